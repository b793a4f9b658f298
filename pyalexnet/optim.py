"""The paper's SGD (Krizhevsky et al. 2012, section 5) and its learning-rate schedules.

    v <- momentum * v - weight_decay * lr * w - lr * dL/dw ;  w <- w + v

``step()`` applies it to every parameter (one kernel launch per tensor) with the current ``lr``;
``end_epoch(validation_error)`` lets the schedule change ``lr``. Schedules are small classes whose whole state
is plain data (``state()`` / ``from_state``), so a checkpoint restores them exactly.
"""

from __future__ import annotations

import math

from . import _backend
from . import _checks as check


class Constant:
    """lr never changes."""

    def next_lr(self, lr: float, epoch: int, validation_error: float | None) -> float:
        return lr

    def state(self) -> dict:
        return {"kind": "constant"}


class StepDecay:
    """lr is multiplied by `factor` every `every` epochs."""

    def __init__(self, every: int, factor: float = 0.1):
        self.every = check.positive_int(every, "every")
        self.factor = check.positive_finite(factor, "factor")

    def next_lr(self, lr: float, epoch: int, validation_error: float | None) -> float:
        return lr * self.factor if epoch % self.every == 0 else lr

    def state(self) -> dict:
        return {"kind": "step", "every": self.every, "factor": self.factor}


class Plateau:
    """The paper's schedule with PyTorch's ReduceLROnPlateau knobs: multiply lr by `factor` (0.1) when the
    validation error has gone `patience` epochs in a row without a new best, at most `max_reductions` times (the
    paper reduced it three times).

    An epoch is a new best when its error is below best * (1 - threshold) (threshold_mode "rel") or below
    best - threshold ("abs"). As in PyTorch, lr drops when more than `patience` epochs in a row were not a new
    best (patience=0: at the first one), and for `cooldown` epochs after a reduction bad epochs are not counted.

    Defaults: patience 4, threshold 1e-4 relative, no cooldown. A validation error moves from epoch to epoch by
    training noise alone, and on a small validation set by whole images (1/60 per image on the demo's 60):
    reducing at the first bad epoch (this class's old rule) lowers the rate at the first such wobble. PyTorch's
    patience 10 is made for open-ended runs: with the paper's 90 epochs and three reductions it would spend over
    a third of the run waiting. Four lets four noisy epochs pass and still leaves room for three reductions near
    the paper's ~30-epoch steps. The threshold is PyTorch's: it keeps a rounding-level change from counting as
    progress.
    """

    MODES = ("rel", "abs")

    def __init__(self, patience: int = 4, factor: float = 0.1, max_reductions: int = 3, threshold: float = 1e-4,
                 threshold_mode: str = "rel", cooldown: int = 0):
        self.patience = check.nonnegative_int(patience, "patience")
        self.factor = check.positive_finite(factor, "factor")
        if self.factor >= 1:
            raise ValueError(f"factor: expected a value < 1 (it lowers the rate), got {factor!r}")
        self.max_reductions = check.nonnegative_int(max_reductions, "max_reductions")
        self.threshold = check.nonnegative_finite(threshold, "threshold")
        if threshold_mode not in self.MODES:
            raise ValueError(f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        if threshold_mode == "rel" and self.threshold >= 1:
            raise ValueError(f"threshold: a relative threshold must be < 1, got {threshold!r}")
        self.threshold_mode = threshold_mode
        self.cooldown = check.nonnegative_int(cooldown, "cooldown")
        self.best = math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0
        self.reductions = 0

    def improves(self, error: float) -> bool:
        """Whether `error` counts as a new best."""
        if self.threshold_mode == "rel":
            return error < self.best * (1 - self.threshold)
        return error < self.best - self.threshold

    def next_lr(self, lr: float, epoch: int, validation_error: float | None) -> float:
        if validation_error is None or not math.isfinite(validation_error):
            raise ValueError(f"validation_error: the plateau schedule needs each epoch's (finite) validation error, "
                             f"got {validation_error!r}")
        if self.improves(validation_error):
            self.best, self.bad_epochs = float(validation_error), 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience and self.reductions < self.max_reductions:
            self.bad_epochs, self.cooldown_left = 0, self.cooldown
            self.reductions += 1
            return lr * self.factor
        return lr

    def state(self) -> dict:
        return {"kind": "plateau", "patience": self.patience, "factor": self.factor,
                "max_reductions": self.max_reductions, "threshold": self.threshold,
                "threshold_mode": self.threshold_mode, "cooldown": self.cooldown, "best": self.best,
                "bad_epochs": self.bad_epochs, "cooldown_left": self.cooldown_left, "reductions": self.reductions}


def schedule_from_state(state: dict):
    kind = state.get("kind")
    if kind == "constant":
        return Constant()
    if kind == "step":
        return StepDecay(state["every"], state["factor"])
    if kind == "plateau":
        if "threshold_mode" in state:
            s = Plateau(state["patience"], state["factor"], state["max_reductions"], state["threshold"],
                        state["threshold_mode"], state["cooldown"])
            s.cooldown_left = int(state["cooldown_left"])
        else:  # written before the knobs: any decrease was a new best, no cooldown, and the reduction came
            # after `patience` bad epochs (PyTorch's patience - 1)
            s = Plateau(state["patience"] - 1, state["factor"], state["max_reductions"], 0.0, "abs", 0)
        s.best, s.bad_epochs, s.reductions = float(state["best"]), int(state["bad_epochs"]), int(state["reductions"])
        return s
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


class SGD:
    """SGD with momentum and weight decay, the paper's rule, over every parameter of `net`."""

    def __init__(self, net, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, schedule=None):
        self.net = net
        self.lr = check.positive_finite(lr, "lr")
        self.momentum = check.unit_interval(momentum, "momentum")
        self.weight_decay = check.nonnegative_finite(weight_decay, "weight_decay")
        self.schedule = schedule if schedule is not None else Constant()
        if not hasattr(self.schedule, "next_lr"):
            raise TypeError("schedule: expected Constant(), StepDecay(...) or Plateau(...)")
        xp = _backend.active.xp
        self.velocity = {k: xp.zeros_like(p) for k, p in net.parameters().items()}
        self.steps = 0
        self.epochs = 0

    def step(self) -> None:
        """One update of every parameter from net.gradients(), in one launch (kernels/sgd.cu, sgd_update_many)."""
        be = _backend.active
        grads, params = self.net.gradients(), self.net.parameters()
        keys = list(params)
        be.module.sgd_update_many([params[k] for k in keys], [grads[k] for k in keys], [self.velocity[k] for k in keys],
                                  self.lr, self.momentum, self.weight_decay, stream=be.stream())
        self.steps += 1

    def end_epoch(self, validation_error: float | None = None) -> float:
        """Counts an epoch and lets the schedule set the learning rate; returns it."""
        lr = check.positive_finite(self.schedule.next_lr(self.lr, self.epochs + 1, validation_error), "lr")
        self.epochs, self.lr = self.epochs + 1, lr  # only once the schedule has accepted the epoch
        return self.lr
