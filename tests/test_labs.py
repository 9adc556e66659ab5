"""nbalex lab: the package's own kernels pass every lab, planted bugs fail with a report that
points at them, starters fail cleanly, handouts are cut from the code by markers.

Under the simulator, kept small: one child-process run per lab for the package's module
(the grader's real path), everything else graded in this process with run_cases.
"""

import json
import os
import subprocess
import sys

import pytest

from nbalex.labs import LABS, get
from nbalex.labs.excerpts import MarkerError, excerpt, regions, source_path
from nbalex.labs.grader import check, format_report, gpu_present
from nbalex.labs.handout import handout_text, start, starter_text
from nbalex.labs.run import run_cases

NBALEX = [sys.executable, "-m", "nbalex.cli"]


def _nbalex(*args):
    code = "import sys; from nbalex.cli import main; sys.argv[0] = 'nbalex'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})


def _planted(tmp_path, lab, old, new, count=1):
    """The lab's solution file with ``old`` replaced by ``new`` (``old`` must occur ``count``
    times, so a drifting solution breaks the test rather than silently planting nothing)."""
    text = open(source_path(get(lab).solution)).read()
    assert text.count(old) == count, (lab, old)
    path = tmp_path / f"{lab}_bug.py"
    path.write_text(text.replace(old, new, 1))
    return str(path)


def _report(lab, path):
    results = run_cases(get(lab), path, "cuda")
    return results, json.dumps(results)


# ------------------------------------------------------------------ the package passes
@pytest.mark.parametrize("lab", [lab.name for lab in LABS])
def test_package_solution_passes_in_a_child_process(lab):
    """The small cases, on the simulator here and on the card where there is one (the
    AlexNet-shape leg has its own tests, tests/test_lab_gpu_shapes.py)."""
    on_gpu = gpu_present()
    report = check(lab, source_path(get(lab).solution), gpu_shapes=not on_gpu)
    assert report["simulator"] is (not on_gpu)
    assert report["passed"], format_report(report)
    if not on_gpu:
        assert report["alexnet"]["reason"].startswith("not run: no GPU")   # the GPU leg
    assert report["score"] == 1.0 and report["total_cases"] >= 4


CONV_LABS = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights"]


def test_the_package_conv2d_module_passes_the_conv_labs():
    """The labs grade nbalex.cuda.conv2d itself (tiled, split-K), not only their first rung."""
    for lab in CONV_LABS:
        results = run_cases(get(lab), source_path("cuda/conv2d.py"), "cuda")
        assert all(r["passed"] for r in results), (lab, results)


# ------------------------------------------------------------------ markers, excerpts
def test_every_marker_pair_exists_and_the_handout_quotes_it_exactly():
    for lab in LABS:
        handout, starter = handout_text(lab), starter_text(lab)
        for marker, _ in lab.starter:
            text = excerpt(lab.solution, marker)
            assert text.strip(), (lab.name, marker)
            assert text in starter, (lab.name, marker)
        for marker, stub in lab.starter:
            if stub is not None:                       # a kernel: its contract is quoted
                assert excerpt(lab.solution, marker) in handout, (lab.name, marker)
        assert excerpt(lab.solution, lab.starter[-1][0]) in handout    # the launchers
        for relpath, marker, _ in lab.excerpts:
            assert excerpt(relpath, marker).strip("\n") in handout
        assert open(source_path(lab.reference)).read().rstrip() in handout
        for case in lab.case_list():
            assert case.label in handout


def test_markers_must_pair():
    assert regions("# lab:begin a\nx = 1\n    # lab:end a\n") == {"a": "x = 1\n"}
    for text in ("# lab:begin a\n", "# lab:end a\n", "# lab:begin a\n# lab:begin a\n"):
        with pytest.raises(MarkerError):
            regions(text)
    with pytest.raises(MarkerError, match="no '# lab:begin nope'"):
        excerpt("cuda/relu.py", "nope")


def test_starter_has_the_package_interface():
    import inspect
    from nbalex.labs.run import load_module
    for lab in LABS:
        path = source_path(lab.solution)
        solution = load_module(path)
        starter = compile(starter_text(lab), f"{lab.name}.py", "exec")
        namespace = {}
        exec(starter, namespace)
        for name in lab.launchers:
            assert inspect.signature(namespace[name]) == inspect.signature(getattr(solution, name))


# ------------------------------------------------------------------ starters fail cleanly
def test_every_starter_fails_cleanly(tmp_path):
    for lab in LABS:
        _, path = start(lab.name, str(tmp_path / lab.name))
        results = run_cases(lab, path, "cuda")
        assert results and not any(r["passed"] for r in results), lab.name
        for r in results:
            assert r["failures"] or r["error"], (lab.name, r)
            if r["error"]:                 # the student's own lines, not the grader's
                assert "nbalex/labs" not in r["error"], r["error"]
        text = format_report({"lab": lab.name, "file": path, "backend": "cuda",
                              "simulator": True, "passed": False, "score": 0.0,
                              "passed_cases": 0, "total_cases": len(results),
                              "cases": results})
        assert "FAIL" in text and "PASS:" not in text


# ------------------------------------------------------------------ planted bugs
BUGS = [
    # (lab, old, new, what the report must say)
    ("relu", "for i in range(start, x.shape[0], step):",
     "for i in range(start, x.shape[0] - 1, step):", "the last 1 of"),
    ("relu", "for i in range(start, x.shape[0], step):", "for i in range(start, start + 1):",
     "IndexError"),
    ("dropout", "uint64(offset) + uint64(i)", "uint64(i)", "offset=1000"),
    ("dropout", "            y[i] = x[i] / keep", "            y[i] = x[i] * keep",
     "0.25 times the expected"),
    ("maxpool", "if (v > best or v != v)", "if (v >= best or v != v)", "a tie went to a later"),
    ("maxpool", "h0 = oh * stride", "h0 = oh * size", "IndexError"),
    ("maxpool", "        for dh in range(size):", "        for dh in range(size - 1):",
     "maxpool_forward"),
    ("lrn", "            entering = c + half + 1\n            if entering < channels:\n"
            "                e = x",
     "            entering = c + half\n            if entering < channels:\n"
     "                e = x", "of axis 1 (of 7)"),
    ("softmax_xent", "width = ROW_THREADS // 2", "width = ROW_THREADS // 4",
     "not 1: the block's reduction"),
    ("softmax_xent", "dlogits[row, k] = g * inv_n", "dlogits[row, k] = g",
     "3 times the expected"),
    ("sgd", "offsets[t + 1] <= i", "offsets[t + 1] < i", "tensor boundaries (elements [10, 300, 301])"),
    ("sgd", "            nonfinite[0] = 1", "            nonfinite[0] = 0",
    '"array": "nonfinite"'),
    ("gemm_naive", "if i < c.shape[0] and j < c.shape[1]:", "if True:", "IndexError"),
    ("gemm_naive", "for k in range(a.shape[1]):", "for k in range(a.shape[1] - 1):",
     "all zeros"),
    ("gemm_tiled", "if row < m and ka < k_dim else", "if row < m else", "IndexError"),
    ("gemm_register", "a_frag[r] = a_s[kk, ty * TM + r]", "a_frag[r] = a_s[kk, ty + r]",
     "sgemm M=33 K=17 N=20"),
    ("conv2d_forward", "ih = oh * stride - pad + kh\n            iw = ow * stride - pad + kw\n",
     "ih = oh - pad + kh\n            iw = ow - pad + kw\n", "y is a stride-1 convolution"),
    ("conv2d_forward", "if 0 <= ih and ih < hgt and 0 <= iw and iw < wid:\n                acc += w",
     "if ih < hgt and iw < wid:\n                acc += w", "overlaps the padding"),
    ("conv2d_forward", "* x[n, g * cg + c, ih, iw]\n        acc += b", "* x[n, c, ih, iw]\n        acc += b",
     "right in group 0, wrong in later groups"),
    ("conv2d_backward_data", "f = g * fg + k // (khgt * kwid)", "f = k // (khgt * kwid)",
     "right in group 0, wrong in later groups"),
    ("conv2d_backward_weights", "for k in range(batch * ohgt * owid):",
     "for k in range(ohgt * owid):", "dw sums over the first image only"),
]


@pytest.mark.parametrize("lab,old,new,says", BUGS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BUGS)])
def test_planted_bug_fails_with_a_report_that_points_at_it(tmp_path, lab, old, new, says):
    path = _planted(tmp_path, lab, old, new)
    results, text = _report(lab, path)
    failed = [r for r in results if not r["passed"]]
    assert failed, f"{lab}: the planted bug passed"
    assert says in json.dumps(failed), text[:3000]
    for r in failed:
        if r["error"]:        # trimmed to the student's file: no grader or numba frames
            assert path in r["error"] and "numba_cuda" not in r["error"], r["error"]


def test_a_kernel_that_never_ends_is_timed_out_and_the_rest_reported(tmp_path):
    path = _planted(tmp_path, "relu", "    for i in range(start, x.shape[0], step):\n        v = x[i]",
                    "    i = start\n    while i < x.shape[0]:\n        v = x[i]")
    report = check("relu", path, timeout=3)
    first = report["cases"][0]
    assert not report["passed"] and "timed out after 3 s" in first["error"]
    assert all("not run" in c["error"] for c in report["cases"][1:])
    assert report["total_cases"] == len(get("relu").case_list())


def test_broken_modules_are_reported_not_raised(tmp_path):
    bad = tmp_path / "syntax.py"
    bad.write_text("def relu_forward(y, x, stream=None)\n    pass\n")
    results = run_cases(get("relu"), str(bad), "cuda")
    assert all("SyntaxError" in r["error"] for r in results)
    half = tmp_path / "half.py"
    half.write_text("def relu_forward(y, x, stream=None):\n    pass\n")
    results = run_cases(get("relu"), str(half), "cuda")
    assert "defines no relu_backward(dx, dy, y, stream=None)" in results[0]["error"]


# ------------------------------------------------------------------ the CLI
def test_cli_list_start_check(tmp_path):
    listed = _nbalex("lab", "list")
    assert listed.returncode == 0
    assert [ln.split()[0] for ln in listed.stdout.splitlines()] == [lab.name for lab in LABS]
    folder = tmp_path / "lab1"
    made = _nbalex("lab", "start", "relu", str(folder))
    assert made.returncode == 0 and (folder / "relu.md").exists() and (folder / "relu.py").exists()
    again = _nbalex("lab", "start", "relu", str(folder))
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    starter = _nbalex("lab", "check", "relu", str(folder / "relu.py"), "--json")
    assert starter.returncode == 1
    assert json.loads(starter.stdout)["score"] == 0.0
    unknown = _nbalex("lab", "check", "nope", str(folder / "relu.py"))
    assert unknown.returncode == 2 and "no lab 'nope'" in unknown.stderr
    solved = _nbalex("lab", "check", "relu", source_path("cuda/relu.py"))
    assert solved.returncode == 0 and solved.stdout.rstrip().endswith("(score 1.00)")


def test_check_static_shows_the_students_kernels_beside_the_packages(tmp_path):
    from nbalex.cuda import static
    if not static.tools_present():
        pytest.skip("the CUDA tools (ptxas, cuobjdump, nvdisasm) are not installed")
    _, path = start("relu", str(tmp_path))
    run = _nbalex("lab", "check", "relu", path, "--json", "--static")
    assert run.returncode == 1                      # the grade, not the static report
    rows = json.loads(run.stdout)["static"]["rows"]
    names = {(r["who"], r["name"]) for r in rows}
    assert names == {(who, k) for who in ("yours", "nbalex")
                     for k in ("relu_forward_kernel", "relu_backward_kernel")}
    mine = {r["name"]: r for r in rows if r["who"] == "yours"}
    theirs = {r["name"]: r for r in rows if r["who"] == "nbalex"}
    # the starter's empty kernels compile to fewer instructions than the package's
    assert all(mine[k]["instructions"] < theirs[k]["instructions"] for k in mine)
    assert all(r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    from nbalex.labs.static_report import format_static
    text = format_static(json.loads(run.stdout)["static"])
    assert "sm_90 static report" in text and "yours   relu_forward_kernel" in text
