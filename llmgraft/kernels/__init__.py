"""Numeric kernels. The torch code is each kernel's reference (the spec) and its CPU path; Triton kernels
(``quant_triton``) are checked against it under ``TRITON_INTERPRET=1`` and used on GPUs where a method opts
in. Nothing here imports a host framework."""
