"""The training loop behind ``nbalex train`` (evaluation and prediction: :mod:`nbalex.inference`).

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

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from nbalex import inference, runtime
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


# ----------------------------------------------------------------------------- helpers
def _check_same_model(model, config_text, path):
    """Raise ValueError when ``--model`` (name or path; None = not given) is not the config in
    the checkpoint at ``path``."""
    if model is None:
        return
    from nbalex.config import resolve_source
    if resolve_source(model)[0].strip() != str(config_text).strip():
        raise ValueError(f"--model {model} is not the model of the run in {path}; leave "
                         f"--model out to resume it, or start a new --out folder")


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


# ------------------------------------------------------------------------------ training
def _fresh_epoch():
    """Running totals of the epoch in progress (kept in the checkpoint across a resume)."""
    return {"loss_sum": 0.0, "images": 0, "train_seconds": 0.0, "seconds": 0.0}


def _write_log(path, history):
    """(Re)write the JSON-lines log from the epochs the checkpoint knows about (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    from nbalex.io.loader import Loader
    from nbalex.backends import resolve

    backend = resolve(backend)
    run = _Run.start(data, val, Path(out), settings, epochs, given, resume, backend, gpus)
    net, settings = run.net, run.settings
    if run.epoch >= epochs:
        report(f"nothing to do: {out} already holds {run.epoch} epochs (--epochs {epochs})")
        return {"epochs": run.epoch, "history": run.history, "checkpoint": str(run.path)}
    loader_args = dict(backend=backend, seed=settings.seed, workers=workers, tower=runtime.loader_tower(net))
    with Loader(data, settings.batch_size, net.input_size, train=True, **loader_args) as train_loader, \
            Loader(val, settings.batch_size, net.input_size, train=False, view="center",
                   drop_last=False, mean=train_loader.mean, **loader_args) as val_loader, \
            _StopRequest(stop_after_steps) as stop:
        steps = train_loader.batches_per_epoch
        report(f"{'resuming' if resume else 'training'} {net.name} ({net.num_params():,} "
               f"parameters, backend {backend}) at epoch {run.epoch + 1}, step {run.step} of "
               f"{steps}; batch {settings.batch_size}, lr {run.lr:g}; run folder {out}")
        while run.epoch < epochs:
            if stop():   # Ctrl-C while the last epoch was being saved: that is the position
                raise Interrupted(run.path, run.epoch, run.step)
            started = time.perf_counter()
            try:
                _train_epoch(net, train_loader, run, steps, stop, progress,
                             f"epoch {run.epoch + 1}/{epochs}")
                run.totals["train_seconds"] += time.perf_counter() - started
                scores = None if stop() else inference.evaluate(
                    net, val_loader, should_stop=stop, progress=progress,
                    desc=f"validate {run.epoch + 1}")
                if scores is None:
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                if stop.forced:  # a second Ctrl-C: quit without saving
                    raise
                run.totals["seconds"] += time.perf_counter() - started
                run.save()
                raise Interrupted(run.path, run.epoch, run.step) from None
            except Diverged as exc:
                kept = (f"the last good checkpoint {run.path} is kept" if run.path.exists()
                        else "no checkpoint was written")
                raise Diverged(f"{exc}; stopped, {kept}. Try a lower --lr.") from None
            except Exception:
                if not stop():
                    raise
                # Ctrl-C reaches the loader's reader processes too; when fetching the next
                # batch fails after a stop request, the finished steps are still saved.
                run.save()
                raise Interrupted(run.path, run.epoch, run.step) from None
            run.totals["seconds"] += time.perf_counter() - started
            report(_epoch_line(run.finish_epoch(scores), epochs))
    return {"epochs": run.epoch, "history": run.history, "checkpoint": str(run.path)}


class _Run:
    """A run folder's state: the network, settings, position, schedule and history."""

    def __init__(self, out, net, settings, state, record, classes, mean, epochs):
        self.out, self.path, self.net, self.settings = out, out / CHECKPOINT, net, settings
        self.classes, self.mean = classes, mean
        self.history, self.totals = record["history"], record["epoch_totals"]
        self.schedule = make_schedule(settings, record["schedule"], epochs)
        self.lr = float(state["lr"]) if state else settings.lr
        self.epoch, self.step = (int(state["epoch"]), int(state["step"])) if state else (0, 0)

    @classmethod
    def start(cls, data, val, out, settings, epochs, given, resume, backend, gpus):
        """A new run in ``out``, or the one saved there (``resume``); checks the data."""
        from nbalex import checkpoint
        from nbalex.io.dataset import H5Dataset
        path = out / CHECKPOINT
        state = None
        if resume:
            if not path.exists():
                raise ValueError(f"nothing to resume: {path} does not exist")
            state = checkpoint.load(path)
            extra = state.get("extra") or {}
            if "run" not in extra:
                raise ValueError(f"{path} was not written by `nbalex train`; cannot resume it")
            record = json.loads(_extra_text(extra["run"]))
            given = dict(given or {})
            _check_same_model(given.pop("model", None), state["config_text"], path)
            settings = Settings(**record["settings"]).merged(given)
            config = state["config_text"]
        else:
            if path.exists():
                raise ValueError(f"{out} already holds a run; pass --resume to continue it "
                                 f"or choose another --out")
            record = {"history": [], "epoch_totals": _fresh_epoch(), "schedule": None}
            config = settings.model
        net = runtime.build_net(config, backend, settings.batch_size, gpus, settings.seed)
        with H5Dataset(data) as train_set, H5Dataset(val) as val_set:
            runtime.check_data(net, train_set, data)
            runtime.check_data(net, val_set, val, classes=train_set.classes)
            classes = [str(c) for c in train_set.classes]
            mean = np.asarray(train_set.mean, dtype=np.float32)
        if state is not None:
            net.load_params(state["params"])
            net.load_momentum(state["momentum"])
        out.mkdir(parents=True, exist_ok=True)
        _write_log(out / LOG, record["history"])
        (out / "model.toml").write_text(net.config_text)
        return cls(out, net, settings, state, record, classes, mean, epochs)

    def save(self):
        """Write the checkpoint at the current position (atomic)."""
        from nbalex import checkpoint
        record = {"settings": dataclasses.asdict(self.settings), "history": self.history,
                  "epoch_totals": self.totals, "schedule": self.schedule.state_dict()}
        extra = {"run": json.dumps(record), "classes": self.classes, "mean": self.mean}
        checkpoint.save(self.path, self.net, epoch=self.epoch, step=self.step, lr=self.lr,
                        seed=self.settings.seed,
                        loader_state={"epoch": self.epoch, "batch": self.step}, extra=extra)

    def finish_epoch(self, scores):
        """Log the finished epoch, step the schedule, save, redraw the plots; returns the row."""
        from nbalex import plots
        t = self.totals
        row = {"epoch": self.epoch + 1, "lr": self.lr,
               "train_loss": t["loss_sum"] / max(t["images"], 1),
               "val_loss": scores["loss"], "top1_error": scores["top1_error"],
               "top5_error": scores["top5_error"],
               "images_per_s": t["images"] / max(t["train_seconds"], 1e-9),
               "seconds": t["seconds"]}
        self.history.append(row)
        self.lr = float(self.schedule.step(row["top1_error"]))
        self.epoch, self.step, self.totals = self.epoch + 1, 0, _fresh_epoch()
        self.save()
        _append_log(self.out / LOG, row)
        plots.plot_curves(self.history, self.out / "curves.png")
        weights = _first_conv_weight(self.net)
        if weights is not None:
            plots.plot_filters(weights, self.out / "filters.png")
        return row


def _train_epoch(net, loader, run, steps, stop, progress, desc):
    """Run steps ``run.step .. steps-1`` of ``run.epoch``, advancing ``run.step`` after each.

    Stops early when ``stop()`` becomes true between steps.
    """
    settings, epoch = run.settings, run.epoch
    with runtime.progress_bar(progress, steps, desc, initial=run.step) as bar:
        tick = time.perf_counter()
        for x, labels in loader.epoch(epoch, start_batch=run.step):
            loss = float(net.forward_backward(x, labels, train=True,
                                              seed=step_seed(settings.seed, epoch, run.step)))
            if not math.isfinite(loss):
                raise Diverged(f"the training loss became {loss} at epoch {epoch + 1}, "
                               f"step {run.step + 1}")
            net.sgd_step(run.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
            run.step += 1
            run.totals["loss_sum"] += loss * len(labels)
            run.totals["images"] += len(labels)
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{len(labels) / max(now - tick, 1e-9):.0f}",
                            refresh=False)
            bar.update(1)
            tick = now
            stop.count_step()
            if stop():
                break


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


# ----------------------------------------------------------------------------- schedule
MAX_REDUCTIONS = 3     # the paper divided the rate by 10 three times


def make_schedule(settings, state=None, epochs=90):
    """The learning-rate schedule of ``settings`` (from ``state`` when resuming).

    ``plateau``: the paper's rule, lr/10 after an epoch whose validation top-1 error is no
    better than the best so far, at most three times (then the rate stays).  ``step``:
    lr/10 every ``step_epochs`` epochs of the ``epochs`` the run is asked for.
    """
    from nbalex import optim
    if settings.schedule == "plateau":
        schedule = optim.ReduceOnPlateau(settings.lr, factor=0.1, patience=1,
                                         max_reductions=MAX_REDUCTIONS)
        if state is not None:
            schedule.load_state_dict(state)
    elif settings.schedule == "step":
        every = settings.step_epochs
        schedule = optim.StepSchedule(settings.lr, milestones=range(every, epochs, every))
        if state is not None:   # the milestones follow --epochs, which may grow on resume
            schedule.epoch = int(state["epoch"])
    else:
        raise ValueError(f"unknown schedule {settings.schedule!r}: choose plateau or step")
    return schedule
