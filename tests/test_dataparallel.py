"""`mpiexec -n 2 nbalex train`: synchronous data-parallel SGD on the reference backend.

Two ranks must equal one process at the same global batch, repeat bit for bit, stop
together whichever rank is asked to, end the job when a rank is killed, and resume exactly.
Skipped, saying why, when the venv has no mpiexec or mpi4py (``pip install -e '.[mpi]'``).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
pytestmark = pytest.mark.skipif(
    not (MPIEXEC.exists() and importlib.util.find_spec("mpi4py")),
    reason=f"needs {MPIEXEC} and mpi4py (pip install -e '.[mpi]')")
TINY = str(ROOT / "tests" / "configs" / "cli-tiny.toml")
EPOCHS = 5
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "PRTE_")


def env():
    out = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONUNBUFFERED="1")
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(train.h5, val.h5): 3 classes, 16 training (6 steps of 8) and 5 validation images each."""
    from nbalex.io.pack import pack
    from nbalex.io.synth import synth
    root = tmp_path_factory.mktemp("dp-data")
    synth(root / "images", classes=3, train_per_class=16, val_per_class=5, seed=5)
    pack(root / "images" / "train", root / "train.h5", size=24, workers=1, progress=False)
    pack(root / "images" / "val", root / "val.h5", size=24, workers=1, progress=False,
         classes_from=root / "train.h5")
    return str(root / "train.h5"), str(root / "val.h5")


def command(packed, out, ranks, epochs=EPOCHS, batch=8, resume=False):
    args = ["--data", packed[0], "--val", packed[1], "--epochs", str(epochs),
            "--backend", "reference", "--workers", "0", "--no-progress", "--out", str(out)]
    args += ["--resume"] if resume else ["--model", TINY, "--batch-size", str(batch),
                                         "--lr", "0.005", "--seed", "3"]
    nbalex = [sys.executable, "-m", "nbalex", "train"]
    return ([str(MPIEXEC), "-n", str(ranks)] if ranks else []) + nbalex + args


def train(packed, out, ranks=2, timeout=120, **kwargs):
    return subprocess.run(command(packed, out, ranks, **kwargs), capture_output=True,
                          text=True, env=env(), timeout=timeout, cwd=ROOT)


def params(out):
    from nbalex import checkpoint
    state = checkpoint.load(Path(out) / "checkpoint.h5")
    return state, state["params"]


def flat(p):
    return np.concatenate([np.ravel(p[k]) for k in p])


def rank_pid(out, rank, deadline):
    """The pid of rank ``rank`` of the job training into ``out`` (found in /proc)."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmdline and b"nbalex" in cmdline and \
                    f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of the job in {out} not found")


def start_and_hit(packed, out, how):
    """Start 2 ranks, wait for the first checkpoint, send ``how`` to rank 1 alone."""
    proc = subprocess.Popen(command(packed, out, 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.monotonic() + 60
    pid = rank_pid(out, 1, deadline)
    while not (out / "checkpoint.h5").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    os.kill(pid, how)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout + stderr, time.monotonic() - t0


@pytest.fixture(scope="module")
def reference_runs(packed, tmp_path_factory):
    """One uninterrupted 2-rank run and one single process at the same global batch."""
    root = tmp_path_factory.mktemp("dp-runs")
    runs = {}
    for name, ranks in (("two", 2), ("one", 0)):
        out = root / name
        result = train(packed, out, ranks)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = (out, result)
    return runs


def test_two_ranks_equal_one_process_and_agree_on_their_parameters(reference_runs):
    (two, result), (one, _) = reference_runs["two"], reference_runs["one"]
    state, p2 = params(two)
    _, p1 = params(one)
    for name in p1:
        scale = float(np.abs(p1[name]).max())
        assert float(np.abs(p2[name] - p1[name]).max()) / scale < 1e-5, name
    record = json.loads(state["extra"]["run"] if isinstance(state["extra"]["run"], str)
                        else state["extra"]["run"].decode())
    assert record["ranks"] == 2
    # compared across the ranks at the save (else the job stops): the saved bits are those
    assert record["params_crc32"] == zlib.crc32(flat(p2).tobytes())
    # rank 0 alone writes and prints; the logged losses are the global batch's
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    log1 = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    assert len(log) == EPOCHS
    for a, b in zip(log, log1):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["top1_error"] == b["top1_error"] and a["val_loss"] == pytest.approx(b["val_loss"])
    assert result.stderr.count("training cli-tiny") == 1 and "over 2 ranks" in result.stderr
    assert result.stdout.count("done:") == 1


def test_two_rank_runs_repeat_bit_for_bit(packed, reference_runs, tmp_path):
    result = train(packed, tmp_path / "again")
    assert result.returncode == 0, result.stderr
    assert flat(params(tmp_path / "again")[1]).tobytes() == \
        flat(params(reference_runs["two"][0])[1]).tobytes()


def test_a_stop_signal_on_one_rank_stops_both_at_one_step_and_resume_is_exact(
        packed, reference_runs, tmp_path):
    out = tmp_path / "stopped"
    code, text, _ = start_and_hit(packed, out, signal.SIGTERM)
    assert code != 0 and "Stopped: interrupted at epoch" in text, text
    assert "Error" not in text, text
    state, _ = params(out)
    assert (state["epoch"], state["step"]) < (EPOCHS, 0)
    resumed = train(packed, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr
    assert flat(params(out)[1]).tobytes() == flat(params(reference_runs["two"][0])[1]).tobytes()


def test_a_killed_rank_ends_the_job_and_resume_is_exact(packed, reference_runs, tmp_path):
    out = tmp_path / "killed"
    code, text, elapsed = start_and_hit(packed, out, signal.SIGKILL)
    assert code != 0, text
    assert elapsed < 15, f"the job took {elapsed:.1f} s to end after a rank was killed"
    resumed = train(packed, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert flat(params(out)[1]).tobytes() == flat(params(reference_runs["two"][0])[1]).tobytes()


def test_a_batch_that_does_not_divide_is_refused_in_one_line(packed, tmp_path):
    result = train(packed, tmp_path / "odd", batch=7)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert text.count("Error: rank") == 1, text
    assert "Error: rank 0 of 2: --batch-size 7 does not divide over 2 ranks" in text
    assert not (tmp_path / "odd").exists()


def test_resume_with_another_number_of_ranks_warns(packed, reference_runs, tmp_path):
    import shutil
    out = tmp_path / "moved"
    shutil.copytree(reference_runs["two"][0], out)
    result = train(packed, out, ranks=0, epochs=EPOCHS + 1, resume=True)
    assert result.returncode == 0, result.stderr
    assert "saved with 2 ranks and resumes with 1" in result.stderr
