"""2-D convolution with groups on the GPU: forward, backward-data and backward-weights as
implicit GEMMs on the register-blocked tile of :mod:`nbalex.cuda.gemm`.

No im2col matrix is ever written: the operand loaders (:mod:`nbalex.cuda.conv2d_loaders`)
gather each K tile straight from ``x``, ``w`` or ``dy`` while it is being loaded into shared
memory.  Only backward-weights' split-K slices need a workspace
(:func:`conv2d_workspace_size`).  Per group g (``blockIdx.z``), with ``Cg = C/groups``,
``Fg = F/groups``, ``P = OH*OW``:

* forward:          C[f, (n,oh,ow)] = sum_{(c,kh,kw)} w[g*Fg+f, c, kh, kw] * x[n, g*Cg+c, oh*s-pad+kh, ow*s-pad+kw]
                    M = Fg, N = batch*P, K = Cg*KH*KW; epilogue adds b[f] and applies ReLU.
* backward-data:    C[c, (n,h,w)] = sum_{(f,kh,kw)} w[g*Fg+f, c, kh, kw] * dy[n, g*Fg+f, oh, ow]
                    with oh = (h+pad-kh)/s, ow = (w+pad-kw)/s where both divide exactly and lie
                    in range (zero otherwise).  M = Cg, N = batch*H*W, K = Fg*KH*KW.
* backward-weights: C[f, (c,kh,kw)] = sum_{(n,oh,ow)} dy[n, g*Fg+f, oh, ow] * x[n, g*Cg+c, oh*s-pad+kh, ow*s-pad+kw]
                    M = Fg, N = Cg*KH*KW, K = batch*P.  K is huge and M*N small, so K is split
                    over ``blockIdx.z = g + groups*split``: each slice writes its partial dw
                    and db into its own slice of the workspace, and a pass sums the slices in
                    order (deterministic, unlike atomics).  ``db`` comes out of the same GEMM:
                    im2col(x) gets an extra column of ones, whose column of C is sum(dy) = db.

Index decoding inside the K loop uses :func:`nbalex.cuda.gemm.fast_div` (multiply + shift)
with divisors prepared on the host in the geometry tuple
:func:`nbalex.cuda.conv2d_loaders.conv_geometry`.
"""

from nbalex import checks
from nbalex.cuda import gemm, tiling
from nbalex.cuda.conv2d_loaders import (
    GEO_SIG, conv_geometry,
    fwd_krange, fwd_setup_w, fwd_fetch_w, fwd_setup_x, fwd_fetch_x, fwd_store_y,
    bwd_data_krange, bwd_data_setup_w, bwd_data_fetch_w, bwd_data_setup_dy, bwd_data_fetch_dy,
    bwd_data_fetch_dy_unit_stride, bwd_data_store_dx,
    bwd_w_krange, bwd_w_setup_dy, bwd_w_fetch_dy, bwd_w_setup_x, bwd_w_fetch_x, bwd_w_store_dw)
from nbalex.cuda.gemm import K_FAST
from nbalex.cuda.launch import flat, stream_or_default


# ---- kernels: one GEMM per pass, built from that pass's loaders, one instance per tile -------
# {(bm, bn): (kernel, threads)}: the 128x128 instance is named as the pass (e.g.
# conv_forward_kernel), the others with their tile (conv_forward_kernel_64x128);
# nbalex.cuda.tiling.gemm_tiling chooses one per launch.

FORWARD = gemm.make_gemm_kernels(
    fwd_setup_w, fwd_fetch_w, K_FAST, fwd_setup_x, fwd_fetch_x, K_FAST, fwd_krange,
    fwd_store_y, name="conv_forward_kernel", tiles=tiling.CONV_TILES["forward"])
BACKWARD_DATA = gemm.make_gemm_kernels(
    bwd_data_setup_w, bwd_data_fetch_w, K_FAST, bwd_data_setup_dy, bwd_data_fetch_dy, K_FAST,
    bwd_data_krange, bwd_data_store_dx, name="conv_backward_data_kernel",
    tiles=tiling.CONV_TILES["backward-data"])
BACKWARD_DATA_UNIT_STRIDE = gemm.make_gemm_kernels(
    bwd_data_setup_w, bwd_data_fetch_w, K_FAST, bwd_data_setup_dy,
    bwd_data_fetch_dy_unit_stride, K_FAST, bwd_data_krange, bwd_data_store_dx,
    name="conv_backward_data_unit_stride_kernel",
    tiles=tiling.CONV_TILES["backward-data-unit-stride"])
# int32 loader state, no per-thread wrap ends: 128 registers at 128x128, no spills
BACKWARD_WEIGHTS = gemm.make_gemm_kernels(
    bwd_w_setup_dy, bwd_w_fetch_dy, K_FAST, bwd_w_setup_x, bwd_w_fetch_x, K_FAST,
    bwd_w_krange, bwd_w_store_dw, name="conv_backward_weights_kernel",
    tiles=tiling.CONV_TILES["backward-weights"])

# lab:begin conv2d.contracts
_DOCS = {
    "FORWARD": """y = conv(x, w) + b (ReLU'd if geo[G_RELU]) as an implicit GEMM.

    y (N*F*OH*OW,) written, w (F*Cg*KH*KW,), x (N*C*H*W,), b (F,): flat float32, geo from
    conv_geometry.  Grid (ceil(N*OH*OW/bn), ceil(Fg/bm), groups), (bm/8)*(bn/8) threads;
    each thread computes 8 filters x 8 output pixels of its group (see nbalex.cuda.gemm).
    """,
    "BACKWARD_DATA": """dx = conv_transpose(dy, w) as an implicit GEMM over dy.

    dx (N*C*H*W,) written, w (F*Cg*KH*KW,), dy (N*F*OH*OW,), flat float32; the 4th argument
    is unused (pass w).  Grid (ceil(N*H*W/bn), ceil(Cg/bm), groups), (bm/8)*(bn/8)
    threads; each thread computes 8 input channels x 8 input pixels of its group.  Any stride.
    """,
    "BACKWARD_WEIGHTS": """dw = sum over (image, oh, ow) of dy (x) im2col(x),
    and db = the sum of dy, as the GEMM's extra all-ones column of im2col(x).

    dw (splits*F*Cg*KH*KW,) and db (splits*F,) written, K slice s into slice s (with one
    slice: dw and db themselves; with several, the workspace, summed by the launcher),
    dy (N*F*OH*OW,), x (N*C*H*W,), flat float32.
    Grid (ceil((Cg*KH*KW+1)/bn), ceil(Fg/bm), groups*splits), (bm/8)*(bn/8) threads; each
    thread computes 8 filters x 8 (c, kh, kw) taps for its group and K slice.
    """,
}
# lab:end conv2d.contracts
_DOCS["BACKWARD_DATA_UNIT_STRIDE"] = _DOCS["BACKWARD_DATA"].replace("Any stride.",
                                                                    "Stride 1 only (conv2-conv5).")
for _family, _doc in _DOCS.items():
    for _kernel, _ in globals()[_family].values():
        _kernel.__doc__ = _doc
conv_forward_kernel, GEMM_THREADS = FORWARD[(gemm.BM, gemm.BN)]       # the 128x128 instances
conv_backward_data_kernel = BACKWARD_DATA[(gemm.BM, gemm.BN)][0]
conv_backward_data_unit_stride_kernel = BACKWARD_DATA_UNIT_STRIDE[(gemm.BM, gemm.BN)][0]
conv_backward_weights_kernel = BACKWARD_WEIGHTS[(gemm.BM, gemm.BN)][0]

_GEMM_SIG = "void(float32[::1], float32[::1], float32[::1], float32[::1], " + GEO_SIG + ")"
STATIC_SIGNATURES = [row for family in (FORWARD, BACKWARD_DATA, BACKWARD_DATA_UNIT_STRIDE,
                                        BACKWARD_WEIGHTS)
                     for row in gemm.static_signatures(family, _GEMM_SIG)]


# ---- launchers ---------------------------------------------------------------------

def _conv_sizes(x_shape, w_shape, stride, pad, groups):
    """(N, F, OH, OW) of a convolution (rules: nbalex.checks.conv2d_geometry), refusing
    tensors of 2**31 elements or more (the kernels index in int32)."""
    n, c, h, w, f, cg, kh, kw, oh, ow = checks.conv2d_geometry(x_shape, w_shape, stride, pad,
                                                               groups)
    if max(n * c * h * w, n * f * oh * ow, f * cg * kh * kw) >= 2 ** 31:
        raise ValueError("conv2d tensors must have fewer than 2**31 elements")
    return n, f, oh, ow


def _tiled(kernels, pass_name, x_shape, w_shape, stride, pad, groups):
    """(kernel, threads, tiling) of one pass on the current device (gemm.launch_tiling)."""
    return gemm.launch_tiling(kernels, tiling.conv_gemm(pass_name, x_shape, w_shape, stride,
                                                        pad, groups))


@checks.checked(checks.conv2d_workspace_size, "cuda")
def conv2d_workspace_size(x_shape, w_shape, stride, pad, groups):
    """float32 elements of backward-weights' split-K slices: splits x (dw size + F), or 0
    when it does not split (forward and backward-data need none).  ``splits`` is the
    largest over gemm.workspace_sm_counts() (the device, or every card of the plan's table)."""
    shape = tiling.conv_gemm("backward-weights", x_shape, w_shape, stride, pad, groups)
    splits = gemm.largest_split(shape)
    if splits == 1:
        return 0
    f, cg, kh, kw = (int(v) for v in w_shape)
    return splits * (f * cg * kh * kw + f)


@checks.checked(checks.conv2d_forward, "cuda")
def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None):
    """y (N,F,OH,OW) = conv(x, w) + b, ReLU'd when ``relu``; float32, C-contiguous."""
    _conv_sizes(x.shape, w.shape, stride, pad, groups)
    geo = conv_geometry(x.shape, w.shape, stride, pad, groups, relu=relu)
    kernel, threads, t = _tiled(FORWARD, "forward", x.shape, w.shape, stride, pad, groups)
    kernel[t.grid, threads, stream_or_default(stream)](flat(y), flat(w), flat(x), b, geo)


@checks.checked(checks.conv2d_backward_data, "cuda")
def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None):
    """dx (N,C,H,W) = gradient of the convolution w.r.t. x, given dy (N,F,OH,OW); overwritten."""
    _conv_sizes(dx.shape, w.shape, stride, pad, groups)
    geo = conv_geometry(dx.shape, w.shape, stride, pad, groups)
    family = BACKWARD_DATA_UNIT_STRIDE if stride == 1 else BACKWARD_DATA
    kernel, threads, t = _tiled(family, "backward-data", dx.shape, w.shape, stride, pad, groups)
    kernel[t.grid, threads, stream_or_default(stream)](flat(dx), flat(w), flat(dy), flat(w), geo)


def backward_weights_splits(x_shape, w_shape, stride, pad, groups):
    """(splits, k_split): how the N*OH*OW reduction of backward-weights is cut on the current
    device (tiling.gemm_tiling)."""
    t = tiling.gemm_tiling(tiling.conv_gemm("backward-weights", x_shape, w_shape, stride, pad,
                                            groups), gemm.sm_count())
    return t.splits, t.k_split


@checks.checked(checks.conv2d_backward_weights, "cuda")
def conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None):
    """dw (F,C/G,KH,KW) and db (F,) = gradients w.r.t. w and b; both overwritten."""
    n, f, oh, ow = _conv_sizes(x.shape, dw.shape, stride, pad, groups)
    stream = stream_or_default(stream)
    kernel, threads, t = _tiled(BACKWARD_WEIGHTS, "backward-weights", x.shape, dw.shape, stride,
                                pad, groups)
    splits = t.splits
    geo = conv_geometry(x.shape, dw.shape, stride, pad, groups, splits=splits, k_split=t.k_split)
    if splits == 1:
        kernel[t.grid, threads, stream](flat(dw), flat(dy), flat(x), db, geo)
        return
    parts = gemm.split_workspace(workspace, splits * (dw.size + f))   # conv2d_workspace_size
    dw_parts, db_parts = parts[:splits * dw.size], parts[splits * dw.size:]
    kernel[t.grid, threads, stream](dw_parts, flat(dy), flat(x), db_parts, geo)
    gemm.sum_slices(flat(dw), dw_parts, splits, stream)
    gemm.sum_slices(db, db_parts, splits, stream)
