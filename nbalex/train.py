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

Ctrl-C does not kill a step half-way: the first SIGINT (or SIGTERM, SIGHUP, SIGUSR1: what
``timeout``, Slurm and ``docker stop`` send) asks the loop to stop after the current step
(or validation batch), the position is saved and :class:`Interrupted` is raised; a second
one stops at once without saving (:class:`Quit`, whose message says what the checkpoint
holds).

Under ``mpiexec -n N`` (or ``srun``) the run is synchronous data-parallel SGD over N ranks
(:mod:`nbalex.parallel_run`): ``--batch-size`` is the global batch, each rank trains on its
equal share of it with the global batch's draws, the gradients are averaged after backward,
every stop decision is agreed at a step boundary and rank 0 alone writes the run folder.

A run is checked on resume: the checkpoint records the training and validation data's
fingerprints (refused when they differ), the config (sized to the data: an output layer
with ``outputs = "classes"`` takes the training data's class count), and the backend and
thread count (a warning when they differ: the run continues, not bit for bit).  A step
whose update leaves a parameter NaN or infinite (``Net.sgd_step`` returns False), or a
non-finite loss, stops the run with :class:`Diverged`; no non-finite checkpoint is written.
"""

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from nbalex import inference, runtime
from nbalex.parallel_run import Ranks
from nbalex.runtime import check_same_model as _check_same_model, epoch_line as _epoch_line
from nbalex.optim import make_schedule
from nbalex.runtime import STOP_SIGNALS, StopRequest  # noqa: F401  (part of this module's interface)
from nbalex.backends import mix32

CHECKPOINT = "checkpoint.h5"
LOG = "log.jsonl"


RETRY = "Start a new --out folder with a lower --lr"   # --resume keeps the run's --lr


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C or a stop signal) after saving its position.

    ``exit_code`` is the shell's for that signal (128 + its number: 130 for Ctrl-C).
    """

    def __init__(self, path, epoch, step, signum=signal.SIGINT):
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}; position saved to "
                         f"{path} (continue with --resume)")
        self.path, self.epoch, self.step = path, epoch, step
        self.exit_code = 128 + int(signum)


class Quit(Exception):
    """A second stop request: training quit at once; the message says what was saved."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


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

    def check(self):
        """Raise ValueError when a setting cannot start a run (e.g. a NaN learning rate)."""
        for name, low in (("lr", None), ("momentum", 0.0), ("weight_decay", 0.0)):
            value = getattr(self, name)
            if not math.isfinite(value) or (low is None and value <= 0) or \
                    (low is not None and value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number "
                                 f"{'> 0' if low is None else '>= 0'}, got {value}")
        return self

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


# ------------------------------------------------------------------------------ training
def _fresh_epoch():
    """Running totals of the epoch in progress (kept in the checkpoint across a resume)."""
    return {"loss_sum": 0.0, "images": 0, "train_seconds": 0.0, "seconds": 0.0}


def _stderr(message):
    print(message, file=sys.stderr)


def train(data, val, out, settings, epochs, *, backend="auto", gpus=(0,), resume=False,
          given=None, workers=2, progress=True, stop_after_steps=None, report=_stderr,
          world=None, gpus_given=False):
    """Train (or, with ``resume``, continue training) a network; returns a summary dict.

    ``settings`` (:class:`Settings`) is used for a new run; on resume the checkpoint's
    settings are used and ``given`` (the options the user passed) must agree with them.
    Raises :class:`Interrupted` after a stop signal (position saved), :class:`Quit` after a
    second one, :class:`Diverged` when the loss or a parameter stops being finite (last
    good checkpoint kept), ValueError on unusable inputs.  ``world``: the process group
    (default :func:`nbalex.distributed.world.init`: a world of one outside a launcher).
    """
    from nbalex.io.loader import Loader
    from nbalex.backends import resolve
    from nbalex.distributed import world as process_group

    backend = resolve(backend)
    ranks = Ranks(world if world is not None else process_group.init())
    report, progress = ranks.report(report), progress and ranks.is_root
    gpus = ranks.gpus(gpus, backend, gpus_given)
    run = _Run.start(data, val, Path(out), settings, epochs, given, resume, backend, gpus, report,
                     ranks)
    net, settings = run.net, run.settings
    if run.epoch >= epochs:
        report(f"nothing to do: {out} already holds {run.epoch} epochs (--epochs {epochs})")
        return {"epochs": run.epoch, "history": run.history, "checkpoint": str(run.path)}
    loader_args = dict(backend=backend, seed=settings.seed, workers=workers,
                       tower=runtime.loader_tower(net), shard=ranks.shard())
    with Loader(data, settings.batch_size, net.input_size, train=True, **loader_args) as train_loader, \
            Loader(val, settings.batch_size, net.input_size, train=False, view="center",
                   drop_last=False, mean=train_loader.mean, **loader_args) as val_loader, \
            StopRequest(stop_after_steps) as stop:
        steps = train_loader.batches_per_epoch
        report(f"{'resuming' if resume else 'training'} {net.name} ({net.num_params():,} "
               f"parameters{run.sized_note}, backend {backend}) at epoch {run.epoch + 1}, step "
               f"{run.step} of {steps}; batch {settings.batch_size}"
               f"{f' over {ranks.size} ranks' if ranks.size > 1 else ''}, lr {run.lr:g}; "
               f"run folder {out}")
        run.sync = ranks.grad_sync(net)
        try:
            while run.epoch < epochs:
                if ranks.any(stop()):   # a stop request while the last epoch was being saved
                    stop.adopt()
                    raise Interrupted(run.path, run.epoch, run.step, stop.signum)
                _run_epoch(run, net, train_loader, val_loader, steps, stop, progress, epochs, report)
        except KeyboardInterrupt:
            if stop.forced:   # a second request: quit without saving, say what is on disk
                raise Quit(f"quit at once without saving; {run.saved_text()}", stop.signum) from None
            raise
    return {"epochs": run.epoch, "history": run.history, "checkpoint": str(run.path)}


def _run_epoch(run, net, train_loader, val_loader, steps, stop, progress, epochs, report):
    """Train and validate one epoch (or its rest), then log and save it; a stop request
    saves the position and raises Interrupted, divergence raises Diverged (the checkpoint
    on disk is the last good one: a save of non-finite parameters is refused)."""
    from nbalex.checkpoint import NonFiniteParameters
    from nbalex.inference import NonFiniteOutputs
    started = time.perf_counter()
    try:
        try:
            _train_epoch(net, train_loader, run, steps, stop, progress,
                         f"epoch {run.epoch + 1}/{epochs}")
            run.totals["train_seconds"] += time.perf_counter() - started
            stopping = run.ranks.any(stop())
            if stopping:
                stop.adopt()
            scores = None if stopping else inference.evaluate(
                net, val_loader, should_stop=stop, progress=progress,
                desc=f"validate {run.epoch + 1}", world=run.ranks.world)
            if scores is None:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            if stop.forced:
                raise
            run.totals["seconds"] += time.perf_counter() - started
            run.save()
            raise Interrupted(run.path, run.epoch, run.step, stop.signum) from None
        except Diverged:
            raise
        except Exception:
            if not stop():
                raise
            # a stop signal sent to the whole process group reaches the loader's reader
            # processes too; when fetching the next batch fails after a stop request, the
            # finished steps are still saved.
            run.save()
            raise Interrupted(run.path, run.epoch, run.step, stop.signum) from None
        run.totals["seconds"] += time.perf_counter() - started
        report(_epoch_line(run.finish_epoch(scores), epochs))
    except NonFiniteOutputs as exc:
        raise Diverged(f"validation after epoch {run.epoch + 1}: {exc}; stopped, "
                       f"{run.saved_text()}. {RETRY}") from None
    except (Diverged, NonFiniteParameters) as exc:
        raise Diverged(f"{exc}; stopped, {run.saved_text()}. {RETRY}") from None


class _Run:
    """A run folder's state: the network, settings, position, schedule and history."""

    def __init__(self, out, net, settings, state, record, data, ranks):
        self.out, self.path, self.net, self.settings = out, out / CHECKPOINT, net, settings
        self.ranks, self.sync = ranks, None
        self.classes, self.mean, self.record = data["classes"], data["mean"], record
        self.history, self.totals = record["history"], record["epoch_totals"]
        self.schedule = make_schedule(settings, record["schedule"])
        self.lr = float(state["lr"]) if state else settings.lr
        if state and settings.schedule == "step":   # a function of the epoch alone
            self.lr = float(self.schedule.lr)
        self.epoch, self.step = (int(state["epoch"]), int(state["step"])) if state else (0, 0)
        self.saved = (self.epoch, self.step) if state else None
        self.sized_note = data["sized_note"]

    @classmethod
    def start(cls, data, val, out, settings, epochs, given, resume, backend, gpus, report, ranks):
        """A new run in ``out``, or the one saved there (``resume``); checks the data (its
        fingerprints against the checkpoint's on resume) and sizes the model to it.  Every
        rank reads the checkpoint; rank 0 alone writes the run folder."""
        from nbalex import checkpoint
        from nbalex.config import follows_data, sized_to
        from nbalex.io.dataset import H5Dataset
        path = out / CHECKPOINT
        state = None
        with H5Dataset(data) as train_set, H5Dataset(val) as val_set:
            found = {"classes": [str(c) for c in train_set.classes],
                     "mean": np.asarray(train_set.mean, dtype=np.float32),
                     "train": runtime.data_fingerprint(train_set, data),
                     "val": runtime.data_fingerprint(val_set, val)}
            if resume:
                if not path.exists():
                    raise ValueError(f"nothing to resume: {path} does not exist")
                state = checkpoint.load(path, warn=report)
                extra = state.get("extra") or {}
                if "run" not in extra:
                    raise ValueError(f"{path} was not written by `nbalex train`; cannot resume it")
                record = json.loads(runtime.extra_text(extra["run"]))
                given = dict(given or {})
                stored_classes = len(extra.get("classes") or found["classes"])
                _check_same_model(given.pop("model", None), state["config_text"], path,
                                  stored_classes)
                settings = Settings(**record["settings"]).merged(given)
                runtime.check_same_data(record.get("data"), found, report)
                runtime.check_same_host(record.get("host"), backend, report)
                ranks.check_same_ranks(record.get("ranks"), report)
                config = state["config_text"]
            else:
                if path.exists():
                    raise ValueError(f"{out} already holds a run; pass --resume to continue it "
                                     f"or choose another --out")
                settings.check()
                record = {"history": [], "epoch_totals": _fresh_epoch(), "schedule": None}
                config = sized_to(settings.model, len(found["classes"]))
            local = ranks.local_batch(settings.batch_size)
            net = runtime.build_net(config, backend, local, gpus, settings.seed)
            runtime.check_data(net, train_set, data)
            runtime.check_data(net, val_set, val, classes=train_set.classes)
        record.update(data={"train": found["train"], "val": found["val"]},
                      host=runtime.host_signature(backend), ranks=ranks.size)
        found["sized_note"] = (f", {net.layers[-1].name} sized to {net.num_classes} classes"
                               if follows_data(net.config_text) else "")
        if state is not None:
            net.load_params(state["params"])
            net.load_momentum(state["momentum"])
        if ranks.is_root:
            out.mkdir(parents=True, exist_ok=True)
            runtime.write_log(out / LOG, record["history"])
            (out / "model.toml").write_text(net.config_text)
        return cls(out, net, settings, state, record, found, ranks)

    def save(self):
        """Write the checkpoint at the current position (atomic); remember it as saved.

        Every rank calls it: the parameters' crc32 is compared across ranks first (drift
        raises DriftError on every rank), then rank 0 writes."""
        from nbalex import checkpoint
        crc = self.ranks.check_params(self.net)
        self.saved = (self.epoch, self.step)
        if not self.ranks.is_root:
            return
        record = {**self.record, "params_crc32": crc, "settings": dataclasses.asdict(self.settings),
                  "history": self.history, "epoch_totals": self.totals,
                  "schedule": self.schedule.state_dict()}
        extra = {"run": json.dumps(record), "classes": self.classes, "mean": self.mean}
        checkpoint.save(self.path, self.net, epoch=self.epoch, step=self.step, lr=self.lr,
                        seed=self.settings.seed,
                        loader_state={"epoch": self.epoch, "batch": self.step}, extra=extra)

    def saved_text(self):
        """What the run folder holds, in words (for the messages of a stopped run)."""
        if self.saved is None:
            return "no checkpoint was written"
        epoch, step = self.saved
        where = f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
        return f"the last good checkpoint {self.path} is kept (at {where}; --resume continues from there)"

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
        if not self.ranks.is_root:
            return row
        runtime.append_log(self.out / LOG, row)
        plots.plot_curves(self.history, self.out / "curves.png")
        weights = runtime.first_conv_weight(self.net)
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
                                              seed=step_seed(settings.seed, epoch, run.step),
                                              batch_offset=loader.share(run.step)[0],
                                              grad_sync=run.sync))
            if run.sync is not None:
                run.sync.wait()     # the gradients are the global batch's mean on every rank
            finite = net.sgd_step(run.lr, momentum=settings.momentum,
                                  weight_decay=settings.weight_decay)
            stop.count_step()
            # agreed by every rank (a world of one: these values): the global batch's loss,
            # a non-finite update anywhere, a stop request anywhere
            loss, images, bad, stopping = run.ranks.agree_step(loss, len(labels),
                                                               finite is False, stop())
            if not math.isfinite(loss):
                raise Diverged(f"the training loss became {loss} at epoch {epoch + 1}, "
                               f"step {run.step + 1}")
            if bad:   # finite None: the backend cannot tell (the save checks later)
                raise Diverged(f"a parameter became NaN or infinite at epoch {epoch + 1}, "
                               f"step {run.step + 1}")
            run.step += 1
            run.totals["loss_sum"] += loss * images
            run.totals["images"] += images
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images / max(now - tick, 1e-9):.0f}",
                            refresh=False)
            bar.update(1)
            tick = now
            if stopping:
                stop.adopt()
                break
