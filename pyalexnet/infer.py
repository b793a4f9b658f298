"""Inference from a checkpoint alone: `pyalexnet predict` and `pyalexnet show-filters`.

A checkpoint written by train (or by `pa.save(..., preprocess=)`) carries its preprocessing (checkpoint.Preprocess:
class names, sizes, mean and scale, test-time views), so predicting needs only the checkpoint and the image
files. Checkpoints from before that, or saved without it, need the prepared dataset they were trained on
(`data=`): its class names and mean image, with the scale train recorded.

Images are read, preprocessed and run `batch_size` at a time; a file that does not decode is reported and
skipped, and the others go on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

import pyalexnet as pa
from . import _backend
from . import _checks as check
from .checkpoint import Checkpoint, Preprocess, load
from .data import BadImage, Dataset, eval_draws, load_image


class Prediction(NamedTuple):
    """One file's result: `top` lists (class name, probability), best first; `error` says why a file was skipped
    (then `top` is empty)."""

    path: str
    top: list
    error: str | None = None


def preprocessing(ck: Checkpoint, weights, data=None) -> Preprocess:
    """The checkpoint's own preprocessing, or with `data` the prepared dataset's (its classes must be the ones
    the checkpoint was trained on)."""
    from .train import check_classes, eval_views

    if data is None:
        if ck.preprocess is None:
            raise ValueError(f"{weights}: holds no preprocessing (saved by an older pyalexnet, or by pyalexnet.save "
                             "without preprocess=): pass --data, the prepared dataset it was trained on")
        return ck.preprocess
    dataset = Dataset(data)
    check_classes(ck.extra, ck.net.num_classes, dataset, weights)
    if ck.net.input_size > dataset.size:
        raise ValueError(f"{weights}: the network's input ({ck.net.input_size}) is larger than {data}'s images "
                         f"({dataset.size})")
    scale = (ck.extra.get("train") or {}).get("scale", 1.0)
    return Preprocess(dataset.classes, dataset.size, ck.net.input_size, dataset.mean, scale, eval_views(ck.extra))


def predict(paths: Sequence, weights, top: int = 5, ten_crop: bool = False, batch_size: int = 64, data=None,
            on_result=None) -> list[Prediction]:
    """The `top` most probable classes of each image file, from a checkpoint and its preprocessing (see the
    module's docstring); with `ten_crop` the softmax averaged over the checkpoint's test-time views. Files are
    decoded and classified `batch_size` at a time; `on_result(prediction)`, when given, is called for each file
    as soon as its batch is done. Returns one Prediction per path, in order."""
    top = check.positive_int(top, "top")
    batch_size = check.positive_int(batch_size, "batch_size")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("paths: expected at least one image file")
    ck = load(weights)
    pre = preprocessing(ck, weights, data)
    net = ck.net.eval()
    xp = _backend.active.xp
    mean = xp.asarray(pre.mean_image())
    views = pre.views if ten_crop else (0,)
    k = min(top, len(pre.classes))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk, images, skipped = paths[start : start + batch_size], [], {}
        for path in chunk:
            try:
                images.append(load_image(path, pre.size))
            except BadImage as e:  # missing, unreadable or not an image: load_image names the file and why
                skipped[path] = str(e)
        probs = iter(_probabilities(net, np.stack(images), mean, pre, views) if images else [])
        for path in chunk:
            if path in skipped:
                r = Prediction(path, [], skipped[path])
            else:
                p = next(probs)
                r = Prediction(path, [(pre.classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]])
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


def _probabilities(net, images: np.ndarray, mean, pre: Preprocess, views) -> np.ndarray:
    device_images = _backend.active.xp.asarray(images)
    total = 0.0
    for view in views:
        params, shift = eval_draws(len(images), pre.size, pre.crop, view)
        x = pa.ops.augment_batch(device_images, mean, params, shift, pre.crop, pre.scale)
        z = np.asarray(pa.to_numpy(net(x)), np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        total = total + z / z.sum(axis=1, keepdims=True)
    return total / len(views)


# ---- the first layer's filters (the paper's Figure 3) ---------------------------------------------------------------
def first_layer_kernels(weights) -> np.ndarray:
    """The first convolution's weights as float64 (kernels, 3, R, S)."""
    net = load(weights).net
    w = np.asarray(pa.to_numpy(net.parameters()[next(iter(net.parameters()))]), np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"{weights}: the first layer's weights {w.shape} are not RGB kernels")
    return w


def filter_grid(weights, columns: int = 12, zoom: int = 4):
    """The first convolution's kernels as one RGB PIL image: each kernel stretched to 0-255 on its own, on a
    grid with 1-pixel gaps, `columns` kernels a row, enlarged `zoom` times (nearest neighbour)."""
    from PIL import Image

    columns, zoom = check.positive_int(columns, "columns"), check.positive_int(zoom, "zoom")
    grid = _grid(first_layer_kernels(weights), columns)
    return Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.Resampling.NEAREST)


def _grid(w: np.ndarray, columns: int) -> np.ndarray:
    k, _, r, s = w.shape
    rows = math.ceil(k / columns)
    grid = np.full((rows * (r + 1) + 1, columns * (s + 1) + 1, 3), 255, np.uint8)
    for i in range(k):
        f = w[i].transpose(1, 2, 0)
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        y, x = 1 + (i // columns) * (r + 1), 1 + (i % columns) * (s + 1)
        grid[y : y + r, x : x + s] = np.round(f * 255).astype(np.uint8)
    return grid


def filter_figure(weights, columns: int = 12, zoom: int = 4):
    """The labelled figure `pyalexnet show-filters` writes, as a matplotlib Figure: the grid of filter_grid()
    with a title (the checkpoint, the layer, the kernels' count and shape), each row labelled with the index of
    its first kernel and each column with its offset, so that kernel i is at row i // columns, column
    i % columns. About `zoom` screen pixels per kernel pixel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns, zoom = check.positive_int(columns, "columns"), check.positive_int(zoom, "zoom")
    w = first_layer_kernels(weights)
    k, _, r, s = w.shape
    grid = _grid(w, columns)
    rows = math.ceil(k / columns)
    dpi = 100
    fig = Figure(figsize=(max(grid.shape[1] * zoom / dpi + 1.2, 4.0), grid.shape[0] * zoom / dpi + 1.0), dpi=dpi)
    ax = fig.add_axes((0.8 / fig.get_figwidth(), 0.35 / fig.get_figheight(),
                       1 - 1.0 / fig.get_figwidth(), 1 - 0.95 / fig.get_figheight()))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([1 + c * (s + 1) + (s - 1) / 2 for c in range(columns)], [f"+{c}" for c in range(columns)],
                  fontsize=7)
    ax.set_yticks([1 + q * (r + 1) + (r - 1) / 2 for q in range(rows)], [str(q * columns) for q in range(rows)],
                  fontsize=7)
    ax.tick_params(length=0)
    ax.set_ylabel("first kernel of the row", fontsize=8)
    ax.set_title(f"{Path(weights).name}: conv1, {k} kernels of {r} x {s} x 3 (each stretched to its own range)",
                 fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def save_filter_figure(weights, path, columns: int = 12, zoom: int = 4) -> None:
    """filter_figure() as a PNG, written atomically."""
    from ._files import atomic_write

    fig = filter_figure(weights, columns, zoom)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
