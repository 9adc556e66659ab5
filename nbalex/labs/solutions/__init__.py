"""Solutions of the GEMM ladder's lower rungs, each behind ``sgemm(c, a, b, stream=None)``.

The top of the ladder is the package's own GEMM (``nbalex/cuda/gemm.py``); these are the
steps to it, kept small and plain to teach from: ``gemm_naive`` (one thread per element),
``gemm_tiled`` (shared-memory tiles), ``gemm_register`` (a 4x4 tile per thread in registers).
"""
