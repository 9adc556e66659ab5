"""One argument check for every backend (nbalex.checks): the same bad call is the same
ValueError, with the same message, on reference, cpu and cuda (under the simulator here),
called through the launchers directly and through the ops façade."""

import numpy as np
import pytest

from nbalex import backends, checks, ops

BACKENDS = backends.BACKENDS
f32 = np.float32


def zeros(*shape, dtype=f32):
    return np.zeros(shape, dtype)


def launch(backend, name, *args, **kwargs):
    """Call backend's launcher ``name``; for cuda every NumPy array goes to the device first
    (a callable argument replaces the array before it by a view of it, taken on the device)."""
    fn = getattr(backends.get_backend(backend), name)
    if backend == "cuda":
        from numba import cuda
        args = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    out = []
    for a in args:
        if callable(a):
            out[-1] = a(out[-1])
        else:
            out.append(a)
    args = out
    return fn(*args, **kwargs)


def message(call):
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def same_everywhere(make_call, expected):
    """The message of make_call(backend) on every backend: all equal, matching ``expected``."""
    got = {b: message(lambda: make_call(b)) for b in BACKENDS}
    assert len(set(got.values())) == 1, got
    assert expected in got["reference"], got["reference"]
    return got["reference"]


x4 = zeros(2, 4, 5, 5)
w4 = zeros(6, 2, 3, 3)

BAD_LAUNCHES = {
    "bias shorter than the filters": (
        ("conv2d_forward", zeros(2, 6, 3, 3), x4, w4, zeros(3), 1, 0, 2),
        "conv2d_forward: b has shape (3,), expected (6,)"),
    "stride 0": (
        ("conv2d_forward", zeros(2, 6, 3, 3), x4, w4, zeros(6), 0, 0, 2),
        "need stride >= 1, pad >= 0, groups >= 1; got 0, 0, 2"),
    "groups not dividing the channels": (
        ("conv2d_backward_data", x4, zeros(2, 6, 3, 3), w4, 1, 0, 3),
        "do not fit groups=3"),
    "wrong conv output shape": (
        ("conv2d_forward", zeros(2, 6, 4, 4), x4, w4, zeros(6), 1, 0, 2),
        "conv2d_forward: y has shape (2, 6, 4, 4), expected (2, 6, 3, 3)"),
    "pool window larger than its input": (
        ("maxpool_forward", zeros(1, 1, 1, 1), zeros(1, 1, 1, 1, dtype=np.int32),
         zeros(1, 1, 2, 2), 3, 2),
        "maxpool_forward: pool window 3 is larger than the input plane 2x2"),
    "maxpool backward without idx": (
        ("maxpool_backward", zeros(1, 1, 5, 5), zeros(1, 1, 2, 2), None, 3, 2),
        "maxpool_backward: idx is None"),
    "wrong linear output": (
        ("linear_forward", zeros(3, 5), zeros(3, 4), zeros(6, 4), zeros(6)),
        "linear_forward: y has shape (3, 5), expected (3, 6)"),
    "non-contiguous input": (
        ("relu_forward", zeros(2, 3), zeros(2, 6), lambda a: a[:, ::2]),
        "relu_forward: x must be C-contiguous"),
    "dropout p = 1": (
        ("dropout_forward", zeros(8), zeros(8, dtype=np.uint8), zeros(8), 1.0, 0),
        "dropout_forward: dropout probability must be in [0, 1), got 1.0"),
    "dropout p < 0": (
        ("dropout_backward", zeros(8), zeros(8), zeros(8, dtype=np.uint8), -0.1),
        "dropout probability must be in [0, 1), got -0.1"),
    "negative dropout offset": (
        ("dropout_forward", zeros(8), zeros(8, dtype=np.uint8), zeros(8), 0.5, 0, -1),
        "dropout_forward: offset must be >= 0, got -1"),
    "mask of the wrong dtype": (
        ("dropout_backward", zeros(8), zeros(8), zeros(8), 0.5),
        "dropout_backward: mask must be uint8, got float32"),
    "LRN with k = 0": (
        ("lrn_forward", zeros(1, 4, 2, 2), zeros(1, 4, 2, 2), zeros(1, 4, 2, 2), 5, 1e-4, 0.75, 0.0),
        "need alpha >= 0 and k > 0"),
    "labels out of range": (
        ("softmax_xent_forward", zeros(2), zeros(2, 3), zeros(2, 3), np.array([0, 3], np.int32)),
        "softmax_xent_forward: labels must lie in [0, 3), got 0..3"),
    "labels of the wrong dtype": (
        ("softmax_xent_backward", zeros(2, 3), zeros(2, 3), np.array([0, 1])),
        "softmax_xent_backward: labels must be int32, got int64"),
    "sgd gradient of another size": (
        ("sgd_update", zeros(6), zeros(5), zeros(6), 0.1, 0.9, 0.0),
        "sgd_update: dw has shape (5,), expected (6,)"),
    "sgd offsets given as a list": (
        ("sgd_update", zeros(6), zeros(6), zeros(6), 0.1, 0.9, 0.0, [0, 6]),
        "sgd_update: offsets must be an array, got list"),
    "sgd with a non-finite lr": (
        ("sgd_update", zeros(6), zeros(6), zeros(6), float("nan"), 0.9, 0.0),
        "sgd_update: lr must be finite, got nan"),
    "mixed float dtypes": (
        ("relu_backward", zeros(4), zeros(4, dtype=np.float64), zeros(4)),
        "relu_backward: dy is float64 but the other arrays are float32"),
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHES))
def test_every_backend_refuses_a_bad_launch_with_one_message(case):
    (name, *args), expected = BAD_LAUNCHES[case]
    # labels travel as host arrays to the cuda launcher (values are checked on the host only)
    host_only = name.startswith("softmax") and "range" in case
    if host_only:
        same_everywhere(lambda b: getattr(backends.get_backend(b), name)(*args), expected)
    else:
        same_everywhere(lambda b: launch(b, name, *args), expected)


def test_float64_only_on_the_reference():
    x = np.array([[-1.0, 2.0]])
    y = np.empty_like(x)
    launch("reference", "relu_forward", y, x)
    np.testing.assert_array_equal(y, [[0.0, 2.0]])
    for b in ("cpu", "cuda"):
        got = message(lambda: launch(b, "relu_forward", np.empty_like(x), x))
        assert got == (f"relu_forward: x is float64; the {b} backend computes in float32 "
                       "(only the reference also takes float64)")
        got = message(lambda: ops.conv2d_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)),
                                                 np.ones(1), backend=b))
        assert "x is float64; the " + b in got and "gemm" not in got


FACADE = {
    "bias shorter": (lambda b: ops.conv2d_forward(x4, w4, zeros(3), groups=2, backend=b),
                     "conv2d_forward: b has shape (3,), expected (6,)"),
    "stride 0": (lambda b: ops.conv2d_forward(x4, w4, zeros(6), stride=0, groups=2, backend=b),
                 "conv2d_forward: need stride >= 1"),
    "pool stride 0": (lambda b: ops.maxpool_forward(x4, 3, 0, backend=b),
                      "maxpool_forward: pool size and stride must be positive, got 3, 0"),
    "pool window": (lambda b: ops.maxpool_forward(x4, size=6, backend=b),
                    "maxpool_forward: pool window 6 is larger than the input plane 5x5"),
    "labels": (lambda b: ops.softmax_xent_forward(zeros(2, 3), [0, 3], backend=b),
               "softmax_xent_forward: labels must lie in [0, 3), got 0..3"),
    "dropout p": (lambda b: ops.dropout_forward(zeros(4), p=1.5, backend=b),
                  "dropout probability must be in [0, 1), got 1.5"),
    "sgd lr": (lambda b: ops.sgd_update(zeros(3), zeros(3), zeros(3), float("inf"), backend=b),
               "sgd_update: lr must be finite, got inf"),
}


@pytest.mark.parametrize("case", list(FACADE))
def test_the_facade_refuses_with_the_launchers_message(case):
    make_call, expected = FACADE[case]
    same_everywhere(make_call, expected)


def test_cpu_no_longer_reads_past_a_short_bias():
    """Before: the cpu conv read b out of bounds and returned garbage (values up to ~1e35)."""
    with pytest.raises(ValueError, match="b has shape"):
        ops.conv2d_forward(np.ones((1, 2, 4, 4), f32), np.ones((4, 2, 3, 3), f32),
                           np.ones(2, f32), backend="cpu")


def test_every_launcher_has_a_check_with_its_signature():
    import inspect
    reference = backends.signatures(backends.get_backend("reference"))
    for name in backends.LAUNCHERS:
        check = inspect.signature(getattr(checks, name))
        params = [p for p in check.parameters if p != "backend"]
        assert params == list(reference[name].parameters), name
        for b in BACKENDS:
            assert callable(getattr(getattr(backends.get_backend(b), name), "unchecked", None)), (b, name)


def test_like_stands_in_for_an_array():
    checks.relu_forward(checks.like((2, 3)), checks.like((2, 3)), backend="cpu")
    with pytest.raises(ValueError, match="relu_forward: y has shape"):
        checks.relu_forward(checks.like((2, 4)), checks.like((2, 3)), backend="cpu")
