"""The teaching examples in examples/ run as a student would run them, and say true things.

Each script runs in a subprocess with this session's environment: under Numba's simulator
when there is no GPU (conftest switches it on), on the GPU otherwise.  The sm_90 report of
``write_a_kernel.py --static`` needs ptxas and cuobjdump (the CUDA 13 pip packages).
"""

import os
import re
import subprocess
import sys

import pytest

from nbalex.cuda import static

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

OPS = ("conv2d", "relu", "lrn", "maxpool", "linear", "dropout", "softmax_xent", "sgd_update")
NUMBER = r"(\d+\.\d+e[+-]\d+|-)"


def run_example(name, *args):
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=REPO,
                         env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def tour():
    return run_example("ops_tour.py")


def test_ops_tour_compares_every_op_on_both_backends(tour):
    rows = {}
    for line in tour.splitlines():
        m = re.match(rf"(\w+)\s+.*?\s{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\d+\.\d$", line)
        if m and m.group(1) in OPS:
            rows[m.group(1)] = [None if c == "-" else float(c) for c in m.groups()[1:]]
    assert set(rows) == set(OPS), tour
    for op, cells in rows.items():
        fwd_cpu, fwd_cuda, bwd_cpu, bwd_cuda = cells
        assert fwd_cpu is not None and fwd_cuda is not None, op
        assert (bwd_cpu is None) == (op == "sgd_update"), op     # only the update has no backward
        for d in cells:
            assert d is None or 0.0 <= d < 1e-4, (op, cells)
    # Exact ops stay exact: integer outputs (indices, masks) and selections.
    for op in ("relu", "maxpool", "dropout"):
        assert rows[op] == [0.0, 0.0, 0.0, 0.0], (op, rows[op])
    assert "OK: backends agree" in tour


def test_ops_tour_checks_the_reference_by_finite_differences(tour):
    m = re.search(r"finite differences, reference conv2d dw .*relative error (\S+)", tour)
    assert m, tour
    assert 0.0 < float(m.group(1)) < 1e-7        # float64, central, eps 1e-6: ~1e-10


def test_ops_tour_points_at_files_that_exist(tour):
    paths = re.findall(r"\b(nbalex/(?:cuda|cpu|reference)/\w+\.py)\b", tour)
    assert {f"nbalex/cuda/{m}.py" for m in ("conv2d", "relu", "lrn", "maxpool", "linear",
                                           "dropout", "softmax_xent", "sgd", "gemm")} <= set(paths)
    assert "nbalex/reference/conv2d.py" in paths
    for path in paths:
        assert os.path.isfile(os.path.join(REPO, path)), path
    assert "conv_forward_kernel" in tour and "relu_forward_kernel" in tour


def test_write_a_kernel_matches_numpy():
    out = run_example("write_a_kernel.py")
    diffs = re.findall(r"max abs difference vs NumPy (\S+)", out)
    assert len(diffs) == 3 and all(float(d) == 0.0 for d in diffs), out
    assert "1 block x 32 threads" in out                     # the grid-stride demonstration
    assert "float64 input refused: ValueError: x must be float32" in out
    assert "OK: bit for bit equal to NumPy" in out


@pytest.mark.skipif(not static.tools_present(),
                    reason="ptxas/cuobjdump/nvdisasm (CUDA 13 pip packages) missing")
def test_write_a_kernel_static_report():
    out = run_example("write_a_kernel.py", "--static")        # re-executes without the simulator
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\S.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d\.\d\d)\s+(\d+)$", line)
        if m:
            rows[m.group(1)] = [int(m.group(2)), int(m.group(3)), int(m.group(4)),
                                float(m.group(5)), int(m.group(6))]
    leaky, relu = rows["leaky_relu_forward_kernel"], rows["relu_forward_kernel (nbalex)"]
    double = rows["leaky_relu, float64 slope"]
    for regs, spills, threads, occ, instructions in (leaky, relu, double):
        assert 0 < regs <= 64 and spills == 0 and threads == 256
        assert occ == static.occupancy(regs, 0, threads) and occ > 0.5
        assert instructions > 10
    # One multiply more than ReLU: about as long; a float64 slope adds conversions.
    assert abs(leaky[4] - relu[4]) < 0.25 * relu[4]
    assert double[4] > leaky[4]
