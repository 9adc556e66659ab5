"""The NumPy reference against PyTorch (an independent implementation), in float64."""

import numpy as np
import pytest

from nbalex import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional


def t(a):
    """A float64 leaf tensor that records its gradient."""
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("n,c,h,w,f,k,stride,pad,groups", [
    (2, 4, 9, 9, 6, 3, 1, 1, 2),
    (1, 3, 23, 23, 4, 11, 4, 0, 1),
    (2, 8, 7, 7, 8, 5, 1, 2, 4),
    (1, 4, 10, 9, 4, 3, 2, 0, 2),
    (2, 6, 5, 5, 6, 1, 1, 0, 3),
])
def test_conv2d_matches_torch(rng, n, c, h, w, f, k, stride, pad, groups):
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((f, c // groups, k, k))
    b = rng.standard_normal(f)
    tx, tw, tb = t(x), t(wt), t(b)
    ty = F.conv2d(tx, tw, tb, stride=stride, padding=pad, groups=groups)
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))

    y = np.empty(tuple(ty.shape))
    ref.conv2d_forward(y, x, wt, b, stride, pad, groups)
    dx, dw, db = np.empty_like(x), np.empty_like(wt), np.empty_like(b)
    ref.conv2d_backward_data(dx, dy, wt, stride, pad, groups)
    ref.conv2d_backward_weights(dw, db, dy, x, stride, pad, groups)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [3, 5, 16])
def test_lrn_matches_torch_local_response_norm(rng, channels):
    # The paper's alpha=1e-4 is not divided by n; PyTorch divides its alpha by n: 5e-4 / 5.
    x = rng.standard_normal((2, channels, 4, 4)) * 30     # large enough for LRN to matter
    tx = t(x)
    ty = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(tx)
    dy = rng.standard_normal(x.shape)
    ty.backward(torch.tensor(dy))

    y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y, scale, x, 5, 1e-4, 0.75, 2.0)
    ref.lrn_backward(dx, dy, x, y, scale, 5, 1e-4, 0.75, 2.0)
    assert np.max(np.abs(y - x * 2.0 ** -0.75)) > 1e-2        # not merely a constant scaling
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,size,stride", [
    ((2, 3, 13, 13), 3, 2), ((1, 2, 8, 9), 2, 2), ((1, 2, 6, 6), 3, 1)])
def test_maxpool_matches_torch(rng, shape, size, stride):
    x = rng.permutation(np.prod(shape)).reshape(shape) * 0.01   # distinct values: no ties
    tx = t(x)
    ty = F.max_pool2d(tx, size, stride)
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))

    y, idx = np.empty(tuple(ty.shape)), np.empty(tuple(ty.shape), np.int32)
    ref.maxpool_forward(y, idx, x, size, stride)
    dx = np.empty_like(x)
    ref.maxpool_backward(dx, dy, idx, size, stride)
    _, tidx = F.max_pool2d(torch.tensor(x), size, stride, return_indices=True)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_linear_matches_torch(rng):
    x, w, b = rng.standard_normal((5, 9)), rng.standard_normal((4, 9)), rng.standard_normal(4)
    tx, tw, tb = t(x), t(w), t(b)
    ty = F.linear(tx, tw, tb)
    dy = rng.standard_normal((5, 4))
    ty.backward(torch.tensor(dy))

    y, dx, dw, db = np.empty((5, 4)), np.empty_like(x), np.empty_like(w), np.empty_like(b)
    ref.linear_forward(y, x, w, b)
    ref.linear_backward_data(dx, dy, w)
    ref.linear_backward_weights(dw, db, dy, x)
    for ours, theirs in [(y, ty.detach()), (dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_softmax_xent_matches_torch_cross_entropy(rng):
    logits = rng.standard_normal((6, 10)) * 4
    labels = rng.integers(0, 10, size=6).astype(np.int32)
    tl = t(logits)
    tloss = F.cross_entropy(tl, torch.tensor(labels, dtype=torch.long), reduction="mean")
    tloss.backward()

    losses, probs, dlogits = np.empty(6), np.empty_like(logits), np.empty_like(logits)
    ref.softmax_xent_forward(losses, probs, logits, labels)
    ref.softmax_xent_backward(dlogits, probs, labels)
    np.testing.assert_allclose(losses.mean(), tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(probs, torch.softmax(tl.detach(), 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(dlogits, tl.grad.numpy(), rtol=1e-11, atol=1e-15)
