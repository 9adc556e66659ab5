"""The NumPy reference checked on its own: every backward against central finite differences
(float64, small random shapes), forwards against explicit loops, dropout against the
contract's hash, SGD against a hand-written loop of the paper's rule."""

import numpy as np
import pytest

from nbalex import backends
from nbalex import reference as ref

EPS = 1e-6


def numeric_grad(loss, a):
    """d loss() / d a by central differences, perturbing the contiguous array ``a`` in place."""
    grad = np.zeros_like(a)
    flat = a.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + EPS
        up = loss()
        flat[i] = old - EPS
        down = loss()
        flat[i] = old
        grad.flat[i] = (up - down) / (2 * EPS)
    return grad


def assert_grad(analytic, loss, a):
    np.testing.assert_allclose(analytic, numeric_grad(loss, a), rtol=1e-5, atol=1e-7)


# --- convolution ------------------------------------------------------------------------

# (N, C, H, W, F, KH, KW, stride, pad, groups)
CONV_CASES = [
    (2, 3, 7, 7, 4, 3, 3, 1, 0, 1),
    (1, 4, 9, 8, 4, 3, 3, 2, 1, 2),
    (1, 4, 11, 11, 8, 5, 5, 4, 2, 4),     # stride 4, pad 2, groups 4
    (1, 3, 19, 19, 2, 11, 11, 4, 0, 1),   # conv1's kernel and stride
    (2, 4, 5, 5, 6, 1, 1, 1, 0, 2),       # 1x1 kernel
    (1, 2, 9, 9, 3, 2, 2, 3, 1, 1),       # stride > kernel: some inputs are never read
    (1, 4, 6, 6, 4, 5, 5, 1, 2, 2),       # conv2's pad 2 with groups 2
    (1, 8, 6, 6, 8, 3, 3, 1, 1, 4),
]


def conv_naive(x, w, b, stride, pad, groups):
    """Six nested loops straight from the definition."""
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    fg = f // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.empty((n, f, oh, ow))
    for ni in range(n):
        for fi in range(f):
            c0 = (fi // fg) * cg
            for i in range(oh):
                for j in range(ow):
                    top, left = i * stride, j * stride
                    patch = xp[ni, c0:c0 + cg, top:top + kh, left:left + kw]
                    y[ni, fi, i, j] = b[fi] + np.sum(patch * w[fi])
    return y


def conv_setup(rng, case):
    n, c, h, wd, f, kh, kw, stride, pad, groups = case
    x = rng.standard_normal((n, c, h, wd))
    w = rng.standard_normal((f, c // groups, kh, kw))
    b = rng.standard_normal(f)
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    return x, w, b, np.empty((n, f, oh, ow)), (stride, pad, groups)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_loops(rng, case):
    x, w, b, y, geom = conv_setup(rng, case)
    ref.conv2d_forward(y, x, w, b, *geom)
    np.testing.assert_allclose(y, conv_naive(x, w, b, *geom), rtol=1e-12, atol=1e-12)
    ref.conv2d_forward(y, x, w, b, *geom, relu=True)
    np.testing.assert_allclose(y, np.maximum(conv_naive(x, w, b, *geom), 0), atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradients(rng, case):
    x, w, b, y, geom = conv_setup(rng, case)
    r = rng.standard_normal(y.shape)          # L = sum(y * r), so dL/dy = r

    def loss():
        ref.conv2d_forward(y, x, w, b, *geom)
        return np.sum(y * r)

    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    ref.conv2d_backward_data(dx, r, w, *geom)
    ref.conv2d_backward_weights(dw, db, r, x, *geom)
    assert_grad(dx, loss, x)
    assert_grad(dw, loss, w)
    assert_grad(db, loss, b)


def test_conv2d_rejects_mismatched_groups(rng):
    x, w = rng.standard_normal((1, 4, 5, 5)), rng.standard_normal((4, 4, 3, 3))
    with pytest.raises(ValueError):
        ref.conv2d_forward(np.empty((1, 4, 3, 3)), x, w, np.zeros(4), 1, 0, 2)


# --- linear, relu -----------------------------------------------------------------------

def test_linear_gradients(rng):
    x, w, b = rng.standard_normal((3, 7)), rng.standard_normal((5, 7)), rng.standard_normal(5)
    y, r = np.empty((3, 5)), rng.standard_normal((3, 5))

    def loss():
        ref.linear_forward(y, x, w, b)
        return np.sum(y * r)

    loss()
    np.testing.assert_allclose(y, np.einsum("nk,mk->nm", x, w) + b, rtol=1e-12)
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    ref.linear_backward_data(dx, r, w)
    ref.linear_backward_weights(dw, db, r, x)
    assert_grad(dx, loss, x)
    assert_grad(dw, loss, w)
    assert_grad(db, loss, b)
    ref.linear_forward(y, x, w, b, relu=True)
    np.testing.assert_allclose(y, np.maximum(x @ w.T + b, 0), rtol=1e-12)


def test_relu_gradient(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5                 # keep finite differences away from the kink
    y, r = np.empty_like(x), rng.standard_normal(x.shape)

    def loss():
        ref.relu_forward(y, x)
        return np.sum(y * r)

    loss()
    dx = np.empty_like(x)
    ref.relu_backward(dx, r, y)
    assert_grad(dx, loss, x)
    ref.relu_backward(r, r, y)                # in place: dx may be dy
    np.testing.assert_array_equal(r, dx)


# --- LRN --------------------------------------------------------------------------------

def lrn_naive(x, size, alpha, beta, k):
    y = np.empty_like(x)
    channels, half = x.shape[1], size // 2
    for c in range(channels):
        lo, hi = max(0, c - half), min(channels - 1, c + half)
        scale = k + alpha * np.sum(x[:, lo:hi + 1] ** 2, axis=1)
        y[:, c] = x[:, c] * scale ** (-beta)
    return y


@pytest.mark.parametrize("channels", [3, 5, 7])            # C < size, C = size, C > size
@pytest.mark.parametrize("alpha,beta,k", [(0.1, 0.75, 1.0), (1e-4, 0.75, 2.0)])
def test_lrn_forward_and_gradient(rng, channels, alpha, beta, k):
    size = 5
    x = rng.standard_normal((2, channels, 3, 3)) * 2
    y, scale, r = np.empty_like(x), np.empty_like(x), rng.standard_normal(x.shape)

    def loss():
        ref.lrn_forward(y, scale, x, size, alpha, beta, k)
        return np.sum(y * r)

    loss()
    np.testing.assert_allclose(y, lrn_naive(x, size, alpha, beta, k), rtol=1e-12)
    dx = np.empty_like(x)
    ref.lrn_backward(dx, r, x, y, scale, size, alpha, beta, k)
    assert_grad(dx, loss, x)


# --- max pooling ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size,stride", [
    ((2, 2, 7, 7), 3, 2), ((1, 3, 8, 8), 3, 2), ((2, 2, 6, 5), 2, 2), ((1, 2, 5, 6), 3, 1)])
def test_maxpool_forward_and_gradient(rng, shape, size, stride):
    x = rng.standard_normal(shape)
    n, c, h, w = shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    y, idx = np.empty((n, c, oh, ow)), np.empty((n, c, oh, ow), np.int32)
    r = rng.standard_normal(y.shape)

    def loss():
        ref.maxpool_forward(y, idx, x, size, stride)
        return np.sum(y * r)

    loss()
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * stride:i * stride + size, j * stride:j * stride + size]
            np.testing.assert_array_equal(y[:, :, i, j], win.max(axis=(2, 3)))
    np.testing.assert_array_equal(np.take_along_axis(x.reshape(n, c, -1),
                                                     idx.reshape(n, c, -1), 2).reshape(y.shape), y)
    dx = np.empty_like(x)
    ref.maxpool_backward(dx, r, idx, size, stride)
    assert_grad(dx, loss, x)


def test_maxpool_ties_go_to_first_and_overlaps_sum():
    x = np.zeros((1, 1, 5, 5))                # every window is a tie
    y, idx = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), np.int32)
    ref.maxpool_forward(y, idx, x, 3, 2)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [10, 12]])   # each window's top-left
    x[0, 0, 2, 2] = 1.0                       # the centre sits in all four windows
    ref.maxpool_forward(y, idx, x, 3, 2)
    assert np.all(idx == 12)
    dx = np.full_like(x, np.nan)              # overwritten, not accumulated
    ref.maxpool_backward(dx, np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), idx, 3, 2)
    assert dx[0, 0, 2, 2] == 10.0 and np.count_nonzero(dx) == 1


# --- dropout ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5])
@pytest.mark.parametrize("p", [0.5, 0.1])
def test_dropout_mask_is_the_contract_hash(rng, seed, p):
    x = rng.standard_normal((3, 5, 7))
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    ref.dropout_forward(y, mask, x, p, seed)
    expected = [backends.dropout_keep(seed, i, p) for i in range(x.size)]
    np.testing.assert_array_equal(mask.reshape(-1), np.array(expected, np.uint8))
    np.testing.assert_allclose(y, x * mask / (1 - p), rtol=1e-15)


def test_mix32_array_matches_scalar(rng):
    values = rng.integers(0, 2**32, size=1000, dtype=np.uint64)
    mixed = ref.dropout.mix32_array(values.astype(np.uint32))
    assert [int(v) for v in mixed] == [backends.mix32(int(v)) for v in values]


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_dropout_keeps_about_one_minus_p(p):
    shape = (1000, 1000)
    mask = ref.dropout.keep_mask(shape, p, seed=3)
    assert abs(mask.mean() - (1 - p)) < 0.003          # std of the mean is ~0.0005
    other = ref.dropout.keep_mask(shape, p, seed=4)
    assert 0 < np.mean(mask != other) < 1               # a different seed, a different mask


def test_dropout_gradient(rng):
    x, r, p = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), 0.5
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)

    def loss():
        ref.dropout_forward(y, mask, x, p, 11)
        return np.sum(y * r)

    loss()
    assert 0 < mask.sum() < mask.size
    dx = np.empty_like(x)
    ref.dropout_backward(dx, r, mask, p)
    assert_grad(dx, loss, x)


# --- softmax cross-entropy --------------------------------------------------------------

def test_softmax_xent_forward_and_gradient(rng):
    logits, labels = rng.standard_normal((4, 6)) * 3, np.array([0, 5, 2, 2], np.int32)
    losses, probs = np.empty(4), np.empty((4, 6))

    def loss():
        ref.softmax_xent_forward(losses, probs, logits, labels)
        return losses.mean()

    loss()
    e = np.exp(logits)
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(losses, -np.log(probs[np.arange(4), labels]), rtol=1e-12)
    dlogits = np.empty_like(logits)
    ref.softmax_xent_backward(dlogits, probs, labels)
    assert_grad(dlogits, loss, logits)


def test_softmax_xent_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    losses, probs = np.empty(2), np.empty((2, 2))
    ref.softmax_xent_forward(losses, probs, logits, np.array([1, 1], np.int32))
    np.testing.assert_allclose(losses, [1000.0, 0.0], atol=1e-12)
    assert np.all(np.isfinite(probs))


# --- SGD --------------------------------------------------------------------------------

def test_sgd_update_matches_the_papers_rule_per_element(rng):
    sizes, lr, momentum, decay = [5, 3, 4], 0.01, 0.9, 5e-4
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    lr_mults, decay_mults = np.array([1.0, 2.0, 0.5]), np.array([1.0, 0.0, 3.0])
    w, dw, v = (rng.standard_normal(offsets[-1]) for _ in range(3))
    w_exp, v_exp = w.copy(), v.copy()
    for t in range(len(sizes)):
        for i in range(offsets[t], offsets[t + 1]):
            v_exp[i] = (momentum * v_exp[i] - decay * decay_mults[t] * lr * lr_mults[t] * w_exp[i]
                        - lr * lr_mults[t] * dw[i])
            w_exp[i] = w_exp[i] + v_exp[i]
    ref.sgd_update(w, dw, v, lr, momentum, decay, offsets, lr_mults, decay_mults)
    np.testing.assert_allclose(v, v_exp, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(w, w_exp, rtol=1e-13, atol=1e-16)


def test_sgd_update_without_offsets_is_one_tensor(rng):
    w, dw, v = (rng.standard_normal(10) for _ in range(3))
    w_exp = w + (0.9 * v - 0.1 * 5e-4 * w - 0.1 * dw)
    ref.sgd_update(w, dw, v, 0.1, 0.9, 5e-4)
    np.testing.assert_allclose(w, w_exp, rtol=1e-13)


# --- augmentation -----------------------------------------------------------------------

def test_augment_batch_matches_a_per_pixel_loop(rng):
    batch, side, crop = 3, 8, 5
    images = rng.integers(0, 256, size=(batch, side, side, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(side, side, 3)).astype(np.float32)
    crop_y = np.array([0, 3, 1], np.int32)
    crop_x = np.array([3, 0, 2], np.int32)
    flip = np.array([0, 1, 1], np.uint8)
    shift = rng.standard_normal((batch, 3)).astype(np.float32)
    out = np.full((batch, 3, crop, crop), np.nan, np.float32)
    ref.augment_batch(out, images, crop_y, crop_x, flip, shift, mean)
    expected = np.empty_like(out)
    for b in range(batch):
        for c in range(3):
            for i in range(crop):
                for j in range(crop):
                    y, x = crop_y[b] + i, crop_x[b] + (crop - 1 - j if flip[b] else j)
                    expected[b, c, i, j] = (np.float32(images[b, y, x, c]) - mean[y, x, c]
                                            + shift[b, c])
    np.testing.assert_array_equal(out, expected)


# --- dtypes -----------------------------------------------------------------------------

def test_float32_in_float32_out(rng):
    x = rng.standard_normal((2, 4, 7, 7))
    w, b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    y64, y32 = np.empty((2, 4, 5, 5)), np.empty((2, 4, 5, 5), np.float32)
    ref.conv2d_forward(y64, x, w, b, 1, 0, 2)
    ref.conv2d_forward(y32, x.astype(np.float32), w.astype(np.float32), b.astype(np.float32),
                       1, 0, 2)
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    s32, l32 = np.empty_like(y32), np.empty_like(y32)
    ref.lrn_forward(l32, s32, y32, 5, 1e-4, 0.75, 2.0)
    assert l32.dtype == np.float32 and np.all(np.isfinite(l32))
