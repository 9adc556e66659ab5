"""The training loop behind ``nbalex train``, and evaluation behind ``nbalex eval``.

A run lives in one folder (``RUN_DIR``):

``checkpoint.h5``  parameters, momentum, learning rate, the position (epoch, step), the run's
                   settings, the schedule's state, the class list and the training mean image
                   (so ``nbalex predict`` needs nothing else).  Written after every epoch and
                   when the run is interrupted; the write is atomic.
``log.jsonl``      one JSON object per finished epoch: epoch, lr, train_loss, val_loss,
                   top1_error, top5_error, images_per_s, seconds.
``model.toml``     the network's configuration, for reading.
``curves.png``, ``filters.png``  redrawn after every epoch (see :mod:`nbalex.plots`).

Every random draw is a function of (seed, epoch, step): the loader derives its crops, flips
and colour noise from (seed, epoch, batch) and each step's dropout seed is
:func:`step_seed`.  So ``--resume`` after an interruption repeats exactly what an
uninterrupted run would have done, bit for bit on the same backend.

Ctrl-C does not kill a step half-way: the first SIGINT asks the loop to stop after the
current step (or validation batch), the position is saved and :class:`Interrupted` is
raised; a second Ctrl-C stops at once without saving.
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from nbalex.backends import mix32

CHECKPOINT = "checkpoint.h5"
LOG = "log.jsonl"


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving its position."""

    def __init__(self, path, epoch, step):
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}; position saved to "
                         f"{path} (continue with --resume)")
        self.path, self.epoch, self.step = path, epoch, step


@dataclasses.dataclass
class Settings:
    """What fixes a run's trajectory.  Stored in the checkpoint; ``--resume`` reuses it."""

    model: str = "alexnet"
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    schedule: str = "plateau"
    step_epochs: int = 30

    def merged(self, given):
        """These settings with ``given`` (name -> value the user passed) checked against them.

        Used on resume: a value the user passes must equal the stored one, since changing it
        would not continue the same run.
        """
        for name, value in given.items():
            if value is None:
                continue
            stored = getattr(self, name)
            if value != stored:
                raise ValueError(f"--{name.replace('_', '-')} {value} differs from the run being "
                                 f"resumed ({stored}); leave it out or start a new --out folder")
        return self


def step_seed(seed, epoch, step):
    """The dropout seed of training step ``step`` of epoch ``epoch`` (32-bit, well mixed)."""
    return mix32(mix32(mix32(seed) ^ (epoch + 1)) ^ (step + 1))


def _host(array):
    """A NumPy view of ``array`` (copied from the GPU when it is a device array)."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return np.asarray(array)


# ---------------------------------------------------------------------------- evaluation
class Scores:
    """Running top-1/top-5 error and cross-entropy over batches of class probabilities."""

    def __init__(self):
        self.images = 0
        self.loss_sum = 0.0
        self.top1_wrong = 0
        self.top5_wrong = 0

    def add(self, probs, labels):
        """Count a batch: ``probs`` (N, K) rows summing to 1, ``labels`` (N,) ints."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        rows = np.arange(len(labels))
        picked = probs[rows, labels]
        self.loss_sum += float(-np.log(np.maximum(picked, 1e-30)).sum())
        # rank = how many classes score strictly higher than the true one (ties favour it)
        rank = (probs > picked[:, None]).sum(axis=1)
        self.top1_wrong += int((rank >= 1).sum())
        self.top5_wrong += int((rank >= 5).sum())
        self.images += len(labels)

    def result(self):
        n = max(self.images, 1)
        return {"top1_error": self.top1_wrong / n, "top5_error": self.top5_wrong / n,
                "loss": self.loss_sum / n, "images": self.images}


def softmax(logits):
    """Row-wise softmax in float64 (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(net, loader, ten_crop=False, should_stop=None, progress=False, desc="eval"):
    """Top-1/top-5 error and mean loss of ``net`` over one pass of ``loader``.

    With ``ten_crop`` the loader yields 10 views per image (rows i*10 .. i*10+9 belong to
    image i) and the softmax is averaged over them.  ``should_stop()`` is polled after every
    batch; when it says yes the pass is abandoned and ``None`` is returned.
    """
    scores = Scores()
    with _bar(progress, getattr(loader, "batches_per_epoch", None), desc, unit="batch") as bar:
        for x, labels in loader.epoch(0):
            probs = softmax(_host(net.forward(x, train=False)))
            labels = _host(labels)
            if ten_crop:
                probs = probs.reshape(len(labels), 10, -1).mean(axis=1)
            scores.add(probs, labels)
            bar.update(1)
            if should_stop is not None and should_stop():
                return None
    return scores.result()


# ----------------------------------------------------------------------------- helpers
def _bar(enabled, total, desc, initial=0, unit="batch"):
    """A tqdm progress bar on stderr, or a do-nothing stand-in."""
    if not enabled:
        return contextlib.nullcontext(_NoBar())
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


class _StopRequest:
    """Turns the first SIGINT into a polite request to stop at the next step boundary.

    A half-done SGD update would leave parameters and momentum out of step, so the loop
    polls :meth:`__call__` between steps instead of being interrupted inside one.  A second
    Ctrl-C raises KeyboardInterrupt at once.  ``after_steps`` makes the request itself after
    that many steps (tests use it to stand in for a Ctrl-C at a known point).
    """

    def __init__(self, after_steps=None):
        self.requested = False
        self.forced = False
        self.after_steps = after_steps
        self.steps = 0
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: KeyboardInterrupt is caught by the loop
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to quit without saving)",
              file=sys.stderr)

    def count_step(self):
        self.steps += 1
        if self.after_steps is not None and self.steps >= self.after_steps:
            self.requested = True

    def __call__(self):
        return self.requested


def build_net(config, backend="auto", batch_size=128, gpus=(0,), seed=0):
    """A :class:`nbalex.model.Net`, after checking that its buffers fit on the GPU.

    ``config`` is a model name, a TOML path, or TOML text from a checkpoint.
    """
    from nbalex import model
    from nbalex.backends import resolve
    backend = resolve(backend)
    if backend == "cuda":
        _check_fits_on_gpu(config, batch_size, gpus)
    return model.Net(config, backend=backend, batch_size=batch_size, gpus=tuple(gpus), seed=seed)


def _check_fits_on_gpu(config, batch_size, gpus):
    """Raise ValueError when one tower's arena for ``batch_size`` exceeds a GPU's free memory."""
    from numba import cuda
    from nbalex import model
    if getattr(cuda, "simulator_enabled", False) or not hasattr(cuda, "current_context"):
        return
    need = model.describe(config, batch_size=batch_size).get("arena_bytes")
    if not need:
        return
    for gpu in gpus:
        with cuda.gpus[gpu]:
            free, _total = cuda.current_context().get_memory_info()
        if need > free:
            raise ValueError(f"batch size {batch_size} needs {need / 2**30:.1f} GiB on GPU {gpu}, "
                             f"which has {free / 2**30:.1f} GiB free; try a smaller --batch-size")


def _check_data(net, dataset, path, classes=None):
    """Raise ValueError when a packed dataset does not fit the network (or the class list)."""
    if len(dataset.classes) != net.num_classes:
        raise ValueError(f"{path} has {len(dataset.classes)} classes but the model "
                         f"{net.name} has {net.num_classes} outputs")
    if dataset.image_size < net.input_size:
        raise ValueError(f"{path} holds {dataset.image_size}px images, smaller than the "
                         f"model's {net.input_size}px input; pack it with a larger --size")
    if classes is not None and list(dataset.classes) != list(classes):
        raise ValueError(f"{path} has different classes from the training data "
                         f"(pack it with --classes-from TRAIN.h5)")


def _tower(net):
    """The first tower to load batches onto (CUDA backend), else None."""
    towers = getattr(net, "towers", None)
    return towers[0] if towers else None


# ------------------------------------------------------------------------------ training
def _fresh_epoch():
    """Running totals of the epoch in progress (kept in the checkpoint across a resume)."""
    return {"loss_sum": 0.0, "images": 0, "train_seconds": 0.0, "seconds": 0.0}


def _write_log(path, history):
    """(Re)write the JSON-lines log from the epochs the checkpoint knows about."""
    with open(path, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def _append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _first_conv_weight(net):
    """The first 4-D parameter (the first convolution's filters), or None."""
    params = net.params()
    for name in net.param_names():
        if np.ndim(params[name]) == 4:
            return params[name]
    return None


def _stderr(message):
    print(message, file=sys.stderr)


def train(data, val, out, settings, epochs, *, backend="auto", gpus=(0,), resume=False,
          given=None, workers=2, progress=True, stop_after_steps=None, report=_stderr):
    """Train (or, with ``resume``, continue training) a network; returns a summary dict.

    ``settings`` (:class:`Settings`) is used for a new run; on resume the checkpoint's
    settings are used and ``given`` (the options the user passed) must agree with them.
    Raises :class:`Interrupted` after Ctrl-C (position saved), :class:`Diverged` when the
    loss stops being finite (last good checkpoint kept), ValueError on unusable inputs.
    """
    from nbalex import checkpoint
    from nbalex.backends import resolve
    from nbalex.io.dataset import H5Dataset
    from nbalex.io.loader import Loader
    from nbalex import plots

    out = Path(out)
    path = out / CHECKPOINT
    state = None
    if resume:
        if not path.exists():
            raise ValueError(f"nothing to resume: {path} does not exist")
        state = checkpoint.load(path)
        run = json.loads(_extra_text(state["extra"]["run"]))
        settings = Settings(**run["settings"]).merged(given or {})
        config = state["config_text"]
    else:
        if path.exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it "
                             f"or choose another --out")
        run = {"history": [], "epoch_totals": _fresh_epoch(), "schedule": None}
        config = settings.model
    backend = resolve(backend)
    train_set, val_set = H5Dataset(data), H5Dataset(val)
    net = build_net(config, backend, settings.batch_size, gpus, settings.seed)
    _check_data(net, train_set, data)
    _check_data(net, val_set, val, classes=train_set.classes)
    if state is not None:
        net.load_params(state["params"])
        net.load_momentum(state["momentum"])
    schedule = make_schedule(settings, run["schedule"])
    lr = state["lr"] if state is not None else settings.lr
    epoch, step = (int(state["epoch"]), int(state["step"])) if state is not None else (0, 0)
    history, totals = run["history"], run["epoch_totals"]
    seed = settings.seed
    classes = [str(c) for c in train_set.classes]
    mean = np.asarray(train_set.mean, dtype=np.float32)

    out.mkdir(parents=True, exist_ok=True)
    _write_log(out / LOG, history)
    (out / "model.toml").write_text(net.config_text)

    def save(epoch_, step_, lr_):
        extra = {"run": json.dumps({"settings": dataclasses.asdict(settings),
                                    "history": history, "epoch_totals": totals,
                                    "schedule": schedule.state_dict()}),
                 "classes": classes, "mean": mean}
        checkpoint.save(path, net, epoch=epoch_, step=step_, lr=lr_, seed=seed,
                        loader_state={"epoch": epoch_, "batch": step_}, extra=extra)

    loader_args = dict(backend=backend, seed=seed, workers=workers, tower=_tower(net))
    train_loader = Loader(data, settings.batch_size, net.input_size, train=True, **loader_args)
    val_loader = Loader(val, settings.batch_size, net.input_size, train=False, view="center",
                        drop_last=False, **loader_args)
    steps = train_loader.batches_per_epoch
    if steps == 0:
        raise ValueError(f"{data} holds fewer images than one batch ({settings.batch_size})")
    try:
        with _StopRequest(stop_after_steps) as stop:
            while epoch < epochs:
                started = time.perf_counter()
                try:
                    step = _train_epoch(net, train_loader, epoch, step, steps, lr, settings,
                                        totals, stop, progress, f"epoch {epoch + 1}/{epochs}")
                    totals["train_seconds"] += time.perf_counter() - started
                    scores = None if stop() else evaluate(
                        net, val_loader, should_stop=stop, progress=progress,
                        desc=f"validate {epoch + 1}")
                    if scores is None:
                        raise KeyboardInterrupt
                except KeyboardInterrupt:
                    if stop.forced:  # a second Ctrl-C: quit without saving
                        raise
                    totals["seconds"] += time.perf_counter() - started
                    save(epoch, step, lr)
                    raise Interrupted(path, epoch, step) from None
                except Diverged as exc:
                    kept = (f"the last good checkpoint ({path}, after epoch {epoch}) is kept"
                            if path.exists() else "no checkpoint was written")
                    raise Diverged(f"{exc}; stopped, {kept}. Try a lower --lr.") from None
                totals["seconds"] += time.perf_counter() - started
                row = {"epoch": epoch + 1, "lr": lr,
                       "train_loss": totals["loss_sum"] / max(totals["images"], 1),
                       "val_loss": scores["loss"], "top1_error": scores["top1_error"],
                       "top5_error": scores["top5_error"],
                       "images_per_s": totals["images"] / max(totals["train_seconds"], 1e-9),
                       "seconds": totals["seconds"]}
                history.append(row)
                lr = schedule.next_lr(lr, epoch + 1, row["top1_error"])
                epoch, step, totals = epoch + 1, 0, _fresh_epoch()
                save(epoch, step, lr)
                _append_log(out / LOG, row)
                plots.plot_curves(history, out / "curves.png")
                weights = _first_conv_weight(net)
                if weights is not None:
                    plots.plot_filters(weights, out / "filters.png")
                report(_epoch_line(row, epochs))
    finally:
        train_loader.close()
        val_loader.close()
    return {"epochs": epoch, "history": history, "checkpoint": str(path)}


def _train_epoch(net, loader, epoch, step, steps, lr, settings, totals, stop, progress, desc):
    """Run steps ``step .. steps-1`` of ``epoch``; returns the number of steps done so far.

    Stops early (returning the position) when ``stop()`` becomes true between steps.
    """
    seed = settings.seed
    with _bar(progress, steps, desc, initial=step) as bar:
        tick = time.perf_counter()
        for x, labels in loader.epoch(epoch, start_batch=step):
            loss = float(net.forward_backward(x, labels, train=True,
                                              seed=step_seed(seed, epoch, step)))
            if not math.isfinite(loss):
                raise Diverged(f"the training loss became {loss} at epoch {epoch + 1}, "
                               f"step {step + 1}")
            net.sgd_step(lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
            step += 1
            images = len(labels)
            totals["loss_sum"] += loss * images
            totals["images"] += images
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images / max(now - tick, 1e-9):.0f}",
                            refresh=False)
            bar.update(1)
            tick = now
            stop.count_step()
            if stop():
                break
    return step


def _epoch_line(row, epochs):
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.3g}  loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  top-1 {100 * row['top1_error']:.1f}%  "
            f"top-5 {100 * row['top5_error']:.1f}%  {row['images_per_s']:.0f} img/s  "
            f"{row['seconds']:.1f} s")


def _extra_text(value):
    """A string stored in a checkpoint's ``extra`` (h5py may hand back bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _extra_text(value[()] if value.ndim == 0 else value.item())
    return str(value)


# ----------------------------------------------------------------------------- inference
def load_checkpoint(path, backend="auto", batch_size=1, gpus=(0,)):
    """(net, state): the network saved in checkpoint ``path`` with its parameters loaded."""
    from nbalex import checkpoint
    state = checkpoint.load(path)
    net = build_net(state["config_text"], backend, batch_size, gpus, int(state.get("seed", 0)))
    net.load_params(state["params"])
    return net, state


def evaluate_checkpoint(checkpoint_path, data, *, ten_crop=False, batch_size=128,
                        backend="auto", gpus=(0,), workers=2, progress=True):
    """Top-1/top-5 error and loss of a checkpoint on packed ``data`` (centre crop or 10 crops).

    Returns {"top1_error", "top5_error", "loss", "images"}.
    """
    from nbalex.backends import resolve
    from nbalex.io.dataset import H5Dataset
    from nbalex.io.loader import Loader
    backend = resolve(backend)
    views = 10 if ten_crop else 1
    net, state = load_checkpoint(checkpoint_path, backend, batch_size * views, gpus)
    classes = (state.get("extra") or {}).get("classes")
    _check_data(net, H5Dataset(data), data, classes=_extra_list(classes))
    loader = Loader(data, batch_size, net.input_size, backend=backend, train=False,
                    seed=0, workers=workers, tower=_tower(net),
                    view="ten" if ten_crop else "center", drop_last=False)
    try:
        return evaluate(net, loader, ten_crop=ten_crop, progress=progress)
    finally:
        loader.close()


def predict(checkpoint_path, images, *, top=5, backend="auto", batch_size=16):
    """Class probabilities of image files, prepared as the packer and centre crop do.

    Needs only the checkpoint: its ``extra`` holds the class names and the training mean.
    Returns one dict per image: {"image", "top": [{"class", "index", "probability"}, ...]}.
    """
    from nbalex.io.pack import load_and_resize
    batch_size = max(1, min(batch_size, len(images)))
    net, state = load_checkpoint(checkpoint_path, backend, batch_size)
    extra = state.get("extra") or {}
    if "classes" not in extra or "mean" not in extra:
        raise ValueError(f"{checkpoint_path} has no class list or mean image "
                         f"(it was not written by `nbalex train`)")
    classes = _extra_list(extra["classes"])
    mean = np.asarray(extra["mean"], dtype=np.float32)
    size, crop = mean.shape[0], net.input_size
    top = max(1, min(top, len(classes)))
    results = []
    for first in range(0, len(images), batch_size):
        paths = images[first:first + batch_size]
        x = np.stack([_centre_crop_input(load_and_resize(p, size), mean, crop) for p in paths])
        probs = softmax(_host(net.forward(x, train=False)))
        for path, row in zip(paths, probs):
            best = np.argsort(-row, kind="stable")[:top]
            results.append({"image": str(path), "top": [
                {"class": classes[i], "index": int(i), "probability": float(row[i])}
                for i in best]})
    return results


def _centre_crop_input(image, mean, crop):
    """uint8 (S,S,3) image -> float32 (3,crop,crop) centre crop with the mean's crop removed."""
    image = np.asarray(image)
    if image.shape != mean.shape:
        raise ValueError(f"resized image has shape {image.shape}, the mean image {mean.shape}")
    y = (image.shape[0] - crop) // 2
    x = (image.shape[1] - crop) // 2
    window = (slice(y, y + crop), slice(x, x + crop))
    centred = image[window].astype(np.float32) - mean[window]
    return np.ascontiguousarray(centred.transpose(2, 0, 1))


def _extra_list(value):
    """A list of strings stored in a checkpoint's ``extra`` (None stays None)."""
    if value is None:
        return None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
