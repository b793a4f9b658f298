"""Checkpoints: everything needed to continue a run bit for bit, in a NumPy .npz file, never a pickle.

Members: "param/<name>" and "velocity/<name>" (float32 arrays), and "meta", the UTF-8 bytes of a JSON object:
format and version, the network's configuration and dropout position, the optimiser's hyperparameters, step
counts and schedule state, the caller's `extra` (JSON values only), and a SHA-256 over the rest of the
metadata and every array's name, shape and bytes. Loading checks the zip's CRCs (accidental damage, truncation) and that digest (edits), and
says which failed.

The write is atomic: a temporary file in the same directory, flushed and fsynced, renamed over the target, and
the directory fsynced. A crash at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _backend
from ._files import atomic_write
from .model import AlexNet
from .optim import SGD, schedule_from_state

FORMAT, VERSION = "pyalexnet-checkpoint", 1


@dataclass
class Checkpoint:
    net: AlexNet
    optimizer: SGD | None
    extra: dict


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


def save(path, net: AlexNet, optimizer: SGD | None = None, extra: dict | None = None) -> None:
    """Writes net (and optimizer, and `extra`, a dict of JSON values) to `path`, atomically."""
    if optimizer is not None and optimizer.net is not net:
        raise ValueError("optimizer: belongs to another network")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict of JSON values, got {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra: must hold only JSON values (dict, list, str, number, bool, None): {e}") from None
    arrays = {f"param/{k}": _host(v) for k, v in net.parameters().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "net": {"variant": net.variant, "num_classes": net.num_classes, "seed": net.seed, "width": net.width,
                "input_size": net.input_size, "dropout_calls": net.dropout_calls, "init": net.init},
        "optimizer": None,
        "extra": extra,
    }
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
    return Checkpoint(net, optimizer, meta["extra"])
