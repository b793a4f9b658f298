"""The batch loader's pipeline: staging threads, the host and device rings, the copy queue, windowed shuffle.

On the emulator the "device" ring is host memory and the copies run on a copy thread of their own, so the
ordering logic the cuda backend relies on (a buffer refilled only after its last reader is done) runs here.
Every batch is compared with one built independently from the contract: the epoch's order
(np.random.default_rng([seed, epoch]).permutation for the full shuffle), the rows read from the shards, and
the draws of (seed, epoch, batch index)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

import pyalexnet as pa
from pyalexnet import data as D

from test_data import _folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _folder(root / "src", np.random.default_rng(11), per_class=9, corrupt=False)  # 27 training images, 3 classes
    D.prepare(root / "src", root / "out", size=12, workers=1, shard_images=4, progress=False)
    return D.Dataset(root / "out")


def _every_image(split) -> np.ndarray:
    """The split's images read back with NumPy's own .npy reader, in index order: the oracle for the rows."""
    return np.concatenate([np.load(p) for p in split.paths])


def _expected(loader, epoch, order):
    every = _every_image(loader.split)
    out = []
    for i in range(loader.batches_per_epoch()):
        rows = order[i * loader.batch_size : (i + 1) * loader.batch_size]
        if loader.train:
            params, shift = D.train_draws(np.random.default_rng([loader.seed, epoch, i]), len(rows), loader.data.size,
                                          loader.crop, loader.data.eigenvalues, loader.data.eigenvectors)
        else:
            params, shift = D.eval_draws(len(rows), loader.data.size, loader.crop, loader.view)
        out.append((every[rows], loader.split.labels[rows].astype(np.int64), params, shift))
    return out


def _same(batch, expected):
    for got, want in zip(batch, expected):
        got = pa.to_numpy(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _address(a) -> int:
    """Where an array's data starts, on either backend."""
    face = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return face["data"][0]


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pyalexnet-")]


def _no_loader_threads_left():
    deadline = time.monotonic() + 10
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _loader_threads(), [t.name for t in _loader_threads()]


@pytest.mark.parametrize("device", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_staged_batches_are_the_contract_whatever_the_threads(dataset, device, threads):
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, seed=7, threads=threads, depth=2)
    for epoch in (0, 1):
        order = np.random.default_rng([7, epoch]).permutation(len(loader.split))  # the full shuffle's contract
        np.testing.assert_array_equal(loader.order(epoch), order)
        expected = _expected(loader, epoch, order)
        got = 0
        for batch, want in zip(loader.epoch(epoch, device=device), expected):
            _same(batch, want)
            got += 1
        assert got == len(expected) == 6  # 27 images: the last 3 dropped
    _no_loader_threads_left()


@pytest.mark.parametrize("device", [False, True])
def test_the_evaluation_order_and_its_short_last_batch(dataset, device):
    loader = D.BatchLoader(dataset, "train", 5, 12, train=False, view=3, threads=2)
    expected = _expected(loader, 0, np.arange(27))
    assert len(expected) == 6 and len(expected[-1][1]) == 2
    n = 0
    for batch, want in zip(loader.epoch(device=device), expected):  # a device batch is checked before the next
        _same(batch, want)
        n += 1
    assert n == 6


def test_resuming_mid_epoch_gives_bitwise_the_rest(dataset):
    loader = D.BatchLoader(dataset, "train", 3, 10, train=True, seed=1, threads=3, shuffle="window", window=2)
    expected = _expected(loader, 4, loader.order(4))
    rest = [tuple(pa.to_numpy(a).copy() for a in b) for b in loader.epoch(4, start=5, device=True)]
    assert len(expected) == 9 and len(rest) == 4
    for got, want in zip(rest, expected[5:]):
        _same(got, want)


@pytest.mark.parametrize("ring", ["device", "host"])
def test_a_ring_batch_stays_intact_while_the_caller_holds_it(dataset, ring):
    """depth 1: the pipeline may run only one batch ahead; while the caller works (sleeps) on a batch, the staging
    threads (and the copy queue) go on, and must not touch the buffer it holds."""
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, seed=2, threads=2, depth=1)
    expected = _expected(loader, 0, loader.order(0))
    buffers, n = set(), 0
    batches = loader.epoch(0, device=True) if ring == "device" else loader.epoch(0, reuse=True)
    for batch, want in zip(batches, expected):
        time.sleep(0.05)
        _same(batch, want)
        buffers.add(_address(batch.images))
        n += 1
    assert n == len(expected) == 6
    # the ring, reused, no allocation per batch: on the device depth + 1 buffers, on the host depth + threads
    assert len(buffers) == (2 if ring == "device" else 3)


def test_windowed_shuffle_reads_a_window_of_shards_at_a_time(dataset):
    split = dataset.split("train")
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, seed=3, shuffle="window", window=2)
    shard_of = np.searchsorted(split.starts, np.arange(len(split)), side="right") - 1
    for epoch in (0, 1):
        order = loader.order(epoch)
        np.testing.assert_array_equal(np.sort(order), np.arange(len(split)))  # every image once
        np.testing.assert_array_equal(order, loader.order(epoch))  # a pure function of (seed, epoch)
        pos, seen_shards = 0, set()
        while pos < len(order):  # consecutive windows, each exactly the images of two whole shards (the last: one)
            window, end = set(), pos
            while end < len(order):
                window.add(int(shard_of[order[end]]))
                end += 1
                if len(window) == 2 and end - pos == split.counts[list(window)].sum():
                    break
            assert len(window) <= 2 and end - pos == split.counts[list(window)].sum()
            assert not window & seen_shards
            seen_shards |= window
            pos = end
        assert seen_shards == set(range(len(split.counts)))
    assert not np.array_equal(loader.order(0), loader.order(1))
    assert not np.array_equal(loader.order(0), np.sort(loader.order(0)))
    with pytest.raises(ValueError, match="shuffle"):
        D.BatchLoader(dataset, "train", 4, 10, train=True, shuffle="sometimes")


def test_a_shard_cut_short_is_an_error_naming_it_and_every_thread_ends(dataset, tmp_path):
    shutil.copytree(dataset.path, tmp_path / "ds")
    ds = D.Dataset(tmp_path / "ds")
    victim = ds.split("train").paths[2]
    with open(victim, "r+b") as f:  # after the dataset was opened: what a memory map would answer with SIGBUS
        f.truncate(os.path.getsize(victim) - 100)
    for device in (False, True):
        loader = D.BatchLoader(ds, "train", 9, 10, train=False, threads=3)
        with pytest.raises(ValueError, match=f"{victim.name}: image 3 is cut short"):
            for _ in loader.epoch(device=device):
                pass
        _no_loader_threads_left()
    with pytest.raises(ValueError, match="truncated"):  # opened afterwards: refused up front
        D.Dataset(tmp_path / "ds")


@pytest.mark.parametrize("device", [False, True])
def test_leaving_early_or_failing_in_the_loop_stops_every_thread(dataset, device):
    loader = D.BatchLoader(dataset, "train", 2, 10, train=True, threads=3, depth=1)
    for i, _ in enumerate(loader.epoch(0, device=device)):
        if i == 1:
            break
    _no_loader_threads_left()
    with pytest.raises(KeyboardInterrupt):
        for _ in loader.epoch(0, device=device):
            raise KeyboardInterrupt  # what Ctrl-C raises in a script's loop
    _no_loader_threads_left()
    # and the loader still works afterwards, from the same rings
    assert sum(1 for _ in loader.epoch(1, device=device)) == loader.batches_per_epoch()


def test_a_failing_copy_reaches_the_caller_and_the_next_epoch_works(dataset, monkeypatch):
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, threads=2)

    def broken(self, pairs, after):
        raise MemoryError("device out of memory")

    for engine in (D._HostCopies, D._CudaCopies):  # whichever this backend uses
        monkeypatch.setattr(engine, "copy", broken)
    with pytest.raises(MemoryError, match="device out of memory"):
        for _ in loader.epoch(0, device=True):
            pass
    monkeypatch.undo()
    _no_loader_threads_left()
    assert sum(1 for _ in loader.epoch(1, device=True)) == 6


@pytest.mark.emu
def test_a_copy_failing_on_the_emulators_copy_thread_reaches_the_caller(dataset, monkeypatch):
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, threads=2)

    def broken(dst, src):
        raise MemoryError("device out of memory")

    monkeypatch.setattr(D.np, "copyto", broken)
    with pytest.raises(MemoryError, match="device out of memory"):
        for _ in loader.epoch(0, device=True):
            pass
    monkeypatch.undo()
    _no_loader_threads_left()
    # the failed copy's event stays with the epoch that saw it: the next one starts clean
    expected = _expected(loader, 1, loader.order(1))
    n = 0
    for batch, want in zip(loader.epoch(1, device=True), expected):
        _same(batch, want)
        n += 1
    assert n == 6


@pytest.mark.parametrize("mode", [{"device": True}, {"reuse": True}])
def test_one_epoch_at_a_time_uses_the_rings(dataset, mode):
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, threads=2)
    first = loader.epoch(0, **mode)
    next(first)
    with pytest.raises(RuntimeError, match="still running"):
        next(loader.epoch(1, **mode))
    assert sum(1 for _ in loader.epoch(1)) == 6  # new arrays: no ring, no conflict
    first.close()
    assert sum(1 for _ in loader.epoch(1, **mode)) == 6
    _no_loader_threads_left()


def test_a_refused_read_ahead_is_only_a_warning(dataset, monkeypatch, caplog):
    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(D.os, "posix_fadvise", refuse, raising=False)
    for shuffle in ("full", "window"):
        loader = D.BatchLoader(dataset, "train", 4, 10, train=True, readahead=True, shuffle=shuffle, window=2)
        with caplog.at_level("WARNING", logger="pyalexnet.data"):
            assert sum(1 for _ in loader.epoch(0, device=True)) == 6
    assert sum("read-ahead refused" in r.message for r in caplog.records) == 1  # once per split


def test_open_files_stay_bounded_however_many_shards(tmp_path):
    _folder(tmp_path / "src", np.random.default_rng(2), per_class=9, corrupt=False)
    D.prepare(tmp_path / "src", tmp_path / "out", size=12, workers=1, shard_images=1, progress=False)
    ds = D.Dataset(tmp_path / "out")
    split = ds.split("train")
    assert len(split.paths) == 27
    split.files.limit = 3
    before = len(os.listdir("/proc/self/fd"))
    loader = D.BatchLoader(ds, "train", 4, 10, train=True, threads=3)
    expected = _expected(loader, 0, loader.order(0))
    for batch, want in zip(loader.epoch(0, device=True), expected):
        _same(batch, want)
        # over the limit only by the files being read at that moment: 3 threads, each a batch of 4 one-image shards
        assert split.files.open_count() <= 3 + 3 * 4
    assert split.files.open_count() <= 3
    assert len(os.listdir("/proc/self/fd")) - before <= 3


def test_waiting_for_input_is_counted(dataset, monkeypatch):
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, threads=1, depth=1, readahead=False)
    read = D.Split.read_into

    def slow(self, *args):
        time.sleep(0.05)
        return read(self, *args)

    monkeypatch.setattr(D.Split, "read_into", slow)
    started = time.perf_counter()
    n = sum(1 for _ in loader.epoch(0, device=True))
    elapsed = time.perf_counter() - started
    assert n == 6
    # the caller does nothing: nearly all of its time is waiting for the (slow) staging
    assert loader.wait_seconds >= 0.05 * n * 0.9 and elapsed >= loader.wait_seconds


def test_interleaved_shards_mix_the_classes(tmp_path):
    _folder(tmp_path / "src", np.random.default_rng(4), per_class=9, corrupt=False)
    D.prepare(tmp_path / "src", tmp_path / "sorted", size=12, workers=1, shard_images=9, progress=False)
    D.prepare(tmp_path / "src", tmp_path / "mixed", size=12, workers=1, shard_images=9, progress=False,
              interleave=True)
    by_class, mixed = D.Dataset(tmp_path / "sorted").split("train"), D.Dataset(tmp_path / "mixed").split("train")
    assert [len(set(by_class.labels[s : s + 9])) for s in (0, 9, 18)] == [1, 1, 1]
    assert all(len(set(mixed.labels[s : s + 9])) > 1 for s in (0, 9, 18))
    # a checkpoint of one must not resume on the other
    assert D.Dataset(tmp_path / "sorted").identity != D.Dataset(tmp_path / "mixed").identity
    a, b = by_class.gather(np.arange(27)), mixed.gather(np.arange(27))
    key = lambda imgs, labs: sorted((int(l), im.tobytes()) for im, l in zip(imgs, labs))  # noqa: E731
    assert key(a, by_class.labels) == key(b, mixed.labels)  # the same images and labels, in another order


def test_loader_arguments_are_checked(dataset):
    for kwargs, match in [({"threads": 0}, "threads"), ({"depth": 0}, "depth"), ({"window": 0}, "window"),
                          ({"view": 10}, "view")]:
        with pytest.raises(ValueError, match=match):
            D.BatchLoader(dataset, "train", 4, 10, train=True, **kwargs)
    loader = D.BatchLoader(dataset, "train", 4, 10, train=True)
    with pytest.raises(ValueError, match="start"):
        loader.epoch(0, start=7)
    with pytest.raises(IndexError):
        dataset.split("train").gather([0, 27])


@pytest.mark.emu
def test_a_device_buffer_is_refilled_only_after_the_work_that_reads_it(dataset):
    """The emulator's compute "stream" is the calling thread, finished when the call returns; a GPU's runs
    behind the host. This engine models that: the work launched with a batch reads it 30 ms after the host asked
    for the next one, and only then is its release event set. A copy into that buffer before the event (a
    device slot released too early, or refilled without waiting) shows as a batch changed under its reader."""
    changed, timers = [], []

    class LateStream(D._HostCopies):
        current = None

        def compute_done(self):
            done, reading = D._Done(), self.current  # None: the ring's first use, nothing of ours launched yet

            def read_late():
                if reading is not None and not np.array_equal(*reading):
                    changed.append(True)
                done.set()

            timer = threading.Timer(0.03, read_late)
            timers.append(timer)
            timer.start()
            return done

    loader = D.BatchLoader(dataset, "train", 4, 10, train=True, seed=5, threads=2, depth=1)
    engine = loader._copies = LateStream()
    expected = _expected(loader, 0, loader.order(0))
    n = 0
    for batch, want in zip(loader.epoch(0, device=True), expected):
        _same(batch, want)
        engine.current = (batch.images, want[0])
        n += 1
    for timer in timers:  # every late read has happened
        timer.join()
    assert n == 6 and len(timers) >= 6 and not changed
