"""The data pipeline's CPU side, measured: `prepare` throughput (images/s, and per worker process) on synthetic
photos of ImageNet's typical size, and how many images/s the background loader stages (shard reads, gathers and
augmentation draws), to compare with the GPU's training rate: the loader must outrun it.

    python bench/data_pipeline.py [--images 400] [--width 500 --height 375] [--workers 1 2] [--out FILE]
                                  [--keep DIR]   (keep the prepared dataset there, e.g. for pyalexnet train)

The photos are smooth random fields with noise, saved as JPEG quality 90 (about the entropy of real photos; pure
noise would make JPEG decoding unrealistically slow). Prints one line per measurement and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_photos(root: Path, n: int, width: int, height: int, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        a = np.asarray(im, np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def main(argv=None) -> int:
    from pyalexnet.data import BatchLoader, Dataset, prepare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="bench/out/data_pipeline.json")
    p.add_argument("--keep", default=None, help="copy the last prepared dataset to this folder")
    args = p.parse_args(argv)
    results = {"images": args.images, "photo": [args.width, args.height], "cpus": len(os.sched_getaffinity(0)),
               "prepare": [], "loader": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "src", args.images, args.width, args.height)
        for workers in sorted(set(args.workers)):
            out = tmp / f"prepared-{workers}"
            t = time.perf_counter()
            prepare(tmp / "src", out, workers=workers, progress=False)
            dt = time.perf_counter() - t
            rate = args.images / dt
            results["prepare"].append({"workers": workers, "seconds": dt, "images_per_s": rate,
                                       "images_per_s_per_worker": rate / workers})
            print(f"prepare, {workers} worker(s): {dt:.2f} s, {rate:.1f} images/s, {rate / workers:.1f} per worker")
        ds = Dataset(out)
        batch = min(args.batch_size, args.images)
        loader = BatchLoader(ds, "train", batch, 227, train=True)
        staged, t = 0, time.perf_counter()
        for epoch in range(3):
            for images, *_ in loader.epoch(epoch):
                staged += len(images)
        dt = time.perf_counter() - t
        results["loader"] = {"batch": batch, "images": staged, "seconds": dt, "images_per_s": staged / dt}
        print(f"loader: {staged / dt:.0f} images/s staged (batch {batch}, 256 x 256 uint8 from memory-mapped shards, "
              "one thread)")
        del loader, ds
        if args.keep:
            import shutil

            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(out, args.keep)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
