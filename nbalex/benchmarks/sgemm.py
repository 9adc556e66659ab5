"""``nbalex bench sgemm``: our GEMM against cuBLAS at AlexNet's matrix shapes (GPU only).

Ours is the cuda backend's ``linear_forward`` (``y = x @ w.T + b``, an SGEMM of (N,K) by
(K,M)) with its split-K workspace allocated once per shape, outside the timed calls; the peer is cuBLAS through PyTorch (CuPy when PyTorch is missing) with TF32 off, on
the same inputs in the same process. The shapes are the fc layers at the batch, the conv
layers' implicit GEMMs (M = F/g, N = B*OH*OW, K = C/g*KH*KW, one group) and 4096^3. Each
result is checked against a float64 product before it is timed.

Example::

    nbalex bench sgemm --json > sgemm.json
"""

import functools
import sys

import click
import numpy as np

from .common import (CheckFailed, TimingRefused, cycling, format_table, median_seconds,
                     refuse_under_simulator, relative_error, rotation_count, time_numba_cuda,
                     time_torch_cuda, to_json)
from .layers import ALEXNET_CONV_FC

TOLERANCE = 1e-4


def gemm_shapes(batch=128, square=4096):
    """[(name, M, N, K)] of AlexNet's GEMMs at ``batch`` plus one ``square``^3 product.

    M is the output features (rows of w), N the rows of x, K the shared dimension.
    """
    shapes = []
    for s in ALEXNET_CONV_FC:
        if s.kind == "conv":
            c, f, k, g = s.in_shape[0], s.out_shape[0], s.kernel, s.groups
            shapes.append((s.name, f // g, batch * s.out_shape[1] * s.out_shape[2], c // g * k * k))
        else:
            shapes.append((s.name, s.out_shape[0], batch, s.in_shape[0]))
    shapes.append((f"square{square}", square, square, square))
    return shapes


def _our_linear():
    """(linear_forward, linear_workspace_size) of the cuda backend."""
    try:
        from nbalex.cuda.linear import linear_forward, linear_workspace_size
    except ImportError:
        from .kernels import load_backend
        backend = load_backend("cuda")
        linear_forward, linear_workspace_size = backend.linear_forward, backend.linear_workspace_size
    return linear_forward, linear_workspace_size


def our_gemm(linear_forward, workspace_size, n, k, m):
    """``ours(y, x, w, b)``: ``linear_forward`` with its split-K workspace for (N,K) x (M,K)
    allocated here, once, as the network's arena holds it: nothing is allocated in a timed call."""
    from numba import cuda

    size = int(workspace_size((n, k), (m, k)))
    workspace = cuda.device_array(size, np.float32) if size else None
    return functools.partial(linear_forward, workspace=workspace)


class TorchPeer:
    """cuBLAS via PyTorch (F.linear = one addmm), TF32 off."""
    name = "cublas (torch)"

    def __init__(self):
        import torch
        if not torch.cuda.is_available():
            raise ImportError("this PyTorch has no CUDA")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.torch = torch

    def prepare(self, x, w, b):
        t = self.torch
        xt, wt, bt = (t.from_numpy(a).cuda() for a in (x, w, b))
        out = t.empty((x.shape[0], w.shape[0]), device="cuda")
        return lambda: t.addmm(bt, xt, wt.t(), out=out), lambda: out.cpu().numpy()

    def exact(self, x, w, b):
        t = self.torch
        xt, wt = t.from_numpy(x).cuda().double(), t.from_numpy(w).cuda().double()
        return (xt @ wt.t() + t.from_numpy(b).cuda().double()).cpu().numpy()

    def time(self, fn, warmup, repeats):
        return time_torch_cuda(fn, warmup, repeats)


class CupyPeer:
    """cuBLAS via CuPy (one matmul plus a broadcast bias add)."""
    name = "cublas (cupy)"

    def __init__(self):
        import cupy
        self.cp = cupy

    def prepare(self, x, w, b):
        cp = self.cp
        xc, wc, bc = (cp.asarray(a) for a in (x, w, b))
        out = cp.empty((x.shape[0], w.shape[0]), dtype=cp.float32)

        def run():
            cp.matmul(xc, wc.T, out=out)
            cp.add(out, bc, out=out)
        return run, lambda: cp.asnumpy(out)

    def exact(self, x, w, b):
        cp = self.cp
        return cp.asnumpy(cp.asarray(x, cp.float64) @ cp.asarray(w, cp.float64).T + cp.asarray(b))

    def time(self, fn, warmup, repeats):
        cp = self.cp
        for _ in range(warmup):
            fn()
        cp.cuda.Device().synchronize()
        samples = []
        for _ in range(repeats):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        return samples


def cublas_peer():
    """The peer: PyTorch when importable, else CuPy, else None."""
    for cls in (TorchPeer, CupyPeer):
        try:
            return cls()
        except ImportError:
            continue
    return None


def bench_shape(name, m, n, k, ours, peer, rng, warmup, repeats):
    """One row: check ours against a float64 product, then time ours and the peer.

    Products small enough to sit in the cache are timed cycling over several copies of
    their operands (:func:`rotation_count`), ours and the peer's alike.
    """
    from numba import cuda

    x = rng.standard_normal((n, k), dtype=np.float32)
    w = (rng.standard_normal((m, k), dtype=np.float32) * k ** -0.5).astype(np.float32)
    b = rng.standard_normal(m, dtype=np.float32)
    copies = rotation_count(4 * (n * k + m * k + m + n * m))
    row = {"shape": name, "M": m, "N": n, "K": k, "flops": 2 * m * n * k, "input_sets": copies}
    sets = [(cuda.to_device(np.full((n, m), np.nan, np.float32)), cuda.to_device(x), cuda.to_device(w),
             cuda.to_device(b)) for _ in range(copies)]
    if peer is not None:
        exact = peer.exact(x, w, b)
    else:
        exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    ours(*sets[0])
    err = relative_error(sets[0][0].copy_to_host(), exact)
    if not err <= TOLERANCE:
        raise CheckFailed(f"{name}: relative error {err:.3g} against float64 > {TOLERANCE:g}")
    row["rel_err"] = err
    seconds = median_seconds(time_numba_cuda(cycling([functools.partial(ours, *s) for s in sets]),
                                             warmup, repeats))
    row["ours_ms"] = seconds * 1e3
    row["ours_tflops"] = row["flops"] / seconds / 1e12
    if peer is not None:
        try:
            prepared = [peer.prepare(x, w, b) for _ in range(copies)]
            run, result = prepared[0]
            run()
            peer_err = relative_error(result(), exact)
            peer_s = median_seconds(peer.time(cycling([p[0] for p in prepared]), warmup, repeats))
        except Exception as exc:  # noqa: BLE001 - our numbers stand without the peer's
            row["peer_error"] = f"{type(exc).__name__}: {exc}"
            return row
        row.update(peer=peer.name, peer_ms=peer_s * 1e3, peer_tflops=row["flops"] / peer_s / 1e12,
                   peer_rel_err=peer_err, percent_of_peer=100.0 * peer_s / seconds)
    return row


def run_sgemm(batch=128, square=4096, repeats=10, warmup=2, seed=0, log=None):
    """Rows for every shape; a failing shape gets an ``error`` field and the rest still run."""
    from nbalex.backends import cuda_available

    refuse_under_simulator("nbalex bench sgemm")
    if not cuda_available():
        raise TimingRefused("nbalex bench sgemm needs a CUDA GPU (none was found)")
    try:
        linear = _our_linear()
    except (ImportError, AttributeError) as exc:
        raise TimingRefused(f"the cuda backend's linear_forward is not available: {exc}") from None
    peer = cublas_peer()
    rng = np.random.default_rng(seed)
    rows = []
    for name, m, n, k in gemm_shapes(batch, square):
        try:
            ours = our_gemm(*linear, n, k, m)
            rows.append(bench_shape(name, m, n, k, ours, peer, rng, warmup, repeats))
        except Exception as exc:  # noqa: BLE001 - one bad shape must not hide the others
            why = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            rows.append({"shape": name, "M": m, "N": n, "K": k, "error": why})
            if log is not None:
                log(f"sgemm {name}: {why}")
    return rows


COLUMNS = [("shape", "shape"), ("M", "M"), ("N", "N"), ("K", "K"), ("ours_ms", "ours ms", 3),
           ("ours_tflops", "ours TFLOP/s", 2), ("peer_ms", "cuBLAS ms", 3),
           ("peer_tflops", "cuBLAS TFLOP/s", 2), ("percent_of_peer", "ours/cuBLAS %", 1),
           ("rel_err", "rel err", ".1e")]


@click.command("sgemm")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
              help="Batch that sets N of the fc and conv GEMMs.")
@click.option("--square", type=click.IntRange(1), default=4096, show_default=True, help="Size of the square product.")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True, help="Timed calls (median reported).")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed calls before timing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of row objects.")
def command(batch_size, square, repeats, warmup, as_json):
    """Our SGEMM (linear_forward) against cuBLAS with TF32 off, as TFLOP/s and a percentage.

    \b
    Example:
      nbalex bench sgemm --json
    """
    try:
        rows = run_sgemm(batch_size, square, repeats, warmup,
                         log=lambda message: click.echo(message, err=True))
    except TimingRefused as exc:
        raise click.ClickException(str(exc))
    if as_json:
        click.echo(to_json(rows))
    else:
        click.echo(format_table(rows, COLUMNS))
        click.echo("ours/cuBLAS % = cuBLAS time over ours x 100 (100: as fast as cuBLAS)")
        if not any("peer" in r for r in rows):
            click.echo("no cuBLAS peer: needs PyTorch with CUDA, or CuPy")
        for r in rows:
            for key in ("error", "peer_error"):
                if r.get(key):
                    click.echo(f"FAILED {r['shape']} {key.replace('_', ' ')}: {r[key]}")
    if any(r.get("error") for r in rows):
        sys.exit(1)
