"""Numeric kernels. Each has a torch reference (the spec); Triton versions, where they pay off, are tested
against it. Nothing here imports a host framework."""
