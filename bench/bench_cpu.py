"""nbalex's CPU backend (Numba + NumPy's BLAS) beside PyTorch on the same CPU, in the same run.

How it times: each side runs in *blocks* (a pause, untimed warm-up calls, then ``--block``
timed calls), and the two sides' blocks alternate for ``--rounds`` rounds, the order flipped
every other round.  The pause lets threads the other side left spinning (OpenBLAS's, OpenMP's)
go to sleep before a block starts.  Reported: the median time per call, its spread (the
interquartile range of all timed calls, and the lowest and highest block median), images/s
from the median, and the ratio nbalex / PyTorch (images/s; > 1: nbalex faster) as the median
and min-max of the per-round ratios, so a noisy machine shows as a wide range.

The PyTorch peer is the same network (:mod:`nbalex.benchmarks.torch_net`, nbalex's initial
weights copied in) in its fastest CPU form: inference in eval mode under
``torch.inference_mode``, training with the fused SGD; NCHW or channels-last, whichever a
short probe finds faster for each network, batch and mode (``--torch-compile`` adds
``torch.compile`` to the probe).  The form that ran is printed.

Tables: end to end (training = forward + backward + SGD step, inference = forward) for every
``--models`` x ``--batches`` x ``--modes``; per layer (``--layers``, forward and backward ms of
nbalex's CPU launchers and of PyTorch's modules with autograd).  The header names the CPU,
the BLAS library and kernel that ran (threadpoolctl), versions and the date.

Usage::

    python bench/bench_cpu.py                                  # everything (several minutes)
    python bench/bench_cpu.py --models alexnet-mini --batches 32 --skip-layers --rounds 3
    python bench/bench_cpu.py --json results.json --out bench/results/cpu-DATE.md --png cpu.png

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set in the environment, can pin NumPy's OpenBLAS to
a slower kernel; run with them unset (``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python
...``): the header warns when they are set.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nbalex.benchmarks.torch_net import (FORMS, load_params, torch_form, torch_network,  # noqa: E402
                                         torch_sgd)
from nbalex.config import ConfigError, load_config  # noqa: E402
from nbalex.model import Net  # noqa: E402
from nbalex.plots import plot_cpu_benchmark  # noqa: E402

from bench_cpu_layers import layer_table  # noqa: E402

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# --------------------------------------------------------------------------- environment

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info():
    """The BLAS NumPy runs: library, version, kernel (core type), threads (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return dict(library="unknown (threadpoolctl is not installed: pip install threadpoolctl)")
    for i in threadpool_info():
        if i.get("user_api") == "blas":
            return dict(library=i.get("internal_api"), version=i.get("version"),
                        kernel=i.get("architecture"), threads=i.get("num_threads"),
                        threading=i.get("threading_layer"), path=os.path.basename(i["filepath"]))
    return dict(library="unknown")


def environment():
    import numba
    from nbalex.cpu import openblas
    return dict(cpu=cpu_model(), cores=os.cpu_count(), blas=blas_info(), numpy=np.__version__,
                numba=numba.__version__, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), blas_pool=openblas.BLAS_POOL,
                python=platform.python_version(), load_avg=list(os.getloadavg()),
                blas_env={v: os.environ[v] for v in BLAS_VARS if v in os.environ},
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def header_lines(info):
    b = info["blas"]
    lines = [f"CPU: {info['cpu']}, {info['cores']} cores | {info['date']}",
             f"BLAS: {b.get('library')} {b.get('version')} kernel={b.get('kernel')} "
             f"threads={b.get('threads')} ({b.get('path', '')}); nbalex's BLAS threads: {info['blas_pool']}",
             f"numpy {info['numpy']} | numba {info['numba']} | torch {info['torch']} "
             f"({info['torch_threads']} threads) | python {info['python']}"]
    load, cores = info["load_avg"][0], info["cores"] or 1
    lines.append(f"load average at start: {load:.1f}" + (
        f" -- WARNING: busier than its {cores} cores; OpenMP (PyTorch) suffers more than nbalex "
        "from oversubscription, so ratios flatter nbalex" if load > cores else ""))
    if info["blas_env"]:
        lines.append("WARNING: " + " ".join(f"{k}={v}" for k, v in info["blas_env"].items())
                     + " set: NumPy's OpenBLAS may run a slower kernel than users get")
    return lines


# --------------------------------------------------------------------------- timing

def alternate(sides, rounds, block, warmup=1, gap=0.25, warmup_s=0.0):
    """Time each callable of ``sides`` ({name: fn}) in alternating blocks.

    A round runs one block per side, in dict order on even rounds and reversed on odd ones; a
    block is ``gap`` seconds of sleep, ``warmup`` untimed calls and more until ``warmup_s``
    seconds of them have passed, then ``block`` timed calls.  (After the pause the first
    calls of either side run slow while the cores wake: alexnet-mini's batch-32 inference
    took 17-21 ms for its first two calls after 0.25 s of sleep, 11 ms after.)
    Returns {name: [[seconds of each timed call] for each round]}."""
    names = list(sides)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = sides[name]
            time.sleep(gap)
            start = time.perf_counter()
            for _ in range(warmup):
                fn()
            while time.perf_counter() - start < warmup_s:
                fn()
            ts = []
            for _ in range(block):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            times[name].append(ts)
    return times


def summary(rounds_s):
    """Median ms per call, IQR of all calls, min-max of the block medians."""
    flat = sorted(t for ts in rounds_s for t in ts)
    q = statistics.quantiles(flat, n=4, method="inclusive") if len(flat) > 1 else flat * 3
    blocks = [statistics.median(ts) for ts in rounds_s]
    return dict(ms=1e3 * statistics.median(flat), iqr_ms=[1e3 * q[0], 1e3 * q[2]],
                block_ms=[1e3 * min(blocks), 1e3 * max(blocks)], calls=len(flat))


def round_ratios(ours, theirs):
    """Per-round speed ratio ours/theirs (time theirs / time ours, > 1: ours faster):
    median and min-max over rounds."""
    r = [statistics.median(b) / statistics.median(a) for a, b in zip(ours, theirs)]
    return dict(median=statistics.median(r), min=min(r), max=max(r))


# --------------------------------------------------------------------------- end to end

def torch_peer(specs, params, x, labels, mode, form):
    """A zero-argument callable running one PyTorch step of ``mode`` in ``form``."""
    net = load_params(torch_network(specs), specs, params)
    module, to_input = torch_form(net, form)
    tx = to_input(torch.from_numpy(x))
    tlab = torch.from_numpy(labels.astype(np.int64))
    if mode == "infer":
        net.eval()

        def infer():
            with torch.inference_mode():
                module(tx)
        return infer
    net.train()
    opt = torch_sgd(net, 1e-3)

    def train():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(tx), tlab).backward()
        opt.step()
    return train


def pick_form(specs, params, x, labels, mode, forms, args):
    """(form, step fn, {form: probe ms or error}) for the fastest of ``forms``."""
    probes, fns = {}, {}
    for form in forms:
        try:
            t0 = time.perf_counter()
            fn = torch_peer(specs, params, x, labels, mode, form)
            fn()                                    # compiles, for 'compiled'
            first = time.perf_counter() - t0
            fns[form] = fn
        except Exception as err:                    # a form this torch cannot run
            probes[form] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        probes[form] = dict(first_call_s=first)
    if len(fns) > 1:
        times = alternate(fns, rounds=2, block=max(1, args.block // 2), warmup=1, gap=args.gap)
        for form, ts in times.items():
            probes[form]["ms"] = summary(ts)["ms"]
    if not fns:
        raise RuntimeError(f"no PyTorch form ran: {probes}")
    best = min(fns, key=lambda f: probes[f].get("ms", 0.0))
    return best, fns[best], probes


def end_to_end(model, batch, mode, args, rng):
    _, _, specs = load_config(model)
    net = Net(model, backend="cpu", batch_size=batch)
    x = rng.standard_normal((batch, *specs[0].in_shape)).astype(np.float32)
    labels = rng.integers(0, specs[-1].out_shape[0], batch).astype(np.int32)
    forms = args.torch_forms
    form, torch_fn, probes = pick_form(specs, net.params(), x, labels, mode, forms, args)
    step = [0]

    def nbalex_train():
        step[0] += 1
        net.forward_backward(x, labels, train=True, seed=step[0])
        net.sgd_step(1e-3)

    nbalex_fn = nbalex_train if mode == "train" else (lambda: net.forward(x, train=False))
    times = alternate({"nbalex": nbalex_fn, "torch": torch_fn}, args.rounds, args.block,
                      args.warmup, args.gap, args.warmup_s)
    nb, pt = summary(times["nbalex"]), summary(times["torch"])
    return dict(model=net.name, batch=batch, mode=mode, torch_form=form, torch_probes=probes,
                nbalex=dict(nb, images_per_s=1e3 * batch / nb["ms"]),
                torch=dict(pt, images_per_s=1e3 * batch / pt["ms"]),
                ratio=round_ratios(times["nbalex"], times["torch"]))


# --------------------------------------------------------------------------- reports

def end_to_end_lines(rows, md=False):
    head = ["model", "batch", "mode", "nbalex img/s", "torch img/s", "nbalex/torch (min-max)",
            "nbalex ms (IQR)", "torch ms (IQR)", "torch form"]
    out = []
    for r in rows:
        nb, pt, q = r["nbalex"], r["torch"], r["ratio"]
        out.append([r["model"], str(r["batch"]), r["mode"], f"{nb['images_per_s']:.1f}",
                    f"{pt['images_per_s']:.1f}", f"{q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f})",
                    f"{nb['ms']:.1f} ({nb['iqr_ms'][0]:.1f}-{nb['iqr_ms'][1]:.1f})",
                    f"{pt['ms']:.1f} ({pt['iqr_ms'][0]:.1f}-{pt['iqr_ms'][1]:.1f})", r["torch_form"]])
    return table(head, out, md)


def layer_lines(rows, md=False):
    head = ["layer", "output", "fwd nbalex", "fwd torch", "ratio", "bwd nbalex", "bwd torch", "ratio"]
    out, tot = [], [0.0, 0.0, 0.0, 0.0]
    for r in rows:
        cells = [r["layer"], r["shape"]]
        for i, p in enumerate(("fwd", "bwd")):
            a, b = r.get(f"{p}_nbalex"), r.get(f"{p}_torch")
            if a is None:
                cells += ["", "", ""]
                continue
            tot[2 * i] += a["ms"]
            tot[2 * i + 1] += b["ms"]
            cells += [f"{a['ms']:.2f}", f"{b['ms']:.2f}", f"{b['ms'] / a['ms']:.2f}"]
        out.append(cells)
    out.append(["sum", "", f"{tot[0]:.1f}", f"{tot[1]:.1f}", f"{tot[1] / tot[0]:.2f}",
                f"{tot[2]:.1f}", f"{tot[3]:.1f}", f"{tot[3] / tot[2]:.2f}" if tot[2] else ""])
    return table(head, out, md)


def table(head, rows, md):
    if md:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
               ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    return [fmt(head), rule] + [fmt(r) for r in rows]


def report(result, args, md=False):
    lines = list(header_lines(result["info"]))
    if md:
        lines = [f"# CPU backend vs PyTorch, same machine, same run: {result['info']['date']}", ""] + \
                [f"- {ln}" for ln in lines] + ["", f"Command: `{result['command']}`"]
    lines += ["", f"Timing: {args.rounds} alternating rounds of {args.warmup} warm-up call(s) "
              f"(at least {args.warmup_s} s of them) + {args.block} timed calls per side, "
              f"{args.gap} s pause before each block; ratio = per-round median (min-max), > 1: "
              "nbalex faster."]
    if result.get("end_to_end"):
        lines += ["", "End to end (training = forward + backward + SGD step):", ""]
        lines += end_to_end_lines(result["end_to_end"], md)
    if result.get("layers"):
        lay = result["layers"]
        lines += ["", f"Per layer, {lay['model']}, batch {lay['batch']}: median ms per call "
                  "(ratio = torch / nbalex, > 1: nbalex faster; conv/fc rows include their fused "
                  "ReLU and its gradient; sgd-step under fwd; torch NCHW, autograd for backward):", ""]
        lines += layer_lines(lay["rows"], md)
    return lines


def write_atomic(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_cpu.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["alexnet", "alexnet-mini"],
                    help="networks of the end-to-end table (config names or TOML paths)")
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    ap.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each: one block per side)")
    ap.add_argument("--block", type=int, default=4, help="timed calls per block")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls at the start of each block")
    ap.add_argument("--warmup-s", type=float, default=0.3,
                    help="... and more untimed calls until this many seconds have passed")
    ap.add_argument("--gap", type=float, default=0.25, help="seconds of pause before each block")
    ap.add_argument("--torch-form", choices=("auto",) + FORMS, default="auto",
                    help="PyTorch form to run (auto: the faster of contiguous and channels-last)")
    ap.add_argument("--torch-compile", action="store_true", help="auto also probes torch.compile")
    ap.add_argument("--layers", default="alexnet", metavar="MODEL", help="network of the per-layer table")
    ap.add_argument("--layers-batch", type=int, default=32)
    ap.add_argument("--layer-rounds", type=int, default=3)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout, tables to stderr)")
    ap.add_argument("--out", metavar="PATH", help="write the tables as markdown (e.g. bench/results/cpu-DATE.md)")
    ap.add_argument("--png", metavar="PATH", help="draw the ratios and the per-layer times as a PNG")
    args = ap.parse_args(argv)
    for name in ("rounds", "block", "layers_batch", "layer_rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batches) < 1 or min(args.warmup, args.gap, args.warmup_s) < 0:
        ap.error("--batches must be >= 1, --warmup, --warmup-s and --gap >= 0")
    if args.torch_form != "auto":
        args.torch_forms = [args.torch_form]
    else:
        args.torch_forms = ["contiguous", "channels-last"] + (["compiled"] if args.torch_compile else [])
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = sys.stderr if args.json == "-" else sys.stdout
    say = lambda *lines: print(*lines, sep="\n", file=log, flush=True)  # noqa: E731
    rng = np.random.default_rng(0)
    result = dict(info=environment(), command=" ".join(["python", "bench/bench_cpu.py", *(argv or sys.argv[1:])]))
    say(*header_lines(result["info"]))
    try:
        if not args.skip_end_to_end:
            result["end_to_end"] = []
            for model in args.models:
                for batch in args.batches:
                    for mode in args.modes:
                        result["end_to_end"].append(end_to_end(model, batch, mode, args, rng))
                        say(end_to_end_lines(result["end_to_end"][-1:])[-1])
        if not args.skip_layers:
            rows = layer_table(args.layers, args.layers_batch, args.layer_rounds, args.block,
                               args.gap, rng, alternate, summary)
            result["layers"] = dict(model=args.layers, batch=args.layers_batch, rows=rows)
    except (ConfigError, FileNotFoundError) as err:
        print(f"bench_cpu: {err}", file=sys.stderr)
        return 2
    say("", *report(result, args))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.out:
        write_atomic(args.out, "\n".join(report(result, args, md=True)) + "\n")
    if args.png:
        plot_cpu_benchmark(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
