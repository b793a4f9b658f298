"""Training and evaluation from a prepared dataset (pyalexnet.data): what `pyalexnet train` and `eval` run
(inference from a checkpoint alone, `predict` and `show-filters`, is pyalexnet.infer).

Training follows the paper (section 5): batch 128, SGD with momentum 0.9 and weight decay 5e-4, lr 0.01 divided
by 10 when the validation error stops improving (at most three times; optim.Plateau) or on a fixed step schedule,
random 224/227 crops, flips and PCA colour shifts (each can be switched off). Checkpoints (pyalexnet.checkpoint,
atomic, with the preprocessing that predict needs) go to OUT/last.npz every N steps and at each epoch's end, and to OUT/best.npz when the validation error
improves; each holds the position in the data (epoch, batch), so a resumed run continues exactly where the
interrupted one stopped. A folder that already holds a run is never trained into by accident: continue it with
`resume`, or start over with `overwrite`.

OUT/log.jsonl gets one JSON object per line, each with "kind", "step" and "time" (ISO 8601, UTC): first "config"
(every argument of the call, the resolved scale and crop, the backend, pyalexnet's version), then "step" (every
`log_every` steps: loss, lr, images/s of the window), "epoch" (validation errors, the next lr), "resume" (a later
call continuing the run), "diverged" and "end" (what the call did: its steps, seconds, last loss). OUT/curves.png
plots it (matplotlib, else Pillow) at each epoch's end and whenever a call ends, however it ends; OUT/tb/ gets
TensorBoard scalars when torch.utils.tensorboard or tensorboardX can be imported.

The input scale: the kernels see (pixel - mean) * scale. The paper's init (N(0, 0.01) weights) was made for raw
0-255 pixels (scale 1); He's init expects inputs of unit variance, and with scale 1 its activations grow by the
pixels' standard deviation (~60) per layer and the loss diverges within a few steps. scale=None picks 1 for init
"paper" and 1 / (2 x the training pixels' standard deviation, from the dataset's colour PCA) for "kaiming": inputs
of standard deviation 1/2, because the torchvision variant (three max-pools, no LRN) at unit variance overshot on
its second step (loss 5.7 -> 11.8 at batch 16, tests/test_train_ux.py) while at 1/2 every seed tried stayed below
2.5 x ln(classes).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import pyalexnet as pa
from . import _backend
from . import _checks as check
from ._files import atomic_write
from .checkpoint import Preprocess
from .data import BatchLoader, Dataset, eval_draws
from .optim import SGD, Plateau, StepDecay

INPUT_BOUND_SHARE = 0.05
"""Above this share of an epoch spent waiting for input, train() says the run is input-bound."""


def wait_share(waited: float, elapsed: float) -> float:
    return min(max(waited / elapsed, 0.0), 1.0) if elapsed > 0 else 0.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is untouched."""


def _device(a):
    return _backend.active.xp.asarray(a)


def _softmax(logits) -> np.ndarray:
    z = np.asarray(pa.to_numpy(logits), np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class _StopRequest:
    """SIGINT (Ctrl-C) during training: the first asks to stop at the end of the current step, with a checkpoint;
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.installed = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
            self.installed = True
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            pass
        return self

    def __exit__(self, *exc):
        if self.installed:
            # None: the previous handler was installed from C, which Python cannot reinstate; the default will do.
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
        return False




# ---- the curves: matplotlib, else Pillow ----------------------------------------------------------------------------
def _curves(log_path):
    """(steps, epochs) from the JSONL log: [(step, loss)] and [(step at the epoch's end, top-1, top-5)]."""
    steps, epochs = [], []
    for line in Path(log_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if rec.get("kind") == "step":
            steps.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "epoch" and rec.get("val_top1_error") is not None:
            epochs.append((rec["step"], rec["val_top1_error"], rec["val_top5_error"]))
    return steps, epochs


_warned_without_matplotlib = False


def plot_curves(log_path, png_path, log_scale: bool = False) -> None:
    """Training loss per logged step (left; a log scale with `log_scale`) and validation top-1/top-5 error at
    each epoch's end (right), on the same step axis, from the JSONL log. Draws with matplotlib (Agg, no window,
    the caller's pyplot state untouched); without it, with Pillow (plainer, no log scale), warning once."""
    global _warned_without_matplotlib
    steps, epochs = _curves(log_path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_without_matplotlib:
            _warned_without_matplotlib = True
            warnings.warn("matplotlib is not installed: curves.png is drawn with Pillow, without axes' ticks or a "
                          "log scale (pip install matplotlib)", RuntimeWarning, stacklevel=2)
        _plot_curves_pillow(steps, epochs, png_path)
        return
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, err_ax = fig.subplots(1, 2, sharex=True)
    points = [(s, y) for s, y in steps if math.isfinite(y) and (y > 0 or not log_scale)]
    if points:
        loss_ax.plot(*zip(*points), color="tab:blue", lw=1.2, label="training loss (logged steps)")
        loss_ax.legend(loc="upper right")
    else:
        loss_ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=loss_ax.transAxes)
    if log_scale:
        loss_ax.set_yscale("log")
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy" + (" (log scale)" if log_scale else ""))
    if epochs:
        s, e1, e5 = zip(*epochs)
        err_ax.plot(s, e1, "o-", color="tab:red", label="top-1")
        err_ax.plot(s, e5, "s-", color="tab:green", label="top-5")
        err_ax.legend(loc="upper right")
    else:
        err_ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center", transform=err_ax.transAxes)
    err_ax.set(title="validation error (centre crop, at each epoch's end)", xlabel="step", ylabel="error",
               ylim=(0, 1))
    for ax in (loss_ax, err_ax):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))


def _plot_curves_pillow(steps, epochs, png_path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 900, 360, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    xs = [x for x, _ in steps] + [x for x, _, _ in epochs]  # one step axis for both panels
    xmin, xmax = (min(xs), max(max(xs), min(xs) + 1)) if xs else (0, 1)

    def panel(x0, title, series, ymax):
        x1 = x0 + w // 2 - pad - 10
        d.rectangle((x0, pad, x1, h - pad), outline="black")
        d.text((x0, 15), title, fill="black")
        if not any(points for _, points in series):
            d.text((x0 + 10, h // 2), "no data yet", fill="gray")
            return
        d.text((x0 - 45, pad - 6), f"{ymax:.3g}", fill="black")
        d.text((x0 - 20, h - pad - 6), "0", fill="black")
        d.text((x0, h - pad + 8), f"step {xmin}", fill="black")
        d.text((x1 - 60, h - pad + 8), f"step {xmax}", fill="black")
        for colour, points in series:
            pts = [(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), h - pad - min(y, ymax) / ymax * (h - 2 * pad))
                   for x, y in points if math.isfinite(y)]
            if len(pts) == 1:
                d.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
            elif pts:
                d.line(pts, fill=colour, width=2)

    losses = [y for _, y in steps if math.isfinite(y)]
    panel(pad, "training loss", [("blue", steps)], max(losses) * 1.05 if losses else 1.0)
    panel(w // 2 + pad, "validation error: top-1 (red), top-5 (green)",
          [("red", [(s, e1) for s, e1, _ in epochs]), ("green", [(s, e5) for s, _, e5 in epochs])], 1.0)
    atomic_write(png_path, lambda f: im.save(f, format="PNG"))


# ---- evaluation -----------------------------------------------------------------------------------------------------
def check_classes(extra: dict, num_classes: int, dataset: Dataset, weights) -> None:
    """Refuses to evaluate or name predictions with a dataset other than the one the checkpoint learned."""
    trained = (extra.get("train") or {}).get("classes")
    if trained is not None and trained != dataset.classes:
        raise ValueError(f"{weights}: trained on other classes than {dataset.path} has "
                         f"({len(trained)} vs {len(dataset.classes)}, first {trained[:3]} vs {dataset.classes[:3]})")
    if num_classes != len(dataset.classes):
        raise ValueError(f"{weights}: the network has {num_classes} outputs, {dataset.path} {len(dataset.classes)} "
                         "classes")


TEN_VIEWS = list(range(10))


def eval_views(extra: dict) -> list[int]:
    """The test-time views (data.eval_draws numbering) that match how a checkpoint's run trained: the paper's
    ten (centre, four corners, and their mirror images), without the mirrored ones when it trained without
    flips, and only the centre (and its mirror) when it trained on centre crops. A checkpoint that does not say
    (not written by train, or before the switches) gets all ten."""
    state = extra.get("train") or {}
    crops = [0, 1, 2, 3, 4] if state.get("random_crop", True) else [0]
    return crops + ([v + 5 for v in crops] if state.get("flip", True) else [])


def evaluate(net, dataset: Dataset, split: str = "val", batch_size: int = 128, ten_crop: bool = True, scale=1.0,
             progress: bool = False, views=None, loader_threads: int | None = None) -> dict:
    """Top-1 and top-5 error of `net` on a split: the centre crop, and with `ten_crop` the average of the softmax
    outputs over `views` (default: the paper's ten, see eval_views for a checkpoint's own). Counts as it goes:
    memory does not grow with the split. The multi-view errors are under "top1_error_10crop" and
    "top5_error_10crop" whatever the number of views; "views" lists them."""
    from tqdm import tqdm

    views = TEN_VIEWS if views is None else [check.integer(v, "views[i]", 0, 10) for v in views]
    if ten_crop and not views:
        raise ValueError("views: expected at least one view (0-9)")
    crop = net.input_size
    mean = _device(dataset.mean)
    loader = BatchLoader(dataset, split, batch_size, crop, train=False, threads=loader_threads)
    images_seen, wrong = 0, {"top1": 0, "top5": 0, "top1_10": 0, "top5_10": 0}

    def count(probs, labels, key):
        top5 = np.argsort(-probs, axis=1)[:, :5]
        wrong["top1" + key] += int(np.sum(top5[:, 0] != labels))
        wrong["top5" + key] += int(np.sum(~(top5 == labels[:, None]).any(axis=1)))

    for device_images, device_labels, params, shift in tqdm(loader.epoch(device=True), total=loader.batches_per_epoch(),
                                                            disable=not progress, desc="eval", leave=False):
        labels = pa.to_numpy(device_labels)
        centre = _softmax(net.forward(pa.ops.augment_batch(device_images, mean, params, shift, crop, scale),
                                      train=False))
        count(centre, labels, "")
        if ten_crop:
            total = np.zeros_like(centre)
            for view in views:
                if view == 0:
                    total += centre
                    continue
                p, sh = eval_draws(len(labels), dataset.size, crop, view)
                x = pa.ops.augment_batch(device_images, mean, p, sh, crop, scale)
                total += _softmax(net.forward(x, train=False))
            count(total / len(views), labels, "_10")
        images_seen += len(labels)
    n = max(images_seen, 1)
    result = {"images": images_seen, "top1_error": wrong["top1"] / n, "top5_error": wrong["top5"] / n}
    if ten_crop:
        result["top1_error_10crop"], result["top5_error_10crop"] = wrong["top1_10"] / n, wrong["top5_10"] / n
        result["views"] = list(views)
    return result


# ---- the run folder -------------------------------------------------------------------------------------------------
RUN_FILES = ("log.jsonl", "last.npz", "best.npz", "curves.png")
TB_DIR = "tb"


def _run_in(out: Path) -> list[str]:
    """The files of an earlier run in `out` that make it a run folder (curves.png alone does not)."""
    return [name for name in RUN_FILES[:3] if (out / name).exists()]


def _claim_run_folder(out: Path, resume, overwrite: bool) -> None:
    """Refuses to mix two runs in one folder; with `overwrite`, removes the old run's files first."""
    found = _run_in(out)
    inside = resume is not None and Path(resume).resolve().parent == out.resolve()
    if overwrite and inside:
        raise ValueError(f"overwrite: would delete {out} and the checkpoint it resumes from ({resume}); drop "
                         "--overwrite to continue that run")
    if found and not overwrite:
        if resume is None:
            raise ValueError(f"{out} already holds a training run ({', '.join(found)}): continue it with --resume "
                             f"{out / 'last.npz'}, start over with --overwrite (deletes it), or pick another --out")
        if not inside:
            raise ValueError(f"{out} holds another training run ({', '.join(found)}) than the one {resume} belongs "
                             "to: resume into the checkpoint's folder or an empty one, or pass --overwrite to "
                             f"delete {out}'s run first")
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        tb = out / TB_DIR
        if tb.is_dir():
            for events in tb.glob("events.out.tfevents.*"):
                events.unlink()
            if not any(tb.iterdir()):
                tb.rmdir()


def default_scale(init: str, dataset: Dataset) -> float:
    """The input scale train() uses when given scale=None: 1 for the paper's init, made for 0-255 pixels; for
    He's ("kaiming"), 1 / (2 x the training pixels' standard deviation), from the dataset's colour PCA (its
    eigenvalues are the variances along the components: their mean is the mean variance per channel): inputs of
    standard deviation 1/2 (see the module's docstring for why not 1). About 1/116 on ImageNet (channel stds
    ~57-58), 1/102 on the demo's images."""
    if init != "kaiming":
        return 1.0
    std = math.sqrt(max(float(np.mean(dataset.eigenvalues)), 0.0))
    return 0.5 / std if std >= 1.0 else 1.0  # constant images: nothing to normalise


def _switch_draws(params, shift, size: int, crop: int, flip: bool, pca: bool, random_crop: bool) -> None:
    """Undoes the augmentations switched off, in place, after the loader drew them all: the random numbers drawn
    stay the same whatever the switches, so a resumed run sees what the interrupted one would have."""
    if not random_crop:
        params[:, :2] = (size - crop) // 2
    if not flip:
        params[:, 2] = 0
    if not pca:
        shift[...] = 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class _Log:
    """OUT/log.jsonl: appends one JSON object per line, stamped with the time."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**rec, "time": _now()}, default=str) + "\n")

    def truncate_to(self, steps: int, epoch: int) -> None:
        """Keeps what the checkpoint at (`steps`, `epoch` finished epochs) has seen: records past it (written
        after the last checkpoint, before a kill) go, and so does a line cut short."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "epoch" and rec["epoch"] > epoch:
                continue
            if rec.get("kind") != "epoch" and rec.get("step", 0) > steps:
                continue
            kept.append(line)
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))


def _summary_writer():
    """TensorBoard's SummaryWriter class (torch.utils.tensorboard's, else tensorboardX's), or None. Never imports
    torch when the tensorboard package it needs is absent."""
    for module, needs in (("torch.utils.tensorboard", "tensorboard"), ("tensorboardX", "tensorboardX")):
        try:
            if sys.modules.get(needs, ...) is None or (needs not in sys.modules and importlib.util.find_spec(needs)
                                                        is None):
                continue
            return importlib.import_module(module).SummaryWriter
        except Exception:  # noqa: BLE001  (a broken optional install is no reason to stop training)
            continue
    return None


class _TensorBoard:
    """Scalars to OUT/tb/ when a SummaryWriter can be imported; otherwise does nothing."""

    def __init__(self, folder: Path, enabled: bool, first_step: int, echo):
        self.writer = None
        writer_class = _summary_writer() if enabled else None
        if writer_class is None:
            return
        try:  # purge_step: a resumed run hides the events the interrupted one wrote after its checkpoint
            self.writer = writer_class(str(folder), purge_step=first_step if first_step > 0 else None)
        except Exception as e:  # noqa: BLE001
            echo(f"warning: no TensorBoard events ({type(e).__name__}: {e})")

    def add(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- training -------------------------------------------------------------------------------------------------------
def _fits(variant: str, size: int) -> bool:
    """Whether every layer of the variant fits an input of size x size (a width-1/64 network: only geometry)."""
    try:
        pa.AlexNet(variant, num_classes=1, width=1 / 64, input_size=size)
        return True
    except ValueError:
        return False


def _new_run(dataset, variant, lr, momentum, weight_decay, schedule, step_every, width, crop, init, seed, patience,
             threshold, cooldown):
    try:
        net = pa.AlexNet(variant, num_classes=len(dataset.classes), seed=seed, width=width, input_size=crop,
                         init=init)
    except ValueError as e:
        if crop is None or "too small" not in str(e):
            raise
        smallest = next(n for n in range(crop + 1, 4 * crop + 300) if _fits(variant, n))
        raise ValueError(f"crop: {crop} x {crop} is too small for the {variant} variant's layers ({e}); the smallest "
                         f"input it takes is {smallest} x {smallest}") from None
    if schedule == "plateau":
        sched = Plateau(patience=patience, threshold=threshold, cooldown=cooldown)
    elif schedule == "step":
        sched = StepDecay(check.positive_int(step_every, "step_every"))
    elif schedule == "constant":
        sched = None
    else:
        raise ValueError(f"schedule: expected plateau, step or constant, got {schedule!r}")
    return net, SGD(net, lr, momentum, weight_decay, sched)


def _resumed_run(resume, dataset, data):
    from .checkpoint import load

    ck = load(resume)
    if ck.optimizer is None:
        raise ValueError(f"{resume}: holds no optimizer state: not a training checkpoint")
    state = ck.extra.get("train")
    if not state:
        raise ValueError(f"{resume}: not written by pyalexnet train (no training position)")
    if state["classes"] != dataset.classes:
        raise ValueError(f"{resume}: trained on other classes than {data}")
    if state.get("dataset") != dataset.identity:
        raise ValueError(f"{resume}: {data} is not the prepared dataset this run trained on (re-prepared or "
                         "another one): a resumed run would not see the same batches")
    return ck.net, ck.optimizer, state


def train(data, out, variant="paper", epochs=90, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4,
          schedule="plateau", step_every=30, patience=4, threshold=1e-4, cooldown=0, width=1.0, crop=None,
          init="paper", seed=0, scale=None, flip=True, pca=True, random_crop=True, checkpoint_every=1000,
          log_every=10, resume=None, overwrite=False, max_steps=None, log_loss=False, tensorboard=True,
          progress=True, loader_threads=None, shuffle="full", shuffle_window=8, echo=print) -> dict:
    """Trains from the prepared dataset `data` into the folder `out`; returns a summary of this call.

    `out` must not hold another run (log.jsonl, last.npz or best.npz) unless `resume` continues it or `overwrite`
    deletes it (with curves.png and TensorBoard events) first. `max_steps` stops (with a checkpoint) after that
    many steps of this call. `scale` None: see default_scale. `patience`, `threshold` (relative) and `cooldown`
    tune the plateau schedule (optim.Plateau). `flip`, `pca`, `random_crop` False switch off those augmentations
    (random_crop False: the centre crop); checkpoints record them (see eval_views). `log_loss`: curves.png's loss
    on a log scale. `loader_threads` staging threads (default data.default_threads()); `shuffle` "full" or
    "window" with `shuffle_window` shards (see data.BatchLoader). On resume the network, optimiser, batch size,
    seed, scale, augmentation switches and shuffle are the checkpoint's.

    The summary: "steps" (run by this call), "total_steps" (the optimiser's, over the whole run), "seconds"
    (this call's wall time), "images_per_s" (this call's training images over its training time, evaluation
    excluded; None without steps), "loss" (the last step's; None without steps), "epoch" and "batch" (the
    position reached), "best_val_top1_error", "stopped" (None: finished the epochs; "max_steps",
    "interrupted", or "nothing_to_do": a resumed checkpoint already at the last epoch), "data_wait" (the share of
    the training time spent waiting for input; None without steps), "scale", "out", "net", "optimizer". Raises
    TrainingDiverged on a NaN/inf loss or weights."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "echo"}
    from tqdm import tqdm

    from .checkpoint import save

    started = time.perf_counter()
    epochs = check.positive_int(epochs, "epochs")
    if max_steps is not None:
        max_steps = check.positive_int(max_steps, "max_steps")
    checkpoint_every = check.positive_int(checkpoint_every, "checkpoint_every")
    log_every = check.positive_int(log_every, "log_every")
    if scale is not None:
        scale = check.positive_finite(scale, "scale")
    dataset = Dataset(data)
    if "train" not in dataset.splits:
        raise ValueError(f"{data}: no training images")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.is_dir():
        _claim_run_folder(out, resume, overwrite)
    if resume is not None:
        net, opt, state = _resumed_run(resume, dataset, data)
        epoch, batch_index, best = state["epoch"], state["batch"], state["best"]
        seed, scale, batch_size = state["seed"], state["scale"], state["batch_size"]
        flip, pca, random_crop = state.get("flip", True), state.get("pca", True), state.get("random_crop", True)
        shuffle, shuffle_window = state.get("shuffle", "full"), state.get("shuffle_window", 8)
    else:
        net, opt = _new_run(dataset, variant, lr, momentum, weight_decay, schedule, step_every, width, crop, init,
                            seed, patience, threshold, cooldown)
        epoch, batch_index, best = 0, 0, None
        scale = default_scale(net.init, dataset) if scale is None else scale
    crop = net.input_size
    if crop > dataset.size:
        raise ValueError(f"the network's input ({crop}) is larger than the prepared images ({dataset.size}); "
                         f"prepare with --size >= {crop} or train with a smaller --crop")
    has_val = "val" in dataset.splits
    if isinstance(opt.schedule, Plateau) and not has_val:
        raise ValueError(f"{data}: the plateau schedule needs validation images; use --schedule step")
    loader = BatchLoader(dataset, "train", batch_size, crop, train=True, seed=seed, threads=loader_threads,
                         shuffle=shuffle, window=shuffle_window)
    wait_start = loader.wait_seconds

    def summary(stopped, steps, loss, train_seconds):
        return {"steps": steps, "total_steps": opt.steps, "seconds": time.perf_counter() - started,
                "images_per_s": steps * batch_size / train_seconds if steps and train_seconds > 0 else None,
                "data_wait": wait_share(loader.wait_seconds - wait_start, train_seconds) if steps else None,
                "loss": loss, "epoch": epoch, "batch": batch_index, "best_val_top1_error": best, "stopped": stopped,
                "scale": scale, "out": str(out), "net": net, "optimizer": opt}

    if resume is not None:
        echo(f"resuming from {resume}: epoch {epoch + 1}, batch {batch_index}, lr {opt.lr:g} (the network, optimiser, "
             "batch size, seed, scale and augmentation switches are the checkpoint's; those options are ignored)")
        if epoch >= epochs:
            echo(f"nothing to do: the checkpoint is already at epoch {epoch} of {epochs} (a larger --epochs trains on)")
            return summary("nothing_to_do", 0, None, 0.0)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "log.jsonl")
    if resume is not None and log.path.exists():
        log.truncate_to(opt.steps, epoch)
    else:
        log.path.unlink(missing_ok=True)
        log.write({"kind": "config", "step": opt.steps, "args": config, "data": str(data), "scale": scale,
                   "crop": crop, "classes": len(dataset.classes), "train_images": len(dataset.splits["train"]),
                   "backend": pa.backend_name(), "version": pa.__version__})
    if resume is not None:
        log.write({"kind": "resume", "step": opt.steps, "epoch": epoch + 1, "batch": batch_index,
                   "from": str(resume), "lr": opt.lr, "args": config})
    mean = _device(dataset.mean)
    # What predict needs without the dataset: the test-time views follow the switches, as eval_views says.
    preprocess = Preprocess(dataset.classes, dataset.size, crop, dataset.mean, scale,
                            eval_views({"train": {"flip": flip, "random_crop": random_crop}}))
    tb = _TensorBoard(out / TB_DIR, tensorboard, opt.steps + 1 if resume is not None else 0, echo)
    written = set()  # the checkpoints this call wrote

    def state_for(ep, bi):
        return {"train": {"epoch": ep, "batch": bi, "best": best, "seed": seed, "scale": scale,
                          "batch_size": batch_size, "classes": dataset.classes, "size": dataset.size, "dataset": dataset.identity, "flip": flip, "pca": pca,
                          "random_crop": random_crop, "shuffle": shuffle, "shuffle_window": shuffle_window}}

    def good_checkpoint():
        """What the divergence messages may promise: only a checkpoint that is on disk."""
        last = out / "last.npz"
        if last in written and last.exists():
            return f"the last good checkpoint ({last}) is untouched"
        if resume is not None and Path(resume).exists():
            return f"this call wrote no checkpoint; the one it resumed from ({resume}) is untouched"
        return (f"no checkpoint was written (the first was due at step {checkpoint_every} or the end of epoch 1); "
                "nothing to resume from")

    def diverged(message, loss):
        log.write({"kind": "diverged", "step": opt.steps, "epoch": epoch + 1, "batch": batch_index, "loss": loss})
        raise TrainingDiverged(f"{message}: training stopped; {good_checkpoint()}. Try a smaller --lr"
                               + (" or the default --scale" if config["scale"] is not None else "") + ".")

    def checkpoint(path, ep, bi):
        # A finite loss can come with weights that the same step's update made inf or NaN: never save those.
        xp = _backend.active.xp
        bad = [k for k, v in net.parameters().items() if not bool(xp.isfinite(v).all())]
        if bad:
            diverged(f"the weights of {', '.join(bad[:3])} became inf or NaN by step {opt.steps} (epoch {ep + 1})",
                     last_loss)
        save(path, net, opt, state_for(ep, bi), preprocess)
        written.add(path)

    def plot():
        if log.path.exists():
            try:
                plot_curves(log.path, out / "curves.png", log_scale=log_loss)
            except Exception as e:  # noqa: BLE001  (a chart is never worth a training run)
                echo(f"warning: could not draw {out / 'curves.png'}: {e}")

    steps, stopped, last_loss, train_seconds = 0, None, None, 0.0
    try:
        with _StopRequest() as stop:
            while epoch < epochs and stopped is None:
                per_epoch = loader.batches_per_epoch()
                bar = tqdm(total=per_epoch, initial=batch_index, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                           disable=not progress, leave=False)
                # The window counts this call's images only: a resumed run's first window starts here, not at
                # the interrupted run's last log line.
                epoch_t = window_t = time.perf_counter()
                window_n = 0
                epoch_wait = window_wait = loader.wait_seconds
                # The batches arrive on the device: copied on a stream of their own while the last step runs.
                for images, labels, params, shift in loader.epoch(epoch, batch_index, device=True):
                    _switch_draws(params, shift, dataset.size, crop, flip, pca, random_crop)
                    x = pa.ops.augment_batch(images, mean, params, shift, crop, scale)
                    loss, dlogits = pa.ops.softmax_cross_entropy(net.forward(x, train=True), labels)
                    if not math.isfinite(loss):
                        bar.close()
                        diverged(f"the loss became {loss} at epoch {epoch + 1}, batch {batch_index}", loss)
                    net.backward(dlogits)
                    opt.step()
                    batch_index += 1
                    steps += 1
                    last_loss = loss
                    window_n += len(labels)
                    bar.update(1)
                    if opt.steps % log_every == 0:
                        pa.synchronize()
                        now = time.perf_counter()
                        rate = window_n / max(now - window_t, 1e-9)
                        waiting = wait_share(loader.wait_seconds - window_wait, now - window_t)
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", data_wait=f"{100 * waiting:.0f}%")
                        log.write({"kind": "step", "epoch": epoch + 1, "step": opt.steps, "loss": loss,
                                   "lr": opt.lr, "images_per_s": rate, "images": window_n, "data_wait": waiting})
                        tb.add({"train/loss": loss, "train/lr": opt.lr, "train/images_per_s": rate,
                                "train/data_wait": waiting}, opt.steps)
                        window_t, window_n, window_wait = now, 0, loader.wait_seconds
                    if opt.steps % checkpoint_every == 0:
                        checkpoint(out / "last.npz", epoch, batch_index)
                    if stop.requested or (max_steps is not None and steps >= max_steps):
                        stopped = "interrupted" if stop.requested else "max_steps"
                        break
                pa.synchronize()
                epoch_seconds = time.perf_counter() - epoch_t
                train_seconds += epoch_seconds
                bar.close()
                epoch_waiting = wait_share(loader.wait_seconds - epoch_wait, epoch_seconds)
                if epoch_waiting > INPUT_BOUND_SHARE:
                    echo(f"input-bound: the training step waited for input {100 * epoch_waiting:.0f}% of the time in "
                         f"epoch {epoch + 1}: the {loader.threads} staging thread(s) are slower than the step; more "
                         "--loader-threads (or a faster disk) would help")
                if stopped is not None:
                    checkpoint(out / "last.npz", epoch, batch_index)
                    break
                rec = {"kind": "epoch", "epoch": epoch + 1, "step": opt.steps, "lr": opt.lr, "val_top1_error": None,
                       "val_top5_error": None}
                val_error = None
                if has_val:
                    ev = evaluate(net, dataset, "val", batch_size=batch_size, ten_crop=False, scale=scale,
                                  loader_threads=loader_threads)
                    val_error = ev["top1_error"]
                    rec.update(val_top1_error=ev["top1_error"], val_top5_error=ev["top5_error"])
                opt.end_epoch(val_error)
                epoch, batch_index = epoch + 1, 0
                improved = val_error is not None and (best is None or val_error < best)
                if improved:
                    best = val_error
                rec["next_lr"] = opt.lr
                log.write(rec)
                tb.add({"val/top1_error": rec["val_top1_error"], "val/top5_error": rec["val_top5_error"]}, opt.steps)
                checkpoint(out / "last.npz", epoch, 0)
                if improved:
                    checkpoint(out / "best.npz", epoch, 0)
                plot()
                top1 = "" if val_error is None else \
                    f", val top-1 error {val_error:.3f} (top-5 {rec['val_top5_error']:.3f})"
                echo(f"epoch {epoch}/{epochs}: step {opt.steps}, lr {rec['lr']:g}{top1}")
                if stop.requested:  # Ctrl-C during the evaluation: the epoch's checkpoint is written, stop here
                    stopped = "interrupted"
        result = summary(stopped, steps, last_loss, train_seconds)
        log.write({"kind": "end", "step": opt.steps, "stopped": stopped, "steps": steps,
                   "seconds": result["seconds"], "images_per_s": result["images_per_s"], "loss": last_loss})
    finally:  # whatever ended the call (the epochs, max_steps, Ctrl-C, divergence, an error): the curves so far
        tb.close()
        plot()
    if stopped == "interrupted":
        echo(f"interrupted: checkpoint written to {out / 'last.npz'} (resume with --resume {out / 'last.npz'})")
    rate = "" if result["images_per_s"] is None else \
        f", {result['images_per_s']:.1f} images/s (waiting for input {100 * result['data_wait']:.0f}% of the time)"
    total = f" ({opt.steps} in all)" if opt.steps != steps else ""
    loss_text = "no step run" if last_loss is None else f"last loss {last_loss:.4f}"
    echo(f"{steps} steps{total} in {result['seconds']:.1f} s{rate}, {loss_text}")
    return result

