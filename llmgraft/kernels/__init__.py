"""Numeric kernels, in torch: each is the reference (the spec) and the CPU path. GPU paths (Triton) will be
tested against them and picked by device. Nothing here imports a host framework."""
