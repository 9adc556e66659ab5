"""The CUDA kernels of the non-GEMM layers against the NumPy reference.

Under the simulator every CUDA thread is a Python thread, so the shapes here are tiny but
awkward (odd sizes, windows at the edges, 1x1 outputs); on a real GPU the ``requires_gpu``
cases run each layer once at AlexNet's shapes.
"""

import numpy as np
import pytest
from numba import cuda

from conftest import requires_gpu
from nbalex import reference as ref
from nbalex.backends import dropout_keep
from nbalex.cuda import dropout as cu_dropout
from nbalex.cuda import launch
from nbalex.cuda import lrn as cu_lrn
from nbalex.cuda import maxpool as cu_maxpool
from nbalex.cuda import relu as cu_relu
from nbalex.cuda import sgd as cu_sgd
from nbalex.cuda import softmax_xent as cu_softmax


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def dev_empty(shape, dtype=np.float32):
    return cuda.device_array(shape, dtype=dtype)


def host(d):
    return d.copy_to_host()


@pytest.fixture
def one_block(monkeypatch):
    """Cap 1-D grids at one block, so each thread walks several elements of its grid-stride loop."""
    monkeypatch.setattr(launch, "MAX_BLOCKS", 1)


# ---------------------------------------------------------------- ReLU

def test_relu_forward_backward_match_reference(rng):
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    x[0, 0, :3] = [np.nan, 0.0, -np.inf]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    ref.relu_forward(y, x)
    ref.relu_backward(dx, dy, y)

    d_y, d_dx = dev_empty(x.shape), dev_empty(x.shape)
    stream = cuda.stream()
    cu_relu.relu_forward(d_y, dev(x), stream=stream)
    cu_relu.relu_backward(d_dx, dev(dy), d_y, stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(host(d_y), y)
    np.testing.assert_array_equal(host(d_dx), dx)


def test_relu_in_place(rng, one_block):
    x = rng.standard_normal(601).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    d_x, d_dy = dev(x), dev(dy)
    cu_relu.relu_forward(d_x, d_x)            # y is x
    cu_relu.relu_backward(d_dy, d_dy, d_x)    # dx is dy
    np.testing.assert_array_equal(host(d_x), np.maximum(x, 0))
    np.testing.assert_array_equal(host(d_dy), np.where(x > 0, dy, 0))


# ---------------------------------------------------------------- LRN

LRN_PARAMS = [(5, 1e-4, 0.75, 2.0),   # the paper's
              (3, 0.5, 0.75, 1.0)]    # strong enough that a wrong window shows in y


@pytest.mark.parametrize("channels", [2, 5, 9])   # fewer, as many and more channels than the window
@pytest.mark.parametrize("size,alpha,beta,k", LRN_PARAMS)
def test_lrn_matches_reference(rng, channels, size, alpha, beta, k):
    x = (2 * rng.standard_normal((2, channels, 3, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y, scale, x, size, alpha, beta, k)
    ref.lrn_backward(dx, dy, x, y, scale, size, alpha, beta, k)

    d_x, d_y, d_scale, d_dx = dev(x), dev_empty(x.shape), dev_empty(x.shape), dev_empty(x.shape)
    cu_lrn.lrn_forward(d_y, d_scale, d_x, size, alpha, beta, k)
    cu_lrn.lrn_backward(d_dx, dev(dy), d_x, d_y, d_scale, size, alpha, beta, k)
    np.testing.assert_allclose(host(d_scale), scale, rtol=1e-6)
    np.testing.assert_allclose(host(d_y), y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(d_dx), dx, rtol=1e-4, atol=1e-6)


def test_lrn_on_2d_input_and_large_then_small_values(rng, one_block):
    """(N, C) input (no spatial axes); a large channel followed by tiny ones (squares 1e9
    apart, k ~ 0) must not leave a float32-sized rounding residue in the running window sum."""
    x = (1e-3 * rng.standard_normal((300, 8))).astype(np.float32)
    x[:, 1] = 30.0
    size, alpha, beta, k = 3, 1.0, 0.75, 1e-6
    y, scale = np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y, scale, x, size, alpha, beta, k)
    d_y, d_scale = dev_empty(x.shape), dev_empty(x.shape)
    cu_lrn.lrn_forward(d_y, d_scale, dev(x), size, alpha, beta, k)
    np.testing.assert_allclose(host(d_scale), scale, rtol=1e-5)
    np.testing.assert_allclose(host(d_y), y, rtol=1e-4)


# ---------------------------------------------------------------- max pooling

POOL_CASES = [  # (x shape, size, stride)
    ((2, 3, 7, 9), 3, 2),
    ((2, 3, 7, 9), 2, 2),    # odd sizes: the last row and column belong to no window
    ((1, 2, 5, 6), 3, 1),
    ((2, 3, 3, 3), 3, 2),    # 1x1 output
    ((1, 2, 4, 3), 3, 2),    # 1x1 output, uncovered last row
]


@pytest.mark.parametrize("shape,size,stride", POOL_CASES)
def test_maxpool_matches_reference(rng, one_block, shape, size, stride):
    # small integers: many ties, so the first-in-window rule and the overlap sums are exercised
    x = rng.integers(0, 4, shape).astype(np.float32)
    out_shape = shape[:2] + tuple((s - size) // stride + 1 for s in shape[2:])
    dy = rng.standard_normal(out_shape).astype(np.float32)
    y, idx, dx = np.empty(out_shape, np.float32), np.empty(out_shape, np.int32), np.empty_like(x)
    ref.maxpool_forward(y, idx, x, size, stride)
    ref.maxpool_backward(dx, dy, idx, size, stride)

    d_y, d_idx, d_dx = dev_empty(out_shape), dev_empty(out_shape, np.int32), dev_empty(shape)
    cu_maxpool.maxpool_forward(d_y, d_idx, dev(x), size, stride)
    cu_maxpool.maxpool_backward(d_dx, dev(dy), d_idx, size, stride)
    np.testing.assert_array_equal(host(d_y), y)
    np.testing.assert_array_equal(host(d_idx), idx)
    np.testing.assert_allclose(host(d_dx), dx, rtol=1e-6, atol=1e-7)


def test_maxpool_rejects_bad_shapes():
    x = dev_empty((1, 1, 5, 5))
    with pytest.raises(ValueError, match="y"):
        cu_maxpool.maxpool_forward(dev_empty((1, 1, 3, 3)), dev_empty((1, 1, 2, 2), np.int32),
                                   x, 3, 2)
    with pytest.raises(ValueError, match="int32"):
        cu_maxpool.maxpool_forward(dev_empty((1, 1, 2, 2)), dev_empty((1, 1, 2, 2)), x, 3, 2)
    with pytest.raises(ValueError, match="larger"):
        cu_maxpool.maxpool_forward(dev_empty((1, 1, 1, 1)), dev_empty((1, 1, 1, 1), np.int32),
                                   x, 7, 1)


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5])
def test_dropout_masks_bit_identical_to_reference(rng, p, seed):
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mask, dx = np.empty_like(x), np.empty(x.shape, np.uint8), np.empty_like(x)
    ref.dropout_forward(y, mask, x, p, seed)
    ref.dropout_backward(dx, dy, mask, p)

    d_y, d_mask, d_dx = dev_empty(x.shape), dev_empty(x.shape, np.uint8), dev_empty(x.shape)
    cu_dropout.dropout_forward(d_y, d_mask, dev(x), p, seed)
    cu_dropout.dropout_backward(d_dx, dev(dy), d_mask, p)
    np.testing.assert_array_equal(host(d_mask), mask)
    np.testing.assert_array_equal(host(d_y), y)
    np.testing.assert_array_equal(host(d_dx), dx)


def test_dropout_hash_agrees_with_the_scalar_rule(one_block):
    """Against nbalex.backends.dropout_keep itself, element by element, in place (y is x)."""
    n, p, seed = 700, 0.3, 123456789
    d_x = dev(np.ones(n, np.float32))
    d_mask = dev_empty(n, np.uint8)
    cu_dropout.dropout_forward(d_x, d_mask, d_x, p, seed)
    expected = np.array([dropout_keep(seed, i, p) for i in range(n)], dtype=np.uint8)
    np.testing.assert_array_equal(host(d_mask), expected)
    np.testing.assert_array_equal(host(d_x), expected / np.float32(1 - p))


def test_dropout_rejects_p_of_one():
    with pytest.raises(ValueError, match="probability"):
        cu_dropout.dropout_forward(dev_empty(4), dev_empty(4, np.uint8), dev_empty(4), 1.0, 0)


# ---------------------------------------------------------------- softmax + cross-entropy

@pytest.mark.parametrize("classes,spread,offset", [
    (7, 3.0, 0.0),
    (1, 1.0, 0.0),          # a single class: probability 1, loss 0
    (130, 3.0, 0.0),        # more classes than threads per row
    (11, 50.0, 1e4),        # large logits: exp(z) would overflow without the max shift
    (11, 1e30, 0.0),
])
def test_softmax_xent_matches_reference(rng, classes, spread, offset):
    n = 5
    logits = (offset + spread * rng.standard_normal((n, classes))).astype(np.float32)
    labels = rng.integers(0, classes, n).astype(np.int32)
    losses, probs, dlogits = np.empty(n, np.float32), np.empty_like(logits), np.empty_like(logits)
    ref.softmax_xent_forward(losses, probs, logits, labels)
    ref.softmax_xent_backward(dlogits, probs, labels)

    d_losses, d_probs, d_labels = dev_empty(n), dev_empty(logits.shape), dev(labels)
    cu_softmax.softmax_xent_forward(d_losses, d_probs, dev(logits), d_labels)
    d_dlogits = dev_empty(logits.shape)
    cu_softmax.softmax_xent_backward(d_dlogits, d_probs, d_labels)
    got_probs, got_losses = host(d_probs), host(d_losses)
    assert np.all(np.isfinite(got_probs)) and np.all(np.isfinite(got_losses))
    np.testing.assert_allclose(got_probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(d_dlogits), dlogits, rtol=1e-5, atol=1e-7)


def test_softmax_xent_rows_loop_in_place_and_bad_label(rng, monkeypatch):
    """One block walks all three rows; dlogits may be probs; a bad label gives a NaN loss."""
    monkeypatch.setattr(cu_softmax, "MAX_ROW_BLOCKS", 1)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    labels = np.array([0, 3, 4], np.int32)          # 4 is out of range
    d_losses, d_probs = dev_empty(3), dev_empty(logits.shape)
    d_labels = dev(labels)
    cu_softmax.softmax_xent_forward(d_losses, d_probs, dev(logits), d_labels)
    losses, probs = host(d_losses), host(d_probs)
    assert np.isnan(losses[2])
    expected_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5)
    np.testing.assert_allclose(losses[:2], -np.log(expected_probs[[0, 1], [0, 3]]), rtol=1e-5)
    cu_softmax.softmax_xent_backward(d_probs, d_probs, d_labels)   # dlogits is probs
    expected = probs.copy()
    expected[[0, 1], [0, 3]] -= 1
    np.testing.assert_allclose(host(d_probs), expected / 3, rtol=1e-6)


# ---------------------------------------------------------------- SGD

def _sgd_case(rng, sizes):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    w, dw, v = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    lr_mults = rng.uniform(0.5, 2.0, len(sizes)).astype(np.float32)
    decay_mults = rng.choice([0.0, 1.0, 3.0], len(sizes)).astype(np.float32)
    return w, dw, v, offsets, lr_mults, decay_mults


@pytest.mark.parametrize("sizes", [[5, 0, 32, 63, 31], [600, 3, 1, 40, 7, 90]])
def test_sgd_segments_and_multipliers(rng, one_block, sizes):
    """One block: each thread's grid-stride loop crosses several tensors (and an empty one)."""
    w, dw, v, offsets, lr_mults, decay_mults = _sgd_case(rng, sizes)
    hyper = (0.05, 0.9, 5e-3)
    d_w, d_v = dev(w), dev(v)
    cu_sgd.sgd_update(d_w, dev(dw), d_v, *hyper, dev(offsets), dev(lr_mults), dev(decay_mults))
    ref.sgd_update(w, dw, v, *hyper, offsets, lr_mults, decay_mults)
    np.testing.assert_allclose(host(d_v), v, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(d_w), w, rtol=1e-5, atol=1e-7)


def test_sgd_single_tensor(rng):
    w, dw, v = (rng.standard_normal(77).astype(np.float32) for _ in range(3))
    d_w, d_v = dev(w), dev(v)
    for _ in range(2):   # two steps: momentum carries over
        cu_sgd.sgd_update(d_w, dev(dw), d_v, 0.01, 0.9, 5e-4)
        ref.sgd_update(w, dw, v, 0.01, 0.9, 5e-4)
    np.testing.assert_allclose(host(d_v), v, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(host(d_w), w, rtol=1e-6, atol=1e-8)


def test_sgd_missing_multiplier_means_one(rng):
    w, dw, v, offsets, lr_mults, _ = _sgd_case(rng, [9, 20, 4])
    d_w, d_v = dev(w), dev(v)
    cu_sgd.sgd_update(d_w, dev(dw), d_v, 0.1, 0.9, 0.01, offsets, dev(lr_mults), None)
    ref.sgd_update(w, dw, v, 0.1, 0.9, 0.01, offsets, lr_mults, None)
    np.testing.assert_allclose(host(d_w), w, rtol=1e-5, atol=1e-7)


def test_sgd_rejects_inconsistent_arguments():
    w = dev_empty(10)
    mults = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="offsets"):
        cu_sgd.sgd_update(w, w, w, 0.1, 0.9, 0.0, lr_mults=mults, decay_mults=mults)
    with pytest.raises(ValueError, match="int64"):
        cu_sgd.sgd_update(w, w, w, 0.1, 0.9, 0.0, np.array([0, 4, 10], np.int32), mults, mults)
    with pytest.raises(ValueError, match="rise from 0"):
        cu_sgd.sgd_update(w, w, w, 0.1, 0.9, 0.0, np.array([0, 4, 9]), mults, mults)
    with pytest.raises(ValueError, match="lr_mults"):
        cu_sgd.sgd_update(w, w, w, 0.1, 0.9, 0.0, np.array([0, 10]), mults, mults)


# ---------------------------------------------------------------- shared preconditions

def test_launchers_reject_wrong_dtype_shape_and_layout():
    x = dev_empty((2, 3, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        cu_relu.relu_forward(dev_empty((2, 3, 4, 4), np.float64), x)
    with pytest.raises(ValueError, match="shape"):
        cu_relu.relu_forward(dev_empty((2, 3, 4, 5)), x)
    with pytest.raises(ValueError, match="contiguous"):
        cu_lrn.lrn_forward(x, x, dev_empty((2, 3, 4, 8))[:, :, :, ::2], 5, 1e-4, 0.75, 2.0)


# ---------------------------------------------------------------- AlexNet shapes, real GPU only

CONV1_OUT = (128, 96, 55, 55)     # conv1's activations at batch 128
POOL1_OUT = (128, 96, 27, 27)


@requires_gpu
def test_alexnet_relu_on_gpu(rng):
    x = rng.standard_normal(CONV1_OUT).astype(np.float32)
    dy = rng.standard_normal(CONV1_OUT).astype(np.float32)
    d_y, d_dx = dev_empty(CONV1_OUT), dev_empty(CONV1_OUT)
    cu_relu.relu_forward(d_y, dev(x))
    cu_relu.relu_backward(d_dx, dev(dy), d_y)
    np.testing.assert_array_equal(host(d_y), np.maximum(x, 0))
    np.testing.assert_array_equal(host(d_dx), np.where(x > 0, dy, 0))


@requires_gpu
@pytest.mark.parametrize("shape", [CONV1_OUT, (128, 256, 27, 27)])   # after conv1 and conv2
def test_alexnet_lrn_on_gpu(rng, shape):
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y, scale, x, 5, 1e-4, 0.75, 2.0)
    ref.lrn_backward(dx, dy, x, y, scale, 5, 1e-4, 0.75, 2.0)
    d_x, d_y, d_scale, d_dx = dev(x), dev_empty(shape), dev_empty(shape), dev_empty(shape)
    cu_lrn.lrn_forward(d_y, d_scale, d_x, 5, 1e-4, 0.75, 2.0)
    cu_lrn.lrn_backward(d_dx, dev(dy), d_x, d_y, d_scale, 5, 1e-4, 0.75, 2.0)
    np.testing.assert_allclose(host(d_scale), scale, rtol=1e-6)
    np.testing.assert_allclose(host(d_y), y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(d_dx), dx, rtol=1e-4, atol=1e-6)


@requires_gpu
def test_alexnet_maxpool_on_gpu(rng):
    x = np.maximum(rng.standard_normal(CONV1_OUT), 0).astype(np.float32)   # ReLU'd: ties at 0
    dy = rng.standard_normal(POOL1_OUT).astype(np.float32)
    y, idx, dx = np.empty(POOL1_OUT, np.float32), np.empty(POOL1_OUT, np.int32), np.empty_like(x)
    ref.maxpool_forward(y, idx, x, 3, 2)
    ref.maxpool_backward(dx, dy, idx, 3, 2)
    d_y, d_idx, d_dx = dev_empty(POOL1_OUT), dev_empty(POOL1_OUT, np.int32), dev_empty(CONV1_OUT)
    cu_maxpool.maxpool_forward(d_y, d_idx, dev(x), 3, 2)
    cu_maxpool.maxpool_backward(d_dx, dev(dy), d_idx, 3, 2)
    np.testing.assert_array_equal(host(d_y), y)
    np.testing.assert_array_equal(host(d_idx), idx)
    np.testing.assert_allclose(host(d_dx), dx, rtol=1e-6, atol=1e-7)


@requires_gpu
def test_alexnet_dropout_on_gpu(rng):
    x = rng.standard_normal((128, 4096)).astype(np.float32)             # fc6's output
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    ref.dropout_forward(y, mask, x, 0.5, 42)
    d_y, d_mask = dev_empty(x.shape), dev_empty(x.shape, np.uint8)
    cu_dropout.dropout_forward(d_y, d_mask, dev(x), 0.5, 42)
    np.testing.assert_array_equal(host(d_mask), mask)
    np.testing.assert_array_equal(host(d_y), y)


@requires_gpu
def test_alexnet_softmax_xent_on_gpu(rng):
    logits = (10 * rng.standard_normal((128, 1000))).astype(np.float32)  # fc8's output
    labels = rng.integers(0, 1000, 128).astype(np.int32)
    losses, probs, dlogits = np.empty(128, np.float32), np.empty_like(logits), np.empty_like(logits)
    ref.softmax_xent_forward(losses, probs, logits, labels)
    ref.softmax_xent_backward(dlogits, probs, labels)
    d_losses, d_probs, d_dlogits = dev_empty(128), dev_empty(logits.shape), dev_empty(logits.shape)
    d_labels = dev(labels)
    cu_softmax.softmax_xent_forward(d_losses, d_probs, dev(logits), d_labels)
    cu_softmax.softmax_xent_backward(d_dlogits, d_probs, d_labels)
    np.testing.assert_allclose(host(d_probs), probs, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(host(d_losses), losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(d_dlogits), dlogits, rtol=1e-5, atol=1e-10)


@requires_gpu
def test_alexnet_sized_sgd_on_gpu(rng):
    # AlexNet's 16 parameter tensors (60,965,224 elements), biases without decay
    sizes = [34848, 96, 307200, 256, 884736, 384, 663552, 384, 442368, 256,
             37748736, 4096, 16777216, 4096, 4096000, 1000]
    w, dw, v, offsets, lr_mults, _ = _sgd_case(rng, sizes)
    decay_mults = np.array([1.0, 0.0] * 8, np.float32)
    d_w, d_v = dev(w), dev(v)
    cu_sgd.sgd_update(d_w, dev(dw), d_v, 0.01, 0.9, 5e-4, dev(offsets), dev(lr_mults),
                      dev(decay_mults))
    ref.sgd_update(w, dw, v, 0.01, 0.9, 5e-4, offsets, lr_mults, decay_mults)
    np.testing.assert_allclose(host(d_v), v, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(host(d_w), w, rtol=1e-5, atol=1e-8)
