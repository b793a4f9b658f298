"""Images in, batches out: an ImageNet-style folder, `prepare` into .npy shards, and the batch loader.

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

`BatchLoader` serves training or evaluation batches, staged ahead while the caller's step runs: a planner
thread draws each batch's augmentation (crop offsets, flips, PCA colour) and hands its rows to a pool of
staging threads, which read them from the shards (pread, pyalexnet._staging) into a ring of host buffers;
with device=True a copy thread moves each batch into a ring of device buffers on a stream of its own. The
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
import time
import warnings
from contextlib import ExitStack, contextmanager
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
            progress: bool = True, report: dict | None = None, interleave: bool = False) -> dict:
    """Preprocesses the folder `src` into `out` (see the module's docstring); returns the dataset.json contents.
    `report`, a dict when given, receives what this call did: "shards" (decoded now), "shards_kept" (finished
    by an earlier call and kept), "images" (files decoded now). Rerunning it resumes: finished shards are kept. A class none of whose training files decodes is an error naming it. With workers > 1 it starts processes by "spawn", which
    re-imports the calling script: a script that calls prepare() must do so under `if __name__ == "__main__":`.

    `interleave`: the training files in a fixed pseudo-random order (seed 0) instead of class by class, so that
    every shard holds a sample of all classes: what the loader's windowed shuffle needs (a window of shards is then
    a random sample of the whole set). Changing it rewrites the training shards."""
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
        if interleave and split == "train":
            items = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
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
    return _finish(out, listing, done, size, interleave)


def _finish(out: Path, listing: dict, done: dict, size: int, interleave: bool = False) -> dict:
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
                **({"interleave": True} if interleave else {}), "mean": "mean.npy", "rgb_mean": mu.tolist(),
                "pca": {"eigenvalues": eigenvalues.tolist(), "eigenvectors": eigenvectors.tolist()},
                "skipped": skipped}
    atomic_write(out / "dataset.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if skipped:
        log.warning("prepare: skipped %d unreadable file(s); dataset.json lists them", len(skipped))
    return manifest


# ---- reading a prepared dataset ---------------------------------------------------------------------------------------
def _open_limit() -> int:
    """How many shard files a dataset keeps open: a quarter of the process's limit, at most 256 (ImageNet has
    about 2,600 shards and many systems allow 1,024 open files)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(4, min(256, (soft if soft > 0 else 1024) // 4))


class _ShardFiles:
    """The shards' open file descriptors, opened on first use, the least recently used closed when more than
    `limit` are open, but never one a reader holds. Thread-safe: the staging threads share it."""

    def __init__(self, paths, limit: int):
        self.paths, self.limit = [str(p) for p in paths], limit
        self._lock = threading.Lock()
        self._open: OrderedDict[int, list] = OrderedDict()  # shard -> [fd, readers]

    @contextmanager
    def use(self, shard: int):
        with self._lock:
            entry = self._open.get(shard)
            if entry is None:
                entry = self._open[shard] = [os.open(self.paths[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), 0]
            else:
                self._open.move_to_end(shard)
            entry[1] += 1
            self._trim()
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                self._trim()

    def open_count(self) -> int:
        return len(self._open)

    def _trim(self):
        while len(self._open) > self.limit:
            idle = next((s for s, (_, readers) in self._open.items() if readers == 0), None)
            if idle is None:
                return  # every open file is being read: over the limit until one is released
            os.close(self._open.pop(idle)[0])

    def close(self):
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


class Split:
    """One split of a prepared dataset: its shards, read with pread into the caller's buffers.

    Not memory maps: a map keeps its file open (one per shard: too many for ImageNet's ~2,600 under the usual
    limit of 1,024), and a map of a file that shrank kills the process with SIGBUS where a read returns short
    and becomes an error naming the file. Reading is thread-safe and releases the interpreter lock."""

    def __init__(self, paths, offsets, counts, labels, image_shape):
        self.paths = [Path(p) for p in paths]
        self.offsets = [int(o) for o in offsets]  # where each shard's pixels start (after the .npy header)
        self.counts = np.asarray(counts, np.int64)
        self.labels = labels  # int32, all shards
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)  # first index per shard
        self.image_shape = tuple(image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.files = _ShardFiles(self.paths, _open_limit())
        self._advice_refused = False

    def __len__(self):
        return len(self.labels)

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index within the shard) of each global image index."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"image indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]

    def read_into(self, out: np.ndarray, positions, indices) -> None:
        """out[positions[i]] = image indices[i] (out: uint8 (n, S, S, 3), C-contiguous), in ascending file order,
        by pyalexnet._staging.read_rows: one pread per image with the interpreter lock released, so that
        several threads read side by side."""
        from . import _staging

        positions = np.asarray(positions, np.int64)
        shard, local = self.locate(indices)
        order = np.lexsort((local, shard))
        shard, local, positions = shard[order], local[order], positions[order]
        offsets = np.asarray(self.offsets, np.int64)[shard] + local * self.row_bytes
        with ExitStack() as held:
            fd_of = {s: held.enter_context(self.files.use(s)) for s in np.unique(shard).tolist()}
            fds = np.fromiter((fd_of[s] for s in shard.tolist()), np.int64, len(shard))
            short = _staging.read_rows(fds, offsets, out, positions, self.row_bytes)
        if short >= 0:
            raise ValueError(f"{self.paths[shard[short]]}: image {local[short]} is cut short (the file has shrunk "
                             "since the dataset was opened?); rerun 'pyalexnet prepare'")

    def gather(self, indices) -> np.ndarray:
        """uint8 (len(indices), S, S, 3), the images in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        self.read_into(out, np.arange(len(indices)), indices)
        return out

    def readahead(self, indices) -> None:
        """Asks the kernel to start reading these images from disk now (posix_fadvise WILLNEED), so that a read
        soon after finds them in the page cache. A no-op where the call does not exist."""
        shard, local = self.locate(indices)
        for s, lo in sorted(zip(shard.tolist(), local.tolist())):
            self._advise(s, self.offsets[s] + lo * self.row_bytes, self.row_bytes)

    def readahead_shards(self, shards) -> None:
        """The same for whole shards: one call each."""
        for s in sorted(shards):
            self._advise(s, self.offsets[s], int(self.counts[s]) * self.row_bytes)

    def _advise(self, shard: int, offset: int, length: int) -> None:
        # Only a hint: a file system that refuses it costs the read-ahead, never the run.
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            with self.files.use(shard) as fd:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as e:
            if not self._advice_refused:
                self._advice_refused = True
                log.warning("read-ahead refused for %s (%s); reading on without it", self.paths[shard], e)


def _npy_pixels(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) of a .npy file, from its header, without reading or mapping it."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{path}: not a C-ordered array")
        return shape, dtype, f.tell()


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
        # ("interleave" only where prepare wrote it: datasets from before it keep their identity.)
        ident = json.dumps({k: m[k] for k in ("size", "classes", "splits", "rgb_mean", "pca", "interleave") if k in m},
                           sort_keys=True)
        self.identity = hashlib.sha256(ident.encode()).hexdigest()[:16]

    def _open(self, s) -> Split:
        paths, offsets, counts, labels = [], [], [], []
        image = (self.size, self.size, 3)
        for shard in s["shards"]:
            if shard["count"] == 0:
                continue
            path = self.path / shard["file"]
            try:
                shape, dtype, offset = _npy_pixels(path)
                size = path.stat().st_size
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable shard ({e}); rerun 'pyalexnet prepare'") from None
            lab = np.load(self.path / shard["labels"])
            if shape != (shard["count"], *image) or dtype != np.uint8 or len(lab) != shard["count"]:
                raise ValueError(f"{path}: does not match dataset.json (damaged?)")
            if size < offset + shard["count"] * int(np.prod(image)):
                raise ValueError(f"{path}: truncated ({size} bytes, {offset + shard['count'] * int(np.prod(image))} "
                                 "expected); rerun 'pyalexnet prepare'")
            paths.append(path)
            offsets.append(offset)
            counts.append(shard["count"])
            labels.append(lab)
        return Split(paths, offsets, counts, np.concatenate(labels), image)

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
class Batch(NamedTuple):
    """One batch: images uint8 (B, S, S, 3), labels int64 (B,), params int32 (B, 3) {oy, ox, flip} and shift
    float32 (B, 3), the augmentation draws (host arrays, what ops.augment_batch takes)."""
    images: Any
    labels: Any
    params: np.ndarray
    shift: np.ndarray


class _Done(threading.Event):
    """The emulator's event: set by the copy thread when its copy is done, carrying its error if it failed."""

    error: BaseException | None = None

    def wait(self, timeout=None):
        finished = super().wait(timeout)
        if self.error is not None:
            raise self.error
        return finished


def _finished() -> _Done:
    done = _Done()
    done.set()
    return done


class _HostCopies:
    """The emulator's copy engine: a thread that runs the host-to-"device" copies one after another, in the
    order they were asked for, each signalling its event when done, as a CUDA copy stream would. The emulator's
    kernels run on the calling thread, so its "compute stream" is that thread: waiting for a copy there means
    waiting on the host, and whatever that thread launched before is already finished."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pyalexnet-copy", daemon=True)
        self._thread.start()

    @staticmethod
    def host_buffer(shape, dtype):
        return np.empty(shape, dtype)

    @staticmethod
    def device_buffer(shape, dtype):
        return np.empty(shape, dtype)

    def copy(self, pairs, after) -> _Done:
        done = _Done()
        self._jobs.put((pairs, after, done))
        return done

    def _run(self):
        while (job := self._jobs.get()) is not None:
            pairs, after, done = job
            try:
                if after is not None:
                    after.wait()
                for dst, src in pairs:
                    np.copyto(dst, src)
            except BaseException as e:  # noqa: BLE001  (handed to whoever waits for this copy)
                done.error = e
            done.set()

    @staticmethod
    def wait_on_compute(event):
        event.wait()

    @staticmethod
    def compute_done():
        return _finished()

    @staticmethod
    def host_wait(event):
        event.wait()

    def close(self):
        self._jobs.put(None)
        _join(self._thread)


class _CudaCopies:
    """The cuda backend's copy engine: one non-blocking stream of its own, copying from pinned host buffers (a
    copy from pageable memory would be staged through a driver buffer and not overlap), ordered against the
    model's stream by events only, never by a device-wide synchronisation."""

    def __init__(self):
        import cupy

        self.cp = cupy
        self.device_id = cupy.cuda.runtime.getDevice()
        with cupy.cuda.Device(self.device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)

    @staticmethod
    def host_buffer(shape, dtype):
        import cupyx

        return cupyx.empty_pinned(shape, dtype)

    def device_buffer(self, shape, dtype):
        with self.cp.cuda.Device(self.device_id):
            return self.cp.empty(shape, dtype)

    def copy(self, pairs, after):
        rt = self.cp.cuda.runtime
        with self.cp.cuda.Device(self.device_id):  # this runs on the loader's copy thread
            if after is not None:
                self.stream.wait_event(after)  # the model has finished reading the device buffer
            for dst, src in pairs:
                rt.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes, rt.memcpyHostToDevice, self.stream.ptr)
            # block=True: the planner waits on it (host_wait) for about a step per batch; a spinning wait would
            # hold a core the whole time
            event = self.cp.cuda.Event(block=True, disable_timing=True)
            event.record(self.stream)
        return event

    def wait_on_compute(self, event):
        self.cp.cuda.get_current_stream().wait_event(event)  # the GPU waits, the host goes on

    def compute_done(self):
        event = self.cp.cuda.Event(disable_timing=True)
        event.record(self.cp.cuda.get_current_stream())
        return event

    @staticmethod
    def host_wait(event):
        event.synchronize()

    def close(self):
        self.stream.synchronize()  # no copy may still read a pinned buffer the next epoch refills


class _Slot:
    """One buffer of a ring: a batch's images and labels, and the event that says when it may be refilled."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.free_after = None  # host ring: its copy to the device; device ring: the model's use of it


SHUFFLES = ("full", "window")


class BatchLoader:
    """Batches of one split, staged ahead of the training step by a pool of threads.

    train=True: a fresh order each epoch, random crops/flips/colour; the last incomplete batch is dropped.
    train=False: in order, every image once (the last batch may be smaller), the given view. The order and the
    draws are a pure function of (seed, epoch, batch index), whatever the number of threads, so a run resumed at
    a batch index sees exactly what the interrupted run would have.

    `shuffle`: "full", a permutation of the whole split each epoch (the default); "window", for datasets larger
    than memory: the shards in a random order and the images shuffled within each run of `window` shards, so
    that an epoch reads each shard once, window by window. A shard written by prepare holds the images of few
    classes (files are sharded in class order unless prepare's `interleave`): a window must span many classes,
    or the batches are far from a random sample. `threads` staging threads (default: up to 4, the CPUs
    allowed) read the batches from the shards, each thread a whole batch, straight into a ring of reusable
    buffers (`depth + threads` of them; on the device `depth + 1`). `readahead` asks the kernel
    (posix_fadvise) for what the batches after those will read, so that reading from disk overlaps too: whole shards with the windowed shuffle, image by image with the full one. None (the default)
    means on for the windowed shuffle and off for the full one, whose data is expected in the page cache (there
    a request per image costs about a third of the staging rate, for nothing).

    `wait_seconds` adds up the time the caller spent waiting for a batch: the input pipeline's share of a
    training step, when the step is faster than the staging. It is the host's wait: on the cuda backend the
    GPU's own wait for a batch's copy (its stream waits on the copy's event; about 0.5 ms for 128 images of
    256 x 256 over PCIe 5) is not in it.

    One epoch at a time uses the rings (device=True or reuse=True): a second one while the first is unfinished
    and not closed is an error."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, crop: int, train: bool, seed: int = 0,
                 view: int = 0, depth: int = 2, threads: int | None = None, shuffle: str = "full", window: int = 8,
                 readahead: bool | None = None):
        self.data = dataset
        self.split = dataset.split(split)
        self.batch_size = check.positive_int(batch_size, "batch_size")
        self.crop = check.integer(crop, "crop", 1, dataset.size + 1)
        self.train, self.seed = train, seed
        self.view = check.integer(view, "view", 0, 10)
        if train and len(self.split) < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.split)} training images")
        self.depth = check.positive_int(depth, "depth")
        self.threads = check.positive_int(threads, "threads") if threads is not None else default_threads()
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle: expected one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        self.shuffle, self.window = shuffle, check.positive_int(window, "window")
        self.readahead = shuffle == "window" if readahead is None else bool(readahead)
        self.wait_seconds = 0.0
        self._rings: dict[str, list[_Slot]] = {}
        self._rings_in_use = False
        self._copies = None

    def batches_per_epoch(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The image indices of `epoch`, in the order the batches take them."""
        n = len(self.split)
        if not self.train:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle == "full":
            return rng.permutation(n)
        shards = rng.permutation(len(self.split.counts))
        windows = []
        for w in range(0, len(shards), self.window):
            members = [np.arange(self.split.starts[s], self.split.starts[s] + self.split.counts[s])
                       for s in shards[w : w + self.window]]
            windows.append(rng.permutation(np.concatenate(members)))
        return np.concatenate(windows)

    def _draws(self, epoch: int, index: int, count: int):
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            return train_draws(rng, count, self.data.size, self.crop, self.data.eigenvalues, self.data.eigenvectors)
        return eval_draws(count, self.data.size, self.crop, self.view)

    def _rows(self, order, index: int):
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def _ring(self, kind: str, make) -> list[_Slot]:
        """The ring of `kind`, made once and reused by every epoch: "device", `depth` batches ready and the one
        the caller holds; "host" and "reuse", as many again as there are staging threads, each reading one."""
        if kind not in self._rings:
            shape = (self.batch_size, *self.split.image_shape)
            count = self.depth + 1 if kind == "device" else self.depth + self.threads
            self._rings[kind] = [_Slot(make(shape, np.uint8), make((self.batch_size,), np.int64))
                                 for _ in range(count)]
        return self._rings[kind]

    def epoch(self, epoch: int = 0, start: int = 0, device: bool = False, reuse: bool = False):
        """Yields the Batch-es of `epoch` from batch index `start`, staged ahead while the caller works.

        device=False: images and labels are NumPy arrays of the caller's own (each batch read straight into a
        new array: keep them as long as you like); with reuse=True the images are the loader's host ring instead,
        each batch valid until the next one is asked for (no allocation, and no page for the kernel to clear,
        per batch: exactly the staging the device path does). device=True: they are backend arrays (CuPy on the cuda
        backend) in the loader's ring on the device, copied there asynchronously, on a stream of their own,
        while the previous step runs; such a batch is valid until the next one is asked for: use it (launch the
        kernels that read it) before, or copy it. The draws are always new host arrays."""
        start = check.integer(start, "start", 0, max(self.batches_per_epoch(), 0) + 1)
        order = self.order(epoch)
        if device:
            return self._device_epoch(epoch, start, order)
        return self._host_epoch(epoch, start, order, reuse)

    # -- staging: a planner thread hands each batch's rows to the pool, in order ------------------------------------
    def _stage(self, epoch, start, order, stop, take_slot, staged):
        """The planner: for each batch, a buffer to fill (take_slot), the pool's reads into it, the draws; puts
        (index, slot, futures, labels, params, shift) in `staged`, then None; an error goes there too."""
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pyalexnet-stage")
        last = self.batches_per_epoch()
        ahead = self.depth + self.threads

        def put(item):
            while not stop.is_set():
                try:
                    staged.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        advised: set[int] = set()

        def advise(i):
            rows = self._rows(order, i)
            if self.shuffle == "window":  # a window's shards are read whole, in any order: ask for them whole
                shards = set(self.split.locate(rows)[0].tolist()) - advised
                advised.update(shards)
                self.split.readahead_shards(shards)
            else:
                self.split.readahead(rows)

        def plan():
            try:
                if self.readahead:
                    for i in range(start, min(start + ahead, last)):
                        advise(i)
                for i in range(start, last):
                    if self.readahead and i + ahead < last:
                        advise(i + ahead)
                    rows = self._rows(order, i)
                    slot = take_slot()
                    if slot is None:
                        return  # stopped
                    # One thread reads a whole batch, the threads different batches: splitting each batch among
                    # them measured 15-20% slower here (a barrier per batch, and the interpreter's per-call work
                    # twice as often), and only the pipeline's first batch would come sooner.
                    futures = [pool.submit(self.split.read_into, slot.images, np.arange(len(rows)), rows)]
                    labels = self.split.labels[rows].astype(np.int64)
                    params, shift = self._draws(epoch, i, len(rows))
                    if not put((i, slot, futures, labels, params, shift)):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
                put(e)

        thread = threading.Thread(target=plan, name="pyalexnet-loader", daemon=True)
        thread.start()
        return thread, pool

    @staticmethod
    def _get(q: queue.Queue, stop: threading.Event):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    return None

    def _hand_out(self, q: queue.Queue, receive, release):
        """The caller's side of a pipeline: takes the next item from `q` (None ends it, an exception a stage
        raised is raised here), turns it into (held, batch) with `receive`, and hands the batch out; `release`
        gives the held buffer back when the caller asks for the next batch, or leaves."""
        held = None
        try:
            while True:
                waited = time.perf_counter()
                if held is not None:  # the caller is done with the last batch (it has launched its work with it)
                    release(held)
                    held = None
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                held, batch = receive(item)
                self.wait_seconds += time.perf_counter() - waited
                yield batch
        finally:
            if held is not None:
                release(held)

    def _claim_rings(self):
        """One epoch at a time may use the rings: a second, while the first is unfinished and not closed, would
        refill the buffers the first one handed out."""
        if self._rings_in_use:
            raise RuntimeError("an earlier epoch of this loader is still running (an unfinished generator from "
                               "epoch(..., device=True or reuse=True)): finish it or close() it first")
        self._rings_in_use = True

    def _host_epoch(self, epoch, start, order, reuse):
        stop = threading.Event()
        staged: queue.Queue = queue.Queue(self.depth + self.threads - 1)  # with the planner's: one per thread
        shape = (self.batch_size, *self.split.image_shape)
        free: queue.Queue = queue.Queue()
        if reuse:
            self._claim_rings()
            for slot in self._ring("reuse", np.empty):
                free.put(slot)
            take_slot = lambda: self._get(free, stop)  # noqa: E731
        else:
            take_slot = lambda: _Slot(np.empty(shape, np.uint8), None)  # noqa: E731

        def receive(item):
            _, slot, futures, labels, params, shift = item
            for f in futures:
                f.result()
            return (slot if reuse else None), Batch(slot.images[: len(labels)], labels, params, shift)

        thread, pool = self._stage(epoch, start, order, stop, take_slot, staged)
        try:
            yield from self._hand_out(staged, receive, free.put)
        finally:
            stop.set()
            _join(thread)
            _shut_down(pool)
            if reuse:
                self._rings_in_use = False

    def _device_epoch(self, epoch, start, order):
        """Three stages, each its own thread: the planner and the pool read batches into the host ring; the copy
        thread waits for each batch's reads, then copies it into a free buffer of the device ring on the copy
        stream; the caller (the model's stream) waits for that copy by an event. A host buffer is refilled
        only after its copy has finished, a device buffer only after the work the caller launched with it."""
        from . import _backend

        self._claim_rings()
        if self._copies is None and _backend.active.name == "cuda":
            self._copies = _CudaCopies()
        copies = self._copies if self._copies is not None else _HostCopies()
        new = "device" not in self._rings
        host_ring = self._ring("host", copies.host_buffer)
        device_ring = self._ring("device", copies.device_buffer)
        if new:  # the memory pool may hand out blocks that work queued on the model's stream still touches
            for slot in device_ring:
                slot.free_after = copies.compute_done()
        stop = threading.Event()
        free_host: queue.Queue = queue.Queue()
        free_device: queue.Queue = queue.Queue()
        for slot in host_ring:
            free_host.put(slot)
        for slot in device_ring:
            free_device.put(slot)
        staged: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()

        def take_host_slot():
            slot = self._get(free_host, stop)
            if slot is not None and slot.free_after is not None:
                copies.host_wait(slot.free_after)  # its last copy to the device has finished reading it
            return slot

        def copy_out():
            try:
                while (item := self._get(staged, stop)) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    i, slot, futures, labels, params, shift = item
                    for f in futures:
                        f.result()
                    n = len(labels)
                    slot.labels[:n] = labels
                    target = self._get(free_device, stop)
                    if target is None:
                        return
                    done = copies.copy([(target.images[:n], slot.images[:n]), (target.labels[:n], slot.labels[:n])],
                                       target.free_after)
                    slot.free_after = done
                    free_host.put(slot)
                    ready.put((target, done, n, params, shift))
                ready.put(None)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
                ready.put(e)
                stop.set()

        def receive(item):
            target, done, n, params, shift = item
            copies.wait_on_compute(done)
            return target, Batch(target.images[:n], target.labels[:n], params, shift)

        def release(target):
            target.free_after = copies.compute_done()
            free_device.put(target)

        planner, pool = self._stage(epoch, start, order, stop, take_host_slot, staged)
        copier = threading.Thread(target=copy_out, name="pyalexnet-loader-copy", daemon=True)
        copier.start()
        try:
            yield from self._hand_out(ready, receive, release)
        finally:
            stop.set()
            _join(planner)
            _join(copier)
            _shut_down(pool)
            copies.close()  # cuda: the stream has finished every copy from the host ring; emu: the thread ends
            for slot in host_ring:  # every copy is over: a failed one must not fail the next epoch's first wait
                slot.free_after = None
            self._rings_in_use = False


def _join(thread: threading.Thread) -> None:
    # A generator the garbage collector finalises may run its cleanup on one of its own threads.
    if thread is not threading.current_thread():
        thread.join()


def _shut_down(pool: ThreadPoolExecutor) -> None:
    if threading.current_thread().name.startswith("pyalexnet-stage"):
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown(wait=True, cancel_futures=True)


def default_threads() -> int:
    """Staging threads when the caller does not say: one per CPU this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))
