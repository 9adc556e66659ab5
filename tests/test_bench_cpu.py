"""bench/bench_cpu.py: block timing that alternates the sides, and its JSON and markdown reports.

Timings are never asserted; what is asserted is the structure, that derived numbers follow from
the measured ones, and the order in which the sides run.
"""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_cpu.py"
TINY = str(ROOT / "tests" / "configs" / "tiny.toml")
QUICK = ["--batches", "2", "--rounds", "2", "--block", "1", "--warmup", "0", "--warmup-s", "0", "--gap", "0",
         "--layers-batch", "2", "--layer-rounds", "1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_alternate_runs_warmed_blocks_in_alternating_order():
    bench = load_bench()
    calls = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.alternate(sides, rounds=3, block=2, warmup=1, gap=0)
    assert "".join(calls) == "aaa" "bbb" "bbb" "aaa" "aaa" "bbb"
    assert {k: [len(r) for r in v] for k, v in times.items()} == {"a": [2, 2, 2], "b": [2, 2, 2]}
    calls.clear()
    slow = {"a": lambda: (calls.append("a"), time.sleep(0.01)), "b": lambda: calls.append("b")}
    bench.alternate(slow, rounds=1, block=1, warmup=1, gap=0, warmup_s=0.05)
    assert 4 <= calls.count("a") <= 8 and calls.count("b") > 10   # warm-up by time, then 1 timed


def test_summary_and_ratios_follow_from_the_times():
    bench = load_bench()
    s = bench.summary([[0.001, 0.003], [0.002, 0.010]])
    assert s["calls"] == 4 and math.isclose(s["ms"], 2.5)
    assert s["iqr_ms"][0] <= s["ms"] <= s["iqr_ms"][1]
    assert [round(v, 6) for v in s["block_ms"]] == [2.0, 6.0]
    r = bench.round_ratios([[1.0], [2.0], [4.0]], [[2.0], [2.0], [2.0]])
    assert (r["min"], r["median"], r["max"]) == (0.5, 1.0, 2.0)


def test_tiny_run_reports_every_case_with_derived_numbers(tmp_path):
    out = tmp_path / "table.md"
    png = tmp_path / "bench.png"
    res = run("--models", TINY, "--layers", TINY, *QUICK, "--json", "-", "--out", str(out),
              "--png", str(png))
    assert res.returncode == 0, res.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(res.stdout)
    info = result["info"]
    for key in ("cpu", "cores", "numpy", "numba", "torch", "date", "blas_pool"):
        assert info[key], key
    assert info["blas"]["library"] and "kernel" in info["blas"]
    rows = result["end_to_end"]
    assert [(r["model"], r["batch"], r["mode"]) for r in rows] == [("tiny", 2, "train"), ("tiny", 2, "infer")]
    for r in rows:
        assert r["torch_form"] in ("contiguous", "channels-last")
        assert set(r["torch_probes"]) == {"contiguous", "channels-last"}
        for side in ("nbalex", "torch"):
            s = r[side]
            assert s["calls"] == 2 and s["ms"] > 0
            assert math.isclose(s["images_per_s"], 2e3 / s["ms"], rel_tol=1e-9)
        q = r["ratio"]
        assert q["min"] <= q["median"] <= q["max"] and q["min"] > 0
    layers = result["layers"]["rows"]
    names = [r["layer"] for r in layers]
    assert names[0] == "conv1" and names[-2:] == ["softmax-xent", "sgd-step"]
    assert all(r["fwd_nbalex"]["ms"] > 0 and r["fwd_torch"]["ms"] > 0 for r in layers)
    assert "bwd_nbalex" not in layers[-1]
    text = out.read_text()
    assert "| tiny | 2 | train |" in text and "| conv1 |" in text and info["blas"]["library"] in text
    assert "End to end" in res.stderr          # the tables go to stderr when JSON goes to stdout


def test_markdown_only_when_asked_and_fixed_form(tmp_path):
    res = run("--models", TINY, "--modes", "infer", "--skip-layers", "--torch-form", "channels-last",
              *QUICK, "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]     # no PNG unless asked
    row, = json.loads((tmp_path / "r.json").read_text())["end_to_end"]
    assert row["torch_form"] == "channels-last" and list(row["torch_probes"]) == ["channels-last"]
    assert "End to end" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--models", "no-such-net", "--skip-layers"], "no-such-net"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr
