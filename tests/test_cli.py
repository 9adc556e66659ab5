"""The ``nbalex`` command end to end on tiny data: synth -> pack -> train -> eval -> predict.

Everything runs through click's CliRunner on the reference backend with the tiny network of
tests/configs/cli-tiny.toml (24x24 packed images, 20x20 crops, 3 classes).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nbalex import checkpoint
from nbalex.cli import cli

TINY = str(Path(__file__).parent / "configs" / "cli-tiny.toml")
LOG_KEYS = {"epoch", "lr", "train_loss", "val_loss", "top1_error", "top5_error",
            "images_per_s", "seconds"}
TRAIN_IMAGES, VAL_IMAGES = 3 * 8, 3 * 4


def nbalex(*args):
    """Run ``nbalex ARGS`` in-process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="nbalex")


def ok(*args):
    result = nbalex(*args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return result


def train_args(data, out, *extra):
    return ("train", "--data", data["train"], "--val", data["val"], "--model", TINY,
            "--batch-size", 4, "--lr", 0.005, "--seed", 3, "--backend", "reference",
            "--workers", 0, "--no-progress", "--out", out, *extra)


def params_of(path):
    return checkpoint.load_params(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny dataset, made and packed through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    made = ok("synth", images, "--classes", 3, "--train-per-class", 8, "--val-per-class", 4,
              "--seed", 5)
    assert f"{TRAIN_IMAGES} training and {VAL_IMAGES} validation" in made.stdout
    ok("pack", images / "train", root / "train.h5", "--size", 24, "--workers", 1)
    ok("pack", images / "val", root / "val.h5", "--size", 24, "--workers", 1,
       "--classes-from", root / "train.h5")
    return {"root": root, "images": images, "train": root / "train.h5", "val": root / "val.h5"}


@pytest.fixture(scope="module")
def run(data):
    """A 2-epoch run, uninterrupted."""
    out = data["root"] / "run"
    ok(*train_args(data, out, "--epochs", 2))
    return out


def test_train_writes_the_log_checkpoint_and_pictures(run):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) == LOG_KEYS
        assert all(np.isfinite(row[k]) for k in LOG_KEYS)
        assert 0 <= row["top1_error"] <= 1 and row["top5_error"] == 0   # 3 classes < 5
    assert rows[0]["lr"] == rows[1]["lr"] == 0.005
    state = checkpoint.load(run / "checkpoint.h5")
    assert (state["epoch"], state["step"]) == (2, 0)
    improved = rows[1]["top1_error"] < rows[0]["top1_error"]
    assert state["lr"] == pytest.approx(0.005 if improved else 0.0005)   # the plateau rule
    assert state["extra"]["classes"] == sorted(p.name for p in (run.parent / "images" / "train")
                                               .iterdir())
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG"
    with Image.open(run / "filters.png") as img:       # 4 filters of 5x5, 8x upscaled, 2x2 grid
        assert img.size == (2 * (5 * 8 + 2) + 2,) * 2


def test_eval_json_is_one_object_that_agrees_with_the_last_validation(data, run):
    result = ok("eval", "--checkpoint", run / "checkpoint.h5", "--data", data["val"],
                "--backend", "reference", "--workers", 0, "--json")
    scores = json.loads(result.stdout)
    assert set(scores) == {"top1_error", "top5_error", "loss", "images"}
    assert scores["images"] == VAL_IMAGES
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert scores["top1_error"] == pytest.approx(last["top1_error"])
    assert scores["loss"] == pytest.approx(last["val_loss"], rel=1e-5)

    ten = json.loads(ok("eval", "--checkpoint", run / "checkpoint.h5", "--data", data["val"],
                        "--backend", "reference", "--workers", 0, "--ten-crop", "--json",
                        "--batch-size", 5).stdout)
    assert ten["images"] == VAL_IMAGES and 0 < ten["loss"] < 10
    assert ten["loss"] != pytest.approx(scores["loss"], rel=1e-6)   # other views, other loss


def test_predict_needs_only_the_checkpoint(data, run):
    files = sorted((data["images"] / "val").glob("*/*"))[::4]
    result = ok("predict", "--checkpoint", run / "checkpoint.h5", "--top", 3,
                "--backend", "reference", "--json", *files)
    answers = json.loads(result.stdout)
    classes = sorted(p.name for p in (data["images"] / "train").iterdir())
    assert [a["image"] for a in answers] == [str(f) for f in files]
    for answer in answers:
        probs = [guess["probability"] for guess in answer["top"]]
        assert sorted(probs, reverse=True) == probs and sum(probs) == pytest.approx(1.0)
        assert sorted(guess["class"] for guess in answer["top"]) == classes
        assert all(classes[g["index"]] == g["class"] for g in answer["top"])
    text = ok("predict", "--checkpoint", run / "checkpoint.h5", "--top", 1,
              "--backend", "reference", files[0]).stdout
    assert answers[0]["top"][0]["class"] in text


def test_resume_after_interruptions_matches_the_uninterrupted_run(data, run, tmp_path):
    out = tmp_path / "run"
    stopped = nbalex(*train_args(data, out, "--epochs", 2, "--stop-after-steps", 3))
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr
    at_stop = params_of(out / "checkpoint.h5")
    again = nbalex(*train_args(data, out, "--epochs", 2, "--resume", "--stop-after-steps", 4))
    assert again.exit_code == 130                      # epoch 1 done, then 1 step of epoch 2
    ok(*train_args(data, out, "--epochs", 2, "--resume"))
    resumed, straight = params_of(out / "checkpoint.h5"), params_of(run / "checkpoint.h5")
    assert resumed.keys() == straight.keys()
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
        assert np.any(resumed[name] != at_stop[name]), f"{name} did not train after the stop"
    strip = lambda rows: [{k: v for k, v in json.loads(r).items()   # noqa: E731
                           if k not in ("seconds", "images_per_s")} for r in rows]
    assert strip((out / "log.jsonl").read_text().splitlines()) == \
        strip((run / "log.jsonl").read_text().splitlines())


def test_info_prints_the_layer_table_and_totals():
    described = json.loads(ok("info", "--model", TINY, "--batch-size", 4, "--backend", "reference",
                                 "--json").stdout)
    assert described["input_size"] == 20 and described["image_size"] == 24
    weights = 4 * 3 * 5 * 5 + 4 + 16 * 4 * 7 * 7 + 16 + 3 * 16 + 3
    assert described["params"] == weights
    assert described["arena_bytes"] > 4 * 4 * 3 * 20 * 20
    table = ok("info", "--model", TINY).stdout
    for name in ("conv1", "norm1", "pool1", "fc2", "drop2", "fc3", f"{weights:,}"):
        assert name in table


def test_bench_static_runs_the_analysis_in_a_process_without_the_simulator(monkeypatch):
    import subprocess
    calls = []

    def fake_run(argv, env):
        calls.append((argv, env))
        return subprocess.CompletedProcess(argv, 3)

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert "static" in ok("bench", "--help").stdout
    result = nbalex("bench", "static", "--kernel", "relu")
    assert result.exit_code == 3                       # the analysis' own exit status
    (argv, env), = calls
    assert "NUMBA_ENABLE_CUDASIM" not in env and "nbalex.cuda.static" in argv[2]
    assert argv[-2:] == ["--kernel", "relu"]


@pytest.mark.parametrize("case", ["missing-data", "png-as-data", "png-as-checkpoint",
                                  "dataset-as-checkpoint", "text-as-image", "unknown-model",
                                  "other-model-on-resume", "existing-run", "batch-too-large"])
def test_mistakes_give_one_error_line_and_a_failure_exit(case, data, run, tmp_path):
    png = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(png)
    ckpt = run / "checkpoint.h5"
    args = {
        "missing-data": train_args({"train": tmp_path / "nope.h5", "val": data["val"]},
                                   tmp_path / "r"),
        "png-as-data": train_args({"train": png, "val": data["val"]}, tmp_path / "r"),
        "png-as-checkpoint": ("eval", "--checkpoint", png, "--data", data["val"]),
        "dataset-as-checkpoint": ("eval", "--checkpoint", data["val"], "--data", data["val"],
                                  "--backend", "reference"),
        "text-as-image": ("predict", "--checkpoint", ckpt, "--backend", "reference",
                          Path(TINY)),
        "unknown-model": ("info", "--model", "alexnet-maxi"),
        "other-model-on-resume": train_args(data, run, "--resume", "--model", "alexnet-mini"),
        "existing-run": train_args(data, run),
        "batch-too-large": train_args(data, tmp_path / "r", "--batch-size", 64),
    }[case]
    result = nbalex(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception   # not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
