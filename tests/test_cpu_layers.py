"""The CPU backend (Numba + BLAS) against the NumPy reference, op by op, at awkward shapes.

Every launcher is called on buffers pre-filled with garbage, so a test also fails when an
output is accumulated into instead of overwritten, or when part of it is left unwritten.
"""

import numpy as np
import pytest

from nbalex import reference as ref
from nbalex.backends import dropout_keep
from nbalex.cpu import (conv2d, conv_strategy, dropout, linear, lrn, maxpool, openblas, relu, sgd,
                        softmax_xent, winograd, workers)

GARBAGE = 7.0


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _garbage_like(a, dtype=None):
    return np.full(a.shape if hasattr(a, "shape") else a, GARBAGE, dtype or np.float32)


def _close(got, want, rtol=1e-4, atol=1e-4):
    """allclose relative to the size of ``want`` (GEMM sums reorder float32 additions)."""
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


# (N, C, H, W, F, K, stride, pad, groups): odd sizes, 1x1, stride > kernel, groups 1/2/4
CONV_CASES = [
    (2, 3, 13, 11, 4, 3, 1, 1, 1),
    (3, 4, 9, 7, 6, 3, 2, 2, 2),
    (2, 8, 7, 7, 8, 1, 1, 0, 4),      # pointwise shortcut, groups 4
    (2, 4, 10, 9, 6, 1, 3, 0, 2),     # 1x1 with stride 3 > kernel: general path
    (3, 8, 11, 11, 8, 2, 3, 1, 4),    # stride > kernel, padded
    (2, 6, 15, 15, 4, 5, 2, 2, 2),
    (1, 3, 23, 23, 5, 11, 4, 0, 1),   # conv1-like
    (2, 5, 13, 13, 6, 3, 1, 1, 1),    # stride 1, 13x13 map: kernel-row path
    (3, 4, 14, 13, 6, 5, 1, 2, 2),    # stride 1, 14x13, 5x5 kernel, grouped: kernel-row path
    (3, 8, 5, 5, 6, 3, 1, 1, 2),      # stride 1, 5x5 map (alexnet-mini conv4-like): im2col
    (1, 6, 5, 5, 4, 3, 1, 1, 1),      # one image, 5x5 map: im2col on the calling thread
    (3, 2, 4, 1, 3, 1, 4, 0, 1),      # one column, stride 4: phases wider than the image
    (4, 4, 13, 15, 6, 3, 1, 1, 2),    # 3x3, 4 images, 13x15: Winograd (odd tiles cropped)
    (5, 3, 16, 14, 4, 3, 1, 0, 1),    # Winograd unpadded (backward data padded 2), 5 images
    (4, 2, 12, 13, 4, 3, 1, 2, 2),    # Winograd padded 2 (backward data unpadded)
]


def _conv_path(case, pass_):
    n, c, h, w, f, k, stride, pad, groups = case
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return conv_strategy.choose(oh, ow, k, k, stride, pad, openblas.gemm is not None, pass_, n)


@pytest.mark.parametrize("pass_", conv_strategy.PASSES)
def test_conv_cases_cover_every_path_the_strategy_can_choose(pass_):
    """Every path choose() returns for a pass is taken by a reference-checked case here."""
    gemm = openblas.gemm is not None
    paths = ({"im2col"} | ({"tap_rows"} if gemm and pass_ != "backward_data" else set())
             | ({"pointwise"} if pass_ != "backward_weights" else set())
             | ({"winograd"} if gemm or pass_ != "backward_weights" else set()))
    assert {_conv_path(case, pass_) for case in CONV_CASES} == paths


@pytest.mark.parametrize("oh,ow,kh,stride,pad,want", [
    (5, 5, 3, 1, 1, ("im2col",) * 3),                         # alexnet-mini conv3-5
    (12, 12, 5, 1, 2, ("im2col",) * 3),                       # alexnet-mini conv2
    (13, 13, 3, 1, 1, ("winograd",) * 3),                     # alexnet conv3-5
    (27, 27, 5, 1, 2, ("tap_rows", "im2col", "tap_rows")),    # alexnet conv2
    (25, 25, 7, 2, 0, ("im2col",) * 3),                       # strided: no kernel-row path
    (7, 7, 1, 1, 0, ("pointwise", "pointwise", "im2col")),
])
def test_conv_strategy_by_shape(oh, ow, kh, stride, pad, want):
    got = tuple(conv_strategy.choose(oh, ow, kh, kh, stride, pad, True, p)
                for p in conv_strategy.PASSES)
    assert got == want
    for p in conv_strategy.PASSES:      # without cblas_sgemm the kernel-row path is never chosen
        assert conv_strategy.choose(oh, ow, kh, kh, stride, pad, False, p) != "tap_rows"
    # ... nor Winograd's backward weights (its GEMMs accumulate through cblas_sgemm's beta)
    assert conv_strategy.choose(oh, ow, kh, kh, stride, pad, False, "backward_weights") != "winograd"
    with pytest.raises(ValueError, match="pass_"):
        conv_strategy.choose(oh, ow, kh, kh, stride, pad, True, "sideways")
    if "winograd" in want:            # a small batch keeps the other paths
        small = conv_strategy.WINOGRAD_BATCH - 1
        assert "winograd" not in {conv_strategy.choose(oh, ow, kh, kh, stride, pad, True, p, small)
                                  for p in conv_strategy.PASSES}


def _conv_arrays(rng, case):
    n, c, h, w, f, k, stride, pad, groups = case
    x = _randn(rng, n, c, h, w)
    wt = _randn(rng, f, c // groups, k, k)
    b = _randn(rng, f)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    dy = _randn(rng, n, f, oh, ow)
    return x, wt, b, dy, stride, pad, groups


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("relu_on", [False, True])
def test_conv2d_forward_matches_reference(rng, case, relu_on):
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, case)
    got, want = _garbage_like(dy), np.empty_like(dy)
    conv2d.conv2d_forward(got, x, wt, b, stride, pad, groups, relu=relu_on)
    ref.conv2d_forward(want, x, wt, b, stride, pad, groups, relu=relu_on)
    _close(got, want)
    if relu_on:
        assert (got >= 0).all() and (got == 0).any()


def _check_backward(x, wt, b, dy, stride, pad, groups, ws):
    """Both backward launchers (garbage-filled outputs, workspace ``ws``) equal the reference."""
    dx, dw, db = _garbage_like(x), _garbage_like(wt), _garbage_like(b)
    conv2d.conv2d_backward_data(dx, dy, wt, stride, pad, groups, workspace=ws)
    conv2d.conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=ws)
    rdx, rdw, rdb = np.empty_like(x), np.empty_like(wt), np.empty_like(b)
    ref.conv2d_backward_data(rdx, dy, wt, stride, pad, groups)
    ref.conv2d_backward_weights(rdw, rdb, dy, x, stride, pad, groups)
    _close(dx, rdx)
    _close(dw, rdw)
    _close(db, rdb)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_matches_reference(rng, case):
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, case)
    ws = np.empty(conv2d.conv2d_workspace_size(x.shape, wt.shape, stride, pad, groups), np.float32)
    _check_backward(x, wt, b, dy, stride, pad, groups, ws)


# One image whose GEMMs count as large (the threshold patched to 0): its filters are shared
# between the workers; splits that cross a group boundary (F=6 in 3 groups, F=7 in 1).
ONE_IMAGE_CASES = [
    (1, 6, 14, 13, 6, 3, 1, 1, 3),    # kernel-row path, 3 groups
    (1, 5, 13, 13, 7, 3, 1, 1, 1),    # kernel-row path, odd filter count
    (1, 3, 23, 23, 5, 11, 4, 0, 1),   # im2col, strided (column phases)
    (1, 6, 9, 9, 6, 3, 1, 1, 3),      # im2col, small map, 3 groups
]


@pytest.mark.parametrize("case", ONE_IMAGE_CASES)
def test_one_image_shares_its_filters_and_matches_reference(rng, case, monkeypatch):
    monkeypatch.setattr(conv_strategy, "THREADED_GEMM_MACS", 0)
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, case)
    ws = np.empty(conv2d.conv2d_workspace_size(x.shape, wt.shape, stride, pad, groups), np.float32)
    y, want = _garbage_like(dy), np.empty_like(dy)
    conv2d.conv2d_forward(y, x, wt, b, stride, pad, groups, relu=True, workspace=ws)
    ref.conv2d_forward(want, x, wt, b, stride, pad, groups)
    _close(y, np.maximum(want, 0))
    _check_backward(x, wt, b, dy, stride, pad, groups, ws)


def test_conv2d_in_several_chunks_matches_one(rng, monkeypatch):
    """A tiny column budget forces one image per chunk: dw is then summed over chunks."""
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, (5, 4, 9, 8, 6, 3, 1, 1, 2))
    outs = []
    for budget in (conv2d.COLS_BUDGET, 1):
        monkeypatch.setattr(conv2d, "COLS_BUDGET", budget)
        y, dx, dw, db = (_garbage_like(a) for a in (dy, x, wt, b))
        conv2d.conv2d_forward(y, x, wt, b, stride, pad, groups, relu=True)
        conv2d.conv2d_backward_data(dx, dy, wt, stride, pad, groups)
        conv2d.conv2d_backward_weights(dw, db, dy, x, stride, pad, groups)
        outs.append((y, dx, dw, db))
    assert conv2d.conv2d_workspace_size(x.shape, wt.shape, 1, 1, 2) > 0
    for one, many in zip(*outs):
        _close(many, one)


def test_winograd_in_several_chunks_matches_reference(rng, monkeypatch):
    """One image per Winograd chunk: each worker's backward weights then accumulate chunk
    after chunk (the GEMMs' beta = 1), and the workspace is sized for that chunk."""
    monkeypatch.setattr(winograd, "CHUNK", 1)
    case = (5, 4, 13, 15, 6, 3, 1, 1, 2)
    want = {"winograd"} if openblas.gemm is not None else {"winograd", "im2col"}
    assert {_conv_path(case, p) for p in conv_strategy.PASSES} == want
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, case)
    ws = np.empty(conv2d.conv2d_workspace_size(x.shape, wt.shape, stride, pad, groups), np.float32)
    _check_backward(x, wt, b, dy, stride, pad, groups, ws)


def test_conv2d_rejects_small_workspace(rng):
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, CONV_CASES[0])
    size = conv2d.conv2d_workspace_size(x.shape, wt.shape, stride, pad, groups)
    with pytest.raises(ValueError):
        conv2d.conv2d_forward(np.empty_like(dy), x, wt, b, stride, pad, groups,
                              workspace=np.empty(size - 1, np.float32))


@pytest.mark.parametrize("relu_on", [False, True])
@pytest.mark.parametrize("n", [1, 5, 12])      # dW as outer products below OUTER_BELOW, a GEMM above
@pytest.mark.parametrize("large", [False, True])   # large: the GEMMs in the workers' shares
def test_linear_matches_reference(rng, relu_on, n, large, monkeypatch):
    k, m = 37, 19
    if large:
        monkeypatch.setattr(linear, "THREADED_WEIGHTS", 0)
    assert linear._shared(n, (m, k)) == (large and n > 1 and workers.WORKERS > 1
                                         and openblas.gemm is not None)
    x, w, b, dy = _randn(rng, n, k), _randn(rng, m, k), _randn(rng, m), _randn(rng, n, m)
    y, want = _garbage_like((n, m)), np.empty((n, m), np.float32)
    linear.linear_forward(y, x, w, b, relu=relu_on)
    ref.linear_forward(want, x, w, b, relu=relu_on)
    _close(y, want)
    dx, dw, db = _garbage_like(x), _garbage_like(w), _garbage_like(b)
    linear.linear_backward_data(dx, dy, w)
    linear.linear_backward_weights(dw, db, dy, x)
    rdx, rdw, rdb = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    ref.linear_backward_data(rdx, dy, w)
    ref.linear_backward_weights(rdw, rdb, dy, x)
    _close(dx, rdx)
    _close(dw, rdw)
    _close(db, rdb)


def test_linear_uses_the_callers_workspace_and_checks_its_size(rng):
    n, k, m = 4, 23, 11
    x, w, b, dy = _randn(rng, n, k), _randn(rng, m, k), _randn(rng, m), _randn(rng, n, m)
    size = linear.linear_workspace_size(x.shape, w.shape)
    assert size == n * max(m, k)
    ws = np.full(size, np.nan, np.float32)
    y, want = np.empty((n, m), np.float32), np.empty((n, m), np.float32)
    linear.linear_forward(y, x, w, b, workspace=ws)
    ref.linear_forward(want, x, w, b)
    _close(y, want)
    _close(ws[:n * m].reshape(m, n).T + b, want)   # y.T went through the workspace
    dx, rdx = np.empty_like(x), np.empty_like(x)
    linear.linear_backward_data(dx, dy, w, workspace=ws)
    ref.linear_backward_data(rdx, dy, w)
    _close(dx, rdx)
    _close(ws[:n * k].reshape(k, n).T, rdx)
    with pytest.raises(ValueError, match="workspace"):
        linear.linear_forward(y, x, w, b, workspace=np.empty(n * m - 1, np.float32))


def test_relu_matches_reference_and_works_in_place(rng):
    x, dy = _randn(rng, 3, 5, 7, 9), _randn(rng, 3, 5, 7, 9)
    y, want = _garbage_like(x), np.empty_like(x)
    relu.relu_forward(y, x)
    ref.relu_forward(want, x)
    np.testing.assert_array_equal(y, want)
    dx, rdx = _garbage_like(x), np.empty_like(x)
    relu.relu_backward(dx, dy, y)
    ref.relu_backward(rdx, dy, want)
    np.testing.assert_array_equal(dx, rdx)
    inplace = x.copy()
    relu.relu_forward(inplace, inplace)
    np.testing.assert_array_equal(inplace, want)


@pytest.mark.parametrize("channels", [1, 2, 4, 5, 6, 11, 70])
@pytest.mark.parametrize("beta", [0.75, 0.6])
@pytest.mark.parametrize("size", [5, 3])
def test_lrn_matches_reference(rng, channels, beta, size):
    """C below, at and above the window (the backward pass's full windows of 5 take a fused
    path), across the backward pass's channel blocks (70 > 2 * CHANNEL_BLOCK); beta 0.75
    takes the pow-free path."""
    assert 2 * lrn.CHANNEL_BLOCK < 70
    alpha, k = 1e-2, 2.0
    x, dy = _randn(rng, 3, channels, 5, 7) * 3, _randn(rng, 3, channels, 5, 7)
    y, scale = _garbage_like(x), _garbage_like(x)
    lrn.lrn_forward(y, scale, x, size, alpha, beta, k)
    ry, rscale = np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(ry, rscale, x, size, alpha, beta, k)
    _close(y, ry, 1e-5, 1e-6)
    _close(scale, rscale, 1e-5, 1e-6)
    dx, rdx = _garbage_like(x), np.empty_like(x)
    lrn.lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k)
    ref.lrn_backward(rdx, dy, x, ry, rscale, size, alpha, beta, k)
    _close(dx, rdx, 1e-5, 1e-6)
    if channels > lrn.CHANNEL_BLOCK:      # a share that starts at image 0's second block
        part, f32, flat = _garbage_like(x), np.float32, (lambda a: a.reshape(3, channels, -1))
        lrn.lrn_backward_kernel(flat(part), flat(dy), flat(x), flat(y), flat(scale), size // 2,
                                f32(alpha), f32(beta), beta == 0.75, 1, 2)
        block = slice(lrn.CHANNEL_BLOCK, 2 * lrn.CHANNEL_BLOCK)
        _close(part[0, block], rdx[0, block], 1e-5, 1e-6)


@pytest.mark.parametrize("size,stride,h,w", [(3, 2, 13, 11), (2, 2, 9, 8), (3, 1, 7, 10),
                                              (3, 2, 27, 27)])
def test_maxpool_matches_reference(rng, size, stride, h, w):
    x = _randn(rng, 2, 3, h, w)
    x[0, 0, :4, :4] = 1.5                                # ties: first in the window wins
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    y, idx = _garbage_like((2, 3, oh, ow)), np.full((2, 3, oh, ow), -1, np.int32)
    maxpool.maxpool_forward(y, idx, x, size, stride)
    ry, ridx = np.empty_like(y), np.empty_like(idx)
    ref.maxpool_forward(ry, ridx, x, size, stride)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    dy = _randn(rng, *y.shape)
    dx, rdx = _garbage_like(x), np.empty_like(x)
    maxpool.maxpool_backward(dx, dy, idx, size, stride)
    ref.maxpool_backward(rdx, dy, ridx, size, stride)
    _close(dx, rdx, 1e-6, 1e-6)


@pytest.mark.parametrize("p,seed", [(0.5, 0), (0.5, 12345), (0.1, 7), (0.9, 2**32 + 3)])
def test_dropout_masks_are_bit_identical(rng, p, seed):
    x, dy = _randn(rng, 6, 33, 7), _randn(rng, 6, 33, 7)
    y, mask = _garbage_like(x), np.full(x.shape, 9, np.uint8)
    dropout.dropout_forward(y, mask, x, p, seed)
    ry, rmask = np.empty_like(x), np.empty(x.shape, np.uint8)
    ref.dropout_forward(ry, rmask, x, p, seed)
    np.testing.assert_array_equal(mask, rmask)
    for i in (0, 1, 500, x.size - 1):                    # the contract's scalar rule
        assert mask.reshape(-1)[i] == dropout_keep(seed, i, p)
    np.testing.assert_array_equal(y, ry)
    dx, rdx = _garbage_like(x), np.empty_like(x)
    dropout.dropout_backward(dx, dy, mask, p)
    ref.dropout_backward(rdx, dy, rmask, p)
    np.testing.assert_array_equal(dx, rdx)
    assert abs(mask.mean() - (1 - p)) < 0.05


def test_softmax_xent_matches_reference(rng):
    n, k = 7, 13
    logits, labels = _randn(rng, n, k) * 5, rng.integers(0, k, n).astype(np.int32)
    losses, probs = _garbage_like((n,)), _garbage_like((n, k))
    softmax_xent.softmax_xent_forward(losses, probs, logits, labels)
    rlosses, rprobs = np.empty((n,), np.float32), np.empty((n, k), np.float32)
    ref.softmax_xent_forward(rlosses, rprobs, logits, labels)
    _close(losses, rlosses, 1e-5, 1e-6)
    _close(probs, rprobs, 1e-5, 1e-6)
    dlogits, rdlogits = _garbage_like(probs), np.empty_like(probs)
    softmax_xent.softmax_xent_backward(dlogits, probs, labels)
    ref.softmax_xent_backward(rdlogits, rprobs, labels)
    _close(dlogits, rdlogits, 1e-5, 1e-7)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_sgd_matches_reference(rng, with_offsets):
    size = 2 * sgd.BLOCK + 1000          # tensors across the kernel's blocks
    w, dw, v = _randn(rng, size), _randn(rng, size), _randn(rng, size)
    kwargs = {}
    if with_offsets:
        kwargs = dict(offsets=np.array([0, 10, 400, sgd.BLOCK + 7, size], np.int64),
                      lr_mults=np.array([1.0, 2.0, 0.5, 1.0]),
                      decay_mults=np.array([1.0, 0.0, 3.0, 1.0]))
    rw, rv = w.copy(), v.copy()
    for _ in range(3):
        sgd.sgd_update(w, dw, v, 0.05, 0.9, 0.01, **kwargs)
        ref.sgd_update(rw, dw, rv, 0.05, 0.9, 0.01, **kwargs)
    _close(w, rw, 1e-5, 1e-6)
    _close(v, rv, 1e-5, 1e-6)
    for where in (5, sgd.BLOCK + 3, size - 1):  # the non-finite count sees every block
        flag, bad = np.zeros(1, np.int32), dw.copy()
        bad[where] = np.inf
        sgd.sgd_update(w.copy(), bad, v.copy(), 0.05, 0.9, 0.01, nonfinite=flag, **kwargs)
        assert flag[0] == 1, where
    flag = np.zeros(1, np.int32)
    sgd.sgd_update(w, dw, v, 0.05, 0.9, 0.01, nonfinite=flag, **kwargs)
    assert flag[0] == 0


def test_conv2d_workers_split_the_batch_and_restore_blas_threads(rng):
    """Odd batch over the workers (uneven shares); BLAS threading is restored afterwards."""
    from nbalex.cpu import workers
    assert workers.split(5, 2) == [(0, 3), (3, 5)]
    assert workers.split(1, 2) == [(0, 1), (1, 1)]
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, (5, 4, 9, 8, 6, 3, 1, 1, 2))
    before = openblas.CONTROLS[0]() if openblas.CONTROLS else None
    y, want = _garbage_like(dy), np.empty_like(dy)
    conv2d.conv2d_forward(y, x, wt, b, stride, pad, groups)
    ref.conv2d_forward(want, x, wt, b, stride, pad, groups)
    _close(y, want)
    if before is not None:
        assert openblas.CONTROLS[0]() == before


def test_one_image_on_a_small_map_runs_single_threaded_blas(rng):
    """A lone chunk with serial_blas sees 1 BLAS thread, then the count is restored; without
    it BLAS keeps its threads; the conv on such a shape still equals the reference."""
    from nbalex.cpu import workers
    if openblas.CONTROLS is None:
        pytest.skip("OpenBLAS thread controls not found")
    get = openblas.CONTROLS[0]
    before, seen = get(), []
    workers.run(lambda t, lo, hi: seen.append(get()), 1, serial_blas=True)
    workers.run(lambda t, lo, hi: seen.append(get()), 1)
    assert seen == [1, before] and get() == before
    assert conv_strategy.small_map(12, 12) and not conv_strategy.small_map(13, 13)
    limit = conv_strategy.THREADED_GEMM_MACS
    assert conv_strategy.serial_blas(limit - 1) and not conv_strategy.serial_blas(limit)
    x, wt, b, dy, stride, pad, groups = _conv_arrays(rng, (1, 6, 5, 5, 4, 3, 1, 1, 1))
    y, want = _garbage_like(dy), np.empty_like(dy)
    conv2d.conv2d_forward(y, x, wt, b, stride, pad, groups)
    ref.conv2d_forward(want, x, wt, b, stride, pad, groups)
    _close(y, want)
    assert get() == before
