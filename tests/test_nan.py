"""NaN and infinities propagate through every op on every backend exactly as the reference does.

Each case feeds NaN, +inf and -inf into one input of one op (tiny shapes, so the CUDA kernels
run under the simulator) and compares what comes out with the NumPy reference: the positions
of NaN, +inf and -inf must be the same, the finite values close, integer outputs (max-pool's
idx) equal.  A case whose reference output holds no special value would prove nothing, so
each case also checks that it does.  On CUDA, split-K is forced wherever a reduction allows it,
so the slice sums are covered too.

Rules the reference defines (and its docstrings state): ReLU keeps NaN (np.maximum); ReLU's
backward, dropout and its backward multiply (dy * (y > 0), x * mask / (1-p)), so a NaN or inf
at a dropped or inactive unit gives NaN; max-pool's first NaN in row-major window order wins
and idx points at it; softmax cross-entropy of a row whose max is not finite (a NaN, a +inf,
or every logit -inf) is NaN throughout, and a -inf logit elsewhere gives probability 0.
"""

import numpy as np
import pytest

from nbalex.backends import get_backend
from nbalex.cuda import tiling

F32 = np.float32
SPECIALS = (np.nan, np.inf, -np.inf)


def spiked(shape, seed, at=None, low=-1.0, high=1.0):
    """A float32 array of uniform values with NaN, +inf, -inf at the flat positions ``at``
    (default: near the start, the middle and the end)."""
    a = np.random.default_rng(seed).uniform(low, high, shape).astype(F32)
    flat = a.reshape(-1)
    at = at if at is not None else (1, flat.size // 2, flat.size - 2)
    for pos, value in zip(at, SPECIALS):
        flat[pos] = value
    return a


def plain(shape, seed, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(F32)


def launch(backend, name, outputs, inputs, *args, **kwargs):
    """Run launcher ``name`` of ``backend`` on fresh outputs [(shape, dtype)] and copies of
    ``inputs``; return the outputs as NumPy arrays."""
    fn = getattr(get_backend(backend), name)
    outs = [np.zeros(shape, dtype) for shape, dtype in outputs]
    if backend != "cuda":
        fn(*outs, *[np.array(a) for a in inputs], *args, **kwargs)
        return outs
    from numba import cuda
    d_outs = [cuda.to_device(o) for o in outs]
    fn(*d_outs, *[cuda.to_device(np.ascontiguousarray(a)) for a in inputs], *args, **kwargs)
    return [d.copy_to_host() for d in d_outs]


def assert_same_specials(label, ref, got):
    ref, got = np.asarray(ref), np.asarray(got)
    assert ref.shape == got.shape, f"{label}: shape {got.shape} != {ref.shape}"
    if ref.dtype.kind in "iu":
        np.testing.assert_array_equal(got, ref, err_msg=label)
        return
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        wrong = np.argwhere(test(ref) != test(got))
        assert wrong.size == 0, (f"{label}: {what} pattern differs at {wrong[:4].tolist()}: "
                                 f"ref {ref[tuple(wrong[0])]}, got {got[tuple(wrong[0])]}")
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=1e-5, err_msg=label)


# ---- the cases: name -> fn(backend) returning a list of output arrays ---------------------

CONV_GEOMETRIES = {"s1p1": (1, 1, 3), "s2p1": (2, 1, 3), "1x1": (1, 0, 1)}


def conv_case(geometry, which, relu=False):
    stride, pad, k = CONV_GEOMETRIES[geometry]
    x_shape, w_shape = (2, 4, 5, 5), (4, 2, k, k)
    oh = (5 + 2 * pad - k) // stride + 1
    y_shape = (2, 4, oh, oh)

    def run(backend):
        x = spiked(x_shape, 1) if which == "x" else plain(x_shape, 1)
        w = spiked(w_shape, 2) if which == "w" else plain(w_shape, 2)
        b = spiked((4,), 3, at=(0, 1, 2)) if which == "b" else plain((4,), 3)
        dy = spiked(y_shape, 4) if which == "dy" else plain(y_shape, 4)
        geo = (stride, pad, 2)
        out = []                             # only the passes the spiked input reaches
        if which != "dy":
            out += launch(backend, "conv2d_forward", [(y_shape, F32)], [x, w, b], *geo, relu=relu)
        if which in ("w", "dy") and not relu:
            out += launch(backend, "conv2d_backward_data", [(x_shape, F32)], [dy, w], *geo)
        if which in ("x", "dy") and not relu:
            out += launch(backend, "conv2d_backward_weights", [(w_shape, F32), ((4,), F32)],
                          [dy, x], *geo)
        return out
    return run


def linear_case(which, relu=False):
    n, k, m = 3, 24, 5

    def run(backend):
        x = spiked((n, k), 1) if which == "x" else plain((n, k), 1)
        w = spiked((m, k), 2) if which == "w" else plain((m, k), 2)
        b = spiked((m,), 3, at=(0, 1, 2)) if which == "b" else plain((m,), 3)
        dy = spiked((n, m), 4) if which == "dy" else plain((n, m), 4)
        (y,) = launch(backend, "linear_forward", [((n, m), F32)], [x, w, b], relu=relu)
        if relu or which == "b":
            return [y]
        (dx,) = launch(backend, "linear_backward_data", [((n, k), F32)], [dy, w])
        dw, db = launch(backend, "linear_backward_weights", [((m, k), F32), ((m,), F32)], [dy, x])
        return [y, dx, dw, db]
    return run


def relu_case(which):
    def run(backend):
        x = spiked((3, 7), 1)
        if which == "x":
            return launch(backend, "relu_forward", [(x.shape, F32)], [x])
        y = np.maximum(x, 0) if which == "y" else plain(x.shape, 1, 0.0, 1.0) * (x > 0)
        dy = spiked(x.shape, 2, at=(0, 3, 5))   # at active and inactive units
        return launch(backend, "relu_backward", [(x.shape, F32)], [dy, y])
    return run


LRN_ARGS = (5, 1e-4, 0.75, 2.0)


def lrn_case(which):
    shape = (2, 9, 2, 2)                     # channel 1 of column 0 is NaN: channels 0..3 see it

    def run(backend):
        x = spiked(shape, 1, at=(4, 40, 70), low=-3, high=3) if which == "x" \
            else plain(shape, 1, -3, 3)
        y, scale = launch("reference", "lrn_forward", [(shape, F32)] * 2, [x], *LRN_ARGS)
        if which == "x":
            fwd = launch(backend, "lrn_forward", [(shape, F32)] * 2, [x], *LRN_ARGS)
        else:
            fwd = []
        dy = spiked(shape, 2, at=(4, 40, 70)) if which == "dy" else plain(shape, 2)
        (dx,) = launch(backend, "lrn_backward", [(shape, F32)], [dy, x, y, scale], *LRN_ARGS)
        return fwd + [dx]
    return run


def maxpool_case(which):
    shape = (1, 2, 7, 7)

    def run(backend):
        x = plain(shape, 1)
        x[0, 0, 0, 2] = np.nan                   # not first in windows (0, 0) and (0, 1)
        x[0, 0, 1, 3] = np.nan                   # a second NaN in window (0, 1)
        x[0, 0, 4:7, 4:7] = -np.inf              # a window of -inf only
        x[0, 1, 3, 3] = np.inf
        x[0, 1, 6, 0] = np.nan                   # last in its window
        y, idx = launch("reference", "maxpool_forward", [((1, 2, 3, 3), F32),
                                                        ((1, 2, 3, 3), np.int32)], [x], 3, 2)
        if which == "x":
            return launch(backend, "maxpool_forward", [((1, 2, 3, 3), F32),
                                                      ((1, 2, 3, 3), np.int32)], [x], 3, 2)
        dy = spiked((1, 2, 3, 3), 2, at=(0, 1, 4))   # windows 0 and 1 overlap at column 2
        return launch(backend, "maxpool_backward", [(shape, F32)], [dy, idx], 3, 2)
    return run


def dropout_case(which):
    def run(backend):
        x = spiked((4, 8), 1, at=(0, 1, 2, 3))
        x.reshape(-1)[4:8] = (np.nan, np.inf, -np.inf, np.nan)
        if which == "x":
            return launch(backend, "dropout_forward", [(x.shape, F32), (x.shape, np.uint8)],
                          [x], 0.5, 7)
        _, mask = launch("reference", "dropout_forward", [(x.shape, F32), (x.shape, np.uint8)],
                         [plain(x.shape, 2)], 0.5, 7)
        return launch(backend, "dropout_backward", [(x.shape, F32)], [x, mask], 0.5)
    return run


def softmax_case(which):
    logits = plain((7, 5), 1, -3, 3)
    logits[0, 2] = np.nan                        # NaN: the whole row is NaN
    logits[1, 0] = np.inf                        # +inf: likewise
    logits[2, 1] = -np.inf                       # -inf, the label: probability 0, loss +inf
    logits[3, 4] = -np.inf                       # -inf elsewhere: probability 0
    logits[4, :] = -np.inf                       # every logit -inf: NaN
    logits[5, 3:] = np.inf                       # two +inf
    labels = np.array([0, 3, 1, 2, 0, 1, 4], np.int32)

    def run(backend):
        n, k = logits.shape
        if which == "logits":
            return launch(backend, "softmax_xent_forward", [((n,), F32), ((n, k), F32)],
                          [logits, labels])
        probs = spiked((n, k), 2, low=0, high=1)
        return launch(backend, "softmax_xent_backward", [((n, k), F32)], [probs, labels])
    return run


def sgd_case(which):
    def run(backend):
        arrays = {name: plain((40,), seed) for seed, name in enumerate(("w", "dw", "v"))}
        arrays[which] = spiked((40,), 5, at=(3, 20, 33))
        offsets = np.array([0, 10, 25, 40], np.int64)
        mults = (np.array([1.0, 2.0, 0.5], F32), np.array([1.0, 0.0, 1.0], F32))
        w, dw, v = arrays["w"].copy(), arrays["dw"], arrays["v"].copy()
        mod = get_backend(backend)
        if backend != "cuda":
            mod.sgd_update(w, dw, v, 0.1, 0.9, 5e-4, offsets, *mults)
            return [w, v]
        from numba import cuda
        d = [cuda.to_device(a) for a in (w, dw, v, offsets, *mults)]
        mod.sgd_update(d[0], d[1], d[2], 0.1, 0.9, 5e-4, d[3], d[4], d[5])
        return [d[0].copy_to_host(), d[2].copy_to_host()]
    return run


def augment_case(which):
    def run(backend):
        images = np.random.default_rng(1).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
        mean = spiked((6, 6, 3), 2, at=(5, 50, 100)) if which == "mean" \
            else plain((6, 6, 3), 2)
        shift = spiked((2, 3), 3, at=(0, 2, 4)) if which == "rgb_shift" else plain((2, 3), 3)
        crop = (np.array([0, 2], np.int32), np.array([1, 0], np.int32), np.array([0, 1], np.uint8))
        return launch(backend, "augment_batch", [((2, 3, 4, 4), F32)],
                      [images, *crop, shift, mean])
    return run


CUDA_CONV = {"s1p1", "s2p1"}     # CUDA runs one implicit-GEMM kernel for every geometry
CASES = {
    **{f"conv2d_{g}_{w}": conv_case(g, w) for g in CONV_GEOMETRIES for w in ("x", "w", "dy")},
    **{f"conv2d_{g}_b": conv_case(g, "b") for g in ("s1p1", "s2p1")},
    **{f"conv2d_{g}_relu": conv_case(g, "x", relu=True) for g in CONV_GEOMETRIES},
    **{f"linear_{w}": linear_case(w) for w in ("x", "w", "b", "dy")},
    "linear_relu": linear_case("x", relu=True),
    **{f"relu_{w}": relu_case(w) for w in ("x", "y", "dy")},
    **{f"lrn_{w}": lrn_case(w) for w in ("x", "dy")},
    **{f"maxpool_{w}": maxpool_case(w) for w in ("x", "dy")},
    **{f"dropout_{w}": dropout_case(w) for w in ("x", "dy")},
    **{f"softmax_xent_{w}": softmax_case(w) for w in ("logits", "probs")},
    **{f"sgd_{w}": sgd_case(w) for w in ("w", "dw", "v")},
    **{f"augment_{w}": augment_case(w) for w in ("mean", "rgb_shift")},
}


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_specials_propagate_as_in_the_reference(case, backend, monkeypatch):
    if backend == "cuda" and case.startswith("conv2d") and case.split("_")[1] not in CUDA_CONV:
        pytest.skip("the same CUDA kernels as the other geometries (simulator time)")
    monkeypatch.setattr(tiling, "MIN_SPLIT_TILES", 1)     # split-K wherever K has 2+ tiles
    ref = CASES[case]("reference")
    assert any(not np.isfinite(r).all() for r in ref if r.dtype.kind == "f"), \
        f"{case}: the reference output holds no NaN or inf, so the case tests nothing"
    got = CASES[case](backend)
    for i, (r, g) in enumerate(zip(ref, got)):
        label = f"{case} on {backend}, output {i}"
        if backend == "cuda" and case.startswith("conv2d") and case.endswith("_w") and i == 1:
            assert_superset_of_specials(label, r, g)
        else:
            assert_same_specials(label, r, g)


def assert_superset_of_specials(label, ref, got):
    """The one known difference: CUDA's backward-data is an implicit GEMM over every filter tap,
    with zeros loaded for the taps that fall outside dy, so a non-finite weight also meets
    those zeros (0 * inf = NaN) where the reference's col2im never multiplies it.  Such dx
    elements come out NaN; no NaN or inf of the reference is ever lost, and every element
    that is finite on CUDA matches the reference."""
    bad_ref, bad_got = ~np.isfinite(ref), ~np.isfinite(got)
    assert not (bad_ref & ~bad_got).any(), f"{label}: a NaN or inf of the reference was lost"
    finite = ~bad_got
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=1e-5, err_msg=label)


@pytest.mark.parametrize("which", ["x", "w", "dy"])
def test_cpu_winograd_never_loses_a_nan_or_inf(which):
    """The CPU's Winograd path (3x3, stride 1, a batch of 4+ on maps over 12x12; every pass)
    mixes a 4x4 input block into all four outputs of its tile, and inf - inf in a transform is NaN: a
    special value may spread to more outputs, or turn from inf into NaN, but none is lost
    and every finite output matches the reference."""
    from nbalex.cpu import conv_strategy
    x_shape, w_shape, y_shape = (4, 4, 13, 13), (4, 2, 3, 3), (4, 4, 13, 13)
    assert conv_strategy.choose(13, 13, 3, 3, 1, 1, True, "forward", 4) == "winograd"
    x = spiked(x_shape, 1) if which == "x" else plain(x_shape, 1)
    w = spiked(w_shape, 2) if which == "w" else plain(w_shape, 2)
    dy = spiked(y_shape, 4) if which == "dy" else plain(y_shape, 4)
    b = plain((4,), 3)
    assert conv_strategy.choose(13, 13, 3, 3, 1, 1, True, "backward_weights", 4) == "winograd"
    for name, outs, ins, reads in (
            ("conv2d_forward", [(y_shape, F32)], [x, w, b], ("x", "w")),
            ("conv2d_backward_data", [(x_shape, F32)], [dy, w], ("dy", "w")),
            ("conv2d_backward_weights", [(w_shape, F32), ((4,), F32)], [dy, x], ("dy", "x"))):
        if which not in reads:
            continue                         # that pass does not read the spiked input
        ref = launch("reference", name, outs, ins, 1, 1, 2)[0]
        got = launch("cpu", name, outs, ins, 1, 1, 2)[0]
        assert not np.isfinite(ref).all()
        assert_superset_of_specials(f"{name}, spiked {which}", ref, got)


def test_maxpool_first_nan_wins_in_the_reference():
    """The rule the kernels follow: a NaN beats every number, and the first NaN in row-major
    window order is the one idx points at."""
    x = np.zeros((1, 1, 3, 3), F32)
    x[0, 0, 0, 2], x[0, 0, 2, 0], x[0, 0, 1, 1] = np.nan, np.nan, 5.0
    y, idx = launch("reference", "maxpool_forward", [((1, 1, 1, 1), F32),
                                                    ((1, 1, 1, 1), np.int32)], [x], 3, 2)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 2


# ---- the SGD kernel's non-finite flag (what lets a training loop stop cheaply) --------------

def sgd_with_flag(backend, w, dw, v, flag, tensors):
    """One sgd_update with a nonfinite flag; returns (w, v, flag) after it."""
    mod = get_backend(backend)
    extra = (np.array([0, 10, 40], np.int64), np.array([1.0, 2.0], F32),
             np.array([0.0, 1.0], F32)) if tensors else (None, None, None)
    if backend != "cuda":
        w, v, flag = w.copy(), v.copy(), flag.copy()
        mod.sgd_update(w, dw, v, 0.1, 0.9, 5e-4, *extra, nonfinite=flag)
        return w, v, flag
    from numba import cuda
    d = [cuda.to_device(a) for a in (w, dw, v, flag)]
    d_extra = [None if a is None else cuda.to_device(a) for a in extra]
    mod.sgd_update(d[0], d[1], d[2], 0.1, 0.9, 5e-4, *d_extra, nonfinite=d[3])
    return d[0].copy_to_host(), d[2].copy_to_host(), d[3].copy_to_host()


@pytest.mark.parametrize("tensors", [False, True], ids=["one-tensor", "offsets"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_sgd_update_flags_a_nonfinite_update(backend, tensors):
    w, dw, v = plain((40,), 0), plain((40,), 1), plain((40,), 2)
    clear = np.zeros(1, np.int32)
    w1, _, flag = sgd_with_flag(backend, w, dw, v, clear, tensors)
    assert flag[0] == 0 and np.isfinite(w1).all()
    for spoil in SPECIALS:
        bad = dw.copy()
        bad[33] = spoil
        w1, _, flag = sgd_with_flag(backend, w, bad, v, clear, tensors)
        assert flag.tolist() == [1], f"{spoil} in dw was not flagged"
        assert not np.isfinite(w1[33])
    _, _, flag = sgd_with_flag(backend, w, dw, v, np.ones(1, np.int32), tensors)
    assert flag[0] == 1                          # the kernel never clears it


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sgd_step_returns_false_after_a_nan_gradient(backend):
    from nbalex.model import Net
    net = Net("tests/configs/tiny.toml", backend=backend, batch_size=2, seed=0)
    good = net.params()
    x = np.random.default_rng(0).standard_normal((2, *net.input_shape)).astype(F32)
    labels = np.array([0, 1], np.int32)
    net.forward_backward(x, labels)
    assert net.sgd_step(0.01) is True
    x[1, 0, 3, 4] = np.nan                       # one NaN pixel: NaN gradients everywhere
    net.forward_backward(x, labels)
    assert net.sgd_step(0.01) is False
    assert net.sgd_step(0.01) is False           # the parameters are still NaN
    net.load_params(good)                        # what resuming a good checkpoint does
    net.load_momentum({name: np.zeros_like(a) for name, a in good.items()})
    x[1, 0, 3, 4] = 0.0
    net.forward_backward(x, labels)
    assert net.sgd_step(0.01) is True            # the flag was re-armed after the False
