"""Learning-rate schedules.  The update itself is a kernel of each backend (``sgd_update``).

Both schedules are stepped once per epoch, after validation, and say the learning rate of
the next epoch; both save and restore their state (for checkpoints)::

    schedule = ReduceOnPlateau(lr=0.01)            # the paper's rule
    for epoch in range(epochs):
        train_one_epoch(lr=schedule.lr)
        schedule.step(val_error)                   # divides lr by 10 when val_error stalls
        if schedule.finished: break

The paper (section 5): "The heuristic which we followed was to divide the learning rate by
10 when the validation error rate stopped improving with the current learning rate.  The
learning rate was initialized at 0.01 and reduced three times prior to termination."
"""


class ReduceOnPlateau:
    """Divide the learning rate by ``1/factor`` when the validation error stops improving.

    An epoch *improves* when its error is below ``best - threshold``.  After ``patience``
    epochs in a row without improvement the rate is multiplied by ``factor`` (at most
    ``max_reductions`` times); ``finished`` turns true when the rate can fall no further
    and the error has stalled again for ``patience`` epochs.
    """

    def __init__(self, lr=0.01, factor=0.1, patience=1, max_reductions=3, threshold=0.0):
        if lr <= 0 or not 0 < factor < 1 or patience < 1 or max_reductions < 0 or threshold < 0:
            raise ValueError("need lr > 0, 0 < factor < 1, patience >= 1, max_reductions >= 0, threshold >= 0")
        self.lr = float(lr)
        self.factor = float(factor)
        self.patience = int(patience)
        self.max_reductions = int(max_reductions)
        self.threshold = float(threshold)
        self.best = None
        self.stale = 0          # epochs since the last improvement (or reduction)
        self.reductions = 0
        self.finished = False

    def step(self, val_error):
        """Record one epoch's validation error; returns the learning rate for the next epoch."""
        val_error = float(val_error)
        if self.best is None or val_error < self.best - self.threshold:
            self.best = val_error
            self.stale = 0
            return self.lr
        self.stale += 1
        if self.stale >= self.patience:
            self.stale = 0
            if self.reductions < self.max_reductions:
                self.lr *= self.factor
                self.reductions += 1
            else:
                self.finished = True
        return self.lr

    def state_dict(self):
        keys = ("lr", "factor", "patience", "max_reductions", "threshold", "best", "stale",
                "reductions", "finished")
        return {"kind": "plateau", **{k: getattr(self, k) for k in keys}}

    def load_state_dict(self, state):
        for key, value in state.items():
            if key != "kind":
                setattr(self, key, value)


class StepSchedule:
    """A fixed schedule: ``lr * factor**k`` after the k-th milestone epoch has passed.

    ``StepSchedule(0.01, milestones=(30, 60, 80))`` divides by 10 at epochs 30, 60 and 80;
    ``StepSchedule(0.01, every=30)`` at every multiple of 30, however long the run becomes
    (so a run extended with ``--resume`` keeps the drop due where the old run ended).
    Epochs count from 0; the rate of epoch e is ``lr_at(e)``.
    """

    def __init__(self, lr=0.01, milestones=(), factor=0.1, every=None):
        if lr <= 0 or not 0 < factor <= 1 or (every is not None and int(every) < 1):
            raise ValueError("need lr > 0, 0 < factor <= 1 and every >= 1")
        self.base_lr = float(lr)
        self.milestones = tuple(sorted(int(m) for m in milestones))
        self.every = None if every is None else int(every)
        self.factor = float(factor)
        self.epoch = 0
        self.finished = False

    def lr_at(self, epoch):
        passed = sum(1 for m in self.milestones if epoch >= m)
        if self.every is not None:
            passed += epoch // self.every
        return self.base_lr * self.factor ** passed

    @property
    def lr(self):
        return self.lr_at(self.epoch)

    def step(self, val_error=None):
        """Advance one epoch (the error is ignored); returns the learning rate for the next."""
        self.epoch += 1
        return self.lr

    def state_dict(self):
        return {"kind": "step", "base_lr": self.base_lr, "milestones": list(self.milestones),
                "every": self.every, "factor": self.factor, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.base_lr = float(state["base_lr"])
        self.milestones = tuple(state["milestones"])
        self.every = state.get("every")
        self.factor = float(state["factor"])
        self.epoch = int(state["epoch"])


def schedule_from_state(state):
    """Rebuild a schedule from its ``state_dict()``."""
    schedule = {"plateau": ReduceOnPlateau, "step": StepSchedule}[state["kind"]]()
    schedule.load_state_dict(state)
    return schedule


MAX_REDUCTIONS = 3     # the paper divided the rate by 10 three times


def make_schedule(settings, state=None):
    """The schedule a run's settings ask for (``settings.schedule``, ``.lr``,
    ``.step_epochs``), from ``state`` when resuming.

    ``plateau``: the paper's rule, lr/10 after an epoch whose validation top-1 error is no
    better than the best so far, at most three times (then the rate stays).  ``step``:
    lr/10 at every multiple of ``step_epochs`` epochs, whatever ``--epochs`` says (a run
    extended with ``--resume`` keeps the drop due where it ended).
    """
    if settings.schedule == "plateau":
        schedule = ReduceOnPlateau(settings.lr, factor=0.1, patience=1,
                                   max_reductions=MAX_REDUCTIONS)
        if state is not None:
            schedule.load_state_dict(state)
    elif settings.schedule == "step":
        schedule = StepSchedule(settings.lr, every=settings.step_epochs)
        if state is not None:
            schedule.epoch = int(state["epoch"])
    else:
        raise ValueError(f"unknown schedule {settings.schedule!r}: choose plateau or step")
    return schedule
