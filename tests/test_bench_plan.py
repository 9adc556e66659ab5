"""``nbalex bench plan``: the launches of one training step and their predicted GPU time.

The plan's launches are checked against the launches a real Net step makes (kernels replaced
by stubs that only log, so no kernel runs), its tiling against the launchers' own split-K and
grid helpers, its FLOP against the model's MACs, its register table against the static report.
"""

import contextlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

from nbalex import backends
from nbalex.benchmarks import plan as plan_mod
from nbalex.cuda import static, tiling
from nbalex.model import describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 128


@pytest.fixture(scope="module")
def alexnet():
    return plan_mod.make_plan("alexnet", BATCH, "h100-sxm")


def gemm_rows(plan):
    return [r for r in plan["rows"] if "executed_flop" in r]


def row(plan, layer, pass_name):
    (found,) = [r for r in plan["rows"] if r["layer"] == layer and r["pass"] == pass_name]
    return found


# ---- totals, FLOP, the issue's numbers ---------------------------------------------------------

def test_totals_are_the_sums_of_the_rows(alexnet):
    rows, t = alexnet["rows"], alexnet["totals"]
    assert t["launches"] == len(rows)
    assert t["useful_flop"] == sum(r.get("useful_flop", 0) for r in rows)
    assert t["executed_flop"] == sum(r.get("executed_flop", 0) for r in rows)
    assert t["bytes"] == sum(r["bytes"] for r in rows)
    assert alexnet["predicted_step_ms"] == pytest.approx(sum(r["predicted_ms"] for r in rows))
    assert alexnet["predicted_images_per_s"] == pytest.approx(
        BATCH / (alexnet["predicted_step_ms"] / 1e3))
    for name, p in alexnet["passes"].items():
        assert p["executed_flop"] == sum(r.get("executed_flop", 0) for r in rows if r["pass"] == name)
        assert p["launches"] == sum(1 for r in rows if r["pass"] == name and "executed_flop" in r)


def test_useful_flop_is_the_models_macs_times_the_passes_training_runs(alexnet):
    info = describe("alexnet")
    first = next(layer for layer in info["layers"] if layer["type"] in ("conv", "fc"))
    # three passes of every layer, less the first layer's backward-data (never run)
    assert alexnet["totals"]["useful_flop"] == 2 * BATCH * (3 * info["macs"] - first["macs"])
    for r in gemm_rows(alexnet):
        layer = next(layer for layer in info["layers"] if layer["name"] == r["layer"])
        assert r["useful_flop"] == 2 * BATCH * layer["macs"]
    assert not any(r["layer"] == "conv1" and r["pass"] == "backward-data" for r in alexnet["rows"])


@pytest.fixture(scope="module")
def before():
    """The plan as the launchers were before tiles other than 128x128: one tile, split-K only
    for grids under one block per SM."""
    saved = tiling.TILES, tiling.WAVE_SPLIT_LOSS
    tiling.TILES, tiling.WAVE_SPLIT_LOSS = ((128, 128),), float("inf")
    try:
        return plan_mod.make_plan("alexnet", BATCH, "h100-sxm")
    finally:
        tiling.TILES, tiling.WAVE_SPLIT_LOSS = saved


def test_the_issues_numbers_before(before):
    """689 GFLOP executed for 529 useful (0.77); conv2 backward-data (M = 48) at 0.38;
    conv5 forward and conv3 backward-data at 1.3 waves."""
    t = before["totals"]
    assert round(t["executed_flop"] / 1e9) == 689 and round(t["useful_flop"] / 1e9) == 529
    assert round(t["tile_efficiency"], 2) == 0.77
    bwd = row(before, "conv2", "backward-data")
    assert bwd["M"] == 48 and round(bwd["tile_efficiency"], 2) == 0.38
    assert round(row(before, "conv5", "forward")["waves"], 1) == 1.3
    assert round(row(before, "conv3", "backward-data")["waves"], 1) == 1.3
    assert {r["tile"] for r in gemm_rows(before)} == {"128x128x8"}


def test_tiles_per_shape_meet_the_issues_goal(alexnet, before):
    """Tile efficiency >= 0.90 for the step and >= 0.70 for every GEMM launch and pass; the
    same useful work; a faster predicted step on an H100 SXM."""
    t = alexnet["totals"]
    assert t["useful_flop"] == before["totals"]["useful_flop"]
    assert t["tile_efficiency"] >= 0.90
    assert min(r["tile_efficiency"] for r in gemm_rows(alexnet)) >= 0.70
    assert all(p["tile_efficiency"] >= 0.70 for p in alexnet["passes"].values())
    assert row(alexnet, "conv2", "backward-data")["tile"] != "128x128x8"
    assert alexnet["predicted_images_per_s"] > 1.10 * before["predicted_images_per_s"]
    assert len({r["tile"] for r in gemm_rows(alexnet)}) >= 3


def test_tile_efficiency_at_most_one_and_executed_flop_covers_whole_tiles(alexnet):
    assert 0 < alexnet["totals"]["tile_efficiency"] <= 1
    for r in gemm_rows(alexnet):
        assert 0 < r["tile_efficiency"] <= 1, r
        x, y, z = r["grid"]
        assert z == r["groups"] * r["split_k"]
        assert r["executed_flop"] >= 2 * (r["M"] * r["N"] * r["K"]) * r["groups"] or \
            r["pass"] == "backward-weights"
        bm, bn, bk = (int(v) for v in r["tile"].split("x"))
        assert r["executed_flop"] % (2 * bm * bn * bk) == 0           # whole tiles
        assert r["kernel"] == tiling.instance_name(r["kernel"].split("_kernel")[0] + "_kernel",
                                                   bm, bn)
        assert r["block"] == (bm // 8) * (bn // 8)


def test_gemm_time_is_executed_work_at_the_ffma_rate_in_whole_waves(alexnet):
    gpu = plan_mod.GPUS["h100-sxm"]
    r = row(alexnet, "conv2", "backward-data")
    x, y, z = r["grid"]
    rate = gpu.sms * 128 * gpu.clock_mhz * 1e6 * plan_mod.STATIC[r["kernel"]][3]
    resident = plan_mod.resident_blocks(r["kernel"])
    assert r["resident_blocks"] == resident and r["waves"] == pytest.approx(
        x * y * z / (gpu.sms * resident))
    want = r["executed_flop"] / 2 / rate * (np.ceil(r["waves"]) / r["waves"]) * 1e3
    assert r["bound"] == "ffma" and r["predicted_ms"] == pytest.approx(want)
    sgd = row(alexnet, "sgd", "update")
    assert sgd["bound"] == "memory" and sgd["bytes"] == 20 * describe("alexnet")["params"]
    assert sgd["predicted_ms"] == pytest.approx(sgd["bytes"] / (0.8 * gpu.hbm_gb_s * 1e9) * 1e3)
    assert min(r["predicted_ms"] for r in alexnet["rows"]) >= plan_mod.LAUNCH_FLOOR_US / 1e3


# ---- the GPU table and the device -------------------------------------------------------------

def test_gpu_table_and_the_sm_count_reaches_split_k():
    assert {k: g.sms for k, g in plan_mod.GPUS.items()} == {"h100-sxm": 132, "h100-pcie": 114,
                                                           "h200": 132}
    sxm = plan_mod.make_plan("alexnet", BATCH, "h100-sxm")
    pcie = plan_mod.make_plan("alexnet", BATCH, "h100-pcie")
    # fc6 forward: 32 output blocks of 128x128; split-K aims at 2 blocks per SM: 264 // 32 = 8,
    # 228 // 32 = 7
    assert row(sxm, "fc6", "forward")["split_k"] == 8
    assert row(pcie, "fc6", "forward")["split_k"] == 7
    assert pcie["predicted_step_ms"] > sxm["predicted_step_ms"]
    assert any("114 SMs" in a for a in pcie["assumptions"])


def test_gpu_from_device_keeps_the_devices_sm_count():
    card = plan_mod.gpu_from_device(b"NVIDIA H100 PCIe", 110, 1_755_000, 1_593_000, 5120)
    assert card.sms == 110 and card.clock_mhz == 1755.0 and card.hbm_gb_s == 2000.0
    assert plan_mod.gpu_from_device("NVIDIA H200", 132, 0, 0, 0).hbm_gb_s == 4800.0
    other = plan_mod.gpu_from_device("Some GPU", 48, 1_500_000, 1_000_000, 256)
    assert (other.sms, other.clock_mhz, other.hbm_gb_s) == (48, 1500.0, 64.0)


# ---- one tiling rule for the plan and the launchers -------------------------------------------

def old_split_k(blocks, inner):
    """The launchers' split-K rule of the 128x128-only kernels, at 132 SMs."""
    if blocks >= 132:
        return 1, inner
    k_tiles = -(-inner // 8)
    splits = max(1, min(264 // blocks, k_tiles // 16))
    if splits == 1:
        return 1, inner
    k_split = -(-k_tiles // splits) * 8
    return -(-inner // k_split), k_split


def test_tiling_split_k_keeps_the_old_rule_for_128x128_tiles():
    from nbalex.cuda import gemm
    assert (tiling.BM, tiling.BN, tiling.BK) == (gemm.BM, gemm.BN, gemm.BK)
    for blocks in (1, 2, 3, 7, 32, 64, 100, 131, 132, 500):
        for inner in (1, 8, 100, 127, 128, 129, 1000, 4096, 21632, 387200):
            assert tiling.split_k(blocks, inner, 132, 256) == old_split_k(blocks, inner)


def test_split_to_whole_waves_only_for_a_partial_last_wave():
    per_wave = 132 * tiling.resident_threads(128, 128) // 256       # 264 blocks of 256 threads
    assert tiling.split_to_whole_waves(2 * per_wave, 4096) == (1, 4096)     # whole waves
    assert tiling.split_to_whole_waves(2 * per_wave - 20, 4096) == (1, 4096)  # 1.92: not stuck
    splits, k_split = tiling.split_to_whole_waves(per_wave + 60, 4096)      # 1.23 waves
    assert splits > 1 and k_split % tiling.BK == 0
    assert (splits - 1) * k_split < 4096 <= splits * k_split
    assert tiling.split_to_whole_waves(per_wave + 60, 200) == (1, 200)      # too short to cut


def test_gemm_tiling_picks_the_tile_that_wastes_least():
    """Pure in (shape, SMs); a 48-row GEMM takes a 64-row tile, a large square one the
    128x128 tile; no candidate tile costs less than the chosen one."""
    small = tiling.GemmShape(48, 93312, 3200, 2)
    t = tiling.gemm_tiling(small, 132)
    assert t.bm == 64 and t == tiling.gemm_tiling(small, 132)
    big = tiling.GemmShape(4096, 4096, 4096)
    assert (tiling.gemm_tiling(big, 132).bm, tiling.gemm_tiling(big, 132).bn) == (128, 128)
    for shape in (small, big, tiling.GemmShape(96, 387200, 363), tiling.GemmShape(5, 7, 9)):
        chosen = tiling.gemm_tiling(shape, 114)
        for bm, bn in tiling.TILES:
            other = tiling.GemmTiling(shape, bm, bn, tiling.BK, 1, shape.k)
            assert tiling.tiling_cost(chosen, 114) <= tiling.tiling_cost(other, 114) * (1 + 1e-9)


def test_plan_tiling_matches_the_launchers_helpers_at_alexnets_shapes(alexnet):
    from nbalex.cuda import conv2d, linear
    for r in gemm_rows(alexnet):
        if r["layer"].startswith("fc"):
            n, (k, m) = BATCH, {"forward": (r["K"], r["N"]), "backward-data": (r["N"], r["K"]),
                                "backward-weights": (r["N"], r["M"])}[r["pass"]]
            assert (r["split_k"], r["k_split"]) == linear.split_k(r["pass"], n, k, m), r
    convs = {"conv1": ((BATCH, 3, 227, 227), (96, 3, 11, 11), 4, 0, 1),
             "conv2": ((BATCH, 96, 27, 27), (256, 48, 5, 5), 1, 2, 2),
             "conv5": ((BATCH, 384, 13, 13), (256, 192, 3, 3), 1, 1, 2)}
    for name, args in convs.items():
        r = row(alexnet, name, "backward-weights")
        assert (r["split_k"], r["k_split"]) == conv2d.backward_weights_splits(*args)


def test_tiling_refuses_bad_shapes():
    with pytest.raises(ValueError, match="positive"):
        tiling.gemm_tiling(tiling.GemmShape(0, 4, 4))
    with pytest.raises(ValueError, match="unknown pass"):
        tiling.linear_gemm("sideways", 2, 3, 4)


@contextlib.contextmanager
def stub_kernels():
    """Every kernel of nbalex.cuda replaced by a stub that logs (name, grid, block) and runs
    nothing; put back on exit."""
    import nbalex.cuda as package
    from nbalex.cuda.launch import is_kernel

    log, saved = [], []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, config):
            grid = config[0]
            grid = tuple(grid) if isinstance(grid, (tuple, list)) else int(grid)
            return lambda *args: log.append((self.name, grid, int(config[1])))

    try:
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"nbalex.cuda.{info.name}")
            for name, value in list(vars(module).items()):
                if is_kernel(value):
                    saved.append((vars(module), name, value))
                    setattr(module, name, Stub(getattr(value, "__name__", name)))
                elif isinstance(value, dict):          # the tile instances of a GEMM kernel
                    for key, entry in list(value.items()):
                        if isinstance(entry, tuple) and entry and is_kernel(entry[0]):
                            saved.append((value, key, entry))
                            value[key] = (Stub(entry[0].__name__), *entry[1:])
        yield log
    finally:
        for table, name, value in reversed(saved):
            table[name] = value


@pytest.mark.skipif(not backends.cuda_available(), reason="needs a GPU or the CUDA simulator")
@pytest.mark.parametrize("batch", [2, 5])
def test_plan_lists_the_launches_a_training_step_makes(batch):
    from nbalex.model import Net
    with stub_kernels() as log:
        net = Net("alexnet-mini", backend="cuda", batch_size=batch)
        log.clear()                                     # only the step's launches
        x = np.zeros((batch, *net.input_shape), np.float32)
        net.forward_backward(x, np.zeros(batch, np.int32), train=True, seed=1)
        net.sgd_step(0.01)
    planned = [(r["kernel"], tuple(r["grid"]) if isinstance(r["grid"], list) else r["grid"],
                r["block"]) for r in plan_mod.step_launches("alexnet-mini", batch)]
    assert planned[0][0] == "augment_batch_kernel"      # the loader's, before the step
    assert planned[1:] == log
    assert any(k == "sum_slices_kernel" for k, _, _ in log)   # split-K covered


# ---- the checked-in static table ---------------------------------------------------------------

# ---- the command ------------------------------------------------------------------------------

def nbalex(*args):
    return subprocess.run([sys.executable, "-m", "nbalex", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_shape():
    run = nbalex("bench", "plan", "--model", "alexnet", "--batch-size", "128", "--gpu", "h200",
                 "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert {"rows", "predicted_step_ms", "predicted_images_per_s", "assumptions"} <= set(data)
    assert data["gpu"]["sms"] == 132 and data["gpu"]["hbm_gb_s"] == 4800.0
    assert all(isinstance(a, str) for a in data["assumptions"]) and len(data["assumptions"]) >= 5
    for r in data["rows"]:
        assert {"layer", "pass", "kernel", "grid", "split_k", "waves", "predicted_ms"} <= set(r)
    keys = [(r["layer"], r["pass"]) for r in data["rows"] if "executed_flop" in r]
    assert len(keys) == len(set(keys)) == 23                  # 8 layers x 3 passes - conv1's dx


def test_cli_table_and_bad_input():
    run = nbalex("bench", "plan", "--batch-size", "16", "--gpu", "h100-pcie")
    assert run.returncode == 0, run.stderr
    assert "predicted step" in run.stdout and "Assumptions:" in run.stdout
    assert "114 SMs" in run.stdout
    for args in (["--batch-size", "0"], ["--gpu", "a100"]):
        bad = nbalex("bench", "plan", *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = nbalex("bench", "plan", "--model", "no-such-model")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
