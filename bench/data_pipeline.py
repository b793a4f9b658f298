"""The data pipeline's CPU side, measured: `prepare` throughput (images/s, and per worker process) on synthetic
photos of ImageNet's typical size; then how many images/s the loader stages with 1...N threads, from the page
cache and cold from disk, beside a bare NumPy gather of the same rows from the same shards; and, where a GPU
exists, the host-to-device copy rate from pinned and from pageable memory.

    python bench/data_pipeline.py [--images 400] [--width 500 --height 375] [--workers 1 2]
                                  [--stage-images 4096] [--threads 1 2 4] [--batch-size 128] [--out FILE]
                                  [--keep DIR]   (keep the prepared photos' dataset there, e.g. for pyalexnet train)

The photos are smooth random fields with noise, saved as JPEG quality 90 (about the entropy of real photos; pure
noise would make JPEG decoding unrealistically slow). The staging set is prepared from small photos (their
decoding is not what is measured): `--stage-images` images stored at 256 x 256, 196,608 bytes each, as
ImageNet's. "Cold" drops the shards from the page cache first (fsync, then posix_fadvise DONTNEED: no root
needed); on a machine whose disk is itself cached by the host, cold may still not mean a physical read.
Prints one line per measurement and writes JSON to --out. Every figure is measured on this machine, now.
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


def write_back(paths, drop: bool = False) -> None:
    """fsync each file (the pages prepare just wrote would otherwise be written back by the kernel during the
    measurements, on the same CPUs); with `drop`, then evict them from the page cache (a dirty page would stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def numpy_gather_rate(split, batch: int, epochs: int, seed: int = 0) -> float:
    """The reference: memory-mapped shards, each batch's rows gathered by NumPy fancy indexing, one thread (what
    the loader did before it had threads)."""
    maps = [np.load(p, mmap_mode="r") for p in split.paths]
    rng, staged, t = np.random.default_rng(seed), 0, time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(split))
        for lo in range(0, len(order) - batch + 1, batch):
            rows = order[lo : lo + batch]
            shard, local = split.locate(rows)
            out = np.empty((len(rows), *split.image_shape), np.uint8)
            for s in np.unique(shard):
                pick = np.nonzero(shard == s)[0]
                ascending = np.argsort(local[pick])
                out[pick[ascending]] = maps[s][local[pick][ascending]]
            staged += len(rows)
    return staged / (time.perf_counter() - t)


def loader_rate(ds, batch: int, threads: int, epochs: int, mode: str, cold: bool = False) -> float:
    """Images/s the loader delivers: mode "ring" (into its reused host buffers: the staging the device path
    does), "new" (each batch a new array of the caller's) or "device" (and copied to the device)."""
    from pyalexnet.data import BatchLoader

    loader = BatchLoader(ds, "train", batch, 227, train=True, threads=threads)
    for _ in loader.epoch(epochs, device=mode == "device", reuse=mode == "ring"):
        pass  # untimed: the rings' first fill (page faults), the copy stream
    staged, seconds = 0, 0.0
    for epoch in range(epochs):
        if cold:
            write_back(loader.split.paths, drop=True)
        t = time.perf_counter()
        for b in loader.epoch(epoch, device=mode == "device", reuse=mode == "ring"):
            staged += len(b.labels)
        seconds += time.perf_counter() - t
    return staged / seconds


def _one_process(args) -> float:
    path, batch, epochs = args
    from pyalexnet.data import Dataset

    return loader_rate(Dataset(path), batch, 1, epochs, "ring")


def separate_processes_rate(path, batch: int, epochs: int, processes: int) -> float:
    """What `processes` separate processes, one staging thread each, stage together: the machine's ceiling for
    reading from the page cache, with no interpreter lock or address space shared."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    os.environ["PYALEXNET_BACKEND"] = "emu"  # the children only read files; no GPU context each
    with ctx.Pool(processes) as pool:
        return sum(pool.map(_one_process, [(str(path), batch, epochs)] * processes))


def copy_rates(batch_bytes: int, repeats: int = 20) -> dict | None:
    """Host-to-device GB/s of one batch, pinned and pageable, timed by CUDA events; None without a GPU."""
    import pyalexnet as pa

    if pa.backend_name() != "cuda":
        return None
    import cupy
    import cupyx

    device = cupy.empty(batch_bytes, np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    rt = cupy.cuda.runtime
    rates = {}
    for kind, host in (("pinned", cupyx.empty_pinned(batch_bytes, np.uint8)), ("pageable", np.empty(batch_bytes, np.uint8))):
        host[:] = 1
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        rt.memcpyAsync(device.data.ptr, host.ctypes.data, batch_bytes, rt.memcpyHostToDevice, stream.ptr)  # warm-up
        start.record(stream)
        for _ in range(repeats):
            rt.memcpyAsync(device.data.ptr, host.ctypes.data, batch_bytes, rt.memcpyHostToDevice, stream.ptr)
        end.record(stream)
        end.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, end)
        rates[kind + "_gbps"] = repeats * batch_bytes / (ms * 1e-3) / 1e9
    return rates


def main(argv=None) -> int:
    from pyalexnet.data import Dataset, prepare

    cpus = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="photos for the prepare measurement (0: skip it)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--workers", type=int, nargs="+", default=[1, cpus])
    p.add_argument("--stage-images", type=int, default=4096, help="images of the staging measurement (0: skip it)")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, cpus, 2 * cpus}))
    p.add_argument("--epochs", type=int, default=2, help="passes over the staging set per measurement")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="bench/out/data_pipeline.json")
    p.add_argument("--keep", default=None, help="copy the prepared photos' dataset to this folder")
    args = p.parse_args(argv)
    results = {"kind": "measured", "date": time.strftime("%Y-%m-%d"), "images": args.images,
               "photo": [args.width, args.height], "cpus": cpus, "prepare": [], "staging": None,
               "copy": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images:
            make_photos(tmp / "src", args.images, args.width, args.height)
            for workers in sorted(set(args.workers)):
                out = tmp / f"prepared-{workers}"
                t = time.perf_counter()
                prepare(tmp / "src", out, workers=workers, progress=False)
                dt = time.perf_counter() - t
                rate = args.images / dt
                results["prepare"].append({"workers": workers, "seconds": dt, "images_per_s": rate,
                                           "images_per_s_per_worker": rate / workers})
                print(f"prepare, {workers} worker(s): {dt:.2f} s, {rate:.1f} images/s, {rate / workers:.1f} per worker",
                      flush=True)
            if args.keep:
                import shutil

                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(out, args.keep)
        if args.stage_images:
            make_photos(tmp / "small", args.stage_images, 64, 48, classes=16, seed=1)
            prepare(tmp / "small", tmp / "staging", workers=cpus, progress=False)
            ds = Dataset(tmp / "staging")
            batch = min(args.batch_size, args.stage_images)
            split = ds.split("train")
            write_back(split.paths)
            numpy_gather_rate(split, batch, 1)  # into the page cache
            reference = numpy_gather_rate(split, batch, args.epochs)
            print(f"bare NumPy gather (memory-mapped shards, one thread, page cache): {reference:,.0f} images/s",
                  flush=True)
            rows = []
            for threads in sorted(set(args.threads)):
                row = {"threads": threads}
                for name, mode, cold in (("page_cache", "ring", False), ("cold", "ring", True),
                                         ("new_arrays", "new", False), ("to_device", "device", False)):
                    row[name] = loader_rate(ds, batch, threads, args.epochs, mode, cold)
                rows.append(row)
                one = rows[0]["page_cache"]
                print(f"loader, {threads} thread(s): staged {row['page_cache']:,.0f} images/s from the page cache "
                      f"({row['page_cache'] / threads:,.0f} per thread, {row['page_cache'] / one:.2f}x one thread; "
                      f"the NumPy gather: {reference:,.0f}), {row['cold']:,.0f} cold from disk; "
                      f"{row['new_arrays']:,.0f} into new arrays; {row['to_device']:,.0f} with the copy to the device "
                      f"({'the GPU' if _on_gpu() else 'the emulator: a host copy on the copy thread'})", flush=True)
            backend = os.environ.get("PYALEXNET_BACKEND")
            apart = separate_processes_rate(tmp / "staging", batch, args.epochs, 2)
            if backend is None:
                os.environ.pop("PYALEXNET_BACKEND", None)
            else:
                os.environ["PYALEXNET_BACKEND"] = backend
            print(f"two separate processes, one staging thread each, together: {apart:,.0f} images/s (the ceiling "
                  "without a shared interpreter or address space)", flush=True)
            results["staging"] = {"images": len(split), "batch": batch, "image_bytes": split.row_bytes,
                                  "numpy_gather_images_per_s": reference, "loader": rows,
                                  "two_processes_images_per_s": apart}
            results["copy"] = copy_rates(batch * split.row_bytes)
            if results["copy"]:
                c = results["copy"]
                print(f"host to device, one batch ({batch * split.row_bytes / 1e6:.1f} MB): {c['pinned_gbps']:.1f} GB/s "
                      f"pinned, {c['pageable_gbps']:.1f} GB/s pageable", flush=True)
            del ds, split
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


def _on_gpu() -> bool:
    import pyalexnet as pa

    return pa.backend_name() == "cuda"


if __name__ == "__main__":
    raise SystemExit(main())
