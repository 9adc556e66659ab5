"""The ops façade (NumPy in, NumPy out) over the reference backend, the gradient convention
(backward launchers overwrite, never accumulate), and, where a backend already provides a
launcher, the same façade call on cpu/cuda against the reference."""


import numpy as np
import pytest

from nbalex import backends, ops
from nbalex import reference as ref

DTYPES = [np.float32, np.float64]


def randn(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def test_reference_exports_every_launcher():
    assert set(backends.LAUNCHERS) <= set(dir(ref))
    assert set(backends.signatures(ref)) == set(backends.LAUNCHERS)


def test_unknown_backend_is_refused(rng):
    with pytest.raises(ValueError):
        ops.relu_forward(randn(rng, 3), backend="tpu")


# --- shapes and dtypes ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_and_linear_shapes_and_dtypes(rng, dtype):
    x, w = randn(rng, 2, 4, 11, 10, dtype=dtype), randn(rng, 6, 2, 3, 3, dtype=dtype)
    b = randn(rng, 6, dtype=dtype)
    y = ops.conv2d_forward(x, w, b, stride=2, pad=1, groups=2, backend="reference")
    assert y.shape == (2, 6, 6, 5) and y.dtype == dtype
    dx, dw, db = ops.conv2d_backward(np.ones_like(y), x, w, stride=2, pad=1, groups=2,
                                     backend="reference")
    assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, b.shape)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    np.testing.assert_allclose(db, np.full(6, 60.0))          # 2 images x 6x5 outputs each

    xf, wf = randn(rng, 3, 5, dtype=dtype), randn(rng, 4, 5, dtype=dtype)
    bf = randn(rng, 4, dtype=dtype)
    yf = ops.linear_forward(xf, wf, bf, backend="reference")
    assert yf.shape == (3, 4) and yf.dtype == dtype
    dxf, dwf, dbf = ops.linear_backward(yf, xf, wf, backend="reference")
    assert (dxf.shape, dwf.shape, dbf.shape) == ((3, 5), (4, 5), (4,))
    assert dxf.dtype == dwf.dtype == dbf.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_norm_dropout_loss_shapes_and_dtypes(rng, dtype):
    x = randn(rng, 2, 3, 9, 9, dtype=dtype)
    y, idx = ops.maxpool_forward(x, backend="reference")
    assert y.shape == idx.shape == (2, 3, 4, 4) and y.dtype == dtype and idx.dtype == np.int32
    assert ops.maxpool_backward(y, idx, x.shape, backend="reference").dtype == dtype
    assert ops.lrn_forward(x, backend="reference").dtype == dtype
    assert ops.relu_forward(x, backend="reference").dtype == dtype
    yd, mask = ops.dropout_forward(x, p=0.5, seed=1, backend="reference")
    assert yd.dtype == dtype and mask.dtype == np.uint8 and mask.shape == x.shape
    loss, probs = ops.softmax_xent_forward(randn(rng, 4, 7, dtype=dtype), [0, 1, 2, 6],
                                           backend="reference")
    assert isinstance(loss, float) and loss > 0 and probs.dtype == dtype
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


# --- round trips and agreement with the launchers ---------------------------------------

def test_conv2d_backward_equals_the_launchers(rng):
    x, w = randn(rng, 2, 4, 8, 8), randn(rng, 6, 2, 3, 3)
    dy = randn(rng, 2, 6, 4, 4)
    dx, dw, db = ops.conv2d_backward(dy, x, w, stride=2, pad=1, groups=2, backend="reference")
    dx_l, dw_l, db_l = np.empty_like(x), np.empty_like(w), np.empty(6)
    ref.conv2d_backward_data(dx_l, dy, w, 2, 1, 2)
    ref.conv2d_backward_weights(dw_l, db_l, dy, x, 2, 1, 2)
    np.testing.assert_array_equal(dx, dx_l)
    np.testing.assert_array_equal(dw, dw_l)
    np.testing.assert_array_equal(db, db_l)


def test_lrn_backward_recomputes_the_denominator(rng):
    x, dy = randn(rng, 2, 7, 3, 3) * 20, randn(rng, 2, 7, 3, 3)
    y = ops.lrn_forward(x, size=5, alpha=1e-3, beta=0.75, k=1.0, backend="reference")
    dx = ops.lrn_backward(dy, x, y, size=5, alpha=1e-3, beta=0.75, k=1.0, backend="reference")
    y_l, scale, dx_l = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y_l, scale, x, 5, 1e-3, 0.75, 1.0)
    ref.lrn_backward(dx_l, dy, x, y_l, scale, 5, 1e-3, 0.75, 1.0)
    np.testing.assert_array_equal(y, y_l)
    np.testing.assert_array_equal(dx, dx_l)


def test_round_trips(rng):
    x = randn(rng, 2, 3, 7, 7)
    y, idx = ops.maxpool_forward(x, size=3, stride=2, backend="reference")
    dy = randn(rng, *y.shape)
    dx = ops.maxpool_backward(dy, idx, x.shape, size=3, stride=2, backend="reference")
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), dy.sum(axis=(2, 3)))   # routed, none lost

    r = ops.relu_forward(x, backend="reference")
    np.testing.assert_array_equal(ops.relu_backward(np.ones_like(x), r, backend="reference"),
                                  (x > 0).astype(x.dtype))

    yd, mask = ops.dropout_forward(x, p=0.25, seed=9, backend="reference")
    np.testing.assert_array_equal(ops.dropout_backward(x, mask, p=0.25, backend="reference"), yd)
    yd2, mask2 = ops.dropout_forward(x, p=0.25, seed=9, backend="reference")
    np.testing.assert_array_equal(mask2, mask)                             # same seed, same mask

    logits, labels = randn(rng, 5, 4), np.array([3, 0, 1, 1, 2])
    loss, probs = ops.softmax_xent_forward(logits, labels, backend="reference")
    dlogits = ops.softmax_xent_backward(probs, labels, backend="reference")
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)
    np.testing.assert_allclose(loss, -np.mean(np.log(probs[np.arange(5), labels])), rtol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "fortran", "strided"])
def test_sgd_update_in_place(rng, layout):
    w, v, dw = randn(rng, 4, 6), randn(rng, 4, 6), randn(rng, 4, 6)
    if layout == "fortran":
        w, v = np.asfortranarray(w), np.asfortranarray(v)
    elif layout == "strided":                                   # views into larger arrays
        w, v = randn(rng, 4, 12)[:, ::2], randn(rng, 4, 12)[:, ::2]
    w0, v0 = w.copy(), v.copy()
    v_exp = 0.9 * v0 - 5e-4 * 0.01 * w0 - 0.01 * dw
    ops.sgd_update(w, dw, v, 0.01, backend="reference")
    np.testing.assert_allclose(v, v_exp, rtol=1e-13)
    np.testing.assert_allclose(w, w0 + v_exp, rtol=1e-13)


# --- the gradient convention: backward launchers overwrite ------------------------------

def _twice(call, *buffers):
    """Run ``call`` into garbage-filled buffers twice; return both results."""
    results = []
    for garbage in (np.nan, 1e3):
        for buf in buffers:
            buf.fill(garbage)
        call()
        results.append([buf.copy() for buf in buffers])
    return results


def test_backward_launchers_overwrite_never_accumulate(rng):
    x, w, dy = randn(rng, 2, 4, 6, 6), randn(rng, 4, 2, 3, 3), randn(rng, 2, 4, 6, 6)
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty(4)
    xl, wl, dyl = randn(rng, 3, 5), randn(rng, 4, 5), randn(rng, 3, 4)
    dxl, dwl, dbl = np.empty_like(xl), np.empty_like(wl), np.empty(4)
    y, scale = np.empty_like(x), np.empty_like(x)
    ref.lrn_forward(y, scale, x, 5, 1e-4, 0.75, 2.0)
    py, idx = np.empty((2, 4, 2, 2)), np.empty((2, 4, 2, 2), np.int32)
    ref.maxpool_forward(py, idx, x, 3, 2)
    mask = ref.dropout.keep_mask(x.shape, 0.5, 0)
    probs = np.full((3, 4), 0.25)
    dlogits = np.empty_like(probs)
    cases = [
        (lambda: ref.conv2d_backward_data(dx, dy, w, 1, 1, 2), dx),
        (lambda: ref.conv2d_backward_weights(dw, db, dy, x, 1, 1, 2), dw, db),
        (lambda: ref.linear_backward_data(dxl, dyl, wl), dxl),
        (lambda: ref.linear_backward_weights(dwl, dbl, dyl, xl), dwl, dbl),
        (lambda: ref.relu_backward(dx, dy, x), dx),
        (lambda: ref.lrn_backward(dx, dy, x, y, scale, 5, 1e-4, 0.75, 2.0), dx),
        (lambda: ref.maxpool_backward(dx, dy[:, :, :2, :2].copy(), idx, 3, 2), dx),
        (lambda: ref.dropout_backward(dx, dy, mask, 0.5), dx),
        (lambda: ref.softmax_xent_backward(dlogits, probs, np.array([0, 1, 3], np.int32)), dlogits),
    ]
    for call, *buffers in cases:
        first, second = _twice(call, *buffers)
        for a, b in zip(first, second):
            assert np.all(np.isfinite(a))
            np.testing.assert_array_equal(a, b)


# --- other backends through the façade ---------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_other_backends_match_the_reference_through_the_facade(rng, backend):
    f32 = np.float32
    x, w = randn(rng, 1, 4, 6, 6, dtype=f32), randn(rng, 4, 2, 3, 3, dtype=f32)
    b = randn(rng, 4, dtype=f32)
    close = dict(rtol=1e-4, atol=1e-5)
    for fn, args in [
        (ops.conv2d_forward, (x, w, b, 1, 1, 2)),
        (ops.conv2d_backward, (x, x, w, 1, 1, 2)),
        (ops.lrn_forward, (x,)),
        (ops.lrn_backward, (x, x, ops.lrn_forward(x, backend="reference"))),
        (ops.maxpool_forward, (x, 3, 2)),
        (ops.dropout_forward, (x, 0.5, 4)),
        (ops.relu_forward, (x,)),
        (ops.linear_forward, (x.reshape(4, 36), randn(rng, 3, 36, dtype=f32), b[:3])),
        (ops.softmax_xent_forward, (x.reshape(4, 36), np.array([0, 5, 9, 35]))),
    ]:
        ours, theirs = fn(*args, backend=backend), fn(*args, backend="reference")
        ours = ours if isinstance(ours, tuple) else (ours,)
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for a, b_ in zip(ours, theirs):
            np.testing.assert_allclose(a, b_, **close, err_msg=f"{fn.__name__} on {backend}")
    wv, dwv, vv = randn(rng, 50, dtype=f32), randn(rng, 50, dtype=f32), randn(rng, 50, dtype=f32)
    w_ref, v_ref = wv.copy(), vv.copy()
    ops.sgd_update(wv, dwv, vv, 0.01, backend=backend)
    assert not np.array_equal(wv, w_ref)        # updated in place
    ops.sgd_update(w_ref, dwv, v_ref, 0.01, backend="reference")
    np.testing.assert_allclose(wv, w_ref, **close)
    np.testing.assert_allclose(vv, v_ref, **close)


def test_cuda_path_copies_to_the_device_and_back(rng, monkeypatch):
    """The façade's cuda plumbing (device buffers, copies both ways, sgd's in-place copy back),
    exercised with a stand-in backend whose launchers take device arrays and run the
    reference on host copies of them."""
    from types import SimpleNamespace

    def on_device(launcher):
        def run(*args, **kwargs):
            assert any(hasattr(a, "copy_to_host") for a in args), "no device array was passed"
            host = [a.copy_to_host() if hasattr(a, "copy_to_host") else a for a in args]
            launcher(*host, **kwargs)
            for dev, h in zip(args, host):
                if hasattr(dev, "copy_to_host"):
                    dev.copy_to_device(h)
        return run

    standin = SimpleNamespace(**{n: on_device(getattr(ref, n)) for n in backends.LAUNCHERS})
    real_get_backend = ops.get_backend
    monkeypatch.setattr(ops, "get_backend",
                        lambda name: standin if name == "cuda" else real_get_backend(name))
    x, w, b = (randn(rng, *s, dtype=np.float32) for s in ((1, 4, 6, 6), (4, 2, 3, 3), (4,)))
    y = ops.conv2d_forward(x, w, b, 1, 1, 2, backend="cuda")
    np.testing.assert_array_equal(y, ops.conv2d_forward(x, w, b, 1, 1, 2, backend="reference"))
    for got, want in zip(ops.conv2d_backward(y, x, w, 1, 1, 2, backend="cuda"),
                         ops.conv2d_backward(y, x, w, 1, 1, 2, backend="reference")):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ops.lrn_backward(x, x, y, backend="cuda"),
                                  ops.lrn_backward(x, x, y, backend="reference"))
    wv, dwv, vv = (randn(rng, 3, 5, dtype=np.float32) for _ in range(3))
    w_before, w_ref, v_ref = wv.copy(), wv.copy(), vv.copy()
    ops.sgd_update(wv, dwv, vv, 0.1, backend="cuda")
    ops.sgd_update(w_ref, dwv, v_ref, 0.1, backend="reference")
    assert not np.array_equal(wv, w_before)     # the caller's array was written
    np.testing.assert_array_equal(wv, w_ref)
    np.testing.assert_array_equal(vv, v_ref)
