"""The training loop's pieces: scoring, seeds, plots, settings, Ctrl-C and divergence.

The end-to-end runs through the command line are in test_cli.py; here the library is
called directly, on the same tiny data (built once per module by the ``packed`` fixture).
"""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbalex import plots
from nbalex import inference
from nbalex import train as training

TINY = str(Path(__file__).parent / "configs" / "cli-tiny.toml")


# ------------------------------------------------------------------------ scoring
def test_scores_match_a_sort_based_top_k(rng):
    probs = rng.dirichlet(np.ones(7), size=200)
    labels = rng.integers(0, 7, size=200)
    scores = inference.Scores()
    scores.add(probs[:120], labels[:120])
    scores.add(probs[120:], labels[120:])
    result = scores.result()
    order = np.argsort(-probs, axis=1)
    assert result["images"] == 200
    assert result["top1_error"] == pytest.approx(np.mean(order[:, 0] != labels))
    in_top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    assert result["top5_error"] == pytest.approx(np.mean(~in_top5))
    assert result["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(200), labels])))


def test_scores_count_ties_against_the_true_class():
    scores = inference.Scores()
    scores.add(np.full((2, 6), 1 / 6), np.array([0, 5]))
    assert scores.result()["top1_error"] == 1.0 and scores.result()["top5_error"] == 1.0
    scores.add(np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]), np.array([1]))
    assert scores.result()["top5_error"] == 1.0    # 5 classes score at least as high as class 1


def test_softmax_rows_sum_to_one_and_ignore_shifts(rng):
    logits = rng.normal(size=(5, 9)) * 30
    probs = inference.softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(inference.softmax(logits + 1000.0), probs, rtol=1e-9)
    assert np.all(np.argmax(probs, axis=1) == np.argmax(logits, axis=1))


def test_step_seeds_differ_across_seed_epoch_and_step():
    seeds = {training.step_seed(s, e, k) for s in range(3) for e in range(20) for k in range(200)}
    assert len(seeds) == 3 * 20 * 200
    assert all(0 <= s < 2**32 for s in seeds)


def test_resume_refuses_changed_run_settings():
    stored = training.Settings(model="alexnet-mini", batch_size=32)
    assert stored.merged({"batch_size": 32, "lr": None}) is stored
    with pytest.raises(ValueError, match="--batch-size 64 differs"):
        stored.merged({"batch_size": 64})
    mini = (Path(training.__file__).parent / "configs" / "alexnet-mini.toml").read_text()
    training._check_same_model("alexnet-mini", mini, "run/checkpoint.h5")
    with pytest.raises(ValueError, match="--model alexnet is not the model"):
        training._check_same_model("alexnet", mini, "run/checkpoint.h5")


def test_plateau_schedule_divides_by_ten_when_error_stalls_at_most_three_times():
    settings = training.Settings(lr=0.01)
    schedule = training.make_schedule(settings)
    errors = (0.5, 0.4, 0.4, 0.45, 0.3, 0.3, 0.3, 0.3)
    lrs = [schedule.step(e) for e in errors[:4]]
    resumed = training.make_schedule(settings, json.loads(json.dumps(schedule.state_dict())))
    lrs += [resumed.step(e) for e in errors[4:]]
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])


def test_step_schedule_divides_every_k_epochs_and_follows_a_longer_resume():
    settings = training.Settings(lr=1.0, schedule="step", step_epochs=2)
    schedule = training.make_schedule(settings)
    lrs = [schedule.step() for _ in range(3)]
    resumed = training.make_schedule(settings, schedule.state_dict())
    lrs += [resumed.step() for _ in range(5)]
    assert lrs == pytest.approx([1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4])


# -------------------------------------------------------------------------- plots
def test_filter_grid_normalises_each_filter_and_upscales_by_blocks(rng):
    weights = rng.normal(size=(5, 3, 3, 3)) * np.arange(1, 6)[:, None, None, None]
    weights[4] = 0.7                                   # a constant filter
    grid = plots.filter_grid(weights, scale=4, gutter=1, columns=3)
    assert grid.shape == (2 * (12 + 1) + 1, 3 * (12 + 1) + 1, 3)
    first = grid[1:13, 1:13]
    assert first.min() == 0.0 and first.max() == 1.0
    block = first[4:8, 8:12]                           # pixel (1, 2) of filter 0, 4x4 copies
    assert np.all(block == block[0, 0])
    low, high = weights[0].min(), weights[0].max()
    np.testing.assert_allclose(block[0, 0], (weights[0, :, 1, 2] - low) / (high - low))
    fifth = grid[14:26, 14:26]                         # row 1, column 1
    assert np.all(fifth == 0.5)
    assert np.all(grid[:, 0] == 1.0)                   # white gutter


def test_plots_write_pngs(tmp_path, rng):
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e,
                "top1_error": 0.9 / e, "top5_error": 0.5 / e} for e in (1, 2, 3)]
    plots.plot_curves(history, tmp_path / "curves.png")
    plots.plot_filters(rng.normal(size=(6, 3, 5, 5)), tmp_path / "filters.png")
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.width > img.height > 100
    with Image.open(tmp_path / "filters.png") as img:
        assert img.format == "PNG" and img.width == 3 * (5 * 8 + 2) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "filters.png"]


def test_a_failed_plot_leaves_the_previous_png_whole(tmp_path, rng):
    path = tmp_path / "filters.png"
    plots.plot_filters(rng.normal(size=(6, 3, 5, 5)), path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        plots.plot_filters(rng.normal(size=(6, 3, 5)), path)   # not 4-D: fails before writing
    with pytest.raises(ZeroDivisionError):
        plots._write_png(path, lambda tmp: (tmp.write_bytes(b"half a pict"), 1 / 0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["filters.png"]


# ------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(train.h5, val.h5): 3 classes, 8 training and 4 validation images each, 24x24."""
    from nbalex.io.pack import pack
    from nbalex.io.synth import synth
    root = tmp_path_factory.mktemp("tiny-data")
    synth(root / "images", classes=3, train_per_class=8, val_per_class=4, seed=5)
    pack(root / "images" / "train", root / "train.h5", size=24, workers=1, progress=False)
    pack(root / "images" / "val", root / "val.h5", size=24, workers=1, progress=False,
         classes_from=root / "train.h5")
    return str(root / "train.h5"), str(root / "val.h5")


def _run(packed, out, epochs=1, **kwargs):
    settings = training.Settings(model=TINY, batch_size=4, lr=0.005, seed=3)
    return training.train(*packed, out, settings, epochs, backend="reference", workers=1,
                          progress=False, report=lambda line: None, **kwargs)


@pytest.mark.parametrize("how", ["sigint", "keyboard-interrupt"])
def test_ctrl_c_saves_the_position_of_the_last_finished_step(how, packed, tmp_path,
                                                              monkeypatch):
    from nbalex import checkpoint
    from nbalex.model import Net
    calls = []
    original = Net.forward_backward

    def forward_backward_with_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C during step 3: it still finishes
        if len(calls) == 3 and how == "keyboard-interrupt":
            raise KeyboardInterrupt               # step 3 never happens
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Net, "forward_backward", forward_backward_with_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(training.Interrupted) as stopped:
        _run(packed, tmp_path / "run")
    done = 3 if how == "sigint" else 2
    assert (stopped.value.epoch, stopped.value.step) == (0, done)
    state = checkpoint.load(tmp_path / "run" / training.CHECKPOINT)
    assert (int(state["epoch"]), int(state["step"])) == (0, done)
    assert len(calls) == 3                        # nothing ran after the request
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(packed, tmp_path,
                                                                    monkeypatch):
    from nbalex.model import Net
    run = tmp_path / "run"
    _run(packed, run, epochs=1)
    saved = (run / training.CHECKPOINT).read_bytes()
    original = Net.forward_backward
    calls = []

    def exploding(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(Net, "forward_backward", exploding)
    with pytest.raises(training.Diverged, match="became nan at epoch 2, step 3.*is kept"):
        _run(packed, run, epochs=2, resume=True)
    assert (run / training.CHECKPOINT).read_bytes() == saved
    rows = [json.loads(line) for line in (run / training.LOG).read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
