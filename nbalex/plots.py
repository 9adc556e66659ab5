"""Pictures of a training run: ``curves.png`` (loss and error per epoch) and ``filters.png``;
and of the CPU benchmark against PyTorch (:func:`plot_cpu_benchmark`).

``filters.png`` is the paper's Figure 3: the first convolution's filters drawn as small RGB
images.  Each filter is min-max normalised to [0, 1] on its own (so weak and strong filters
are equally visible), upscaled with nearest-neighbour so an 11×11 kernel is not a smudge, and
laid out in a grid with a thin white gutter.  Matplotlib draws with the Agg backend, so no
display is needed.
"""

import math
import os
from pathlib import Path

import numpy as np


def _pyplot():
    """matplotlib.pyplot on the Agg backend (imported late: it is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _write_png(path, write):
    """``write(tmp)`` a PNG next to ``path``, then rename it onto ``path`` (atomic: a reader
    or an interruption never sees half a picture)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_curves(history, path):
    """Draw training/validation loss and top-1/top-5 validation error against the epoch.

    ``history`` is the list of per-epoch log rows (dicts with ``epoch``, ``train_loss``,
    ``val_loss``, ``top1_error``, ``top5_error``).  Writes a PNG to ``path``.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_err.plot(epochs, [100 * row["top1_error"] for row in history], "o-", label="top-1")
    ax_err.plot(epochs, [100 * row["top5_error"] for row in history], "s-", label="top-5")
    ax_err.set(xlabel="epoch", ylabel="validation error (%)", title="Validation error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        _write_png(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def filter_grid(weights, scale=None, gutter=2, columns=None):
    """Arrange first-layer filters (F, C, KH, KW) as one float image (H, W, 3) in [0, 1].

    Each filter is min-max normalised on its own (a constant filter becomes mid-grey) and
    upscaled ``scale`` times with nearest-neighbour (default: to about 44 pixels a side).
    Filters with one channel are drawn grey; with 3 channels as RGB; otherwise the channel
    mean is drawn grey.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected conv weights (F, C, KH, KW), got shape {w.shape}")
    count, channels, kh, kw = w.shape
    if channels != 3:
        w = np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    low = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - low
    tiles = np.where(span > 0, (w - low) / np.where(span > 0, span, 1), 0.5)
    tiles = tiles.transpose(0, 2, 3, 1)                         # (F, KH, KW, 3)
    scale = scale or max(1, 44 // max(kh, kw))
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscale
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    th, tw = tiles.shape[1:3]
    grid = np.ones((rows * (th + gutter) + gutter, columns * (tw + gutter) + gutter, 3))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gutter + r * (th + gutter), gutter + c * (tw + gutter)
        grid[y:y + th, x:x + tw] = tile
    return grid


def plot_filters(weights, path):
    """Write the first layer's filters (F, C, KH, KW) as a colour grid PNG (Figure 3)."""
    plt = _pyplot()
    grid = filter_grid(weights)
    _write_png(path, lambda tmp: plt.imsave(tmp, grid, format="png"))


def plot_cpu_benchmark(result, path):
    """Draw ``bench/bench_cpu.py``'s result (its JSON as a dict): the end-to-end ratios
    nbalex / PyTorch with their min-max range (left), and the per-layer forward + backward
    milliseconds of both (right), whichever of the two the result holds.  Writes a PNG."""
    rows, layers = result.get("end_to_end") or [], (result.get("layers") or {}).get("rows") or []
    panels = [p for p, have in (("ratios", rows), ("layers", layers)) if have]
    if not panels:
        raise ValueError("the result has neither end-to-end rows nor a per-layer table")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.5 + 0.42 * max(
        len(rows), len(layers))), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "ratios":
            labels = [f"{r['model']}, batch {r['batch']}, {r['mode']}" for r in rows]
            med = [r["ratio"]["median"] for r in rows]
            err = [[m - r["ratio"]["min"] for m, r in zip(med, rows)],
                   [r["ratio"]["max"] - m for m, r in zip(med, rows)]]
            ax.barh(labels, [m - 1 for m in med], left=1, xerr=err, capsize=3,   # from 1 out
                    color=["C0" if m >= 1 else "C3" for m in med])
            ax.axvline(1.0, color="k", lw=1)
            ax.invert_yaxis()
            ax.set_xscale("log")            # a ratio and its inverse equally far from 1
            ax.set(xlabel="images/s, nbalex / PyTorch (median, min-max; log scale)",
                   title="End to end: above 1, nbalex is faster")
        else:
            lay = result["layers"]
            names = [r["layer"] for r in layers]
            total = lambda r, side: sum(r[f"{p}_{side}"]["ms"] for p in ("fwd", "bwd")  # noqa: E731
                                        if f"{p}_{side}" in r)
            y = np.arange(len(layers))
            ax.barh(y - 0.2, [total(r, "nbalex") for r in layers], 0.4, label="nbalex")
            ax.barh(y + 0.2, [total(r, "torch") for r in layers], 0.4, label="PyTorch")
            ax.set_yticks(y, names)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.legend()
            ax.set(xlabel="ms per call, forward + backward (log scale)",
                   title=f"Per layer, {lay['model']}, batch {lay['batch']}")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    try:
        _write_png(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
