"""``nbalex bench plan``: every kernel launch of one training step of one tower, with the GPU
time each would take, predicted without a GPU.

The launches are those of :meth:`nbalex.model.Net.forward_backward` and ``sgd_step`` on one
tower (one GPU), in order, plus the loader's augmentation kernel before them.  Each GEMM pass
(conv and fc ``forward``, ``backward-data``, ``backward-weights``) is cut into blocks by
:func:`nbalex.cuda.tiling.gemm_tiling`, the function of the shape and SM count that sizes
the launchers' grids and split-K; the other kernels use the launchers' own 1-D grid rules.

The model of the GPU (every assumption is printed with the plan):

* a GEMM kernel issues one warp instruction per scheduler per clock, so it feeds the FFMA
  pipes (128 FFMA/SM/clock on sm_90) in the fraction of its main loop that is FFMA: its
  sustained rate is ``SMs x 128 x clock x ffma_share`` (the share from the static sm_90
  report, :data:`STATIC`); its time is the executed multiply-adds at that rate, rounded up
  to whole waves (``waves`` = blocks / (SMs x resident blocks per SM));
* every kernel moves at least the bytes of the tensors it reads and writes once, at
  HBM_FRACTION of the card's HBM bandwidth; a kernel's time is the larger of the two, and at
  least LAUNCH_FLOOR_US;
* the host's launch overhead is not included (``nbalex bench train`` measures it).

:data:`STATIC` is the register/shared-memory/FFMA-share table of ``nbalex bench static``
(CUDA 13.5), checked in so that the plan needs no compiler; tests/test_bench_plan.py
compares it with the static report when the CUDA tools are present.
"""

import json
import math
from dataclasses import dataclass

import click
import numpy as np

from nbalex.cuda import tiling
from nbalex.cuda.launch import THREADS_PER_BLOCK as THREADS, grid_1d
from nbalex.cuda.softmax_xent import MAX_ROW_BLOCKS, ROW_THREADS
from nbalex.cuda.static import MAX_WARPS_PER_SM, occupancy

FFMA_PER_SM_PER_CLOCK = 128        # sm_90: 4 schedulers x 32 FP32 lanes
HBM_FRACTION = 0.8                 # of the datasheet HBM bandwidth a streaming kernel reaches
LAUNCH_FLOOR_US = 2.0              # least GPU time of any kernel (launch latency and ramp)
SUM_BLOCKS = 1024                  # cap of the split-K sums' grids (gemm, linear)


@dataclass(frozen=True)
class Gpu:
    """A GPU the plan can price a step on: SMs, the clock FFMA times use, HBM bandwidth."""
    name: str
    sms: int
    clock_mhz: float
    hbm_gb_s: float


GPUS = {
    # Datasheet SM counts, maximum boost clocks and HBM bandwidth; SMs x 256 FLOP x clock
    # gives the datasheet FP32 peaks (66.9, 51.2, 66.9 TFLOP/s).
    "h100-sxm": Gpu("NVIDIA H100 SXM5 80GB", 132, 1980.0, 3350.0),
    "h100-pcie": Gpu("NVIDIA H100 PCIe 80GB", 114, 1755.0, 2000.0),
    "h200": Gpu("NVIDIA H200 SXM 141GB", 132, 1980.0, 4800.0),
}
DEFAULT_GPU = "h100-sxm"

# kernel: (registers, static shared bytes, threads per block, main-loop FFMA share or None)
STATIC = {
    "augment_batch_kernel": (28, 0, 256, None),
    "conv_forward_kernel": (128, 16896, 256, 0.718),
    "conv_forward_kernel_128x64": (141, 12800, 128, 0.689),
    "conv_forward_kernel_64x128": (141, 12800, 128, 0.641),
    "conv_forward_kernel_64x64": (145, 8704, 64, 0.615),
    "conv_backward_data_kernel": (127, 16896, 256, 0.619),
    "conv_backward_data_unit_stride_kernel": (127, 16896, 256, 0.681),
    "conv_backward_data_unit_stride_kernel_128x64": (149, 12800, 128, 0.633),
    "conv_backward_data_unit_stride_kernel_64x128": (153, 12800, 128, 0.600),
    "conv_backward_weights_kernel": (128, 16896, 256, 0.694),
    "conv_backward_weights_kernel_128x64": (141, 12800, 128, 0.631),
    "conv_backward_weights_kernel_64x128": (143, 12800, 128, 0.609),
    "dropout_forward_kernel": (31, 0, 256, None),
    "dropout_backward_kernel": (31, 0, 256, None),
    "sum_slices_kernel": (30, 0, 256, None),
    "linear_forward_kernel": (126, 16896, 256, 0.786),
    "linear_forward_kernel_128x64": (139, 12800, 128, 0.754),
    "linear_forward_kernel_64x128": (139, 12800, 128, 0.753),
    "linear_forward_kernel_64x64": (141, 8704, 64, 0.721),
    "linear_backward_data_kernel": (128, 16896, 256, 0.778),
    "linear_backward_data_kernel_128x64": (130, 12800, 128, 0.756),
    "linear_backward_data_kernel_64x128": (139, 12800, 128, 0.750),
    "linear_backward_data_kernel_64x64": (143, 8704, 64, 0.716),
    "linear_backward_data_split_kernel": (124, 16896, 256, 0.791),
    "linear_backward_data_split_kernel_128x64": (141, 12800, 128, 0.756),
    "linear_backward_data_split_kernel_64x128": (141, 12800, 128, 0.750),
    "linear_backward_data_split_kernel_64x64": (145, 8704, 64, 0.716),
    "linear_backward_weights_kernel": (128, 16896, 256, 0.786),
    "linear_backward_weights_kernel_128x64": (139, 12800, 128, 0.753),
    "linear_backward_weights_kernel_64x128": (139, 12800, 128, 0.749),
    "linear_backward_weights_kernel_64x64": (143, 8704, 64, 0.722),
    "linear_bias_grad_kernel": (26, 0, 256, None),
    "linear_sum_bias_relu_kernel": (30, 0, 256, None),
    "lrn_forward_kernel": (48, 0, 256, None),
    "lrn_backward_kernel": (61, 0, 256, None),
    "maxpool_forward_kernel": (31, 0, 256, None),
    "maxpool_backward_kernel": (45, 0, 256, None),
    "relu_backward_kernel": (30, 0, 256, None),
    "sgd_update_kernel": (27, 0, 256, None),
    "softmax_xent_forward_kernel": (64, 1024, 128, None),
    "softmax_xent_backward_kernel": (32, 0, 256, None),
}
STATIC_RELEASE = "13.5"


def gpu_from_device(name, sms, clock_khz, memory_clock_khz, bus_bits):
    """The Gpu of a real device: its own SM count always; clock and bandwidth from the table
    when its name is a known card, else from its attributes (memory clock x 2 x bus width)."""
    text = name.decode() if isinstance(name, bytes) else str(name)
    upper = text.upper()
    key = ("h200" if "H200" in upper else "h100-pcie" if "H100" in upper and "PCIE" in upper
           else "h100-sxm" if "H100" in upper else None)
    if key is not None:
        known = GPUS[key]
        return Gpu(f"{text} (clock and bandwidth of {key})", int(sms), known.clock_mhz, known.hbm_gb_s)
    return Gpu(text, int(sms), clock_khz / 1e3, 2 * memory_clock_khz * 1e3 * bus_bits / 8 / 1e9)


def detect_gpu():
    """The Gpu of device 0 when a real one is present (never the simulator), else None."""
    try:
        from numba import config, cuda
        if config.ENABLE_CUDASIM or not cuda.is_available():
            return None
        dev = cuda.get_current_device()
        return gpu_from_device(dev.name, dev.MULTIPROCESSOR_COUNT, dev.CLOCK_RATE,
                               dev.MEMORY_CLOCK_RATE, dev.GLOBAL_MEMORY_BUS_WIDTH)
    except Exception:              # no driver, no device, a refused context: plan for the table
        return None


def resident_blocks(kernel):
    """Blocks of ``kernel`` an SM holds at once (nbalex.cuda.static's occupancy formula)."""
    regs, smem, threads, _ = STATIC[kernel]
    warps = tiling.cdiv(threads, 32)
    return round(occupancy(regs, smem, threads) * MAX_WARPS_PER_SM / warps)


# ---- the launches of one step ---------------------------------------------------------------

def _prod(shape):
    return int(np.prod(shape, dtype=np.int64))


def _launch(layer, pass_name, kernel, grid, threads=THREADS, bytes_moved=0, **extra):
    return {"layer": layer, "pass": pass_name, "kernel": kernel, "grid": grid, "block": threads,
            "split_k": 1, "bytes": int(bytes_moved), **extra}


def _sum_launch(layer, pass_name, kernel, size, splits, extra_bytes=0):
    """A split-K sum over ``splits`` slices of ``size`` floats (gemm.sum_slices and
    linear_sum_bias_relu_kernel share this grid rule)."""
    threads = min(THREADS, 32 * tiling.cdiv(size, 32))
    return _launch(layer, pass_name, kernel, min(tiling.cdiv(size, threads), SUM_BLOCKS), threads,
                   4 * size * (splits + 1) + extra_bytes)


def _gemm(layer, pass_name, kernel, t, bytes_moved):
    """The row of one GEMM launch cut as ``t`` (a tiling.GemmTiling); ``kernel`` names the
    pass's kernel, the row names the instance of t's tile (tiling.instance_name)."""
    shape = t.shape
    return _launch(layer, pass_name, tiling.instance_name(kernel, t.bm, t.bn), list(t.grid), t.threads, bytes_moved, M=shape.m,
                   N=shape.n, K=shape.k, groups=shape.groups, tile=f"{t.bm}x{t.bn}x{t.bk}",
                   split_k=t.splits, k_split=t.k_split, useful_flop=2 * shape.useful_macs,
                   executed_flop=2 * t.executed_macs)


def conv_launches(step, batch, pass_name, sm_count):
    """The launches of one conv launcher call (conv2d_forward / _backward_data / _weights)."""
    s, g = step.spec, step.groups
    x_shape, w_shape = (batch, *step.in_shape), (s.out_shape[0], step.in_shape[0] // g,
                                                 s["kernel"], s["kernel"])
    x, y, w, f = _prod(x_shape), batch * _prod(step.out_shape), _prod(w_shape), w_shape[0]
    t = tiling.gemm_tiling(tiling.conv_gemm(pass_name, x_shape, w_shape, s["stride"], s["pad"], g),
                           sm_count)
    if pass_name == "forward":
        return [_gemm(s.name, pass_name, "conv_forward_kernel", t, 4 * (x + w + f + y))]
    if pass_name == "backward-data":
        kernel = ("conv_backward_data_unit_stride_kernel" if s["stride"] == 1
                  else "conv_backward_data_kernel")
        return [_gemm(s.name, pass_name, kernel, t, 4 * (y + w + x))]
    row = _gemm(s.name, pass_name, "conv_backward_weights_kernel", t,
                4 * (y + x + t.splits * (w + f)))
    if t.splits == 1:
        return [row]
    return [row, _sum_launch(s.name, "backward-weights-sum", "sum_slices_kernel", w, t.splits),
            _sum_launch(s.name, "backward-weights-sum", "sum_slices_kernel", f, t.splits)]


def linear_launches(step, batch, pass_name, sm_count):
    """The launches of one linear launcher call."""
    name, inputs, outputs = step.spec.name, _prod(step.in_shape), step.out_shape[0]
    x, y, w = batch * inputs, batch * outputs, inputs * outputs
    t = tiling.gemm_tiling(tiling.linear_gemm(pass_name, batch, inputs, outputs), sm_count)
    if pass_name == "forward":
        row = _gemm(name, pass_name, "linear_forward_kernel", t,
                    4 * (x + w + t.splits * y + (outputs if t.splits == 1 else 0)))
        return [row] if t.splits == 1 else [row, _sum_launch(
            name, "forward-sum", "linear_sum_bias_relu_kernel", y, t.splits, 4 * outputs)]
    if pass_name == "backward-data":
        kernel = "linear_backward_data_kernel" if t.splits == 1 else "linear_backward_data_split_kernel"
        row = _gemm(name, pass_name, kernel, t, 4 * (y + w + t.splits * x))
        return [row] if t.splits == 1 else [row, _sum_launch(
            name, "backward-data-sum", "sum_slices_kernel", x, t.splits)]
    row = _gemm(name, pass_name, "linear_backward_weights_kernel", t, 4 * (y + x + w))
    threads = min(THREADS, 32 * tiling.cdiv(outputs, 32))
    return [row, _launch(name, "backward-bias", "linear_bias_grad_kernel",
                         tiling.cdiv(outputs, threads), threads, 4 * (y + outputs))]


def _elementwise(step, batch, pass_name):
    """The launch of an LRN, max-pool or dropout pass (forward or backward-data)."""
    s, kind = step.spec, step.spec.type
    x, y = batch * _prod(step.in_shape), batch * _prod(step.out_shape)
    fwd = pass_name == "forward"
    if kind == "lrn":          # one thread per (image, group, pixel) column
        columns = batch * step.groups * _prod(step.in_shape[1:])
        return _launch(s.name, pass_name, f"lrn_{'forward' if fwd else 'backward'}_kernel",
                       grid_1d(columns), bytes_moved=4 * x * (3 if fwd else 5))
    if kind == "maxpool":      # forward: one thread per output; backward: per input element
        return _launch(s.name, pass_name, f"maxpool_{'forward' if fwd else 'backward'}_kernel",
                       grid_1d(y if fwd else x), bytes_moved=4 * x + 8 * y)
    return _launch(s.name, pass_name, f"dropout_{'forward' if fwd else 'backward'}_kernel",
                   grid_1d(x), bytes_moved=9 * x)


def step_launches(config, batch, sm_count=tiling.SM_COUNT):
    """Every kernel launch of one training step of ``config`` on one tower at ``batch``, in
    launch order: augmentation, forward, loss, backward (from the last layer to the first
    with parameters, whose backward-data is not run), the SGD update."""
    from nbalex.config import load_config
    from nbalex.towers import plan_steps

    cfg, _, specs = load_config(config)
    steps = plan_steps(specs, 1)
    channels, crop = specs[0].in_shape[0], specs[0].in_shape[1]
    pixels = batch * crop * crop
    rows = [_launch("data", "augment", "augment_batch_kernel", tiling.cdiv(pixels, THREADS),
                    bytes_moved=pixels * channels * 5 + 4 * crop * crop * channels)]
    gemm_calls = {"conv": conv_launches, "fc": linear_launches}

    active = lambda step: step.spec.type != "dropout" or step.spec["p"] > 0   # noqa: E731
    for step in steps:
        if step.spec.type in gemm_calls:
            rows += gemm_calls[step.spec.type](step, batch, "forward", sm_count)
        elif active(step):
            rows.append(_elementwise(step, batch, "forward"))
    classes = steps[-1].out_shape[0]
    logits = batch * classes
    rows.append(_launch("softmax-xent", "forward", "softmax_xent_forward_kernel",
                        min(batch, MAX_ROW_BLOCKS), ROW_THREADS, 4 * (2 * logits + 2 * batch)))
    rows.append(_launch("softmax-xent", "backward-data", "softmax_xent_backward_kernel",
                        grid_1d(logits), bytes_moved=4 * (2 * logits + batch)))
    first = next(i for i, st in enumerate(steps) if st.spec.type in gemm_calls)
    for i in range(len(steps) - 1, first - 1, -1):
        step = steps[i]
        if step.spec.type in gemm_calls:
            if step.spec["relu"]:
                y = batch * _prod(step.out_shape)
                rows.append(_launch(step.spec.name, "relu-backward", "relu_backward_kernel",
                                    grid_1d(y), bytes_moved=12 * y))
            rows += gemm_calls[step.spec.type](step, batch, "backward-weights", sm_count)
            if i > first:
                rows += gemm_calls[step.spec.type](step, batch, "backward-data", sm_count)
        elif active(step):
            rows.append(_elementwise(step, batch, "backward-data"))
    params = sum(p.size for s in specs for p in s.params)
    rows.append(_launch("sgd", "update", "sgd_update_kernel", grid_1d(params),
                        bytes_moved=20 * params))
    return rows


# ---- pricing ----------------------------------------------------------------------------------

def price(row, gpu):
    """Add ``resident_blocks``, ``waves``, the times and ``predicted_ms`` to one launch row."""
    resident = resident_blocks(row["kernel"])
    grid = row["grid"]
    blocks = grid[0] * grid[1] * grid[2] if isinstance(grid, list) else grid
    waves = blocks / (gpu.sms * resident)
    memory_ms = row["bytes"] / (HBM_FRACTION * gpu.hbm_gb_s * 1e9) * 1e3
    share = STATIC[row["kernel"]][3]
    ffma_ms = None
    if "executed_flop" in row:
        rate = gpu.sms * FFMA_PER_SM_PER_CLOCK * gpu.clock_mhz * 1e6 * share   # FFMA/s
        ffma_ms = row["executed_flop"] / 2 / rate * (math.ceil(waves) / waves) * 1e3
        row["tile_efficiency"] = row["useful_flop"] / row["executed_flop"]
        row["ffma_share"] = share
    times = {"ffma": ffma_ms or 0.0, "memory": memory_ms, "launch": LAUNCH_FLOOR_US / 1e3}
    bound = max(times, key=times.get)
    row.update(resident_blocks=resident, waves=waves, ffma_ms=ffma_ms, memory_ms=memory_ms,
               bound=bound, predicted_ms=times[bound])
    return row


def totals(rows):
    """Sums over ``rows``: flop, bytes, launches, predicted ms and the tile efficiency."""
    useful = sum(r.get("useful_flop", 0) for r in rows)
    executed = sum(r.get("executed_flop", 0) for r in rows)
    return {"launches": len(rows), "useful_flop": useful, "executed_flop": executed,
            "tile_efficiency": useful / executed if executed else None,
            "bytes": sum(r["bytes"] for r in rows),
            "predicted_ms": sum(r["predicted_ms"] for r in rows)}


def assumptions(gpu, source):
    rate = gpu.sms * FFMA_PER_SM_PER_CLOCK * gpu.clock_mhz * 1e6
    shares = ", ".join(f"{k} {v[3]:.3f}" for k, v in STATIC.items() if v[3] is not None)
    return [
        f"GPU: {gpu.name}, {gpu.sms} SMs ({source}), clock {gpu.clock_mhz:.0f} MHz (maximum "
        f"boost; a lower sustained clock scales the FFMA times), HBM {gpu.hbm_gb_s:.0f} GB/s",
        f"FFMA: {FFMA_PER_SM_PER_CLOCK} per SM per clock = {2 * rate / 1e12:.1f} TFLOP/s peak; a GEMM "
        f"kernel sustains peak x its static main-loop FFMA share (one warp instruction per "
        f"scheduler per clock): {shares}",
        "GEMM time: executed multiply-adds (whole tiles, K padded to whole K tiles) at that "
        "rate, rounded up to whole waves (waves = blocks / (SMs x resident blocks per SM))",
        f"memory: each tensor a kernel reads or writes moves once, at {HBM_FRACTION:.0%} of HBM "
        f"bandwidth ({HBM_FRACTION * gpu.hbm_gb_s:.0f} GB/s); a kernel takes the larger of its "
        f"FFMA and memory times, and at least {LAUNCH_FLOOR_US:g} us",
        f"resident blocks per SM: registers and shared memory of the sm_90 static report "
        f"(CUDA {STATIC_RELEASE}, checked in), with nbalex.cuda.static's occupancy formula",
        "not included: the host's launch overhead (nbalex bench train measures it), the "
        "input's host-to-device copy, overlap between kernels",
        "useful_flop: 2 x the layer's multiply-adds (the db column of conv backward-weights "
        "and the split-K sums count as executed work only)",
    ]


def make_plan(model="alexnet", batch=128, gpu=None):
    """The plan of one training step: {"model", "batch_size", "gpu", "rows", "totals",
    "passes" (totals of each pass's GEMM launches), "predicted_step_ms",
    "predicted_images_per_s", "assumptions" (strings)}.

    ``gpu``: a key of GPUS, or None for the GPU present (its own SM count), else DEFAULT_GPU.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch!r}")
    if gpu is None:
        card = detect_gpu()
        card, source = (card, "read from the device") if card else (GPUS[DEFAULT_GPU], "table")
    elif gpu in GPUS:
        card, source = GPUS[gpu], "table"
    else:
        raise ValueError(f"unknown GPU {gpu!r}; expected one of {', '.join(GPUS)}")
    rows = [price(r, card) for r in step_launches(model, batch, card.sms)]
    total = totals(rows)
    passes = {p: totals([r for r in rows if r["pass"] == p and "executed_flop" in r])
              for p in tiling.PASSES}                # the GEMM launches of each pass
    step_ms = total["predicted_ms"]
    return {"model": model, "batch_size": batch, "gpu": vars(card), "rows": rows,
            "totals": total, "passes": passes, "predicted_step_ms": step_ms,
            "predicted_images_per_s": batch / (step_ms / 1e3),
            "assumptions": assumptions(card, source)}


# ---- output -----------------------------------------------------------------------------------

def _cell(value, digits):
    if value is None:
        return "-"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


COLUMNS = [("layer", "layer", 0), ("pass", "pass", 0), ("kernel", "kernel", 0),
           ("M", "M", 0), ("N", "N", 0), ("K", "K", 0), ("groups", "g", 0), ("grid", "grid", 0),
           ("split_k", "split", 0), ("resident_blocks", "res", 0), ("waves", "waves", 2),
           ("tile_efficiency", "tile eff", 2), ("bytes", "MB", 1), ("bound", "bound", 0),
           ("predicted_ms", "ms", 3)]


def format_plan(plan):
    """The plan as a text table, its totals and assumptions."""
    table = [[_cell(r.get(k) / 1e6 if k == "bytes" else r.get(k), d) for k, _, d in COLUMNS]
             for r in plan["rows"]]
    heads = [h for _, h, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 2 else c.ljust(w)        # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    t = plan["totals"]
    out = [f"{plan['model']}, batch {plan['batch_size']}, one tower on {plan['gpu']['name']}",
           "", line(heads), "-" * (sum(widths) + 2 * len(widths) - 2), *map(line, table), "",
           f"predicted step {plan['predicted_step_ms']:.2f} ms, "
           f"{plan['predicted_images_per_s']:.0f} images/s; {t['launches']} launches",
           f"GEMM work: {t['useful_flop'] / 1e9:.1f} GFLOP useful, {t['executed_flop'] / 1e9:.1f} "
           f"GFLOP executed (tile efficiency {t['tile_efficiency']:.2f})"]
    for name, p in plan["passes"].items():
        out.append(f"  {name} GEMMs: {p['useful_flop'] / 1e9:.1f} / {p['executed_flop'] / 1e9:.1f} GFLOP "
                   f"(tile efficiency {p['tile_efficiency']:.2f}), {p['predicted_ms']:.2f} ms")
    out += ["", "Assumptions:", *(f"- {a}" for a in plan["assumptions"])]
    return "\n".join(out)


@click.command("plan", epilog="Examples:\n\n\b\n  nbalex bench plan --model alexnet --batch-size 128\n"
                              "  nbalex bench plan --gpu h100-pcie --json")
@click.option("--model", default="alexnet", show_default=True,
              help="Config name or TOML file (as for nbalex train).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per step (one tower holds them all).")
@click.option("--gpu", type=click.Choice(sorted(GPUS)), default=None,
              help=f"Price the step on this card [default: the GPU present, else {DEFAULT_GPU}].")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def command(model, batch_size, gpu, as_json):
    """Every kernel launch of one training step and its predicted GPU time, without a GPU.

    For each GEMM pass: M, N, K, groups, block tile, grid, split-K, resident blocks per SM,
    waves, useful and executed FLOP; for every kernel its bytes and predicted time; totals
    (step ms, images/s, tile efficiency), with every assumption of the model printed.
    """
    plan = make_plan(model, batch_size, gpu)
    click.echo(json.dumps(plan, indent=1) if as_json else format_plan(plan))
