"""A training run can be trusted: divergence stops it, stop signals save its position, a
resume continues exactly (or says why it cannot), and the model is sized by its data.

Same tiny data and network as test_train.py (its ``packed`` fixture), reference backend.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nbalex import checkpoint, runtime
from nbalex import train as training
from nbalex.model import Net
from test_train import TINY, _run, packed  # noqa: F401  (packed is a fixture)

FOLLOWS = str(Path(__file__).parent / "configs" / "follows-data.toml")


def _train(packed, out, epochs, resume=False, lines=None, **settings):  # noqa: F811
    base = dict(model=TINY, batch_size=4, lr=0.005, seed=3)
    return training.train(*packed, out, training.Settings(**{**base, **settings}), epochs,
                          backend="reference", workers=1, progress=False, resume=resume,
                          report=(lines.append if lines is not None else lambda line: None))


def _log(run):
    return [json.loads(line) for line in (run / training.LOG).read_text().splitlines()]


# ------------------------------------------------------------------------ divergence
def test_a_non_finite_update_stops_the_run_even_while_the_loss_is_finite(packed, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    run = tmp_path / "run"
    _run(packed, run, epochs=1)
    saved = (run / training.CHECKPOINT).read_bytes()
    original, calls = Net.sgd_step, []

    def reporting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)
        return len(calls) != 2          # the 2nd update "made" a non-finite parameter

    monkeypatch.setattr(Net, "sgd_step", reporting)
    with pytest.raises(training.Diverged, match="NaN or infinite at epoch 2, step 2.*is kept"):
        _run(packed, run, epochs=2, resume=True)
    assert len(calls) == 2 and (run / training.CHECKPOINT).read_bytes() == saved


def test_a_backend_that_cannot_tell_still_never_saves_a_nan(packed, tmp_path, monkeypatch):  # noqa: F811
    original, calls = Net.sgd_step, []

    def poisoning(self, *args, **kwargs):      # returns None, as a backend that cannot tell
        calls.append(1)
        original(self, *args, **kwargs)
        if len(calls) == 6:                    # the epoch's last step: the loss never shows it
            params = self.params()
            params["conv1.weight"].flat[0] = np.nan
            self.load_params(params)

    monkeypatch.setattr(Net, "sgd_step", poisoning)
    # caught by the validation's NaN outputs or, failing that, by the refused save
    with pytest.raises(training.Diverged, match="(conv1.weight holds NaN|outputs are NaN or "
                                                "infinite).*no checkpoint was written"):
        _run(packed, tmp_path / "run", epochs=1)
    assert not (tmp_path / "run" / training.CHECKPOINT).exists()


def test_nan_outputs_never_score_as_correct():
    from nbalex.inference import NonFiniteOutputs, Scores
    scores = Scores()
    probs = np.full((3, 4), 0.25)
    probs[0, 1], probs[1] = 0.7, np.nan          # row 1 came from a diverged network
    probs[0, [0, 2, 3]] = 0.1
    scores.add(probs, np.array([1, 2, 0]))
    assert (scores.top1_wrong, scores.top5_wrong, scores.nonfinite) == (2, 1, 1)
    with pytest.raises(NonFiniteOutputs, match="NaN or infinite for 1 of 3 images"):
        scores.result()


def test_a_validation_with_nan_outputs_stops_the_run(packed, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    _run(packed, run, epochs=1)
    saved = (run / training.CHECKPOINT).read_bytes()
    original = Net.forward

    def overflowing(self, x, *args, **kwargs):   # finite parameters, outputs that overflow
        logits = original(self, x, *args, **kwargs)
        return np.full_like(runtime.to_host(logits), np.inf)

    monkeypatch.setattr(Net, "forward", overflowing)
    with pytest.raises(training.Diverged, match="validation after epoch 2: .*NaN or infinite.*is kept"):
        _run(packed, run, epochs=2, resume=True)
    assert (run / training.CHECKPOINT).read_bytes() == saved


def test_settings_with_nan_or_inf_are_refused_before_any_work(packed, tmp_path):  # noqa: F811
    for bad in ({"lr": float("nan")}, {"momentum": float("inf")}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match="must be a finite number"):
            _train(packed, tmp_path / "run", 1, **bad)
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- resume
def test_a_step_milestone_at_the_end_of_a_run_is_applied_when_it_is_extended(packed, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    _train(packed, run, 2, schedule="step", step_epochs=2)
    assert checkpoint.load(run / training.CHECKPOINT)["lr"] == pytest.approx(0.0005)
    _train(packed, run, 3, resume=True)
    assert [row["lr"] for row in _log(run)] == pytest.approx([0.005, 0.005, 0.0005])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_stop_signals_save_the_position_like_ctrl_c(signum, packed, tmp_path, monkeypatch):  # noqa: F811
    original, calls = Net.forward_backward, []

    def signalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)   # during step 3: it still finishes
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Net, "forward_backward", signalled)
    before = {s: signal.getsignal(s) for s in training.STOP_SIGNALS}
    with pytest.raises(training.Interrupted, match="step 3; position saved.*--resume") as stop:
        _run(packed, tmp_path / "run")
    assert stop.value.exit_code == 128 + signum and len(calls) == 3
    assert checkpoint.load(tmp_path / "run" / training.CHECKPOINT)["step"] == 3
    assert {s: signal.getsignal(s) for s in training.STOP_SIGNALS} == before


def test_a_second_signal_quits_and_says_what_was_saved(packed, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    _run(packed, run, epochs=1)
    original, calls = Net.forward_backward, []

    def twice(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Net, "forward_backward", twice)
    with pytest.raises(training.Quit) as quit_:
        _run(packed, run, epochs=2, resume=True)
    assert str(quit_.value).startswith("quit at once without saving; the last good checkpoint")
    assert "at the end of epoch 1; --resume continues from there" in str(quit_.value)
    assert checkpoint.load(run / training.CHECKPOINT)["epoch"] == 1


DRIVER = """
import os, sys, time
from pathlib import Path
from nbalex.model import Net
original, calls, marker = Net.forward_backward, [], Path(os.environ["STEP3_MARKER"])
def slow_third_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        marker.write_text("step 3")
        time.sleep(2.0)           # the signal arrives here, inside step 3
    return original(self, *args, **kwargs)
Net.forward_backward = slow_third_step
from nbalex.cli import main
sys.argv = ["nbalex", *sys.argv[1:]]
main()
"""


def test_sigterm_to_nbalex_train_saves_and_resume_gives_the_same_bits(packed, tmp_path):  # noqa: F811
    train, val = packed
    out, marker = tmp_path / "run", tmp_path / "step3"
    args = ["train", "--data", train, "--val", val, "--model", TINY, "--batch-size", "4",
            "--lr", "0.005", "--seed", "3", "--backend", "reference", "--workers", "1",
            "--no-progress", "--epochs", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "STEP3_MARKER": str(marker)})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Stopped: interrupted at epoch 1, step 3; position saved" in stderr
    assert "--resume" in stderr.strip().splitlines()[-1]
    assert checkpoint.load(out / training.CHECKPOINT)["step"] == 3

    _run(packed, out, epochs=2, resume=True)
    _run(packed, tmp_path / "straight", epochs=2)
    resumed = checkpoint.load_params(out / training.CHECKPOINT)
    straight = checkpoint.load_params(tmp_path / "straight" / training.CHECKPOINT)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def test_resume_refuses_other_training_or_validation_data_naming_both(packed, tmp_path):  # noqa: F811
    train, val = packed
    run = tmp_path / "run"
    _run(packed, run, epochs=1)
    with pytest.raises(ValueError) as err:
        _run((val, val), run, epochs=2, resume=True)
    message = str(err.value)
    assert message.startswith(f"--data {val} is not the data of the run") and train in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=f"--val {train} is not the data.*{val}"):
        _run((train, train), run, epochs=2, resume=True)
    assert checkpoint.load(run / training.CHECKPOINT)["epoch"] == 1


def test_resume_on_another_backend_or_thread_count_warns(packed, tmp_path, monkeypatch):  # noqa: F811
    run, lines = tmp_path / "run", []
    _run(packed, run, epochs=1)
    monkeypatch.setattr(runtime, "host_signature", lambda backend: {"backend": "cpu", "threads": 7})
    _train(packed, run, 1, resume=True, lines=lines)
    assert any(line.startswith("warning: the run was saved on backend reference and resumes "
                               "on cpu with 7 threads") for line in lines), lines
    record = json.loads(checkpoint.load(run / training.CHECKPOINT)["extra"]["run"])
    assert record["host"] == {"backend": "reference", "threads": None}


def test_the_host_signature_counts_the_cpu_backends_threads():
    import numba
    assert runtime.host_signature("cpu") == {"backend": "cpu", "threads": numba.get_num_threads()}
    assert runtime.host_signature("cuda") == {"backend": "cuda", "threads": None}


# ------------------------------------------------------------------ sized by the data
def test_the_output_layer_follows_the_training_data(packed, tmp_path):  # noqa: F811
    run, lines = tmp_path / "run", []
    _train(packed, run, 1, lines=lines, model=FOLLOWS)
    assert "fc2 sized to 3 classes" in lines[0]
    state = checkpoint.load(run / training.CHECKPOINT)
    assert state["params"]["fc2.weight"].shape[0] == 3
    assert "classes = 3" in state["config_text"] and state["config_text"] == \
        (run / "model.toml").read_text()
    _train(packed, run, 2, resume=True, model=FOLLOWS)   # the same --model, compared sized
    assert checkpoint.load(run / training.CHECKPOINT)["epoch"] == 2


def test_a_config_stating_another_output_count_is_refused(packed, tmp_path):  # noqa: F811
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(Path(FOLLOWS).read_text().replace('outputs = "classes"', "outputs = 5"))
    with pytest.raises(ValueError, match='has 3 classes but the model follows-data has 5 '
                                         'outputs.*outputs = "classes"'):
        _train(packed, tmp_path / "run", 1, model=str(fixed))


def test_packaged_models_follow_the_data():
    from nbalex.config import follows_data, sized_to
    from nbalex.model import describe
    assert follows_data("alexnet") and follows_data("alexnet-mini")
    assert describe("alexnet")["params"] == 60_965_224           # unsized: 1000 classes
    mini = describe(sized_to("alexnet-mini", 10))
    assert mini["num_classes"] == 10 and mini["layers"][-1]["params"] == 10 * 256 + 10
    assert Net(sized_to("alexnet-mini", 10), backend="reference", batch_size=1).num_classes == 10
