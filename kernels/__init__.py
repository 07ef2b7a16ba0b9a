"""sparseq.kernels: Triton kernels and their wrappers (installed as ``sparseq.kernels``).

Nothing is imported eagerly: import a kernel module (e.g. ``sparseq.kernels.int8_mm``) to
compile-on-first-call and register its ``sparseq::<name>_triton`` op.
"""
