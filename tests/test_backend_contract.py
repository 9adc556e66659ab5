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
