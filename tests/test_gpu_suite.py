"""bench/gpu_suite.sh in dry-run mode: a stand-in nvidia-smi on PATH, the CUDA simulator on.

The suite's promises are checked without a GPU: at most 7 files come back, one JSON record
per step, the table is written, a failing step is reported as such, and a run killed part
way through still leaves the records and table of the steps that finished.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "bench" / "gpu_suite.sh"
STAND_IN_SMI = """#!/bin/sh
echo "NVIDIA Stand-in 80GB, 580.00, 81559 MiB, 1980 MHz, 1980 MHz"
"""


@pytest.fixture
def machine(tmp_path):
    """(environment, output folder, tests folder): PATH starts with a stand-in nvidia-smi and a
    python3 that is this interpreter (so the env step finds this session's packages)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(STAND_IN_SMI)
    smi.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("NBALEX_SUITE_SKIP", None)
    env.pop("NBALEX_SUITE_BUDGET", None)
    tests = tmp_path / "suite_tests"
    tests.mkdir()
    return env, tmp_path / "out", tests


def records(out):
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def suite_steps():
    run = subprocess.run(["bash", str(SUITE), "--list"], capture_output=True, text=True, check=True)
    return run.stdout.split()


def test_dry_run_reports_every_step_and_the_failing_test(machine):
    env, out, tests = machine
    (tests / "test_probe.py").write_text(
        "def test_passes():\n    assert True\n\n"
        "def test_breaks():\n    assert 1 == 2, 'on purpose'\n")
    env["NBALEX_SUITE_TESTS"] = str(tests)
    run = subprocess.run(["bash", str(SUITE), "--dry-run", "--budget", "150", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=170)
    assert run.returncode == 1, run.stdout + run.stderr        # the test step failed
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 7, files
    assert not [f for f in files if f.startswith(".")], files   # no temporary file left
    recs = records(out)
    assert [r["step"] for r in recs] == suite_steps()
    by_step = {r["step"]: r for r in recs}
    for step in ("env", "nvidia-smi", "preflight"):
        assert by_step[step]["status"] == "ok", by_step[step]
    assert by_step["preflight"]["data"]["ok"] is True
    assert by_step["tests"]["status"] == "failed (exit 1)"
    assert by_step["sgemm"]["status"] == "skipped (dry run)"
    assert all(r["dry_run"] for r in recs)
    tables = list(out.glob("gpu-nvidia-stand-in-80gb-*.md"))
    assert len(tables) == 1, files
    table = tables[0].read_text()
    assert "| tests | failed (exit 1) |" in table
    assert "test_probe.py::test_breaks" in table and "1 failed, 1 passed" in table
    assert _passed("test_probe.py::test_passes", (out / "pytest.log").read_text())
    assert "steps not ok: tests" in run.stdout
    assert (out / "raw.tar.gz").stat().st_size > 0


def _passed(test, log):
    """Whether pytest -v's log reports ``test`` passed, with or without pytest-xdist (which
    writes "[gw0] [ 50%] PASSED path::test" instead of "path::test PASSED")."""
    return any(test in line and "PASSED" in line for line in log.splitlines())


def test_a_run_cut_short_keeps_the_finished_steps(machine):
    env, out, tests = machine
    (tests / "test_slow.py").write_text(
        "import time\n\ndef test_first():\n    assert True\n\n"
        "def test_slow():\n    time.sleep(120)\n")
    env["NBALEX_SUITE_TESTS"] = f"-x {tests}"
    proc = subprocess.Popen(["bash", str(SUITE), "--dry-run", "--budget", "200", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        log = out / "pytest.log"
        while time.monotonic() < deadline and not _passed(
                "test_first", log.read_text() if log.exists() else ""):
            assert proc.poll() is None, "the suite ended before the slow test"
            time.sleep(0.5)
        assert _passed("test_first", log.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    recs = records(out)
    assert [r["step"] for r in recs] == ["env", "nvidia-smi", "preflight"]
    assert all(r["status"] == "ok" for r in recs)
    table = next(out.glob("gpu-*.md")).read_text()
    assert "| preflight | ok |" in table
    assert len(list(out.iterdir())) <= 7


def test_a_bad_budget_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run(["bash", str(SUITE), "--budget", "soon", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "budget" in run.stderr
    assert not (tmp_path / "steps.jsonl").exists()
