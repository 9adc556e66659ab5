"""The three backends expose the same launchers with the same signatures (DESIGN §3)."""

import importlib

import numpy as np
import pytest

from nbalex import backends


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_backend_exports_every_launcher(name):
    module = importlib.import_module(f"nbalex.{name}")
    missing = [n for n in backends.LAUNCHERS if not callable(getattr(module, n, None))]
    assert not missing, f"nbalex.{name} lacks {missing}"


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_signatures_match_reference(name):
    reference = backends.signatures(importlib.import_module("nbalex.reference"))
    other = backends.signatures(importlib.import_module(f"nbalex.{name}"))
    for launcher in backends.LAUNCHERS:
        assert str(other[launcher]) == str(reference[launcher]), launcher


def test_launchers_put_outputs_first_and_take_a_stream():
    reference = backends.signatures(importlib.import_module("nbalex.reference"))
    for launcher, sig in reference.items():
        if launcher.endswith("_workspace_size"):
            continue
        params = list(sig.parameters.values())
        assert params[-1].name == "stream" and params[-1].default is None, launcher


def test_auto_resolves_to_an_existing_backend():
    assert backends.resolve("auto") in backends.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("tpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert backends.resolve("auto") == "cpu"
    with pytest.raises(ValueError, match="backend cuda needs an NVIDIA GPU.*--backend cpu"):
        backends.resolve("cuda")
    assert backends.resolve("cuda", need_device=False) == "cuda"      # sizing, planning


def test_dropout_rule_keeps_about_one_minus_p():
    keep = np.array([backends.dropout_keep(7, i, 0.3) for i in range(20000)])
    assert abs(keep.mean() - 0.7) < 0.02
    assert backends.dropout_keep(7, 5, 0.0) is True
    other_seed = np.array([backends.dropout_keep(8, i, 0.3) for i in range(20000)])
    assert (keep != other_seed).mean() > 0.3


def _run(backend, name, outputs, inputs, *args):
    """Launch on ``backend`` (cuda: through device copies); returns the outputs as NumPy."""
    module = importlib.import_module(f"nbalex.{backend}")
    if backend != "cuda":
        getattr(module, name)(*outputs, *inputs, *args)
        return outputs
    from numba import cuda
    dev = [None if o is None else cuda.to_device(o) for o in outputs]
    getattr(module, name)(*dev, *[cuda.to_device(a) for a in inputs], *args)
    return [None if d is None else d.copy_to_host() for d in dev]


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_dropout_offset_lets_two_halves_draw_the_full_mask(name):
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    empty = lambda a: [np.empty_like(a), np.empty(a.shape, np.uint8)]   # noqa: E731
    y, mask = _run(name, "dropout_forward", empty(x), [x], 0.5, 11)
    per_example = 3 * 5
    halves = [_run(name, "dropout_forward", empty(x[r:r + 2]), [x[r:r + 2]], 0.5, 11, r * per_example)
              for r in (0, 2)]
    np.testing.assert_array_equal(np.concatenate([h[1] for h in halves]), mask)
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), y)
    expected = [backends.dropout_keep(11, 30 + i, 0.5) for i in range(30)]
    np.testing.assert_array_equal(halves[1][1].reshape(-1), expected)


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_inference_outputs_may_be_none(name):
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(np.float32)
    pooled = (2, 4, 2, 2)
    y, idx = _run(name, "maxpool_forward", [np.empty(pooled, np.float32),
                                            np.empty(pooled, np.int32)], [x], 3, 2)
    y_only, none = _run(name, "maxpool_forward", [np.empty(pooled, np.float32), None], [x], 3, 2)
    assert none is None
    np.testing.assert_array_equal(y_only, y)
    z, scale = _run(name, "lrn_forward", [np.empty_like(x), np.empty_like(x)], [x], 3, 0.1, 0.75, 2.0)
    z_only, none = _run(name, "lrn_forward", [np.empty_like(x), None], [x], 3, 0.1, 0.75, 2.0)
    assert none is None
    np.testing.assert_array_equal(z_only, z)
