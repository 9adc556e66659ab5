"""SGEMM, rung 3: register blocking.

Each thread computes a TM x TN = 4 x 4 tile of C held in registers: per step kk of a K tile
it reads 4 values of A and 4 of B from shared memory and does 16 multiply-adds, so shared
memory traffic per flop drops fourfold against rung 2.  A block of 8 x 8 threads computes a
32 x 32 tile of C, with K walked in tiles of BK = 8.  The package's GEMM
(``nbalex/cuda/gemm.py``) is the next rung: 8 x 8 per thread, double-buffered tiles,
loads in flight during the multiply-adds, and operand loaders that read A and B straight out
of a layer's arrays.
"""

# lab:begin gemm_register.imports
from numba import cuda, float32

from nbalex.cuda.launch import stream_or_default

BM = 32      # rows of C per block
BN = 32      # columns of C per block
BK = 8       # K depth of a shared tile
TM = 4       # rows of C per thread
TN = 4       # columns of C per thread
THREADS_X = BN // TN            # 8 threads along n
THREADS_Y = BM // TM            # 8 threads along m
THREADS = THREADS_X * THREADS_Y
LOADS = BK * BM // THREADS      # elements of each tile every thread loads (4)
# lab:end gemm_register.imports


# lab:begin gemm_register.kernel
@cuda.jit
def sgemm_register_kernel(c, a, b):
    """c[i, j] = sum_k a[i, k] * b[k, j], summed in k order in float32.

    a (M, K), b (K, N), c (M, N) float32, c written.  Block (bx, by) computes C's BM x BN
    tile at rows by*BM.., columns bx*BN..; thread (tx, ty) owns rows ty*TM + {0..3} and
    columns tx*TN + {0..3} of it, accumulated in a local (register) array.  Per K tile each
    of the THREADS threads loads LOADS elements of A into a_s[k, m] (transposed, so a thread's
    4 rows are adjacent) and LOADS of B into b_s[k, n], zero past the edges; after a barrier
    each step kk reads a 4-value fragment of each and does the 16 multiply-adds of their
    outer product; a second barrier keeps the tiles until all threads are done.  Only the
    final stores are guarded.
    """
    # lab:end gemm_register.kernel
    a_s = cuda.shared.array((BK, BM), float32)
    b_s = cuda.shared.array((BK, BN), float32)
    acc = cuda.local.array((TM, TN), float32)
    a_frag = cuda.local.array(TM, float32)
    b_frag = cuda.local.array(TN, float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * THREADS_X + tx
    m0 = cuda.blockIdx.y * BM
    n0 = cuda.blockIdx.x * BN
    m, n = c.shape
    k_dim = a.shape[1]
    for r in range(TM):
        for s in range(TN):
            acc[r, s] = float32(0.0)
    for k0 in range(0, k_dim, BK):
        for q in range(LOADS):
            e = tid + q * THREADS
            r, kk = e // BK, e % BK                  # A tile: BM rows x BK
            gi, gk = m0 + r, k0 + kk
            a_s[kk, r] = a[gi, gk] if gi < m and gk < k_dim else float32(0.0)
            kk, s = e // BN, e % BN                  # B tile: BK rows x BN
            gk, gj = k0 + kk, n0 + s
            b_s[kk, s] = b[gk, gj] if gk < k_dim and gj < n else float32(0.0)
        cuda.syncthreads()  # the tiles are complete before any thread reads them
        for kk in range(BK):
            for r in range(TM):
                a_frag[r] = a_s[kk, ty * TM + r]
            for s in range(TN):
                b_frag[s] = b_s[kk, tx * TN + s]
            for r in range(TM):
                for s in range(TN):
                    acc[r, s] += a_frag[r] * b_frag[s]
        cuda.syncthreads()  # every thread is done with the tiles before the next load
    for r in range(TM):
        for s in range(TN):
            i, j = m0 + ty * TM + r, n0 + tx * TN + s
            if i < m and j < n:
                c[i, j] = acc[r, s]


# lab:begin gemm_register.launchers
STATIC_SIGNATURES = [(sgemm_register_kernel,
                      "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", True, THREADS)]


def sgemm(c, a, b, stream=None):
    """c = a @ b for float32 a (M, K), b (K, N); c (M, N) is overwritten."""
    m, n = c.shape
    blocks = ((n + BN - 1) // BN, (m + BM - 1) // BM)
    sgemm_register_kernel[blocks, (THREADS_X, THREADS_Y), stream_or_default(stream)](c, a, b)
# lab:end gemm_register.launchers
