"""The benchmarks: CPU tables with numbers and ratios, the reference check, the simulator refusal.

Timings themselves are never asserted (they depend on the machine); what is asserted is that
they exist, that the derived columns follow from them, and that a wrong kernel is stopped
before it is timed.
"""

import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from nbalex import backends
from nbalex.benchmarks import kernels, peers, sgemm, train
from nbalex.benchmarks.layers import (ALEXNET_CONV_FC, ALEXNET_LAYERS, LayerSpec, make_inputs,
                                      parameter_count, passes)
from nbalex.benchmarks.profile import LaunchRecorder, LayerAttributor, instrument

FAST = ["--backend", "cpu", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?$")


def run(command, args):
    return CliRunner().invoke(command, args, catch_exceptions=False)


def test_cpu_table_has_times_rates_and_ratios_for_every_pass():
    result = run(kernels.command, FAST + ["--layer", "fc8", "--layer", "relu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["layer", "pass", "ms"] and "torch/ours" in header and "numpy/ours" in header
    rows = [ln.split() for ln in lines[2:] if ln.split()[:1] in (["fc8"], ["relu"])]
    assert [r[:2] for r in rows] == [["fc8", "forward"], ["fc8", "backward-data"],
                                     ["fc8", "backward-weights"], ["relu", "forward"],
                                     ["relu", "backward-data"]]
    ms, ratio = header.index("ms"), header.index("torch/ours")
    for r in rows:
        assert NUMBER.match(r[ms]) and float(r[ms]) > 0, r
        assert NUMBER.match(r[ratio]) and float(r[ratio]) > 0, r
    fc_rows = [r for r in rows if r[0] == "fc8"]
    assert all(NUMBER.match(r[header.index("numpy/ours")]) for r in fc_rows)


def test_json_rows_derive_rates_and_ratios_from_the_times():
    result = run(kernels.command, FAST + ["--layer", "fc8,pool5", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["layer"], r["pass"]) for r in rows} >= {("fc8", "forward"), ("pool5", "backward-data")}
    for r in rows:
        assert r["ms"] > 0 and r["check_error"] <= kernels.TOLERANCE
        assert math.isclose(r["torch_over_ours"], r["torch_ms"] / r["ms"], rel_tol=1e-9)
        assert math.isclose(r["gbs"], r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
    fc8 = next(r for r in rows if (r["layer"], r["pass"]) == ("fc8", "forward"))
    assert fc8["flops"] == 2 * 2 * 4096 * 1000
    assert fc8["bytes"] == 4 * (2 * 4096 + 1000 * 4096 + 1000 + 2 * 1000)
    assert all(r["gflops"] is None for r in rows if r["layer"] == "pool5")


def _forgets_the_clamp(y, x, stream=None):
    np.copyto(y, x)


def _writes_half(y, x, stream=None):
    half = y.shape[0] // 2
    np.maximum(x[:half], 0, out=y[:half])


@pytest.mark.parametrize("wrong", [_forgets_the_clamp, _writes_half])
def test_a_wrong_kernel_is_stopped_before_it_is_timed(monkeypatch, wrong):
    real = kernels.load_backend

    def with_wrong_relu(name):
        module = real(name)
        if name != "cpu":
            return module
        launchers = {n: getattr(module, n) for n in backends.LAUNCHERS if hasattr(module, n)}
        return SimpleNamespace(**{**launchers, "relu_forward": wrong})

    monkeypatch.setattr(kernels, "load_backend", with_wrong_relu)
    result = run(kernels.command, FAST + ["--layer", "relu", "--json"])
    assert result.exit_code == 1
    rows = {r["pass"]: r for r in json.loads(result.stdout)}
    assert "does not match the reference" in rows["forward"]["error"] and "ms" not in rows["forward"]
    assert rows["backward-data"]["ms"] > 0 and "error" not in rows["backward-data"]
    assert "relu forward" in result.stderr


def test_the_simulator_refuses_to_print_timings(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    for command, args in ((kernels.command, ["--backend", "cuda", "--layer", "relu"]),
                          (sgemm.command, []),
                          (train.command, ["--backend", "cuda", "--model", "alexnet-mini"])):
        result = run(command, args)
        assert result.exit_code != 0
        assert "simulator" in result.output and "ms" not in result.stdout


def _reference_outputs(spec, n, host):
    reference, arrays, out = kernels.load_backend("reference"), {k: v.copy() for k, v in host.items()}, {}
    for pa in passes(spec, n):
        for name, (shape, dtype) in pa.writes.items():
            arrays[name] = np.zeros(shape, dtype)
        pa.launch(reference, arrays, None)
        out[pa.name] = {name: arrays[name].copy() for name in (*pa.writes, *pa.in_place)}
    return out


SMALL = [LayerSpec("c", "conv", (4, 9, 9), (6, 5, 5), 3, 2, 1, 2),
         LayerSpec("f", "fc", (12,), (5,)),
         LayerSpec("l", "lrn", (7, 3, 3), (7, 3, 3)),
         LayerSpec("p", "pool", (3, 7, 7), (3, 3, 3)),
         LayerSpec("r", "relu", (3, 4, 4), (3, 4, 4)),
         LayerSpec("s", "softmax-xent", (10,), (10,)),
         LayerSpec("g", "sgd", (), (), params=50)]


@pytest.mark.parametrize("spec", SMALL, ids=[s.kind for s in SMALL])
def test_peers_compute_what_the_reference_computes(spec, rng):
    n = 3
    host = make_inputs(spec, n, rng)
    if spec.kind == "sgd":
        host["v"][:] = 0      # PyTorch's first momentum step equals ours only from v = 0
    expected = _reference_outputs(spec, n, host)
    tensors = peers.to_torch(host, peers.torch_device("cpu"))
    for pa in passes(spec, n):
        got = {k: v.detach().numpy() for k, v in peers.torch_pass(spec, pa.name, tensors)().items()}
        numpy_fn = peers.numpy_pass(spec, pa.name, host)
        if numpy_fn is not None:
            for name, value in numpy_fn().items():
                np.testing.assert_allclose(value, expected[pa.name][name], rtol=1e-4, atol=1e-5)
        for name, value in got.items():
            np.testing.assert_allclose(value, expected[pa.name][name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"torch {spec.kind} {pa.name} {name}")


def test_layer_table_agrees_with_the_alexnet_config():
    from nbalex.model import describe

    info = describe("alexnet")
    assert parameter_count(ALEXNET_CONV_FC) == info["params"] == 60_965_224
    by_name = {row["name"]: row for row in info["layers"]}
    for spec in ALEXNET_CONV_FC:
        assert tuple(by_name[spec.name]["output_shape"]) == spec.out_shape, spec.name
        assert by_name[spec.name]["params"] == parameter_count([spec]), spec.name
    pools = [s for s in ALEXNET_LAYERS if s.kind == "pool"]
    assert [s.out_shape for s in pools] == [tuple(r["output_shape"]) for r in info["layers"]
                                            if r["type"] == "maxpool"]
    assert next(s for s in ALEXNET_LAYERS if s.kind == "sgd").params == info["params"]


def test_sgemm_shapes_are_alexnets_implicit_gemms():
    shapes = {name: (m, n, k) for name, m, n, k in sgemm.gemm_shapes(batch=128)}
    assert shapes["conv1"] == (96, 128 * 55 * 55, 3 * 11 * 11)
    assert shapes["conv2"] == (128, 128 * 27 * 27, 48 * 5 * 5)
    assert shapes["fc6"] == (4096, 128, 9216) and shapes["square4096"] == (4096,) * 3


def test_sgemm_checks_a_product_before_timing_it(rng):
    def host_product(y, x, w, b):
        y.copy_to_device((x.copy_to_host() @ w.copy_to_host().T + b.copy_to_host()).astype(np.float32))

    def leaves_output_unwritten(y, x, w, b):
        pass

    row = sgemm.bench_shape("small", 8, 16, 32, host_product, None, rng, warmup=0, repeats=1)
    assert row["rel_err"] <= sgemm.TOLERANCE and row["flops"] == 2 * 8 * 16 * 32
    with pytest.raises(sgemm.CheckFailed, match="relative error"):
        sgemm.bench_shape("small", 8, 16, 32, leaves_output_unwritten, None, rng, warmup=0, repeats=1)


def test_profiler_counts_and_attributes_launches_then_restores_them():
    from nbalex.config import load_config

    _, _, specs = load_config("alexnet-mini")
    conv2 = next(s for s in specs if s.name == "conv2")
    calls = []
    module = SimpleNamespace(conv2d_forward=lambda y, x, w, b, *rest, **kw: calls.append("conv"),
                             relu_forward=lambda y, x, stream=None: calls.append("relu"))
    original = module.conv2d_forward
    recorder = LaunchRecorder(LayerAttributor(specs, batch=4), sync=lambda: None)
    with instrument([module], recorder):
        recorder.recording = True
        module.conv2d_forward(None, None, np.zeros(conv2.params[0].shape), None, 1, 2, 2)
        module.relu_forward(None, None)
    assert module.conv2d_forward is original and calls == ["conv", "relu"]
    assert recorder.calls == 2 and set(recorder.seconds) == {"conv2", "relu"}


def test_train_bench_reports_throughput_layer_shares_and_launches():
    r = train.run_train("alexnet-mini", batch_size=2, backend="cpu", steps=1, warmup=0, peer=False)
    assert not [k for k in r if k.endswith("_error")], r
    assert r["ours_images_per_s"] > 0 and r["launches_per_step"] > 0
    names = {row["layer"] for row in r["layers"]}
    assert {"conv1", "norm1", "pool5", "fc8", "relu", "dropout", "sgd", "softmax-xent"} <= names
    assert 0 < sum(row["share"] for row in r["layers"]) <= 1.0 + 1e-9
    assert r["loader"].startswith("not measured")
    text = train.format_result(r)
    assert "images/s" in text and "conv1" in text and "launches" in text


def _write_results_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "write_results.py"
    spec = importlib.util.spec_from_file_location("write_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_results_turns_step_records_into_a_markdown_table(tmp_path, capsys):
    wr = _write_results_module()
    out = tmp_path / "out"
    out.mkdir()

    def step(name, status, stdout=None, stderr=None, rc=0):
        files = {}
        for key, text in (("stdout", stdout), ("stderr", stderr)):
            if text is not None:
                files[key] = tmp_path / f"{name}.{key}"
                files[key].write_text(text if isinstance(text, str) else json.dumps(text))
        assert wr.main(["record", str(out), "--step", name, "--status", status, "--rc", str(rc),
                        "--seconds", "3", "--limit", "60",
                        *[a for k, f in files.items() for a in (f"--{k}", str(f))]]) == 0

    step("nvidia-smi", "ok", "NVIDIA Test Card, 580.1, 81559 MiB, 345 MHz, 1980 MHz\n")
    (out / "pytest.log").write_text("....\nFAILED tests/test_x.py::test_y - boom\n"
                                    "1 failed, 120 passed, 3 skipped in 99.0s\n")
    step("tests", "failed (exit 1)", rc=1)
    step("memcheck", "ok", {"ok": True, "launches": 14, "kernels": ["a", "b"], "gemm_not_reached": []},
         "========= ERROR SUMMARY: 0 errors\n")
    step("kernels-conv", "ok", [{"layer": "conv1", "pass": "forward", "batch": 128, "backend": "cuda",
                                 "ms": 2.0, "gflops": 9000.0, "gbs": 200.0, "torch_ms": 1.0,
                                 "torch_over_ours": 0.5, "check_error": 1e-7}])
    step("sgemm", "failed (exit 1)", "not json", "Traceback ...\nRuntimeError: planted\n", rc=1)
    step("train", "ok", {"model": "alexnet", "batch": 128, "ours_images_per_s": 1000.0, "layers": []})
    step("variants", "ok", [{"op": "relu_forward", "size": "conv1", "variant": variant,
                             "grid": "package", "blocks": 4096, "ms": 0.1, "gbps": 2900.0,
                             "vs_package": 1.0, "queued_ms": 0.1, "queued_gbps": 2900.0,
                             "queued_vs_package": speedup}
                            for variant, speedup in (("package", 1.0), ("unroll4", 1.25))])
    step("static", "skipped (dry run)")
    records = wr.read_records(out)
    assert [r["step"] for r in records][:2] == ["nvidia-smi", "tests"]
    assert records[4]["data"] is None and records[4]["stdout_tail"] == "not json"
    [md] = list(out.glob("gpu-nvidia-test-card-*.md"))
    text = md.read_text()
    assert "| NVIDIA Test Card | 580.1 |" in text
    assert "| conv1 | forward | 2.000 |" in text and "RuntimeError: planted" in text
    assert "FAILED tests/test_x.py::test_y - boom" in text
    assert "| memcheck | ok | ERROR SUMMARY: 0 errors | 14 | 2 |" in text
    assert "| relu_forward | conv1 | unroll4 | package | 4096 |" in text
    assert wr.main(["summary", str(out)]) == 1          # tests and sgemm failed
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary[-1] == "steps not ok: tests, sgemm" and "120 passed" in "\n".join(summary)
    assert "variants: faster than ours: relu_forward/conv1 unroll4 (package) 1.25x" in summary
    (out / "steps.jsonl").open("a").write('{"step": "torn')      # a kill mid-line
    assert len(wr.read_records(out)) == len(records)


def test_write_results_counts_a_killed_pytest_log(tmp_path):
    wr = _write_results_module()
    (tmp_path / "pytest.log").write_text("tests/a.py::test_1 PASSED [ 10%]\n"
                                         "tests/a.py::test_2 FAILED [ 20%]\ntests/b.py::test_3 ")
    rows, line = wr.tests_section(tmp_path, {})
    assert line == "cut short: 1 passed, 1 failed; last test started: tests/b.py::test_3"
    assert any("tests/a.py::test_2 FAILED" in r for r in rows)



@pytest.mark.skipif(not backends.cuda_available(), reason="needs a GPU or the CUDA simulator")
def test_record_launches_counts_each_kernel_a_launcher_launches_and_restores_them():
    """bench train prices real launches: one linear_backward_weights call is two kernels."""
    import nbalex.cuda.linear as linear
    from nbalex.cuda.launch import record_launches

    rng = np.random.default_rng(0)
    dy = rng.standard_normal((2, 5), dtype=np.float32)
    x = rng.standard_normal((2, 12), dtype=np.float32)
    dw, db = np.zeros((5, 12), np.float32), np.zeros(5, np.float32)
    kernel = linear.linear_bias_grad_kernel
    with record_launches() as log:
        linear.linear_backward_weights(dw, db, dy, x)
    names = log.names()      # the GEMM is the tile instance chosen for the shape (its name says which)
    assert len(names) == 2 and names[0].startswith("linear_backward_weights_kernel")
    assert names[1] == "linear_bias_grad_kernel"
    assert all(seconds > 0 for *_, seconds in log.launches) and log.host_seconds() > 0
    assert log.launches[1][2] in range(32, linear.BIAS_THREADS + 1)     # the block it was given
    assert linear.linear_bias_grad_kernel is kernel                  # put back on exit
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=1e-6)


def test_bench_kernels_leaves_out_what_training_never_runs():
    conv1 = next(s for s in ALEXNET_LAYERS if s.name == "conv1")
    conv2 = next(s for s in ALEXNET_LAYERS if s.name == "conv2")
    assert kernels.untrained_passes() == {("conv1", "backward-data")}
    assert [p.name for p in kernels.bench_passes(conv1, 2)] == ["forward", "backward-weights"]
    assert [p.name for p in kernels.bench_passes(conv1, 2, untrained=True)] == \
        ["forward", "backward-data", "backward-weights"]
    assert [p.name for p in kernels.bench_passes(conv2, 2)] == [p.name for p in passes(conv2, 2)]


@pytest.mark.skipif(not backends.cuda_available(), reason="needs a GPU or the CUDA simulator")
def test_bench_sgemm_allocates_the_split_k_workspace_once_outside_the_timed_calls():
    seen = []

    def linear_forward(y, x, w, b, relu=False, workspace=None, stream=None):
        seen.append(workspace)

    ours = sgemm.our_gemm(linear_forward, lambda xs, ws: 7 * xs[0] * ws[0], 3, 5, 4)
    ours(None, None, None, None)
    ours(None, None, None, None)
    assert seen[0] is seen[1] and seen[0].shape == (7 * 3 * 4,)
    none_needed = sgemm.our_gemm(linear_forward, lambda xs, ws: 0, 3, 5, 4)
    none_needed(None, None, None, None)
    assert seen[2] is None
