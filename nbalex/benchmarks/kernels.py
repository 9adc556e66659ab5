"""``nbalex bench kernels``: every AlexNet layer's launchers, timed beside a peer.

For each layer and pass (forward, backward-data, backward-weights) that a training step runs
(conv1's backward-data is left out unless ``--untrained``, which marks it) the launcher of the chosen
backend is first checked against ``nbalex.reference`` at a small batch (a mismatch aborts
that row with the reason), then timed at the full batch: the median of ``repeats`` calls after
``warmup`` untimed ones, with CUDA events on a GPU and ``perf_counter`` on the CPU. The peer
runs in the same process on the same inputs: PyTorch (cuDNN/cuBLAS, TF32 off) on a GPU,
PyTorch and NumPy (im2col + matmul) on the CPU. Rates use the pass's floating-point work
(conv and fc only) and its minimum traffic (every input read once, every output written once).

Example::

    nbalex bench kernels --backend cpu --layer conv2 --layer fc6 --batch-size 8
    nbalex bench kernels --backend cuda --json > kernels.json
"""

import dataclasses
import functools
import importlib
import pkgutil
import sys
from types import SimpleNamespace

import click
import numpy as np

from .. import backends
from . import peers
from .common import (CheckFailed, TimingRefused, compare_outputs, cycling, format_table,
                     median_seconds, rate, ratio, refuse_under_simulator, rotation_count, time_host,
                     time_numba_cuda, time_torch_cuda, to_json)
from .layers import ALEXNET_LAYERS, array_shapes, make_inputs, passes, workspace_size

DEFAULT_BATCH = {"cuda": 128, "cpu": 16}
DEFAULT_REPEATS = {"cuda": 10, "cpu": 3}
DEFAULT_WARMUP = {"cuda": 2, "cpu": 1}
CHECK_BATCH = 2
CHECK_PARAMS = 1 << 20
TOLERANCE = 1e-4
POISON = {"f": np.nan, "i": -1, "u": 255}


# ---------------------------------------------------------------------------------------------
# Backends and memory.

def load_backend(name):
    """The launchers of backend ``name`` as a module-like object.

    Uses the package's exports when it has them all; otherwise collects them from the
    package's submodules (one file per layer), so a partially exported package still works.
    """
    package = importlib.import_module(f"nbalex.{name}")
    if all(callable(getattr(package, n, None)) for n in backends.LAUNCHERS):
        return package
    found, errors = {}, []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("static",):
            continue
        try:
            sub = importlib.import_module(f"nbalex.{name}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - a layer file that does not import
            errors.append(f"nbalex.{name}.{info.name}: {type(exc).__name__}: {exc}")
            continue
        for launcher in backends.LAUNCHERS:
            if launcher not in found and callable(getattr(sub, launcher, None)):
                found[launcher] = getattr(sub, launcher)
    for launcher in backends.LAUNCHERS:
        found.setdefault(launcher, _unavailable(f"nbalex.{name}", launcher, errors))
    return SimpleNamespace(__name__=f"nbalex.{name}", **found)


def _unavailable(package, launcher, errors):
    """A launcher that says why the backend does not have it, when called."""
    def launch(*args, **kwargs):
        why = "; ".join(errors) if errors else "no module defines it"
        raise NotImplementedError(f"{package} has no {launcher} ({why})")
    return launch


class HostMemory:
    """Arrays for the reference and cpu backends: plain NumPy, timed with perf_counter."""

    def put(self, a):
        return np.array(a, copy=True)

    def get(self, a):
        return np.array(a, copy=True)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def poisoned(self, shape, dtype):
        return np.full(shape, POISON[np.dtype(dtype).kind], dtype)

    def time(self, fn, warmup, repeats):
        return time_host(fn, warmup, repeats)


class CudaMemory(HostMemory):
    """Device arrays for the cuda backend, timed with CUDA events on the default stream."""

    def __init__(self):
        from numba import cuda
        self.cuda = cuda

    def put(self, a):
        return self.cuda.to_device(np.ascontiguousarray(a))

    def get(self, a):
        return a.copy_to_host()

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype)

    def poisoned(self, shape, dtype):
        return self.put(np.full(shape, POISON[np.dtype(dtype).kind], dtype))

    def time(self, fn, warmup, repeats):
        return time_numba_cuda(fn, warmup, repeats)


def memory_for(backend):
    return CudaMemory() if backend == "cuda" else HostMemory()


def _workspace(mem, module, spec, n):
    size = workspace_size(module, spec, n)
    return mem.empty((size,), np.float32) if size else None


# ---------------------------------------------------------------------------------------------
# Which passes: those a training step runs.

def untrained_passes():
    """{(layer, pass)} that a training step never runs: the first layer's backward-data (its
    input is the image, whose gradient nothing uses; in AlexNet conv1's, M = 3)."""
    return {(ALEXNET_LAYERS[0].name, "backward-data")}


def bench_passes(spec, n, untrained=False):
    """The passes of ``spec`` to check and time: those training runs, or all with ``untrained``."""
    skip = set() if untrained else {p for layer, p in untrained_passes() if layer == spec.name}
    return [pa for pa in passes(spec, n) if pa.name not in skip]


# ---------------------------------------------------------------------------------------------
# Check, then time.

def check_layer(spec, module, mem, reference, rng, n=CHECK_BATCH, untrained=False):
    """{pass name: max relative error, or the CheckFailed/other exception} for one layer.

    Each pass runs on the reference and on ``module`` from the same inputs; the outputs of
    ``module`` are poisoned first (NaN, -1, 255) so an unwritten element fails. Later passes
    get the reference's forward outputs, so each pass is judged on its own. SGD, whose size
    does not follow the batch, is checked on its first ``CHECK_PARAMS`` parameters.
    """
    if spec.kind == "sgd":
        spec = dataclasses.replace(spec, params=min(spec.params, CHECK_PARAMS))
    host = make_inputs(spec, n, rng)
    ref = {k: v.copy() for k, v in host.items()}
    ours = {k: mem.put(v) for k, v in host.items()}
    ws_ref = _workspace(HostMemory(), reference, spec, n)
    ws_ours = _workspace(mem, module, spec, n)
    results = {}
    for pa in bench_passes(spec, n, untrained):
        for name, (shape, dtype) in pa.writes.items():
            ref[name] = np.zeros(shape, dtype)
            ours[name] = mem.poisoned(shape, dtype)
        pa.launch(reference, ref, ws_ref)
        expected = {name: ref[name] for name in (*pa.writes, *pa.in_place)}
        try:
            pa.launch(module, ours, ws_ours)
            got = {name: mem.get(ours[name]) for name in expected}
            results[pa.name] = compare_outputs(got, expected, TOLERANCE)
        except Exception as exc:          # noqa: BLE001 - the row reports whatever went wrong
            results[pa.name] = exc
        for name in expected:             # continue from the reference's values
            ours[name] = mem.put(ref[name])
    return results


def _peer_callables(spec, backend, host_sets, n):
    """({peer: {pass: callable}}, {peer: why it is missing}) for one layer.

    Each callable cycles through the input sets ``host_sets`` (see :func:`cycling`).
    """
    found, missing = {}, {}
    try:
        device = peers.torch_device(backend)
        sets = [peers.to_torch(host, device) for host in host_sets]
        found["torch"] = {pa.name: cycling([peers.torch_pass(spec, pa.name, t) for t in sets])
                          for pa in passes(spec, n)}
    except Exception as exc:  # noqa: BLE001 - no torch, or a torch without CUDA: time ours alone
        missing["torch"] = f"{type(exc).__name__}: {exc}"
    if backend == "cpu" and spec.kind in ("conv", "fc"):
        found["numpy"] = {pa.name: cycling([peers.numpy_pass(spec, pa.name, host) for host in host_sets])
                          for pa in passes(spec, n)}
    return found, missing


def _peer_timer(name, backend):
    """The timer for a peer: CUDA events for PyTorch on a GPU, perf_counter otherwise."""
    return time_torch_cuda if (name == "torch" and backend == "cuda") else time_host


def time_layer(spec, backend, module, mem, rng, n, warmup, repeats, skip=(), untrained=False):
    """{pass name: row dict} for one layer at batch ``n``: ours, then each peer.

    Working sets that would fit in the cache are copied (:func:`rotation_count`) and the
    timed calls cycle through the copies, ours and the peer's alike. Passes in ``skip``
    (they failed their check) are run once per copy, untimed, so that the passes after
    them still get their inputs; an error there is ignored.
    """
    host = make_inputs(spec, n, rng)
    shapes = array_shapes(spec, n, host)
    set_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())
    copies = rotation_count(set_bytes)
    host_sets = [host] + [{k: v.copy() for k, v in host.items()} for _ in range(copies - 1)]
    sets = [{k: mem.put(v) for k, v in h.items()} for h in host_sets]
    ws = _workspace(mem, module, spec, n)
    peer_fns, peer_missing = _peer_callables(spec, backend, host_sets, n)
    rows = {}
    for pa in bench_passes(spec, n, untrained):
        for arrays in sets:
            for name, (shape, dtype) in pa.writes.items():
                arrays[name] = mem.empty(shape, dtype)
        ours = cycling([functools.partial(pa.launch, module, arrays, ws) for arrays in sets])
        if pa.name in skip:
            try:
                for _ in sets:
                    ours()
            except Exception:  # noqa: BLE001 - already reported by the check
                pass
            continue
        seconds = median_seconds(mem.time(ours, warmup, repeats))
        nbytes = pa.min_bytes(shapes)
        row = {"layer": spec.name, "pass": pa.name, "shape": spec.describe(), "batch": n,
               "backend": backend, "ms": seconds * 1e3, "gflops": rate(pa.flops, seconds),
               "gbs": rate(nbytes, seconds), "flops": pa.flops, "bytes": nbytes,
               "input_sets": copies}
        if (spec.name, pa.name) in untrained_passes():
            row["note"] = "not run in training"
        for peer, why in peer_missing.items():
            row[f"{peer}_error"] = why
        for peer, fns in peer_fns.items():
            try:
                peer_s = median_seconds(_peer_timer(peer, backend)(fns[pa.name], warmup, repeats))
            except Exception as exc:  # noqa: BLE001 - our row stands without its peer
                row[f"{peer}_error"] = f"{type(exc).__name__}: {exc}"
                continue
            row[f"{peer}_ms"] = peer_s * 1e3
            row[f"{peer}_over_ours"] = ratio(peer_s, seconds)
        rows[pa.name] = row
    return rows


def bench_layer(spec, backend, module, mem, reference, rng, n, warmup, repeats, log=None,
                untrained=False):
    """Check every pass of one layer that training runs (all with ``untrained``), time those
    that passed; one row per pass."""
    def report(message):
        if log is not None:
            log(message)

    checks = check_layer(spec, module, mem, reference, rng, untrained=untrained)
    bad = {p: _describe(e) for p, e in checks.items() if isinstance(e, Exception)}
    for p, why in bad.items():
        report(f"{spec.name} {p}: {why}; not timed")
    timed = {}
    if len(bad) < len(checks):
        try:
            timed = time_layer(spec, backend, module, mem, rng, n, warmup, repeats, skip=set(bad),
                               untrained=untrained)
        except Exception as exc:  # noqa: BLE001 - report it in the rows, keep the rest going
            why = f"timing failed: {type(exc).__name__}: {exc}"
            report(f"{spec.name}: {why}")
            bad.update({p: why for p in checks if p not in bad})
    rows = []
    for p, result in checks.items():
        if p in bad:
            rows.append({"layer": spec.name, "pass": p, "shape": spec.describe(), "batch": n,
                         "backend": backend, "error": bad[p]})
        else:
            rows.append({**timed[p], "check_error": result})
    return rows


def select_layers(names=None):
    """The layer specs named (all of AlexNet's when ``names`` is empty), in table order."""
    table = {s.name: s for s in ALEXNET_LAYERS}
    wanted = [n for item in (names or ()) for n in item.split(",") if n]
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return [s for s in ALEXNET_LAYERS if not wanted or s.name in wanted]


def run_kernels(backend="auto", layers=None, batch_size=None, repeats=None, warmup=None,
                seed=0, log=None, untrained=False):
    """Check and time the layers; return the list of row dicts (failed rows carry ``error``).

    Passes a training step never runs (:func:`untrained_passes`) are left out unless
    ``untrained``; then their rows carry ``note: "not run in training"``.

    Raises :class:`TimingRefused` for the cuda backend under the CUDA simulator.
    """
    backend = backends.resolve(backend)
    if backend == "reference":
        raise ValueError("the reference backend is the oracle, not a benchmark target")
    if backend == "cuda":
        refuse_under_simulator("nbalex bench kernels --backend cuda")
        peers.torch_device("cuda")      # TF32 off before anything runs
    n = batch_size or DEFAULT_BATCH[backend]
    repeats = repeats or DEFAULT_REPEATS[backend]
    warmup = DEFAULT_WARMUP[backend] if warmup is None else warmup
    module, reference = load_backend(backend), load_backend("reference")
    mem = memory_for(backend)
    rng = np.random.default_rng(seed)
    rows = []
    for spec in select_layers(layers):
        done = bench_layer(spec, backend, module, mem, reference, rng, n, warmup, repeats, log,
                           untrained)
        for r in done:                  # progress on stderr, in case the run is cut short
            if log is not None and "ms" in r:
                peer = f", torch {r['torch_ms']:.3f} ms" if r.get("torch_ms") is not None else ""
                log(f"{r['layer']} {r['pass']}: {r['ms']:.3f} ms{peer}")
        rows += done
    return rows


def _describe(exc):
    """'does not match the reference: ...' for a mismatch, else the error that stopped the check."""
    if isinstance(exc, CheckFailed):
        return f"does not match the reference: {exc}"
    return f"could not be checked: {type(exc).__name__}: {exc}"


COLUMNS = [("layer", "layer"), ("pass", "pass"), ("ms", "ms", 3), ("gflops", "GFLOP/s", 1),
           ("gbs", "GB/s", 1), ("torch_ms", "torch-ms", 3), ("torch_over_ours", "torch/ours", 2),
           ("numpy_ms", "numpy-ms", 3), ("numpy_over_ours", "numpy/ours", 2),
           ("check_error", "rel-err", ".1e"), ("note", "note")]


def format_rows(rows, backend):
    """The plain-text table, with a legend line and one line per failed row."""
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows) or c[0] in ("ms",)]
    text = format_table(rows, columns)
    legend = ("peer/ours = the peer's time over ours (above 1: ours is faster); "
              f"GB/s counts each input read once and each output written once; backend {backend}")
    failures = [f"FAILED {r['layer']} {r['pass']}: {r['error']}" for r in rows if r.get("error")]
    peer_errors = sorted({f"peer {k[:-6]} missing: {v}" for r in rows for k, v in r.items()
                          if k.endswith("_error") and k != "check_error" and k != "error"})
    return "\n".join([text, legend, *peer_errors, *failures])


@click.command("kernels")
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Whose launchers to time; auto = cuda on a GPU, else cpu.")
@click.option("--layer", "layers", multiple=True,
              help="Layer(s) to run (repeatable or comma-separated); default every layer.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Batch for timing (default 128 on a GPU, 16 on the CPU).")
@click.option("--repeats", type=click.IntRange(1), default=None, help="Timed calls per pass (median reported).")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Untimed calls before timing.")
@click.option("--untrained", is_flag=True,
              help="Also time the passes training never runs (conv1 backward-data), marked so.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of row objects.")
def command(backend, layers, batch_size, repeats, warmup, untrained, as_json):
    """Time every AlexNet layer's kernels beside PyTorch (and NumPy on the CPU).

    \b
    Examples:
      nbalex bench kernels --backend cpu --layer conv2 --layer fc6 --batch-size 8
      nbalex bench kernels --backend cuda --json
    """
    def log(message):
        click.echo(message, err=True)
    try:
        rows = run_kernels(backend, layers, batch_size, repeats, warmup, log=log, untrained=untrained)
    except (TimingRefused, ValueError) as exc:
        raise click.ClickException(str(exc))
    resolved = rows[0].get("backend", backend) if rows else backend
    click.echo(to_json(rows) if as_json else format_rows(rows, resolved))
    if any(r.get("error") for r in rows):
        sys.exit(1)
