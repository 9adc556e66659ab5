"""Fully-connected layers on the GPU: the three GEMMs of a linear layer on the register-blocked
tile of :mod:`nbalex.cuda.gemm`, plus the bias-gradient reduction.

Shapes: x (N, K), w (M, K), b (M,), y (N, M).  With the GEMM's C[i, j] = sum_k A[i, k] B[k, j]:

* forward:          C = y,  A[i, k] = x[i, k],   B[k, j] = w[j, k]    (M_gemm = N, N_gemm = M)
* backward-data:    C = dx, A[i, m] = dy[i, m],  B[m, j] = w[m, j]    (N x K, inner M)
* backward-weights: C = dw, A[i, n] = dy[n, i],  B[n, j] = x[n, j]    (M x K, inner N)

The GEMM's columns are always the contiguous index of C, so stores coalesce.  Every operand
is a plain strided row, read by :func:`nbalex.cuda.gemm.fetch_strided`.  ``geo`` is
``(N, M, K, relu, splits, k_split)`` as int64.

Split-K.  At AlexNet's batch of 128 the output tile grids of forward and backward-data are
tiny (fc6 forward: 1 x 32 blocks on a 132-SM H100), so when the grid has fewer blocks than
the GPU has SMs, :func:`split_k` cuts the reduction into ``splits`` slices of ``k_split``
(a multiple of the K tile) over ``blockIdx.z``.  Slice z stores its partial product into
slice z of the ``workspace`` (``linear_workspace_size`` elements: ``splits`` outputs end to
end), and one elementwise pass sums the slices in order into the output, adding the
forward's bias and ReLU on the way: deterministic, unlike atomics, and no zero-fill.  With
one slice the kernels store directly, bias and ReLU fused.  The forward kernel serves both
cases (a run-time switch in its store); backward-data has a separate split kernel, because
the switch makes its unsplit kernel spill.
"""

from numba import cuda, float32, int32, uint64

from nbalex import checks
from nbalex.cuda import gemm, tiling
from nbalex.cuda.gemm import K_FAST, ROW_FAST, fetch_strided
from nbalex.cuda.launch import flat, stream_or_default

G_N, G_M, G_K, G_RELU, G_SPLITS, G_KSPLIT = range(6)
GEO_SIG = "UniTuple(int64, 6)"
BIAS_THREADS = 256


def slice_of(total):
    """krange of split-K slice z of the geo[total]-long reduction, in k relative to the
    slice's start z*k_split (the sliced loader setups below fold that start into their
    offsets, so the K loop runs from 0): [0, min(k_split, geo[total] - z*k_split))."""
    @cuda.jit(device=True, inline="always")
    def k_slice(geo, z):
        left = int32(geo[total] - z * geo[G_KSPLIT])
        return 0, (int32(geo[G_KSPLIT]) if geo[G_KSPLIT] < left else left)
    return k_slice


reduce_over_k = slice_of(G_K)          # forward: over the K input features, maybe split
reduce_over_m_slice = slice_of(G_M)    # split backward-data: over the M output features


@cuda.jit(device=True, inline="always")
def reduce_over_m(geo, z):
    """Unsplit backward-data: over all M output features."""
    return 0, geo[G_M]


@cuda.jit(device=True, inline="always")
def reduce_over_n(geo, z):
    """backward-weights: over the N batch rows, never split."""
    return 0, geo[G_N]


# ---- operand loaders and stores, by the geo slots they read --------------------------------

def rows_of(rows, length, sliced=False):
    """Loader setup for row i of a row-major (geo[rows], geo[length]) matrix, read along the
    row (k contiguous): state (offset of element [i, k0], i < geo[rows]), where k0 is 0, or
    split-K slice z's start z*k_split when ``sliced``."""
    if sliced:
        @cuda.jit(device=True, inline="always")
        def setup_row(src, geo, z, i):
            return (int32(i * geo[length] + z * geo[G_KSPLIT]), i < geo[rows])
    else:
        @cuda.jit(device=True, inline="always")
        def setup_row(src, geo, z, i):
            return (int32(i * geo[length]), i < geo[rows])
    return setup_row


def columns_of(cols, sliced=False):
    """Loader setup for column j of a row-major matrix with geo[cols] columns, read down the
    column: state (offset of element [k0, j], j < geo[cols]), where row k0 is 0, or split-K
    slice z's start z*k_split when ``sliced``."""
    if sliced:
        @cuda.jit(device=True, inline="always")
        def setup_column(src, geo, z, j):
            return (int32(z * geo[G_KSPLIT] * geo[cols] + j), j < geo[cols])
    else:
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


def slice_into(rows, cols):
    """GEMM store of split-K slice z: out is the workspace, slice z of it a row-major
    (geo[rows], geo[cols]) output: out[z, i, j] = v."""
    @cuda.jit(device=True, inline="always")
    def store_in_slice(out, unused, geo, z, i, j, v):
        if i < geo[rows] and j < geo[cols]:
            out[uint64(int32((z * geo[rows] + i) * geo[cols] + j))] = v
    return store_in_slice


# ---- forward: y = x @ w.T + b ------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def fwd_store_y(y, b, geo, z, i, j, v):
    """y[i, j] = v + b[j], ReLU'd when asked; with split-K, y is the workspace and slice z
    gets y[z, i, j] = v (bias and ReLU come later, from linear_sum_bias_relu_kernel)."""
    if i < geo[G_N] and j < geo[G_M]:
        if geo[G_SPLITS] > 1:
            y[uint64(int32((z * geo[G_N] + i) * geo[G_M] + j))] = v
        else:
            v += b[uint64(j)]
            if geo[G_RELU] != 0 and v < float32(0.0):
                v = float32(0.0)
            y[uint64(int32(i * geo[G_M] + j))] = v


FORWARD = gemm.make_gemm_kernels(
    rows_of(G_N, G_K, sliced=True), fetch_unit_stride, K_FAST,   # A = x: row i is x[i, :]
    rows_of(G_M, G_K, sliced=True), fetch_unit_stride, K_FAST,   # B = w.T: column j is w[j, :]
    reduce_over_k, fwd_store_y, name="linear_forward_kernel", tiles=tiling.LINEAR_TILES)
_FORWARD_DOC = """y = x @ w.T + b (ReLU'd if geo[G_RELU]).

    y (N*M,), x (N*K,), w (M*K,), b (M,): flat float32.  Grid (ceil(M/bn), ceil(N/bm),
    splits), (bm/8)*(bn/8) threads; each thread computes 8 rows x 8 features of y over K slice
    blockIdx.z.  One slice: y written, bias and ReLU fused.  Several: the first argument is
    the workspace (splits*N*M,) and slice z's partial product is written to its slice z,
    no bias or ReLU.
    """


# ---- backward data: dx = dy @ w -----------------------------------------------------------

# 128 registers, no spills (141 unbounded): zero-extended load indices
BACKWARD_DATA = gemm.make_gemm_kernels(
    rows_of(G_N, G_M), fetch_unit_stride, K_FAST,        # A = dy: row i is dy[i, :]
    columns_of(G_K), fetch_at_stride(G_K), ROW_FAST,     # B = w: column j is w[:, j]
    reduce_over_m, store_into(G_N, G_K), name="linear_backward_data_kernel", tiles=tiling.LINEAR_TILES)
_BACKWARD_DATA_DOC = """dx = dy @ w.

    dx (N*K,) written, dy (N*M,), w (M*K,), flat float32; the 4th argument is unused (pass
    w).  Grid (ceil(K/bn), ceil(N/bm)), (bm/8)*(bn/8) threads; each thread computes 8x8 of dx.
    """

# A kernel of its own rather than a run-time switch in the one above: folding the slice
# start into the loaders' offsets and switching the store makes that kernel spill 16 bytes
# at 128 registers; this one fits 2 blocks/SM without spills (145 registers unbounded).
BACKWARD_DATA_SPLIT = gemm.make_gemm_kernels(
    rows_of(G_N, G_M, sliced=True), fetch_unit_stride, K_FAST,
    columns_of(G_K, sliced=True), fetch_at_stride(G_K), ROW_FAST,
    reduce_over_m_slice, slice_into(G_N, G_K), name="linear_backward_data_split_kernel", tiles=tiling.LINEAR_TILES)
_BACKWARD_DATA_SPLIT_DOC = """parts[z] = dy[:, slice z] @ w[slice z, :].

    parts (splits*N*K,) the workspace, slice z written, dy (N*M,), w (M*K,), flat float32;
    the 4th argument is unused (pass w).  Grid (ceil(K/bn), ceil(N/bm),
    splits), (bm/8)*(bn/8) threads; each thread computes 8x8 of dx over M rows [z*k_split,
    min((z+1)*k_split, M)), z = blockIdx.z.
    """


# ---- backward weights: dw = dy.T @ x ------------------------------------------------------

BACKWARD_WEIGHTS = gemm.make_gemm_kernels(
    columns_of(G_M), fetch_at_stride(G_M), ROW_FAST,     # A = dy.T: row i is dy[:, i]
    columns_of(G_K), fetch_at_stride(G_K), ROW_FAST,     # B = x: column j is x[:, j]
    reduce_over_n, store_into(G_M, G_K), name="linear_backward_weights_kernel", tiles=tiling.LINEAR_TILES)
_BACKWARD_WEIGHTS_DOC = """dw = dy.T @ x.

    dw (M*K,) written, dy (N*M,), x (N*K,), flat float32; the 4th argument is unused (pass
    dy).  Grid (ceil(K/bn), ceil(M/bm)), (bm/8)*(bn/8) threads; each thread computes 8x8 of dw.
    """

_FAMILIES = ((FORWARD, _FORWARD_DOC), (BACKWARD_DATA, _BACKWARD_DATA_DOC),
             (BACKWARD_DATA_SPLIT, _BACKWARD_DATA_SPLIT_DOC),
             (BACKWARD_WEIGHTS, _BACKWARD_WEIGHTS_DOC))
for _family, _doc in _FAMILIES:
    for _kernel, _ in _family.values():
        _kernel.__doc__ = _doc
linear_forward_kernel, GEMM_THREADS = FORWARD[(gemm.BM, gemm.BN)]     # the 128x128 instances
linear_backward_data_kernel = BACKWARD_DATA[(gemm.BM, gemm.BN)][0]
linear_backward_data_split_kernel = BACKWARD_DATA_SPLIT[(gemm.BM, gemm.BN)][0]
linear_backward_weights_kernel = BACKWARD_WEIGHTS[(gemm.BM, gemm.BN)][0]


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


@cuda.jit
def linear_sum_bias_relu_kernel(y, parts, b, m_cols, splits, relu):
    """y[i, j] = parts[0, i, j] + ... + parts[splits-1, i, j] (in that order) + b[j], then
    max(., 0) when relu != 0: the forward epilogue after a split-K GEMM.

    y (N*M,) written, parts (splits*N*M,) the workspace, b (M,): flat float32; grid-stride
    loop, each thread handling elements i*M + j = its grid index, + grid size, ...
    """
    size = y.shape[0]
    for at in range(cuda.grid(1), size, cuda.gridsize(1)):
        v = parts[at]
        for z in range(1, splits):
            v += parts[z * size + at]
        v += b[at % m_cols]
        if relu != 0 and v < float32(0.0):
            v = float32(0.0)
        y[at] = v


_GEMM_SIG = "void(float32[::1], float32[::1], float32[::1], float32[::1], " + GEO_SIG + ")"
STATIC_SIGNATURES = [row for family, _ in _FAMILIES
                     for row in gemm.static_signatures(family, _GEMM_SIG)] + [
    (linear_bias_grad_kernel, "void(float32[::1], float32[::1], int64, int64)", False,
     BIAS_THREADS),
    (linear_sum_bias_relu_kernel,
     "void(float32[::1], float32[::1], float32[::1], int64, int64, int64)", False, BIAS_THREADS),
]


# ---- launchers ----------------------------------------------------------------------------

def _tiled(kernels, pass_name, n, k, m):
    """(kernel, threads, tiling) of one pass of x (n, k), w (m, k) on the current device."""
    return gemm.launch_tiling(kernels, tiling.linear_gemm(pass_name, n, k, m))


def split_k(pass_name, n, k, m):
    """(splits, k_split) of pass ``pass_name`` of x (n, k), w (m, k) on the current device."""
    t = tiling.gemm_tiling(tiling.linear_gemm(pass_name, n, k, m), gemm.sm_count())
    return t.splits, t.k_split


def _check_sizes(n, m, k):
    """Refuse tensors of 2**31 elements or more (the kernels index in int32)."""
    if max(n * m, n * k, m * k) >= 2 ** 31:
        raise ValueError("linear layer tensors must have fewer than 2**31 elements")


@checks.checked(checks.linear_workspace_size, "cuda")
def linear_workspace_size(x_shape, w_shape):
    """float32 elements for the split-K slices of forward (splits x N*M) or backward-data
    (splits x N*K), whichever is larger; 0 when neither splits.  ``splits`` is the largest
    over gemm.workspace_sm_counts() (the device, or every card of the plan's table)."""
    n, k, m = int(x_shape[0]), int(x_shape[1]), int(w_shape[0])
    fwd_splits = gemm.largest_split(tiling.linear_gemm("forward", n, k, m))
    data_splits = gemm.largest_split(tiling.linear_gemm("backward-data", n, k, m))
    return max(fwd_splits * n * m if fwd_splits > 1 else 0,
               data_splits * n * k if data_splits > 1 else 0)


def _slices(workspace, splits, size):
    """The workspace's first splits*size elements (allocated when None), or None unsplit."""
    return None if splits == 1 else gemm.split_workspace(workspace, splits * size)


@checks.checked(checks.linear_forward, "cuda")
def linear_forward(y, x, w, b, relu=False, workspace=None, stream=None):
    """y (N,M) = x (N,K) @ w (M,K).T + b (M,), ReLU'd when ``relu``; y is overwritten."""
    (n, k), m = x.shape, w.shape[0]
    _check_sizes(n, m, k)
    stream = stream_or_default(stream)
    kernel, threads, t = _tiled(FORWARD, "forward", n, k, m)
    splits, k_split = t.splits, t.k_split
    parts = _slices(workspace, splits, n * m)
    kernel[t.grid, threads, stream](
        flat(y) if parts is None else parts, flat(x), flat(w), b,
        (n, m, k, int(bool(relu)), splits, k_split))
    if parts is not None:
        threads = min(BIAS_THREADS, 32 * gemm.cdiv(y.size, 32))
        linear_sum_bias_relu_kernel[min(gemm.cdiv(y.size, threads), 1024), threads, stream](
            flat(y), parts, b, m, splits, int(bool(relu)))


@checks.checked(checks.linear_backward_data, "cuda")
def linear_backward_data(dx, dy, w, workspace=None, stream=None):
    """dx (N,K) = dy (N,M) @ w (M,K); dx is overwritten."""
    (n, m), k = dy.shape, w.shape[1]
    _check_sizes(n, m, k)
    stream = stream_or_default(stream)
    t = tiling.gemm_tiling(tiling.linear_gemm("backward-data", n, k, m), gemm.sm_count())
    splits, k_split = t.splits, t.k_split
    kernel, threads = (BACKWARD_DATA if splits == 1 else BACKWARD_DATA_SPLIT)[(t.bm, t.bn)]
    parts = _slices(workspace, splits, n * k)
    kernel[t.grid, threads, stream](
        flat(dx) if parts is None else parts, flat(dy), flat(w), flat(w),
        (n, m, k, 0, splits, k_split))
    if parts is not None:
        gemm.sum_slices(flat(dx), parts, splits, stream)


@checks.checked(checks.linear_backward_weights, "cuda")
def linear_backward_weights(dw, db, dy, x, workspace=None, stream=None):
    """dw (M,K) = dy.T @ x and db (M,) = dy summed over the batch; both overwritten."""
    (n, m), k = dy.shape, x.shape[1]
    _check_sizes(n, m, k)
    stream = stream_or_default(stream)
    kernel, threads, t = _tiled(BACKWARD_WEIGHTS, "backward-weights", n, k, m)
    kernel[t.grid, threads, stream](flat(dw), flat(dy), flat(x), flat(dy), (n, m, k, 0, 1, n))
    threads = min(BIAS_THREADS, 32 * gemm.cdiv(m, 32))
    linear_bias_grad_kernel[gemm.cdiv(m, threads), threads, stream](
        db, flat(dy), n, m)
