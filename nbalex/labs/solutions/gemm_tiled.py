"""SGEMM, rung 2: shared-memory tiles.

A block of TILE x TILE threads computes a TILE x TILE tile of C.  K is walked in
ceil(K/TILE) steps; at each, the block loads one TILE x TILE tile of A and one of B into
shared memory (each thread one element of each), and every thread then reads TILE values of
each from shared memory: each global load now serves TILE multiply-adds instead of one.
"""

# lab:begin gemm_tiled.imports
from numba import cuda, float32

from nbalex.cuda.launch import stream_or_default

TILE = 16
"""Tile edge: a block is TILE x TILE threads and computes a TILE x TILE tile of C."""
# lab:end gemm_tiled.imports


# lab:begin gemm_tiled.kernel
@cuda.jit
def sgemm_tiled_kernel(c, a, b):
    """c[i, j] = sum_k a[i, k] * b[k, j], summed in k order in float32.

    a (M, K), b (K, N), c (M, N) float32, c written.  Block (bx, by) computes the tile of C
    at rows by*TILE.., columns bx*TILE..; thread (tx, ty) = cuda.threadIdx owns
    c[by*TILE + ty, bx*TILE + tx].  Per K step t it loads a[row, t*TILE + tx] and
    b[t*TILE + ty, col] into the shared tiles (0 past the edge of A or B: a partial tile is
    zero-filled), waits for the block, accumulates over the tile, and waits again before
    the next load overwrites it.  Every thread runs every step and every barrier; only the
    final store is guarded.
    """
    # lab:end gemm_tiled.kernel
    a_s = cuda.shared.array((TILE, TILE), float32)
    b_s = cuda.shared.array((TILE, TILE), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.y * TILE + ty
    col = cuda.blockIdx.x * TILE + tx
    m, n = c.shape
    k_dim = a.shape[1]
    acc = float32(0.0)
    for t in range((k_dim + TILE - 1) // TILE):
        ka = t * TILE + tx
        kb = t * TILE + ty
        a_s[ty, tx] = a[row, ka] if row < m and ka < k_dim else float32(0.0)
        b_s[ty, tx] = b[kb, col] if kb < k_dim and col < n else float32(0.0)
        cuda.syncthreads()  # both tiles are complete before any thread reads them
        for kk in range(TILE):
            acc += a_s[ty, kk] * b_s[kk, tx]
        cuda.syncthreads()  # every thread is done with the tiles before the next load
    if row < m and col < n:
        c[row, col] = acc


# lab:begin gemm_tiled.launchers
STATIC_SIGNATURES = [(sgemm_tiled_kernel,
                      "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", True,
                      TILE * TILE)]


def sgemm(c, a, b, stream=None):
    """c = a @ b for float32 a (M, K), b (K, N); c (M, N) is overwritten."""
    m, n = c.shape
    blocks = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    sgemm_tiled_kernel[blocks, (TILE, TILE), stream_or_default(stream)](c, a, b)
# lab:end gemm_tiled.launchers
