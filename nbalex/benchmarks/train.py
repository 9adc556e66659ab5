"""``nbalex bench train``: whole training steps per second, beside PyTorch's same network.

Three measurements, each its own pass:

1. throughput: ``forward_backward`` + ``sgd_step`` of :class:`nbalex.model.Net` on random
   inputs, the median step time after warm-up steps (the device synchronised after each
   step), as images/s; PyTorch's same network (grouped convs, the same LRN, SGD with
   momentum and weight decay) on the same device, TF32 off, timed the same way;
2. profile: a fresh Net whose backend launchers are wrapped (:mod:`.profile`): every
   launcher call is counted and timed with the device synchronised around it, giving each
   layer's share of a step. On cuda every real kernel launch is also logged where it is made
   (:func:`nbalex.cuda.launch.record_launches`; a launcher can launch several kernels), and
   the launch overhead is the measured host time of those launches, each with its own
   arguments; on the CPU it is the launcher calls times one empty compiled call;
3. loader: one pass of :class:`nbalex.io.loader.Loader` over ``--data`` when given
   (images/s on its own), else "not measured".

Example::

    nbalex bench train --model alexnet --batch-size 128 --steps 10 --json
"""

import collections
import contextlib
import importlib
import math
import sys
import time

import click
import numpy as np

from .. import backends
from .common import TimingRefused, format_table, median_seconds, refuse_under_simulator, to_json
from .profile import LaunchRecorder, LayerAttributor, instrument

LR = 0.01


def device_sync(backend):
    """A function that waits for the device (a no-op on the CPU)."""
    if backend == "cuda":
        from numba import cuda
        return cuda.synchronize
    return lambda: None


def random_batch(layer_specs, input_size, batch, backend, rng, channels=3):
    """(x, labels): x float32 (B,C,S,S) on the backend's device (as the Loader yields it)."""
    x = rng.standard_normal((batch, channels, input_size, input_size)).astype(np.float32)
    labels = rng.integers(0, layer_specs[-1].out_shape[0], batch).astype(np.int32)
    if backend == "cuda":
        from numba import cuda
        x = cuda.to_device(x)
    return x, labels


def step_times(step, sync, warmup, steps):
    """Per-step seconds of ``step(i)`` after ``warmup`` untimed steps, synchronised each step."""
    for i in range(warmup):
        step(i)
    sync()
    samples = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        samples.append(time.perf_counter() - t0)
    return samples


def ours_throughput(model, backend, batch, x, labels, warmup, steps):
    """Median seconds per training step of our Net."""
    from nbalex.model import Net

    net = Net(model, backend=backend, batch_size=batch)

    def step(i):
        net.forward_backward(x, labels, train=True, seed=i)
        net.sgd_step(LR)
    return median_seconds(step_times(step, device_sync(backend), warmup, steps))


def launch_log(backend):
    """A context that logs every real kernel launch (cuda), or yields None (cpu)."""
    if backend == "cuda":
        from nbalex.cuda.launch import record_launches
        return record_launches()
    return contextlib.nullcontext(None)


def profile_layers(model, backend, batch, x, labels, layer_specs, steps):
    """One profiling pass of ``steps`` steps after a warm-up step, as a dict:

    ``per_layer`` {layer: ms per step}, ``launcher_calls`` per step, ``wall_ms`` per step, and
    for cuda ``launches`` (real kernel launches per step, counted where each kernel is launched:
    a launcher may launch several, e.g. a split-K GEMM and its sum), ``launch_host_ms`` (their
    measured host time per step, each launch with its own arguments) and ``kernels``
    {kernel name: launches per step}. For cpu those three are None.
    """
    from nbalex.model import Net

    sync = device_sync(backend)
    recorder = LaunchRecorder(LayerAttributor(layer_specs, batch), sync)
    package = importlib.import_module(f"nbalex.{backend}")
    with instrument([package], recorder), launch_log(backend) as log:
        net = Net(model, backend=backend, batch_size=batch)
        net.forward_backward(x, labels, train=True, seed=0)      # warm-up, not recorded
        net.sgd_step(LR)
        sync()
        if log is not None:
            log.clear()
        recorder.recording = True
        t0 = time.perf_counter()
        for i in range(steps):
            net.forward_backward(x, labels, train=True, seed=i + 1)
            net.sgd_step(LR)
        sync()
        wall = (time.perf_counter() - t0) / steps
        recorder.recording = False
    result = {"per_layer": {layer: s / steps * 1e3 for layer, s in recorder.seconds.items()},
              "launcher_calls": recorder.calls / steps, "wall_ms": wall * 1e3,
              "launches": None, "launch_host_ms": None, "kernels": None}
    if log is not None:
        counts = collections.Counter(log.names())
        result.update(launches=len(log) / steps, launch_host_ms=log.host_seconds() / steps * 1e3,
                      kernels={name: c / steps for name, c in sorted(counts.items())})
    return result


def empty_launch_seconds(backend, count=200):
    """Host time of one launch of an empty kernel (cuda) or one call of an empty @njit (cpu)."""
    if backend == "cuda":
        from numba import cuda

        @cuda.jit
        def empty():
            pass

        def launch():
            empty[1, 32]()
        sync = cuda.synchronize
    else:
        from numba import njit

        @njit
        def launch():
            pass
        sync = lambda: None  # noqa: E731
    launch()
    sync()
    t0 = time.perf_counter()
    for _ in range(count):
        launch()
    sync()
    return (time.perf_counter() - t0) / count


def torch_throughput(layer_specs, channels, backend, batch, x_host, labels, warmup, steps):
    """Median seconds per training step of PyTorch's same network on the same device."""
    import torch

    from .torch_net import torch_network, torch_sgd

    device = torch.device("cuda" if backend == "cuda" else "cpu")
    if backend == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    net = torch_network(layer_specs, channels).to(device).train()
    opt = torch_sgd(net, LR)
    x = torch.from_numpy(x_host).to(device)
    y = torch.from_numpy(labels).long().to(device)

    def step(i):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    sync = torch.cuda.synchronize if backend == "cuda" else (lambda: None)
    return median_seconds(step_times(step, sync, warmup, steps))


def loader_images_per_second(data, batch, input_size, backend, batches):
    """Images/s of one Loader pass over ``data`` (at most ``batches`` batches after one)."""
    from nbalex.io.loader import Loader

    sync = device_sync(backend)
    with Loader(data, batch, input_size, backend=backend, train=True, seed=0) as loader:
        it = iter(loader.epoch(0))
        next(it)                                     # readers started, first batch staged
        sync()
        count, t0 = 0, time.perf_counter()
        for _ in range(min(batches, len(loader) - 1)):
            next(it)
            count += 1
        sync()
        seconds = time.perf_counter() - t0
    return count * batch / seconds if count else None


def run_train(model="alexnet", batch_size=128, backend="auto", steps=5, warmup=2, data=None,
              peer=True, profile=True, seed=0, log=None):
    """The measurements as one dict (see the module docstring); failures become ``*_error``."""
    from nbalex.config import load_config

    backend = backends.resolve(backend)
    if backend == "reference":
        raise ValueError("the reference backend is the oracle, not a benchmark target")
    if backend == "cuda":
        refuse_under_simulator("nbalex bench train --backend cuda")
    config, _, layer_specs = load_config(model)
    size, channels = config["input_size"], config.get("input_channels", 3)
    rng = np.random.default_rng(seed)
    x, labels = random_batch(layer_specs, size, batch_size, backend, rng, channels)
    x_host = x.copy_to_host() if backend == "cuda" else x
    result = {"model": config["name"], "backend": backend, "batch": batch_size, "steps": steps,
              "warmup": warmup}

    def attempt(key, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not hide the rest
            result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
            if log is not None:
                log(f"train {key}: {result[f'{key}_error']}")
            return None

    ours = attempt("ours", lambda: ours_throughput(model, backend, batch_size, x, labels, warmup, steps))
    if ours:
        result.update(ours_ms=ours * 1e3, ours_images_per_s=batch_size / ours)
    if peer:
        theirs = attempt("torch", lambda: torch_throughput(layer_specs, channels, backend, batch_size,
                                                           x_host, labels, warmup, steps))
        if theirs:
            result.update(torch_ms=theirs * 1e3, torch_images_per_s=batch_size / theirs)
            if ours:
                result["ours_over_torch"] = theirs / ours
    if profile:
        prof = attempt("profile", lambda: profile_layers(model, backend, batch_size, x, labels,
                                                         layer_specs, max(1, min(steps, 3))))
        if prof:
            per_layer, wall_ms = prof["per_layer"], prof["wall_ms"]
            total = sum(per_layer.values())
            result["profile_ms"] = wall_ms
            result["layers"] = [{"layer": k, "ms": v, "share": v / wall_ms if wall_ms else None}
                                for k, v in sorted(per_layer.items(), key=lambda kv: -kv[1])]
            result["outside_launchers_ms"] = max(0.0, wall_ms - total)
            result["launcher_calls_per_step"] = prof["launcher_calls"]
            launch_s = attempt("launch", lambda: empty_launch_seconds(backend))
            if launch_s is not None:
                result["empty_launch_us"] = launch_s * 1e6
            if prof["launches"] is not None:       # cuda: every real launch, timed as made
                result["launches_per_step"] = prof["launches"]
                result["launch_overhead_ms"] = prof["launch_host_ms"]
                result["kernel_launches"] = prof["kernels"]
                result["launch_pricing"] = "measured host time of each launch, with its arguments"
            elif launch_s is not None:             # cpu: a launcher call priced as an empty call
                result["launches_per_step"] = prof["launcher_calls"]
                result["launch_overhead_ms"] = prof["launcher_calls"] * launch_s * 1e3
                result["launch_pricing"] = "launcher calls x one empty @njit call"
            if ours and result.get("launch_overhead_ms") is not None:
                result["launch_overhead_share"] = result["launch_overhead_ms"] / (ours * 1e3)
    if data:
        ips = attempt("loader", lambda: loader_images_per_second(data, batch_size, size, backend,
                                                                 max(steps, 4)))
        if ips:
            result["loader_images_per_s"] = ips
            if ours:
                result["loader_share"] = batch_size / ips / ours
    else:
        result["loader"] = "not measured (no --data)"
    return result


def format_result(r):
    """The result as a few plain-text lines and a per-layer table."""
    def num(key, fmt="{:.1f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    lines = [f"model {r['model']}, backend {r['backend']}, batch {r['batch']}, "
             f"median of {r['steps']} steps after {r['warmup']} warm-up",
             f"ours   {num('ours_images_per_s')} images/s ({num('ours_ms')} ms/step)",
             f"torch  {num('torch_images_per_s')} images/s ({num('torch_ms')} ms/step)",
             f"torch/ours time ratio {num('ours_over_torch', '{:.2f}')} (above 1: ours is faster)"]
    if "loader_images_per_s" in r:
        lines.append(f"loader {num('loader_images_per_s')} images/s alone, "
                     f"{100 * r.get('loader_share', math.nan):.1f}% of a step if it were serial")
    else:
        lines.append(f"loader {r.get('loader', '-')}")
    if "launches_per_step" in r:
        lines.append(f"launches {r['launches_per_step']:.0f}/step "
                     f"({num('launcher_calls_per_step', '{:.0f}')} launcher calls) -> "
                     f"{num('launch_overhead_ms', '{:.2f}')} ms/step host time "
                     f"[{r.get('launch_pricing', '-')}; empty launch {num('empty_launch_us', '{:.1f}')} us]"
                     + (f" ({100 * r['launch_overhead_share']:.1f}% of a step)"
                        if r.get("launch_overhead_share") is not None else ""))
    if r.get("layers"):
        lines.append(f"profile pass (synchronised per launch): {r['profile_ms']:.1f} ms/step, "
                     f"{r['outside_launchers_ms']:.1f} ms outside launchers")
        lines.append(format_table(r["layers"], [("layer", "layer"), ("ms", "ms/step", 2),
                                                ("share", "share", 3)]))
    for key in sorted(k for k in r if k.endswith("_error")):
        lines.append(f"FAILED {key[:-6]}: {r[key]}")
    return "\n".join(lines)


@click.command("train")
@click.option("--model", default="alexnet", show_default=True, help="Config name or .toml path.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per step.")
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="auto = cuda on a GPU, else cpu.")
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True, help="Timed steps (median reported).")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed steps first.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A packed HDF5 file to time the loader on (else the loader is not measured).")
@click.option("--no-peer", is_flag=True, help="Skip PyTorch's network.")
@click.option("--no-profile", is_flag=True, help="Skip the per-layer profiling pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(model, batch_size, backend, steps, warmup, data, no_peer, no_profile, as_json):
    """Training images/s of our network beside PyTorch's, with each layer's share of a step.

    \b
    Examples:
      nbalex bench train --steps 10
      nbalex bench train --backend cpu --model alexnet-mini --batch-size 32 --data demo/train.h5
    """
    try:
        result = run_train(model, batch_size, backend, steps, warmup, data, not no_peer,
                           not no_profile, log=lambda message: click.echo(message, err=True))
    except TimingRefused as exc:
        raise click.ClickException(str(exc))
    click.echo(to_json(result) if as_json else format_result(result))
    if "ours_error" in result:
        sys.exit(1)
