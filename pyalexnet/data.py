"""Images in, batches out: an ImageNet-style folder, `prepare` into memory-mappable shards, and the batch loader.

The folder (what ImageNet's train/val look like once unpacked):

    SRC/train/<class>/<image>           one folder per class; the sorted folder names are the classes
    SRC/val/<class>/<image>             either the same layout,
    SRC/val/<image> + SRC/val/labels.txt   or flat, with "<file name> <class name>" per line

`prepare(SRC, OUT)` applies the paper's preprocessing once (section 2: the shorter side rescaled to 256, the
central 256 x 256 patch, RGB) and writes, for each split, shards `<split>-NNNNN.npy` (uint8, (n, 256, 256, 3))
with `<split>-NNNNN.labels.npy` (int32) and a `<split>-NNNNN.json` written last, which marks the shard done: a
rerun after an interruption redoes only the shards without one (and any whose file list changed). It also
computes, over the training images, the per-pixel mean image (`mean.npy`, float32 (256, 256, 3)) and the PCA of
the RGB values (section 4.1's colour augmentation: eigenvalues and eigenvectors of their 3 x 3 covariance), and
writes `dataset.json` last. Pixel values stay in 0-255 units throughout.

Images Pillow cannot read (corrupt, truncated, not an image) are skipped, each with a logged warning, and listed
with the reason in dataset.json; grayscale, CMYK, palette, 16-bit and alpha images are converted to RGB; a file
whose extension lies about its format is read by its content.

`BatchLoader` serves training or evaluation batches: a background thread gathers the next batch's images from
the shards and draws its augmentation (crop offsets, flips, PCA colour), while the caller's step runs; the
GPU-side kernel `ops.augment_batch` turns the uint8 batch into the network's float32 input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import queue
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _checks as check
from ._files import atomic_write

log = logging.getLogger("pyalexnet.data")

FORMAT, VERSION = "pyalexnet-dataset", 1
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".jfif"}
PCA_STD = 0.1  # alpha_i ~ N(0, 0.1), the paper's section 4.1


class BadImage(ValueError):
    """An image file Pillow cannot decode."""


# ---- reading one image ----------------------------------------------------------------------------------------
def load_image(path, size: int = 256) -> np.ndarray:
    """The paper's preprocessing of one file: shorter side to `size` (bicubic), centre crop, RGB uint8 (size,
    size, 3). Raises BadImage for anything Pillow cannot decode completely."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # JPEG only: decode at a reduced scale (1/2, 1/4, 1/8) that still covers `size`: much faster for
                # large photos, and the resize below does the rest.
                im.draft("RGB", (size, size))
                im.load()  # a truncated file fails here, not later
                rgb = _to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from None
    w, h = rgb.size
    if w < 1 or h < 1:
        raise BadImage(f"{path}: empty image")
    # Shorter side to `size`, then the central size x size: the same as resizing only the central square of
    # the source (a box in source coordinates), which never materialises a huge intermediate for an extreme
    # aspect ratio.
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def _to_rgb(im):
    from PIL import Image

    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
        a = np.asarray(im, dtype=np.float64)
        top = a.max() if a.size and a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent pixels become white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


# ---- the folder -----------------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan(src) -> dict:
    """{"classes": [...], "train": [(path, label)], "val": [(path, label)] or []} for an ImageNet-style folder."""
    src = Path(src)
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{src}: expected a train/ folder with one sub-folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{train_dir}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    per_class = {c: _images_in(train_dir / c) for c in classes}
    empty = [c for c in classes if not per_class[c]]
    if len(empty) == len(classes):
        raise ValueError(f"{train_dir}: no images (extensions {sorted(IMAGE_EXTENSIONS)})")
    if empty:  # as torchvision's ImageFolder: a class the network could never learn is an error, not a warning
        raise ValueError(f"{train_dir}: {len(empty)} class folder(s) hold no image files: {', '.join(empty[:5])}"
                         f"{' ...' if len(empty) > 5 else ''} (extensions {sorted(IMAGE_EXTENSIONS)}); remove them "
                         "or add images")
    train = [(p, index[c]) for c in classes for p in per_class[c]]
    val = []
    val_dir = src / "val"
    if val_dir.is_dir():
        labels_file = val_dir / "labels.txt"
        if labels_file.is_file():
            for n, line in enumerate(labels_file.read_text().splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{labels_file}:{n}: expected '<file name> <class name>', got {line!r}")
                if parts[1] not in index:
                    raise ValueError(f"{labels_file}:{n}: class {parts[1]!r} is not one of train/'s classes")
                val.append((val_dir / parts[0], index[parts[1]]))
        else:
            unknown = sorted(p.name for p in val_dir.iterdir()
                             if p.is_dir() and not p.name.startswith(".") and p.name not in index)
            if unknown:
                raise ValueError(f"{val_dir}: class folders {unknown[:5]} are not among train/'s classes")
            val = [(p, index[c]) for c in classes if (val_dir / c).is_dir() for p in _images_in(val_dir / c)]
    return {"classes": classes, "train": train, "val": val}


# ---- prepare ----------------------------------------------------------------------------------------------------------
def _shard_task(args):
    """Worker: decodes one shard's files, writes its arrays, then its .json; returns the json dict."""
    out, split, index, files, labels, size, plan_hash = args
    out = Path(out)
    stem = f"{split}-{index:05d}"
    # The marker goes first: from here until the new one is written, the shard is not done, whatever its files.
    (out / f"{stem}.json").unlink(missing_ok=True)
    images, kept, skipped = [], [], []
    for path, label in zip(files, labels):
        try:
            images.append(load_image(path, size))
            kept.append(label)
        except BadImage as e:
            skipped.append({"file": str(path), "reason": str(e)})
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    atomic_write(out / f"{stem}.npy", lambda f: np.save(f, array))
    atomic_write(out / f"{stem}.labels.npy", lambda f: np.save(f, np.asarray(kept, np.int32)))
    info = {"file": f"{stem}.npy", "labels": f"{stem}.labels.npy", "count": len(kept), "planned": len(files),
            "plan": plan_hash, "skipped": skipped}
    if split == "train":  # the sums the mean and the colour PCA need, in float64, 16 images at a time
        rgb_sum, rgb_outer = np.zeros(3), np.zeros((3, 3))
        for start in range(0, len(array), 16):
            pixels = array[start : start + 16].reshape(-1, 3).astype(np.float64)
            rgb_sum += pixels.sum(axis=0)
            rgb_outer += pixels.T @ pixels
        stats = {"image_sum": array.sum(axis=0, dtype=np.float64), "rgb_sum": rgb_sum, "rgb_outer": rgb_outer,
                 "pixels": np.float64(array.shape[0] * size * size)}
        atomic_write(out / f"{stem}.stats.npz", lambda f: np.savez(f, **stats))
        info["stats"] = f"{stem}.stats.npz"
    atomic_write(out / f"{stem}.json", lambda f: f.write(json.dumps(info).encode()))  # last: the shard is done
    return split, index, info


def _plan_hash(files, labels, size) -> str:
    h = hashlib.sha256(f"{size}|".encode())
    for p, label in zip(files, labels):
        h.update(f"{p}|{label}\n".encode())
    return h.hexdigest()[:16]


def prepare(src, out, size: int = 256, workers: int | None = None, shard_images: int = 512,
            progress: bool = True, report: dict | None = None) -> dict:
    """Preprocesses the folder `src` into `out` (see the module's docstring); returns the dataset.json contents.
    `report`, a dict when given, receives what this call did: "shards" (decoded now), "shards_kept" (finished
    by an earlier call and kept), "images" (files decoded now). Rerunning it resumes: finished shards are kept. A class none of whose training files decodes is an error naming it. With workers > 1 it starts processes by "spawn", which
    re-imports the calling script: a script that calls prepare() must do so under `if __name__ == "__main__":`."""
    from tqdm import tqdm

    size = check.positive_int(size, "size")
    shard_images = check.positive_int(shard_images, "shard_images")
    if workers is not None:
        workers = check.positive_int(workers, "workers")
    listing = scan(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, done = [], {}
    for split in ("train", "val"):
        items = listing[split]
        for index, start in enumerate(range(0, len(items), shard_images)):
            files = [str(p) for p, _ in items[start : start + shard_images]]
            labels = [label for _, label in items[start : start + shard_images]]
            plan = _plan_hash(files, labels, size)
            marker = out / f"{split}-{index:05d}.json"
            if marker.is_file():
                try:
                    info = json.loads(marker.read_text())
                    if info.get("plan") == plan and (out / info["file"]).is_file():
                        done[(split, index)] = info
                        continue
                except (ValueError, KeyError):
                    pass  # a damaged marker: redo the shard
            tasks.append((str(out), split, index, files, labels, size, plan))
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks) or 1))
    total = sum(len(t[3]) for t in tasks)
    if tasks:  # the old manifest no longer describes the shards: gone until the new one is written
        (out / "dataset.json").unlink(missing_ok=True)
    if done:
        log.info("prepare: %d shard(s) already done, %d to go", len(done), len(tasks))
    with tqdm(total=total, unit="img", desc="prepare", disable=not progress) as bar:
        if workers == 1 or len(tasks) <= 1:
            results = map(_shard_task, tasks)
            for split, index, info in results:
                done[(split, index)] = info
                bar.update(info["planned"])
        else:
            # spawn, not fork: the parent may hold a CUDA context or the emulator's threads. The children
            # import pyalexnet only for this module: keep them off the GPU.
            # A process pool that fails (a worker killed for memory) instead of waiting forever.
            ctx = multiprocessing.get_context("spawn")
            saved = os.environ.get("PYALEXNET_BACKEND")
            os.environ["PYALEXNET_BACKEND"] = "emu"
            try:
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    for future in as_completed([pool.submit(_shard_task, t) for t in tasks]):
                        split, index, info = future.result()
                        done[(split, index)] = info
                        bar.update(info["planned"])
            except BrokenProcessPool as e:
                raise RuntimeError(f"a worker process died ({e}); out of memory? Try fewer --workers. "
                                   "Rerunning resumes.") from None
            finally:
                if saved is None:
                    os.environ.pop("PYALEXNET_BACKEND", None)
                else:
                    os.environ["PYALEXNET_BACKEND"] = saved
    if report is not None:
        report.update(shards=len(tasks), shards_kept=len(done) - len(tasks), images=total)
    return _finish(out, listing, done, size)


def _finish(out: Path, listing: dict, done: dict, size: int) -> dict:
    splits, skipped = {}, []
    image_sum, rgb_sum, rgb_outer, pixels = np.zeros((size, size, 3)), np.zeros(3), np.zeros((3, 3)), 0.0
    for split in ("train", "val"):
        shards = [done[key] for key in sorted(k for k in done if k[0] == split)]
        for info in shards:
            skipped += info["skipped"]
            for s in info["skipped"]:
                log.warning("skipped %s", s["reason"])
            if split == "train":
                with np.load(out / info["stats"]) as z:
                    image_sum += z["image_sum"]
                    rgb_sum += z["rgb_sum"]
                    rgb_outer += z["rgb_outer"]
                    pixels += float(z["pixels"])
        splits[split] = {"count": sum(i["count"] for i in shards),
                         "shards": [{"file": i["file"], "labels": i["labels"], "count": i["count"]} for i in shards]}
    count = splits["train"]["count"]
    if count == 0:
        raise ValueError("no readable training image: every file failed to decode (see the warnings)")
    per_class = np.zeros(len(listing["classes"]), np.int64)
    for info in (done[k] for k in done if k[0] == "train"):
        per_class += np.bincount(np.load(out / info["labels"]), minlength=len(per_class))[: len(per_class)]
    unreadable = [c for c, n in zip(listing["classes"], per_class) if n == 0]
    if unreadable:
        raise ValueError(f"class(es) {', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}: no training "
                         "image decodes (see the warnings): remove the class or replace its files")
    mean = (image_sum / count).astype(np.float32)
    mu = rgb_sum / pixels
    cov = rgb_outer / pixels - np.outer(mu, mu)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
    atomic_write(out / "mean.npy", lambda f: np.save(f, mean))
    manifest = {"format": FORMAT, "version": VERSION, "size": size, "classes": listing["classes"], "splits": splits,
                "mean": "mean.npy", "rgb_mean": mu.tolist(),
                "pca": {"eigenvalues": eigenvalues.tolist(), "eigenvectors": eigenvectors.tolist()},
                "skipped": skipped}
    atomic_write(out / "dataset.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if skipped:
        log.warning("prepare: skipped %d unreadable file(s); dataset.json lists them", len(skipped))
    return manifest


# ---- reading a prepared dataset ---------------------------------------------------------------------------------------
@dataclass
class Split:
    images: list  # memory-mapped uint8 arrays, one per shard
    labels: np.ndarray  # int32, all shards
    starts: np.ndarray  # the first global index of each shard

    def __len__(self):
        return len(self.labels)

    def gather(self, indices) -> np.ndarray:
        """uint8 (len(indices), S, S, 3), read from the shards in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), *self.images[0].shape[1:]), np.uint8)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = indices[rows] - self.starts[s]
            order = np.argsort(local)  # ascending offsets: sequential reads of the memory map
            out[rows[order]] = self.images[s][local[order]]
        return out


class Dataset:
    """A folder written by prepare(): classes, the train and val splits, the mean image and the colour PCA."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such folder" if not self.path.exists()
                                    else f"{self.path}: not a folder (expected one written by 'pyalexnet prepare')")
        manifest_path = self.path / "dataset.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path}: no dataset.json; run 'pyalexnet prepare SRC {self.path}' first")
        try:
            m = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise ValueError(f"{manifest_path}: damaged ({e})") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{manifest_path}: not a {FORMAT} version {VERSION} file")
        self.manifest = m
        self.size = int(m["size"])
        self.classes = list(m["classes"])
        self.mean = np.load(self.path / m["mean"])
        self.eigenvalues = np.asarray(m["pca"]["eigenvalues"], np.float64)
        self.eigenvectors = np.asarray(m["pca"]["eigenvectors"], np.float64)
        self.splits = {name: self._open(s) for name, s in m["splits"].items() if s["count"] > 0}
        # What a resumed training run checks: the same images in the same order, the same mean and PCA.
        ident = json.dumps({k: m[k] for k in ("size", "classes", "splits", "rgb_mean", "pca")}, sort_keys=True)
        self.identity = hashlib.sha256(ident.encode()).hexdigest()[:16]

    def _open(self, s) -> Split:
        images, labels = [], []
        for shard in s["shards"]:
            if shard["count"] == 0:
                continue
            a = np.load(self.path / shard["file"], mmap_mode="r")
            lab = np.load(self.path / shard["labels"])
            if a.shape != (shard["count"], self.size, self.size, 3) or a.dtype != np.uint8 or len(lab) != len(a):
                raise ValueError(f"{self.path / shard['file']}: does not match dataset.json (damaged?)")
            images.append(a)
            labels.append(lab)
        counts = [len(a) for a in images]
        return Split(images, np.concatenate(labels), np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ValueError(f"{self.path}: no {name!r} images")
        return self.splits[name]


# ---- augmentation draws (the kernel applies them) ---------------------------------------------------------------------
def train_draws(rng: np.random.Generator, batch: int, size: int, crop: int, eigenvalues, eigenvectors,
                pca_std: float = PCA_STD):
    """Random crops, flips and PCA colour shifts for a training batch: params (batch, 3) int32 {oy, ox, flip}
    and shift (batch, 3) float32 = sum_i alpha_i sqrt(lambda_i) p_i, alpha_i ~ N(0, pca_std), where lambda_i and
    p_i are the eigenvalues (variances, in 0-255 units) and eigenvectors of the RGB covariance.

    The paper writes the magnitude as alpha_i lambda_i without saying in which units lambda is; taken literally
    with 0-255 pixels that shifts colours by hundreds of grey levels. We follow the reproductions that match its
    results (cuda-convnet's successors, fb.resnet.torch, torchvision's references), whose "eigenvalues" are the
    standard deviations along the components: about +-5 grey levels on ImageNet."""
    params = np.empty((batch, 3), np.int32)
    params[:, 0] = rng.integers(0, size - crop + 1, batch)
    params[:, 1] = rng.integers(0, size - crop + 1, batch)
    params[:, 2] = rng.integers(0, 2, batch)
    alpha = rng.normal(0.0, pca_std, (batch, 3))
    shift = (alpha * np.sqrt(np.asarray(eigenvalues))[None, :]) @ np.asarray(eigenvectors).T
    return params, shift.astype(np.float32)


def eval_draws(batch: int, size: int, crop: int, view: int = 0):
    """The paper's test-time views (section 4.1): view 0 the centre crop, 1-4 the corners, 5-9 the same five
    flipped. Returns params and a zero shift."""
    if not 0 <= view < 10:
        raise ValueError(f"view: expected 0-9, got {view}")
    c, e = (size - crop) // 2, size - crop
    oy, ox = [(c, c), (0, 0), (0, e), (e, 0), (e, e)][view % 5]
    params = np.tile(np.array([oy, ox, view // 5], np.int32), (batch, 1))
    return params, np.zeros((batch, 3), np.float32)


def augment_reference(images, mean, params, shift, crop, scale=1.0) -> np.ndarray:
    """NumPy version of kernels/augment.cu, for the tests."""
    images, mean = np.asarray(images, np.float64), np.asarray(mean, np.float64)
    out = np.empty((len(images), 3, crop, crop))
    for b, (oy, ox, flip) in enumerate(np.asarray(params)):
        patch = images[b, oy : oy + crop, ox : ox + crop] - mean[oy : oy + crop, ox : ox + crop]
        if flip:
            patch = patch[:, ::-1]
        out[b] = (patch + np.asarray(shift, np.float64)[b]).transpose(2, 0, 1) * scale
    return out


# ---- the loader ---------------------------------------------------------------------------------------------------------
class BatchLoader:
    """Batches of one split, staged by a background thread: (images uint8 (B, S, S, 3), labels, params, shift).

    train=True: a fresh permutation each epoch, random crops/flips/colour; the last incomplete batch is dropped.
    train=False: in order, every image once (the last batch may be smaller), the given view. The order and the
    draws are a pure function of (seed, epoch, batch index), so a run resumed at a batch index sees exactly what
    the interrupted run would have."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, crop: int, train: bool, seed: int = 0,
                 view: int = 0, depth: int = 2):
        self.data = dataset
        self.split = dataset.split(split)
        self.batch_size = check.positive_int(batch_size, "batch_size")
        self.crop = check.integer(crop, "crop", 1, dataset.size + 1)
        self.train, self.seed, self.view = train, seed, view
        if train and len(self.split) < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.split)} training images")
        self.depth = depth

    def batches_per_epoch(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _make(self, epoch: int, index: int, order):
        lo = index * self.batch_size
        rows = order[lo : lo + self.batch_size]
        images = self.split.gather(rows)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            params, shift = train_draws(rng, len(rows), self.data.size, self.crop, self.data.eigenvalues,
                                        self.data.eigenvectors)
        else:
            params, shift = eval_draws(len(rows), self.data.size, self.crop, self.view)
        return images, self.split.labels[rows].astype(np.int64), params, shift

    def epoch(self, epoch: int = 0, start: int = 0):
        """Yields the batches of `epoch` from batch index `start`, the next one prepared in the background."""
        n = len(self.split)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False  # the consumer has gone

        def produce():
            try:
                for i in range(start, self.batches_per_epoch()):
                    if not put(self._make(epoch, i, order)):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
                put(e)

        thread = threading.Thread(target=produce, name="pyalexnet-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
