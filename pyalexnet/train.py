"""Training, evaluation and inference from a prepared dataset (pyalexnet.data): what `pyalexnet train`, `eval`,
`predict` and `show-filters` run.

Training follows the paper (section 5): batch 128, SGD with momentum 0.9 and weight decay 5e-4, lr 0.01 divided
by 10 when the validation error stops improving (at most three times) or on a fixed step schedule, random
224/227 crops, flips and PCA colour shifts. Checkpoints (pyalexnet.checkpoint, atomic) go to OUT/last.npz every N
steps and at each epoch's end, and to OUT/best.npz when the validation error improves; each holds the position
in the data (epoch, batch), so a resumed run continues exactly where the interrupted one stopped. A JSONL log
(OUT/log.jsonl) gets one line per logged step and per epoch, and OUT/curves.png plots them.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np

import pyalexnet as pa
from . import _backend
from . import _checks as check
from ._files import atomic_write
from .data import BatchLoader, Dataset, eval_draws, load_image
from .optim import SGD, Plateau, StepDecay


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


# ---- plotting without matplotlib: Pillow draws the curves ------------------------------------------------------------
def plot_curves(log_path, png_path) -> None:
    """Training loss per logged step and validation top-1/top-5 error per epoch, from the JSONL log."""
    from PIL import Image, ImageDraw

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
    w, h, pad = 900, 360, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)

    def panel(x0, title, series, ymax):
        x1 = x0 + w // 2 - pad - 10
        d.rectangle((x0, pad, x1, h - pad), outline="black")
        d.text((x0, 15), title, fill="black")
        xs = [x for s in series for x, _ in s[1]]
        if not xs:
            d.text((x0 + 10, h // 2), "no data yet", fill="gray")
            return
        xmin, xmax = min(xs), max(max(xs), min(xs) + 1)
        d.text((x0 - 45, pad - 6), f"{ymax:.3g}", fill="black")
        d.text((x0 - 20, h - pad - 6), "0", fill="black")
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


def evaluate(net, dataset: Dataset, split: str = "val", batch_size: int = 128, ten_crop: bool = True, scale=1.0,
             progress: bool = False) -> dict:
    """Top-1 and top-5 error of `net` on a split: the centre crop, and the paper's 10-view average (the centre
    and four corner crops and their mirror images, softmax outputs averaged). Counts as it goes: memory does
    not grow with the split."""
    from tqdm import tqdm

    crop = net.input_size
    mean = _device(dataset.mean)
    loader = BatchLoader(dataset, split, batch_size, crop, train=False)
    images_seen, wrong = 0, {"top1": 0, "top5": 0, "top1_10": 0, "top5_10": 0}

    def count(probs, labels, key):
        top5 = np.argsort(-probs, axis=1)[:, :5]
        wrong["top1" + key] += int(np.sum(top5[:, 0] != labels))
        wrong["top5" + key] += int(np.sum(~(top5 == labels[:, None]).any(axis=1)))

    for images, labels, params, shift in tqdm(loader.epoch(), total=loader.batches_per_epoch(), disable=not progress,
                                              desc="eval", leave=False):
        device_images = _device(images)
        centre = _softmax(net.forward(pa.ops.augment_batch(device_images, mean, params, shift, crop, scale),
                                      train=False))
        count(centre, labels, "")
        if ten_crop:
            total = centre.copy()
            for view in range(1, 10):
                p, sh = eval_draws(len(images), dataset.size, crop, view)
                x = pa.ops.augment_batch(device_images, mean, p, sh, crop, scale)
                total += _softmax(net.forward(x, train=False))
            count(total / 10, labels, "_10")
        images_seen += len(labels)
    n = max(images_seen, 1)
    result = {"images": images_seen, "top1_error": wrong["top1"] / n, "top5_error": wrong["top5"] / n}
    if ten_crop:
        result["top1_error_10crop"], result["top5_error_10crop"] = wrong["top1_10"] / n, wrong["top5_10"] / n
    return result


# ---- training -------------------------------------------------------------------------------------------------------
def train(data, out, variant="paper", epochs=90, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4,
          schedule="plateau", step_every=30, width=1.0, crop=None, init="paper", seed=0, scale=1.0,
          checkpoint_every=1000,
          log_every=10, resume=None, max_steps=None, progress=True, echo=print) -> dict:
    """Trains from the prepared dataset `data` into the folder `out`; returns a summary dict. `max_steps` stops
    (with a checkpoint) after that many steps of this call. Raises TrainingDiverged on a NaN/inf loss."""
    from tqdm import tqdm

    from .checkpoint import load, save

    dataset = Dataset(data)
    if "train" not in dataset.splits:
        raise ValueError(f"{data}: no training images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = check.positive_int(epochs, "epochs")
    if max_steps is not None:
        max_steps = check.positive_int(max_steps, "max_steps")
    checkpoint_every = check.positive_int(checkpoint_every, "checkpoint_every")
    log_every = check.positive_int(log_every, "log_every")
    if resume is not None:
        ck = load(resume)
        if ck.optimizer is None:
            raise ValueError(f"{resume}: holds no optimizer state: not a training checkpoint")
        net, opt, state = ck.net, ck.optimizer, ck.extra.get("train")
        if not state:
            raise ValueError(f"{resume}: not written by pyalexnet train (no training position)")
        if state["classes"] != dataset.classes:
            raise ValueError(f"{resume}: trained on other classes than {data}")
        if state.get("dataset") != dataset.identity:
            raise ValueError(f"{resume}: {data} is not the prepared dataset this run trained on (re-prepared or "
                             "another one): a resumed run would not see the same batches")
        epoch, batch_index, best = state["epoch"], state["batch"], state["best"]
        seed, scale, batch_size = state["seed"], state["scale"], state["batch_size"]
        echo(f"resuming from {resume}: epoch {epoch + 1}, batch {batch_index}, lr {opt.lr:g} (the network, optimiser, "
             "batch size, seed and scale are the checkpoint's; those options are ignored)")
    else:
        net = pa.AlexNet(variant, num_classes=len(dataset.classes), seed=seed, width=width, input_size=crop,
                         init=init)
        if schedule == "plateau":
            sched = Plateau()
        elif schedule == "step":
            sched = StepDecay(check.positive_int(step_every, "step_every"))
        elif schedule == "constant":
            sched = None
        else:
            raise ValueError(f"schedule: expected plateau, step or constant, got {schedule!r}")
        opt = SGD(net, lr, momentum, weight_decay, sched)
        epoch, batch_index, best = 0, 0, None
    crop = net.input_size
    if crop > dataset.size:
        raise ValueError(f"the network's input ({crop}) is larger than the prepared images ({dataset.size}); "
                         f"prepare with --size >= {crop} or train with a smaller --crop")
    has_val = "val" in dataset.splits
    if isinstance(opt.schedule, Plateau) and not has_val:
        raise ValueError(f"{data}: the plateau schedule needs validation images; use --schedule step")
    loader = BatchLoader(dataset, "train", batch_size, crop, train=True, seed=seed)
    mean = _device(dataset.mean)
    log_path = out / "log.jsonl"

    def state_for(ep, bi):
        return {"train": {"epoch": ep, "batch": bi, "best": best, "seed": seed, "scale": scale,
                          "batch_size": batch_size, "classes": dataset.classes, "data": str(Path(data).resolve()),
                          "size": dataset.size, "dataset": dataset.identity}}

    # The log continues the checkpoint's run: records past it (written after the last checkpoint, before a kill)
    # go, and so does a line cut short. A new run starts a new log.
    if resume is not None and log_path.exists():
        kept = []
        for line in log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if (rec.get("kind") == "step" and rec["step"] <= opt.steps) or \
                    (rec.get("kind") == "epoch" and rec["epoch"] <= epoch):
                kept.append(line)
        atomic_write(log_path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))
    elif resume is None:
        log_path.unlink(missing_ok=True)

    def plot():
        try:
            plot_curves(log_path, out / "curves.png")
        except Exception as e:  # noqa: BLE001  (a chart is never worth a training run)
            echo(f"warning: could not draw {out / 'curves.png'}: {e}")

    def checkpoint(path, ep, bi):
        # A finite loss can come with weights that the same step's update made inf or NaN: never save those.
        xp = _backend.active.xp
        bad = [k for k, v in net.parameters().items() if not bool(xp.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(
                f"the weights of {', '.join(bad[:3])} became inf or NaN by step {opt.steps} (epoch {ep + 1}): training "
                f"stopped; the last good checkpoint ({out / 'last.npz'}) is untouched. Try a smaller --lr.")
        save(path, net, opt, state_for(ep, bi))

    def write_log(rec):
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    steps_this_call, stopped = 0, None
    started = time.perf_counter()
    with _StopRequest() as stop:
        while epoch < epochs and stopped is None:
            per_epoch = loader.batches_per_epoch()
            bar = tqdm(total=per_epoch, initial=batch_index, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       disable=not progress, leave=False)
            window_t, window_n = time.perf_counter(), 0
            for images, labels, params, shift in loader.epoch(epoch, batch_index):
                x = pa.ops.augment_batch(_device(images), mean, params, shift, crop, scale)
                loss, dlogits = pa.ops.softmax_cross_entropy(net.forward(x, train=True), _device(labels))
                if not math.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"the loss became {loss} at epoch {epoch + 1}, batch {batch_index}: training stopped; "
                        f"the last good checkpoint ({out / 'last.npz'}) is untouched. Try a smaller --lr.")
                net.backward(dlogits)
                opt.step()
                batch_index += 1
                steps_this_call += 1
                window_n += len(labels)
                bar.update(1)
                if opt.steps % log_every == 0:
                    pa.synchronize()
                    now = time.perf_counter()
                    rate = window_n / max(now - window_t, 1e-9)
                    window_t, window_n = now, 0
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
                    write_log({"kind": "step", "epoch": epoch + 1, "step": opt.steps, "loss": loss, "lr": opt.lr,
                               "images_per_s": rate})
                if opt.steps % checkpoint_every == 0:
                    checkpoint(out / "last.npz", epoch, batch_index)
                if stop.requested or (max_steps is not None and steps_this_call >= max_steps):
                    stopped = "interrupted" if stop.requested else "max_steps"
                    break
            bar.close()
            if stopped is not None:
                checkpoint(out / "last.npz", epoch, batch_index)
                break
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": opt.steps, "lr": opt.lr, "val_top1_error": None,
                   "val_top5_error": None}
            val_error = None
            if has_val:
                ev = evaluate(net, dataset, "val", batch_size=batch_size, ten_crop=False, scale=scale)
                val_error = ev["top1_error"]
                rec.update(val_top1_error=ev["top1_error"], val_top5_error=ev["top5_error"])
            opt.end_epoch(val_error)
            epoch, batch_index = epoch + 1, 0
            improved = val_error is not None and (best is None or val_error < best)
            if improved:
                best = val_error
            rec["next_lr"] = opt.lr
            write_log(rec)
            checkpoint(out / "last.npz", epoch, 0)
            if improved:
                checkpoint(out / "best.npz", epoch, 0)
            plot()
            top1 = "" if val_error is None else f", val top-1 error {val_error:.3f} (top-5 {rec['val_top5_error']:.3f})"
            echo(f"epoch {epoch}/{epochs}: step {opt.steps}, lr {rec['lr']:g}{top1}")
            if stop.requested:  # Ctrl-C during the evaluation: the epoch's checkpoint is written, stop here
                stopped = "interrupted"
    if stopped == "interrupted":
        echo(f"interrupted: checkpoint written to {out / 'last.npz'} (resume with --resume {out / 'last.npz'})")
    if log_path.exists():
        plot()
    return {"epoch": epoch, "batch": batch_index, "steps": opt.steps, "best_val_top1_error": best, "stopped": stopped,
            "seconds": time.perf_counter() - started, "net": net, "optimizer": opt}


# ---- inference --------------------------------------------------------------------------------------------------------
def predict(paths, weights, data=None, top: int = 5, ten_crop: bool = False) -> list:
    """[(path, [(class name, probability), ...])] for image files, from a training checkpoint."""
    from .checkpoint import load

    ck = load(weights)
    state = ck.extra.get("train") or {}
    data = data or state.get("data")
    if data is None:
        raise ValueError(f"{weights}: does not say which dataset it was trained on: pass --data")
    dataset = Dataset(data)
    check_classes(ck.extra, ck.net.num_classes, dataset, weights)
    net, crop, scale = ck.net, ck.net.input_size, state.get("scale", 1.0)
    images = np.stack([load_image(p, dataset.size) for p in paths])
    probs = 0
    views = range(10) if ten_crop else range(1)
    for view in views:
        params, shift = eval_draws(len(images), dataset.size, crop, view)
        x = pa.ops.augment_batch(_device(images), _device(dataset.mean), params, shift, crop, scale)
        probs = probs + _softmax(net.forward(x, train=False))
    probs = probs / len(views)
    top = min(top, len(dataset.classes))
    results = []
    for path, p in zip(paths, probs):
        best = np.argsort(-p)[:top]
        results.append((str(path), [(dataset.classes[i], float(p[i])) for i in best]))
    return results


def filter_grid(weights, columns: int = 12, zoom: int = 4):
    """The first convolution's kernels as one RGB image (the paper's Figure 3): each kernel scaled to 0-255 on
    its own, on a grid with 1-pixel gaps, enlarged `zoom` times."""
    from PIL import Image

    from .checkpoint import load

    net = load(weights).net
    w = np.asarray(pa.to_numpy(net.parameters()[next(iter(net.parameters()))]), np.float64)  # (K, 3, R, S)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"{weights}: the first layer's weights {w.shape} are not RGB kernels")
    k, _, r, s = w.shape
    rows = math.ceil(k / columns)
    grid = np.full((rows * (r + 1) + 1, columns * (s + 1) + 1, 3), 255, np.uint8)
    for i in range(k):
        f = w[i].transpose(1, 2, 0)
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        y, x = 1 + (i // columns) * (r + 1), 1 + (i % columns) * (s + 1)
        grid[y : y + r, x : x + s] = np.round(f * 255).astype(np.uint8)
    return Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.Resampling.NEAREST)
