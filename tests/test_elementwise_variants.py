"""bench/elementwise_variants.py: every variant equals the package kernel bit for bit, a wrong
variant is caught before it is timed, and no timings are printed under the simulator."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda, float32

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "elementwise_variants.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("elementwise_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_only_finds_every_variant_bit_exact(bench, capsys):
    assert bench.main(["--check-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = {(op.name, variant, grid) for op in bench.OPS
                for variant, _, grid in bench.rows_for(op)}
    assert {op.name for op in bench.OPS} == {"relu_forward", "relu_backward",
                                            "dropout_backward", "sgd_update_single"}
    assert all(any(v == "unroll4" for v, _, _ in bench.rows_for(op)) for op in bench.OPS)
    seen = set()
    for line in lines:
        name, variant, grid = line.split()[:3]
        assert line.endswith(": ok"), line
        assert "n=1, 100, 3001" in line
        seen.add((name, variant, grid.removeprefix("grid=")))
    assert seen == expected and len(lines) == len(expected)


@cuda.jit
def relu_forward_no_tail(y, x):
    """Wrong on purpose: the unrolled loop of relu_forward_unroll4 without its tail loop."""
    n = x.shape[0]
    s = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * s < n:
        for k in range(4):
            v = x[i + k * s]
            y[i + k * s] = float32(0.0) if v < 0 else v
        i += 4 * s


@cuda.jit
def relu_forward_positive_zero(y, x):
    """Wrong on purpose, in the sign of zero only: -0.0 becomes +0.0 (the values compare
    equal; the bits do not)."""
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        v = x[i]
        y[i] = float32(0.0) if v <= 0 else v


@pytest.mark.parametrize("kernel", [relu_forward_no_tail, relu_forward_positive_zero])
def test_a_wrong_variant_is_reported_as_a_mismatch(bench, kernel):
    op = copy.copy(next(op for op in bench.OPS if op.name == "relu_forward"))
    op.variants = {"wrong": kernel}
    rng = np.random.default_rng(1)
    lines = []
    bad = bench.check(op, [("tiny", op.make(rng, n)) for n in bench.CHECK_SIZES],
                      bench.CHECK_GEOMETRY, lines.append)
    assert bad == {("relu_forward", "wrong", "quarter"), ("relu_forward", "wrong", "resident")}
    wrong = [line for line in lines if " wrong " in line]
    assert len(wrong) == 2 and all("MISMATCH" in line for line in wrong)
    assert all(line.endswith(": ok") for line in lines if " package " in line)


def test_timing_rows_follow_the_row_list(bench, monkeypatch):
    """The timing path runs end to end (on the simulator its times mean nothing; what is
    checked is the row layout and that the derived columns follow from the times)."""
    @cuda.jit
    def no_spin(microseconds):
        pass
    monkeypatch.setattr(bench, "spin_kernel", no_spin)
    monkeypatch.setattr(bench, "QUEUED_LAUNCHES", 2)
    op = next(op for op in bench.OPS if op.name == "sgd_update_single")
    host = op.make(np.random.default_rng(2), 300)
    rows = bench.time_op(op, "tiny", host, bench.CHECK_GEOMETRY, 1,
                         skip={("sgd_update_single", "unroll4", "resident")})
    assert [(r["variant"], r["grid"]) for r in rows] == [
        ("package", "package"), ("package", "resident"), ("unroll4", "quarter")]
    assert [r["blocks"] for r in rows] == [4, 16, 3]
    assert rows[0]["vs_package"] == pytest.approx(1.0)
    for r in rows:
        assert r["elements"] == 300 and r["threads"] == 32
        if r["ms"]:
            assert r["gbps"] == pytest.approx(20 * 300 / (r["ms"] * 1e-3) / 1e9)


def test_timings_are_refused_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "NUMBA_ENABLE_CUDASIM=1" in run.stderr and "no timings" in run.stderr
    assert run.stdout == ""
