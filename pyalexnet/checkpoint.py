"""Checkpoints: everything needed to continue a run bit for bit, in a NumPy .npz file, never a pickle.

Members: "param/<name>" and "velocity/<name>" (float32 arrays), "preprocess/mean" (the mean image, when the
preprocessing has one), and "meta", the UTF-8 bytes of a JSON object: format and version, the network's
configuration and dropout position, the optimiser's hyperparameters, step counts and schedule state, the
preprocessing (class names, sizes, per-channel mean and scale, test-time views: what `pyalexnet predict` needs,
so that a checkpoint predicts without the dataset it was trained on), the caller's `extra` (JSON values; NumPy
scalars become Python numbers), and a SHA-256 over the rest of the metadata and every array's name, shape and
bytes. No absolute path is stored: a checkpoint moves between machines. Loading checks the zip's CRCs (accidental damage, truncation) and that digest (edits), and
says which failed.

The write is atomic: a temporary file in the same directory, flushed and fsynced, renamed over the target, and
the directory fsynced. A crash at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _backend
from ._files import atomic_write
from .model import AlexNet
from .optim import SGD, schedule_from_state

FORMAT, VERSION = "pyalexnet-checkpoint", 1


# torchvision's ImageNet normalisation: (x / 255 - mean) / std per channel, RGB.
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class Preprocess:
    """How an image file becomes the network's input, as the network was trained to see it.

    The file's shorter side is resized to `size` and its central size x size kept (data.load_image: the paper's
    preprocessing, and torchvision's Resize(size) + CenterCrop(size)); the network sees the central (or, for
    test-time views, a corner's) crop x crop of that, as (pixel - mean) * scale per channel, pixels 0-255.
    `mean` is either the (size, size, 3) mean image of the training set (the paper) or three per-channel means
    (torchvision: 255 x its means); `scale` one number or three (torchvision: 1 / (255 x its stds)).
    `classes` names the outputs in order; `views` are the test-time views (data.eval_draws numbering) that
    match how the network was trained (train.eval_views)."""

    classes: Sequence[str]
    size: int
    crop: int
    mean: Any
    scale: Any = 1.0
    views: Sequence[int] = field(default=tuple(range(10)))

    def __post_init__(self):
        classes = tuple(self.classes) if not isinstance(self.classes, str) else None
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"preprocess.classes: expected a list of non-empty class names, got {self.classes!r}")
        for name in ("size", "crop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"preprocess.{name}: expected a positive integer, got {v!r}")
        if self.crop > self.size:
            raise ValueError(f"preprocess.crop: {self.crop} does not fit images of {self.size} x {self.size}")
        mean = np.asarray(self.mean, dtype=np.float32)
        if mean.shape not in ((3,), (int(self.size), int(self.size), 3)) or not np.isfinite(mean).all():
            raise ValueError(f"preprocess.mean: expected 3 per-channel means or a ({self.size}, {self.size}, 3) "
                             f"mean image of finite values, got shape {mean.shape}")
        scale = np.broadcast_to(np.asarray(self.scale, dtype=np.float64), (3,)) if np.ndim(self.scale) <= 1 \
            and np.size(self.scale) in (1, 3) else None
        if scale is None or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"preprocess.scale: expected one or three positive finite numbers, got {self.scale!r}")
        views = tuple(int(v) for v in self.views)
        if not views or any(not 0 <= v < 10 for v in views) or len(set(views)) != len(views):
            raise ValueError(f"preprocess.views: expected distinct views 0-9, got {self.views!r}")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "classes", classes)
        set_(self, "size", int(self.size))
        set_(self, "crop", int(self.crop))
        set_(self, "mean", mean)
        set_(self, "scale", tuple(float(v) for v in scale))
        set_(self, "views", views)

    @classmethod
    def torchvision(cls, classes: Sequence[str], size: int = 256, crop: int = 224) -> "Preprocess":
        """torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), ToTensor(),
        Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)); pass the 1000 ImageNet class names."""
        return cls(classes, size, crop, [255.0 * m for m in TORCHVISION_MEAN],
                   [1.0 / (255.0 * s) for s in TORCHVISION_STD], views=tuple(range(10)))

    def mean_image(self) -> np.ndarray:
        """The mean as the (size, size, 3) float32 image the augment kernel subtracts."""
        if self.mean.shape == (3,):
            return np.ascontiguousarray(np.broadcast_to(self.mean, (self.size, self.size, 3)))
        return self.mean

    def _meta(self) -> dict:
        return {"classes": list(self.classes), "size": self.size, "crop": self.crop, "scale": list(self.scale),
                "views": list(self.views), "mean": self.mean.tolist() if self.mean.shape == (3,) else "image"}

    @classmethod
    def _from_meta(cls, m: dict, arrays: dict) -> "Preprocess":
        mean = arrays["preprocess/mean"] if m["mean"] == "image" else m["mean"]
        return cls(m["classes"], m["size"], m["crop"], mean, m["scale"], m["views"])

    def __repr__(self) -> str:
        mean = "mean image" if self.mean.shape != (3,) else "mean " + ", ".join(f"{v:g}" for v in self.mean)
        return (f"Preprocess({len(self.classes)} classes, size={self.size}, crop={self.crop}, {mean}, "
                f"scale={', '.join(f'{v:.4g}' for v in self.scale)}, views={list(self.views)})")


@dataclass
class Checkpoint:
    net: AlexNet
    optimizer: SGD | None
    extra: dict
    preprocess: Preprocess | None = None


def _host(a) -> np.ndarray:
    return a.get() if _backend.active.name == "cuda" else np.asarray(a)


def _digest(arrays: dict, meta: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_value(v):
    """json.dumps' fallback: NumPy scalars (np.float32(0.5), np.int64(3), np.bool_) as Python numbers."""
    if isinstance(v, np.generic) and not isinstance(v, (np.void, np.datetime64, np.timedelta64)):
        return v.item()
    if isinstance(v, np.ndarray):
        raise TypeError(f"a NumPy array of shape {v.shape} (store a list: a.tolist())")
    raise TypeError(f"{type(v).__name__} {v!r} is not a JSON value")


def save(path, net: AlexNet, optimizer: SGD | None = None, extra: dict | None = None,
         preprocess: Preprocess | None = None) -> None:
    """Writes net (and optimizer, and `extra`, a dict of JSON values or NumPy scalars, and `preprocess`, how
    images become the network's input: what `pyalexnet predict` reads) to `path`, atomically."""
    if optimizer is not None and optimizer.net is not net:
        raise ValueError("optimizer: belongs to another network")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict of JSON values, got {type(extra).__name__}")
    try:
        extra = json.loads(json.dumps(extra, default=_json_value))  # a plain-JSON copy: what load() returns
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra: must hold only JSON values (dict, list, str, number, bool, None) or NumPy "
                        f"scalars: {e}") from None
    if preprocess is not None:
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess: expected a pyalexnet.Preprocess, got {type(preprocess).__name__}")
        if len(preprocess.classes) != net.num_classes:
            raise ValueError(f"preprocess: names {len(preprocess.classes)} classes, the network has "
                             f"{net.num_classes} outputs")
        if preprocess.crop != net.input_size:
            raise ValueError(f"preprocess: crops {preprocess.crop} x {preprocess.crop}, the network's input is "
                             f"{net.input_size} x {net.input_size}")
    arrays = {f"param/{k}": _host(v) for k, v in net.parameters().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "net": {"variant": net.variant, "num_classes": net.num_classes, "seed": net.seed, "width": net.width,
                "input_size": net.input_size, "dropout_calls": net.dropout_calls, "init": net.init},
        "optimizer": None,
        "preprocess": None if preprocess is None else preprocess._meta(),
        "extra": extra,
    }
    if preprocess is not None and preprocess.mean.shape != (3,):
        arrays["preprocess/mean"] = preprocess.mean
    if optimizer is not None:
        schedule_from_state(optimizer.schedule.state())  # a schedule load() could not rebuild fails now, not later
        arrays.update({f"velocity/{k}": _host(v) for k, v in optimizer.velocity.items()})
        meta["optimizer"] = {"lr": optimizer.lr, "momentum": optimizer.momentum,
                             "weight_decay": optimizer.weight_decay, "steps": optimizer.steps,
                             "epochs": optimizer.epochs, "schedule": optimizer.schedule.state()}
    meta["sha256"] = _digest(arrays, meta)
    meta_bytes = json.dumps(meta).encode()

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    atomic_write(path, lambda f: np.savez(f, meta=np.frombuffer(meta_bytes, dtype=np.uint8), **arrays))


def load(path) -> Checkpoint:
    """Reads a checkpoint written by save(): a ready AlexNet, a ready SGD bound to it (or None), the extra dict."""
    path = Path(path)
    with open(path, "rb") as f:  # our handle, closed even when NumPy fails halfway through the zip
        head = f.read(4)
        f.seek(0)
        if head != b"PK\x03\x04":  # not a zip: NumPy would try it as .npy or a pickle and advise allow_pickle
            what = "empty" if not head else "a .npy array" if head == b"\x93NUM" else "not a zip archive"
            raise ValueError(f"{path}: not a pyalexnet checkpoint ({what}; checkpoints are .npz files written by "
                             "pyalexnet train or pyalexnet.save)")
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a readable pyalexnet checkpoint (truncated or damaged?): {e}") from None
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a pyalexnet checkpoint (no 'meta' member)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file")
    if _digest(arrays, meta) != meta.get("sha256"):
        raise ValueError(f"{path}: the contents do not match the checkpoint's SHA-256: the file was modified")
    try:
        return _rebuild(arrays, meta)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: inconsistent checkpoint: {e}") from None


def _rebuild(arrays: dict, meta: dict) -> Checkpoint:
    cfg = meta["net"]
    net = AlexNet(cfg["variant"], cfg["num_classes"], cfg["seed"], cfg["width"], cfg["input_size"],
                  cfg.get("init", "paper"))
    net.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    net.dropout_calls = int(cfg["dropout_calls"])
    optimizer = None
    if meta["optimizer"] is not None:
        o = meta["optimizer"]
        optimizer = SGD(net, o["lr"], o["momentum"], o["weight_decay"], schedule_from_state(o["schedule"]))
        optimizer.steps, optimizer.epochs = int(o["steps"]), int(o["epochs"])
        for k, v in optimizer.velocity.items():
            v[...] = _backend.active.xp.asarray(arrays[f"velocity/{k}"])
    pre = meta.get("preprocess")  # absent in checkpoints from before it existed
    return Checkpoint(net, optimizer, meta["extra"], None if pre is None else Preprocess._from_meta(pre, arrays))
