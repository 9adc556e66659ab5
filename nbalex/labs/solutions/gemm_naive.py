"""SGEMM, rung 1: one thread per element of C, every operand read from global memory.

Each of the M*N threads reads a row of A and a column of B: 2*K loads per 2*K flops, so the
kernel is bound by memory bandwidth, far from the GPU's arithmetic peak.
"""

# lab:begin gemm_naive.imports
from numba import cuda, float32

from nbalex.cuda.launch import stream_or_default

TILE = 16
"""Threads per block along each axis (16 x 16 = 256)."""
# lab:end gemm_naive.imports


# lab:begin gemm_naive.kernel
@cuda.jit
def sgemm_naive_kernel(c, a, b):
    """c[i, j] = sum_k a[i, k] * b[k, j], summed in k order in float32.

    a (M, K), b (K, N), c (M, N) float32, c written.  A 2-D grid of TILE x TILE blocks
    covering C: the thread at cuda.grid(2) = (x, y) computes row i = y, column j = x
    (adjacent threads take adjacent columns, so the loads of b and the stores are
    coalesced); threads past the edge of C do nothing.
    """
    # lab:end gemm_naive.kernel
    j, i = cuda.grid(2)
    if i < c.shape[0] and j < c.shape[1]:
        acc = float32(0.0)
        for k in range(a.shape[1]):
            acc += a[i, k] * b[k, j]
        c[i, j] = acc


# lab:begin gemm_naive.launchers
STATIC_SIGNATURES = [(sgemm_naive_kernel,
                      "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", True,
                      TILE * TILE)]


def sgemm(c, a, b, stream=None):
    """c = a @ b for float32 a (M, K), b (K, N); c (M, N) is overwritten."""
    m, n = c.shape
    blocks = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    sgemm_naive_kernel[blocks, (TILE, TILE), stream_or_default(stream)](c, a, b)
# lab:end gemm_naive.launchers
