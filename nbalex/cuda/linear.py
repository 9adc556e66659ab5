"""Fully-connected layers on the GPU: the three GEMMs of a linear layer on the register-blocked
tile of :mod:`nbalex.cuda.gemm`, plus the bias-gradient reduction.

Shapes: x (N, K), w (M, K), b (M,), y (N, M).  With the GEMM's C[i, j] = sum_k A[i, k] B[k, j]:

* forward:          C = y,  A[i, k] = x[i, k],   B[k, j] = w[j, k]    (M_gemm = N, N_gemm = M)
* backward-data:    C = dx, A[i, m] = dy[i, m],  B[m, j] = w[m, j]    (N x K, inner M)
* backward-weights: C = dw, A[i, n] = dy[n, i],  B[n, j] = x[n, j]    (M x K, inner N)

The GEMM's columns are always the contiguous index of C, so stores coalesce.  Every operand
is a plain strided row, read by :func:`nbalex.cuda.gemm.fetch_strided`.  ``geo`` is
``(N, M, K, relu)`` as int64.
"""

from numba import cuda, float32, int32, uint64

from nbalex.cuda import gemm
from nbalex.cuda.gemm import K_FAST, ROW_FAST, fetch_strided
from nbalex.cuda.launch import check_array, check_ndim, flat, stream_or_default

G_N, G_M, G_K, G_RELU = range(4)
GEO_SIG = "UniTuple(int64, 4)"
BIAS_THREADS = 256


@cuda.jit(device=True, inline="always")
def reduce_over_m(geo, z):
    """backward-data: the reduction runs over the M output features."""
    return 0, geo[G_M]


@cuda.jit(device=True, inline="always")
def reduce_over_k(geo, z):
    """forward: over the K input features."""
    return 0, geo[G_K]


@cuda.jit(device=True, inline="always")
def reduce_over_n(geo, z):
    """backward-weights: over the N batch rows."""
    return 0, geo[G_N]


# ---- operand loaders and stores, by the geo slots they read --------------------------------

def rows_of(rows, length):
    """Loader setup for row i of a row-major (geo[rows], geo[length]) matrix, read along the
    row (k contiguous): state (offset of element [i, 0], i < geo[rows])."""
    @cuda.jit(device=True, inline="always")
    def setup_row(src, geo, z, i):
        return (int32(i * geo[length]), i < geo[rows])
    return setup_row


def columns_of(cols):
    """Loader setup for column j of a row-major matrix with geo[cols] columns, read down the
    column: state (offset of element [0, j], j < geo[cols])."""
    @cuda.jit(device=True, inline="always")
    def setup_column(src, geo, z, j):
        return (int32(j), j < geo[cols])
    return setup_column


@cuda.jit(device=True, inline="always")
def fetch_unit_stride(src, geo, st, k, step, k_end, buf):
    """Loader fetch along a row (consecutive k are neighbours)."""
    fetch_strided(src, st[0], 1, st[1], k, step, k_end, buf)


def fetch_at_stride(stride):
    """Loader fetch down a column: consecutive k are geo[stride] apart."""
    @cuda.jit(device=True, inline="always")
    def fetch_column(src, geo, st, k, step, k_end, buf):
        fetch_strided(src, st[0], geo[stride], st[1], k, step, k_end, buf)
    return fetch_column


def store_into(rows, cols):
    """GEMM store for a plain row-major (geo[rows], geo[cols]) output: out[i, j] = v."""
    @cuda.jit(device=True, inline="always")
    def store_element(out, unused, geo, z, i, j, v):
        if i < geo[rows] and j < geo[cols]:
            out[uint64(int32(i * geo[cols] + j))] = v
    return store_element


# ---- forward: y = x @ w.T + b ------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def fwd_store_y(y, b, geo, z, i, j, v):
    """y[i, j] = v + b[j], ReLU'd when asked."""
    if i < geo[G_N] and j < geo[G_M]:
        v += b[uint64(j)]
        if geo[G_RELU] != 0 and v < float32(0.0):
            v = float32(0.0)
        y[uint64(int32(i * geo[G_M] + j))] = v


linear_forward_kernel, GEMM_THREADS = gemm.make_gemm_kernel(
    rows_of(G_N, G_K), fetch_unit_stride, K_FAST,        # A = x: row i is x[i, :]
    rows_of(G_M, G_K), fetch_unit_stride, K_FAST,        # B = w.T: column j is w[j, :]
    reduce_over_k, fwd_store_y, name="linear_forward_kernel")
linear_forward_kernel.__doc__ = """y = x @ w.T + b (ReLU'd if geo[G_RELU]).

    y (N*M,) written, x (N*K,), w (M*K,), b (M,): flat float32.  Grid (ceil(M/128),
    ceil(N/128)), 256 threads; each thread computes 8 rows x 8 features of y.
    """


# ---- backward data: dx = dy @ w -----------------------------------------------------------

linear_backward_data_kernel, _ = gemm.make_gemm_kernel(
    rows_of(G_N, G_M), fetch_unit_stride, K_FAST,        # A = dy: row i is dy[i, :]
    columns_of(G_K), fetch_at_stride(G_K), ROW_FAST,     # B = w: column j is w[:, j]
    reduce_over_m, store_into(G_N, G_K), name="linear_backward_data_kernel",
    min_blocks=1)  # at 128 registers (2 blocks/SM) ptxas spills a few bytes here
linear_backward_data_kernel.__doc__ = """dx = dy @ w.

    dx (N*K,) written, dy (N*M,), w (M*K,), flat float32; the 4th argument is unused (pass
    w).  Grid (ceil(K/128), ceil(N/128)), 256 threads; each thread computes 8x8 of dx.
    """


# ---- backward weights: dw = dy.T @ x ------------------------------------------------------

linear_backward_weights_kernel, _ = gemm.make_gemm_kernel(
    columns_of(G_M), fetch_at_stride(G_M), ROW_FAST,     # A = dy.T: row i is dy[:, i]
    columns_of(G_K), fetch_at_stride(G_K), ROW_FAST,     # B = x: column j is x[:, j]
    reduce_over_n, store_into(G_M, G_K), name="linear_backward_weights_kernel")
linear_backward_weights_kernel.__doc__ = """dw = dy.T @ x.

    dw (M*K,) written, dy (N*M,), x (N*K,), flat float32; the 4th argument is unused (pass
    dy).  Grid (ceil(K/128), ceil(M/128)), 256 threads; each thread computes 8x8 of dw.
    """


@cuda.jit
def linear_bias_grad_kernel(db, dy, n_rows, m_cols):
    """db[j] = sum_i dy[i, j]: thread j of the grid sums column j (reads coalesce along j).

    dy (N*M,) flat float32, db (M,) written; threads past M do nothing.
    """
    j = cuda.grid(1)
    if j < m_cols:
        total = float32(0.0)
        for i in range(n_rows):
            total += dy[i * m_cols + j]
        db[j] = total


_GEMM_SIG = "void(float32[::1], float32[::1], float32[::1], float32[::1], " + GEO_SIG + ")"
STATIC_SIGNATURES = [
    (linear_forward_kernel, _GEMM_SIG, True, GEMM_THREADS),
    (linear_backward_data_kernel, _GEMM_SIG, True, GEMM_THREADS),
    (linear_backward_weights_kernel, _GEMM_SIG, True, GEMM_THREADS),
    (linear_bias_grad_kernel, "void(float32[::1], float32[::1], int64, int64)", False,
     BIAS_THREADS),
]


# ---- launchers ----------------------------------------------------------------------------

def _grid(rows, cols):
    bm, bn = gemm.BM, gemm.BN
    return (gemm.cdiv(cols, bn), gemm.cdiv(rows, bm), 1)


def _check_operands(a_name, a, b_name, b):
    """Both 2-D, float32 and C-contiguous; return their shapes."""
    check_array(a_name, a)
    check_array(b_name, b)
    check_ndim(a_name, a, 2)
    check_ndim(b_name, b, 2)
    return a.shape, b.shape


def _check_sizes(n, m, k):
    if n < 1 or m < 1 or k < 1:
        raise ValueError(f"linear layer sizes must be positive, got N={n}, M={m}, K={k}")
    if max(n * m, n * k, m * k) >= 2 ** 31:
        raise ValueError("linear layer tensors must have fewer than 2**31 elements")


def linear_forward(y, x, w, b, relu=False, stream=None):
    """y (N,M) = x (N,K) @ w (M,K).T + b (M,), ReLU'd when ``relu``; y is overwritten."""
    (n, k), (m, _) = _check_operands("x", x, "w", w)
    check_array("w", w, shape=(m, k))
    check_array("b", b, shape=(m,))
    check_array("y", y, shape=(n, m))
    _check_sizes(n, m, k)
    geo = (n, m, k, int(bool(relu)))
    linear_forward_kernel[_grid(n, m), GEMM_THREADS, stream_or_default(stream)](
        flat(y), flat(x), flat(w), b, geo)


def linear_backward_data(dx, dy, w, stream=None):
    """dx (N,K) = dy (N,M) @ w (M,K); dx is overwritten."""
    (n, m), (_, k) = _check_operands("dy", dy, "w", w)
    check_array("w", w, shape=(m, k))
    check_array("dx", dx, shape=(n, k))
    _check_sizes(n, m, k)
    linear_backward_data_kernel[_grid(n, k), GEMM_THREADS, stream_or_default(stream)](
        flat(dx), flat(dy), flat(w), flat(w), (n, m, k, 0))


def linear_backward_weights(dw, db, dy, x, stream=None):
    """dw (M,K) = dy.T @ x and db (M,) = dy summed over the batch; both overwritten."""
    (n, m), (_, k) = _check_operands("dy", dy, "x", x)
    check_array("x", x, shape=(n, k))
    check_array("dw", dw, shape=(m, k))
    check_array("db", db, shape=(m,))
    _check_sizes(n, m, k)
    stream = stream_or_default(stream)
    linear_backward_weights_kernel[_grid(m, k), GEMM_THREADS, stream](
        flat(dw), flat(dy), flat(x), flat(dy), (n, m, k, 0))
    threads = min(BIAS_THREADS, 32 * gemm.cdiv(m, 32))
    linear_bias_grad_kernel[gemm.cdiv(m, threads), threads, stream](
        db, flat(dy), n, m)
