"""The GEMM-based CUDA kernels (convolution, linear) against the NumPy reference.

Under the simulator every launch runs its blocks' 256 threads as Python threads, so the
shapes here are tiny (1-9 blocks per launch) but chosen to hit every edge of the tiling:
sizes that are not multiples of the 128x128 block tile or of the K tile of 8, more than one
block along M and along N, odd sizes, 1x1 and non-square kernels, stride larger than the
kernel, padding 0/1/2, groups 1/2/4, batch 1 and 3, the fused ReLU, split-K in the conv
weight gradient and in the linear forward (with the separate bias + ReLU pass) and
backward-data.  The AlexNet-shaped cases need a real GPU.
"""

import numpy as np
import pytest
from numba import cuda
from conftest import requires_gpu

from nbalex.cuda import conv2d as cuda_conv
from nbalex.cuda import gemm, tiling
from nbalex.cuda import linear as cuda_linear
from nbalex.reference import conv2d as ref_conv
from nbalex.reference import linear as ref_linear


def assert_close(got, want, rtol=1e-4):
    """float32 kernel result vs float64 reference, error scaled to the result's size."""
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def conv_case(rng, n, c, h, w, f, kh, kw, stride, pad, groups, relu):
    """Run the three CUDA conv launchers and compare with the reference in float64."""
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((f, c // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    dy = rng.standard_normal((n, f, oh, ow)).astype(np.float32)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, wt, b, dy))

    y = np.full((n, f, oh, ow), np.nan, np.float32)
    cuda_conv.conv2d_forward(y, x, wt, b, stride, pad, groups, relu=relu)
    y_ref = np.empty(y.shape)
    ref_conv.conv2d_forward(y_ref, x64, w64, b64, stride, pad, groups, relu=relu)
    assert_close(y, y_ref)

    dx = np.full(x.shape, np.nan, np.float32)
    cuda_conv.conv2d_backward_data(dx, dy, wt, stride, pad, groups)
    dx_ref = np.empty(x.shape)
    ref_conv.conv2d_backward_data(dx_ref, dy64, w64, stride, pad, groups)
    assert_close(dx, dx_ref)

    dw = np.full(wt.shape, np.nan, np.float32)
    db = np.full(b.shape, np.nan, np.float32)
    cuda_conv.conv2d_backward_weights(dw, db, dy, x, stride, pad, groups)
    dw_ref, db_ref = np.empty(wt.shape), np.empty(b.shape)
    ref_conv.conv2d_backward_weights(dw_ref, db_ref, dy64, x64, stride, pad, groups)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)


CONV_CASES = [
    # n, c, h, w, f, kh, kw, stride, pad, groups, relu
    pytest.param(3, 4, 7, 6, 4, 3, 2, 2, 2, 2, False, id="odd-batch3-stride2-pad2-groups2"),
    pytest.param(1, 4, 6, 5, 8, 1, 1, 3, 0, 4, True, id="1x1-stride3-groups4"),
    pytest.param(3, 3, 7, 7, 2, 3, 3, 1, 1, 1, True, id="3x3-pad1-two-blocks-along-n-k-tail"),
    pytest.param(1, 130, 3, 2, 2, 1, 1, 1, 0, 1, True, id="two-blocks-along-m-and-n"),
]


@pytest.mark.parametrize("n, c, h, w, f, kh, kw, stride, pad, groups, relu", CONV_CASES)
def test_conv2d_matches_reference(rng, n, c, h, w, f, kh, kw, stride, pad, groups, relu):
    conv_case(rng, n, c, h, w, f, kh, kw, stride, pad, groups, relu)


def test_conv2d_backward_weights_split_k(rng, monkeypatch):
    """Several K slices, summed from the workspace, give the same gradient as one."""
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 3)
    splits, k_split = cuda_conv.backward_weights_splits((2, 2, 6, 6), (3, 2, 3, 3), 1, 1, 1)
    total = 2 * 6 * 6                       # the reduction runs over N*OH*OW
    assert splits == 3 and k_split % gemm.BK == 0
    assert (splits - 1) * k_split < total <= splits * k_split   # every slice holds work
    conv_case(rng, 2, 2, 6, 6, 3, 3, 3, 1, 1, 1, False)


def test_conv2d_workspace_holds_the_split_k_slices():
    """conv1's backward-weights at batch 128 is a 3-block grid, so it is split; the workspace
    holds one (dw, db) per slice.  A grid that fills the GPU needs none."""
    x_shape, w_shape = (128, 3, 227, 227), (96, 3, 11, 11)
    splits, _ = cuda_conv.backward_weights_splits(x_shape, w_shape, 4, 0, 1)
    assert splits > 1
    shape = tiling.conv_gemm("backward-weights", x_shape, w_shape, 4, 0, 1)
    largest = max(tiling.gemm_tiling(shape, sms).splits for sms in tiling.TABLE_SM_COUNTS)
    assert largest >= splits and largest > tiling.gemm_tiling(shape, 114).splits
    size = cuda_conv.conv2d_workspace_size(x_shape, w_shape, 4, 0, 1)
    assert size == largest * (96 * 3 * 11 * 11 + 96)           # any card of the table fits
    assert size * 4 < 32 * 2**20                            # tens of MB at most
    assert cuda_conv.conv2d_workspace_size((1, 2048, 4, 4), (2048, 2048, 1, 1), 1, 0, 1) == 0


def test_conv2d_split_k_uses_the_given_workspace_deterministically(rng, monkeypatch):
    """With a workspace (filled with NaN first) the split backward-weights writes every slice
    before summing them, gives the reference's gradient, and the same bits twice; a short
    workspace is refused."""
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 3)
    args = (1, 1, 1)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    size = cuda_conv.conv2d_workspace_size(x.shape, (3, 2, 3, 3), *args)
    assert size == 3 * (3 * 2 * 3 * 3 + 3)
    results = []
    for _ in range(2):
        ws = cuda.to_device(np.full(size, np.nan, np.float32))
        dw, db = np.empty((3, 2, 3, 3), np.float32), np.empty(3, np.float32)
        cuda_conv.conv2d_backward_weights(dw, db, dy, x, *args, workspace=ws)
        assert not np.isnan(ws.copy_to_host()).any()
        results.append((dw, db))
    dw_ref, db_ref = np.empty((3, 2, 3, 3)), np.empty(3)
    ref_conv.conv2d_backward_weights(dw_ref, db_ref, dy.astype(np.float64), x.astype(np.float64),
                                     *args)
    assert_close(results[0][0], dw_ref)
    assert_close(results[0][1], db_ref)
    assert all(np.array_equal(a, b) for a, b in zip(results[0], results[1]))
    with pytest.raises(ValueError, match="workspace"):
        cuda_conv.conv2d_backward_weights(dw, db, dy, x, *args,
                                          workspace=cuda.to_device(np.zeros(size - 1, np.float32)))


def test_conv2d_launchers_check_preconditions():
    x = np.zeros((1, 4, 5, 5), np.float32)
    w = np.zeros((2, 2, 3, 3), np.float32)
    b = np.zeros(2, np.float32)
    y = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="float32"):
        cuda_conv.conv2d_forward(y, x.astype(np.float64), w, b, 1, 0, 2)
    with pytest.raises(ValueError, match="shape"):
        cuda_conv.conv2d_forward(np.zeros((1, 2, 4, 4), np.float32), x, w, b, 1, 0, 2)
    with pytest.raises(ValueError, match="groups"):
        cuda_conv.conv2d_forward(y, x, w, b, 1, 0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        cuda_conv.conv2d_backward_data(np.zeros((1, 5, 5, 4), np.float32).transpose(0, 3, 1, 2),
                                       y, w, 1, 0, 2)
    with pytest.raises(ValueError, match="larger than"):
        cuda_conv.conv2d_backward_weights(np.zeros((2, 2, 7, 7), np.float32), b, y, x, 1, 0, 2)


def linear_case(rng, n, m, k, relu):
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    dy = rng.standard_normal((n, m)).astype(np.float32)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))

    y = np.full((n, m), np.nan, np.float32)
    cuda_linear.linear_forward(y, x, w, b, relu=relu)
    y_ref = np.empty((n, m))
    ref_linear.linear_forward(y_ref, x64, w64, b64, relu=relu)
    assert_close(y, y_ref)

    dx = np.full((n, k), np.nan, np.float32)
    cuda_linear.linear_backward_data(dx, dy, w)
    dx_ref = np.empty((n, k))
    ref_linear.linear_backward_data(dx_ref, dy64, w64)
    assert_close(dx, dx_ref)

    dw = np.full((m, k), np.nan, np.float32)
    db = np.full(m, np.nan, np.float32)
    cuda_linear.linear_backward_weights(dw, db, dy, x)
    dw_ref, db_ref = np.empty((m, k)), np.empty(m)
    ref_linear.linear_backward_weights(dw_ref, db_ref, dy64, x64)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)


@pytest.mark.parametrize("n, m, k, relu", [
    pytest.param(3, 5, 7, True, id="tiny-relu"),
    pytest.param(5, 130, 17, False, id="two-blocks-k-tail"),
])
def test_linear_matches_reference(rng, n, m, k, relu):
    linear_case(rng, n, m, k, relu)


def test_linear_split_k_matches_reference(rng, monkeypatch):
    """Forward (bias + ReLU while the slices are summed) and backward-data with K cut into
    slices that are not multiples of each other, give the reference's result."""
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 2)
    n, m, k = 3, 37, 45
    splits, k_split = cuda_linear.split_k("forward", n, k, m)        # reduction over K
    assert splits == 3 and k_split % gemm.BK == 0 and k % k_split != 0
    assert (splits - 1) * k_split < k <= splits * k_split       # every slice holds work
    splits, k_split = cuda_linear.split_k("backward-data", n, k, m)  # over M
    assert splits == 2 and k_split % gemm.BK == 0 and m % k_split != 0
    linear_case(rng, n, m, k, True)


def test_linear_split_k_uses_the_given_workspace_deterministically(rng, monkeypatch):
    """linear_workspace_size covers both split passes; with a NaN-filled workspace the results
    match the reference and repeat bit for bit; a short workspace is refused."""
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 2)
    n, m, k = 3, 37, 45
    size = cuda_linear.linear_workspace_size((n, k), (m, k))
    assert size == max(3 * n * m, 2 * n * k)
    x, w, b, dy = (rng.standard_normal(s).astype(np.float32) for s in ((n, k), (m, k), (m,), (n, m)))
    outs = []
    for _ in range(2):
        ws = cuda.to_device(np.full(size, np.nan, np.float32))
        y, dx = np.empty((n, m), np.float32), np.empty((n, k), np.float32)
        cuda_linear.linear_forward(y, x, w, b, relu=True, workspace=ws)
        cuda_linear.linear_backward_data(dx, dy, w, workspace=ws)
        outs.append((y, dx))
    assert_close(outs[0][0], np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b, 0))
    assert_close(outs[0][1], dy.astype(np.float64) @ w.astype(np.float64))
    assert all(np.array_equal(a, b) for a, b in zip(outs[0], outs[1]))
    with pytest.raises(ValueError, match="workspace"):
        cuda_linear.linear_forward(y, x, w, b, workspace=cuda.to_device(np.zeros(3 * n * m - 1,
                                                                                 np.float32)))
    assert cuda_linear.linear_workspace_size((2048, 9216), (4096, 9216)) == 0


def test_linear_split_k_only_for_small_grids():
    """fc6-fc8 at batch 128 are split to about 2 blocks' worth of threads per SM, slices of
    at least MIN_SPLIT_TILES K tiles each; a grid that fills the GPU is left whole."""
    for n, k, m, pass_name in [(128, 9216, 4096, "forward"), (128, 4096, 4096, "forward"),
                               (128, 4096, 1000, "forward"), (128, 9216, 4096, "backward-data")]:
        t = tiling.gemm_tiling(tiling.linear_gemm(pass_name, n, k, m), gemm.sm_count())
        inner = t.shape.k
        assert (t.splits, t.k_split) == cuda_linear.split_k(pass_name, n, k, m)
        assert t.splits > 1 and gemm.sm_count() * 256 <= t.blocks * t.threads
        assert t.blocks * t.threads <= 2 * gemm.sm_count() * 256
        assert t.k_split >= tiling.MIN_SPLIT_TILES * gemm.BK
        assert (t.splits - 1) * t.k_split < inner <= t.splits * t.k_split
    assert cuda_linear.split_k("forward", 2048, 9216, 4096) == (1, 9216)
    assert cuda_linear.split_k("forward", 128, 64, 4096) == (1, 64)     # too short to cut


# ---- every smaller tile instance, once per pass kernel, at tiny awkward shapes --------------

SMALL_TILES = [t for t in tiling.TILES if t != (gemm.BM, gemm.BN)]


def force_tile(monkeypatch, tile):
    """Launch every GEMM at ``tile`` where its kernel is built at it (else at 128x128)."""
    monkeypatch.setattr(tiling, "TILES", (tile,))


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_conv2d_tile_instances_match_reference(rng, monkeypatch, tile):
    """Partial tiles along M and N, a K tail (K = 18), padding; stride 1 runs the unit-stride
    backward-data kernel.  Only the passes built at ``tile`` are run."""
    force_tile(monkeypatch, tile)
    x_shape, w_shape = (2, 3, 5, 4), (5, 3, 3, 2)
    fwd = tiling.gemm_tiling(tiling.conv_gemm("forward", x_shape, w_shape, 1, 1, 1))
    assert (fwd.bm, fwd.bn) == tile
    built = [p for p in ("backward-data", "backward-weights")
             if tile in tiling.conv_gemm(p, x_shape, w_shape, 1, 1, 1).tiles]
    if len(built) == 2:
        conv_case(rng, 2, 3, 5, 4, 5, 3, 2, 1, 1, 1, True)
        return
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    y = np.full((2, 5, 5, 5), np.nan, np.float32)
    cuda_conv.conv2d_forward(y, x, w, b, 1, 1, 1, relu=True)
    y_ref = np.empty(y.shape)
    ref_conv.conv2d_forward(y_ref, *(a.astype(np.float64) for a in (x, w, b)), 1, 1, 1, relu=True)
    assert_close(y, y_ref)


@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_linear_tile_instances_match_reference(rng, monkeypatch, tile):
    """Every fc kernel at ``tile``: forward, backward-data and backward-weights unsplit (K
    tails, partial tiles), then forward and backward-data split into slices."""
    force_tile(monkeypatch, tile)
    t = tiling.gemm_tiling(tiling.linear_gemm("backward-weights", 3, 7, 5))
    assert (t.bm, t.bn) == tile
    linear_case(rng, 3, 5, 7, True)
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 2)
    n, m, k = 3, 37, 45
    assert cuda_linear.split_k("forward", n, k, m)[0] > 1
    assert cuda_linear.split_k("backward-data", n, k, m)[0] > 1
    x, w, b, dy = (rng.standard_normal(s).astype(np.float32) for s in ((n, k), (m, k), (m,), (n, m)))
    y, dx = np.empty((n, m), np.float32), np.empty((n, k), np.float32)
    cuda_linear.linear_forward(y, x, w, b, relu=True)
    cuda_linear.linear_backward_data(dx, dy, w)
    assert_close(y, np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b, 0))
    assert_close(dx, dy.astype(np.float64) @ w.astype(np.float64))


def test_linear_launchers_check_preconditions():
    x = np.zeros((2, 3), np.float32)
    w = np.zeros((4, 3), np.float32)
    b = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="shape"):
        cuda_linear.linear_forward(np.zeros((2, 3), np.float32), x, w, b)
    with pytest.raises(ValueError, match="shape"):
        cuda_linear.linear_forward(np.zeros((2, 4), np.float32), x, np.zeros((4, 5), np.float32), b)
    with pytest.raises(ValueError, match="float32"):
        cuda_linear.linear_backward_data(x, np.zeros((2, 4), np.float64), w)
    with pytest.raises(ValueError, match="contiguous"):
        cuda_linear.linear_backward_weights(np.zeros((3, 4), np.float32).T, b,
                                            np.zeros((2, 4), np.float32), x)


def test_magic_divider_is_exact():
    """(n * magic) >> shift == n // d over the whole int32 range's awkward corners."""
    rng = np.random.default_rng(7)
    big = 2 ** 31 - 1
    n = np.concatenate([np.arange(0, 5000), rng.integers(0, big, 20000), big - np.arange(100)])
    for d in list(range(1, 300)) + [387200, 3025, 46225, 2 ** 20 + 7, big]:
        magic, shift = gemm.magic_divider(d)
        assert magic < 2 ** 32
        got = (n.astype(object) * magic) >> shift
        assert np.array_equal(got.astype(np.int64), n // d), d


# ---- AlexNet's shapes, on a real GPU ------------------------------------------------------

ALEXNET_CONVS = [
    # name, (C, H), (F, K, stride, pad, groups)
    pytest.param(3, 227, 96, 11, 4, 0, 1, id="conv1"),
    pytest.param(96, 27, 256, 5, 1, 2, 2, id="conv2"),
    pytest.param(256, 13, 384, 3, 1, 1, 1, id="conv3"),
    pytest.param(384, 13, 384, 3, 1, 1, 2, id="conv4"),
    pytest.param(384, 13, 256, 3, 1, 1, 2, id="conv5"),
]


@requires_gpu
@pytest.mark.parametrize("c, size, f, k, stride, pad, groups", ALEXNET_CONVS)
def test_conv2d_alexnet_layer(rng, c, size, f, k, stride, pad, groups):
    conv_case(rng, 128, c, size, size, f, k, k, stride, pad, groups, True)


@requires_gpu
@pytest.mark.parametrize("k, m", [pytest.param(9216, 4096, id="fc6"),
                                  pytest.param(4096, 4096, id="fc7"),
                                  pytest.param(4096, 1000, id="fc8")])
def test_linear_alexnet_layer(rng, k, m):
    linear_case(rng, 128, m, k, True)
