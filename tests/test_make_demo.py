"""`make demo` from the README runs twice in a row, and `make clean-demo` keeps the venv."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / ".installed").exists(),
                                reason="needs make and the project's .venv (built by `make test`)")

TINY = ["DEMO_TRAIN=6", "DEMO_VAL=3", "DEMO_EPOCHS=1", "DEMO_STEP=1"]


def _make(*args):
    # A user's shell: the simulator switch the test session sets for itself is not passed on
    # (with it, `--backend auto` would train on the simulated GPU).
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_demo_runs_twice_and_clean_demo_keeps_the_venv(tmp_path):
    demo = tmp_path / "demo"
    for attempt in (1, 2):
        done = _make("demo", f"DEMO={demo}", *TINY)
        assert done.returncode == 0, f"make demo #{attempt} failed:\n{done.stdout}\n{done.stderr}"
        assert (demo / "run" / "checkpoint.h5").exists()
    done = _make("clean-demo", f"DEMO={demo}")
    assert done.returncode == 0, done.stderr
    assert not demo.exists()
    assert (ROOT / ".venv" / ".installed").exists()
    assert Path(sys.executable).exists()
