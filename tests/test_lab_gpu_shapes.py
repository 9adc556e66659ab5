"""nbalex lab check's GPU leg: AlexNet's shapes, checked against the package and timed.

Without a GPU the leg is forced at a reduced scale under the simulator (the hidden
--gpu-shapes-scale option), so its code runs here: the child process, the JSON timings, the
table, a bug that only larger shapes expose.  PyTorch's equivalents are checked against the
reference on the CPU (their GPU timing needs a CUDA build of PyTorch and a GPU).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nbalex.labs import LABS, get
from nbalex.labs.alexnet_shapes import PACKAGE, plan
from nbalex.labs.excerpts import source_path
from nbalex.labs.grader import format_report, gpu_leg
from nbalex.labs.handout import start
from nbalex.labs.run import run_cases

SCALE = 0.01
"""AlexNet's sizes times this: fc6 as a GEMM is M=1 K=92 N=41 (the simulator is slow)."""


def _nbalex(*args):
    code = "import sys; from nbalex.cli import main; sys.argv[0] = 'nbalex'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})


def _leg(results):
    return [r for r in results if r.get("leg") == "alexnet"]


def test_the_shapes_are_alexnets():
    labels = {lab.name: [p.label for p in plan(lab)] for lab in LABS}
    assert labels["relu"][0] == "relu_forward conv1's output (128, 96, 55, 55)"
    assert ("conv2d_forward x(128, 3, 227, 227) w(96, 3, 11, 11) stride=4 pad=0 groups=1 relu "
            "(conv1)") in labels["conv2d_forward"]
    assert ("conv2d_backward_data x(128, 96, 27, 27) w(256, 48, 5, 5) stride=1 pad=2 groups=2 "
            "(conv2)") in labels["conv2d_backward_data"]
    assert len(labels["conv2d_backward_weights"]) == 5
    assert labels["sgd"] == ["sgd_update AlexNet's 60,965,224 parameters in 16 tensors"]
    assert "sgemm fc6 forward M=128 K=9216 N=4096" in labels["gemm_tiled"]
    assert any("norm1 x(256, 48, 55, 55)" in s for s in labels["lrn"])
    assert any("pool5 x(128, 256, 13, 13) size=3 stride=2" in s for s in labels["maxpool"])
    assert labels["softmax_xent"][0] == "softmax_xent_forward fc8's logits (128, 1000)"


def test_when_the_leg_runs():
    assert gpu_leg("cuda", sim=False) == (1.0, None)
    assert gpu_leg("cuda", sim=True, scale=0.5) == (0.5, None)
    assert "no GPU" in gpu_leg("cuda", sim=True)[1]
    assert "--no-gpu-shapes" in gpu_leg("cuda", sim=False, gpu_shapes=False)[1]
    assert "cpu backend" in gpu_leg("cpu", sim=False)[1]


def test_relu_at_scaled_alexnet_shapes_in_the_child_with_timings():
    run = _nbalex("lab", "check", "relu", source_path("cuda/relu.py"), "--json",
                  "--gpu-shapes-scale", str(SCALE))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(run.stdout)
    leg = _leg(report["cases"])
    assert [c["launcher"] for c in leg] == ["relu_forward", "relu_backward"]
    assert report["total_cases"] == len(get("relu").case_list()) + 2 and report["score"] == 1
    assert report["alexnet"]["reason"] is None and report["alexnet"]["scale"] == SCALE
    assert "simulator" in report["alexnet"]["torch"]         # PyTorch is not timed here
    for c in leg:
        t = c["timings"]
        assert c["passed"] and c["layer"] == "conv1"
        assert t["yours_ms"] > 0 and t["nbalex_ms"] > 0 and t["torch_ms"] is None
        assert t["ratio"] == pytest.approx(t["yours_ms"] / t["nbalex_ms"], rel=1e-2)
    text = format_report(report)
    assert "AlexNet's shapes (batch 1, scaled by 0.01" in text
    assert "yours ms" in text and "nbalex ms" in text and "torch ms" in text
    assert "  PASS  " in text.split("AlexNet's shapes")[1]
    assert "torch ms: not timed (the kernels run under Numba's simulator)" in text
    no_leg = _nbalex("lab", "check", "relu", source_path("cuda/relu.py"), "--json",
                     "--gpu-shapes-scale", str(SCALE), "--no-gpu-shapes")
    skipped = json.loads(no_leg.stdout)
    assert skipped["alexnet"]["reason"] == "skipped (--no-gpu-shapes)"
    assert not _leg(skipped["cases"])


def test_a_bug_only_larger_shapes_expose_fails_the_leg(tmp_path):
    """A K loop capped at 64 passes every small case (K <= 40) and fails fc6 (K = 92)."""
    text = open(source_path(get("gemm_naive").solution)).read()
    old = "for k in range(a.shape[1]):"
    assert text.count(old) == 1
    path = tmp_path / "gemm_naive_capped.py"
    path.write_text(text.replace(old, "for k in range(min(a.shape[1], 64)):"))
    results = run_cases(get("gemm_naive"), str(path), "cuda", scale=SCALE)
    assert all(r["passed"] for r in results if r["leg"] == "small")
    fc6, fc7, conv3 = _leg(results)
    assert not fc6["passed"] and fc6["timings"] is None and fc6["layer"] == "fc6"
    assert fc6["failures"][0]["array"] == "c" and "K=92" in fc6["label"]
    assert fc7["passed"] and conv3["passed"]                    # K = 41 and 27
    assert fc7["timings"]["yours_ms"] > 0 and fc7["timings"]["nbalex_ms"] > 0
    report = {"lab": "gemm_naive", "file": str(path), "backend": "cuda", "simulator": True,
              "passed": False, "score": 0.0, "passed_cases": 0, "total_cases": len(results),
              "cases": results, "alexnet": {"reason": None, "scale": SCALE, "batch": 1,
                                            "timer": "wall clock", "torch": None}}
    shown = format_report(report).split("AlexNet's shapes")[1]
    assert f"FAIL  {fc6['label']}" in shown and "c (1x41):" in shown


def test_the_leg_waits_for_the_small_cases(tmp_path):
    _, path = start("relu", str(tmp_path))
    leg = _leg(run_cases(get("relu"), path, "cuda", scale=SCALE))
    assert len(leg) == 2
    assert all(not r["passed"] and "small-shape cases must pass first" in r["error"]
               for r in leg)


def test_a_hung_alexnet_case_is_reported_as_such():
    from nbalex.labs.grader import _complete
    done = [{"label": "relu_forward x(1,)", "launcher": "relu_forward", "leg": "small",
             "passed": True, "failures": [], "error": None, "seconds": 0.1}]
    labels = ["relu_forward x(1,)", "relu_forward conv1's output", "relu_backward conv1's"]
    results = _complete(labels, done, True, 5.0, -9, "", ["small", "alexnet", "alexnet"])
    hung, rest = results[1], results[2]
    assert hung["leg"] == "alexnet" and "too slow for AlexNet's shapes" in hung["error"]
    assert rest["leg"] == "alexnet" and rest["error"].startswith("not run")


# ------------------------------------------------------------------ PyTorch's ops
TORCH_LABS = [lab.name for lab in LABS if lab.name not in ("gemm_tiled", "gemm_register")]
"""One lab per op (the three GEMM rungs share sgemm's shapes)."""


@pytest.mark.parametrize("lab", TORCH_LABS)
def test_torch_equivalents_compute_what_the_package_does(lab):
    """Each PyTorch op the leg times, on the CPU at scaled shapes, against the reference
    (dropout's forward draws its own random numbers: only its form is checked)."""
    torch = pytest.importorskip("torch")
    import importlib
    from nbalex.labs import torch_ops
    module = importlib.import_module(f"nbalex.reference.{PACKAGE[get(lab).op]}")
    for planned in plan(get(lab), 0.02):
        shape = planned.build()
        case = shape.case
        if case.launcher == "sgd_update":
            case.inout["v"][:] = 0               # PyTorch's first step: no momentum yet
        host = {n: v.copy() for n, v in {**case.inputs, **case.inout, **case.outputs,
                                          **shape.extra}.items()}
        t = {n: torch.from_numpy(v.copy()) for n, v in host.items()}
        got = torch_ops.prepare(case.launcher, t, shape.params)()
        shape.package(module, host)
        if case.launcher == "dropout_forward":
            y, x, keep = got["y"].numpy(), host["x"], 1 - shape.params["p"]
            assert np.all((y == 0) | np.isclose(y, x / keep, rtol=1e-6))
            assert 0.3 < (y != 0).mean() < 0.7
            continue
        if case.launcher == "sgd_update":
            got = {"w": torch.cat([p.detach() for p in got["w"]])}
        assert got, planned.label
        for name, value in got.items():
            want = host[name]
            rtol, atol = case.tolerance(name)
            np.testing.assert_allclose(value.numpy().astype(want.dtype), want,
                                       rtol=max(rtol, 1e-5), atol=max(atol, 1e-6),
                                       err_msg=f"{planned.label}: {name}")
