"""The data pipeline: reading awkward image files, `prepare` (shards, mean, colour PCA, resuming), the
augmentation kernel against NumPy given the same draws, and the background batch loader."""

import json
import logging
import os

import numpy as np
import pytest
from conftest import rel_err

import pyalexnet as pa
from pyalexnet import data as D

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _photo(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---- reading one image --------------------------------------------------------------------------------------------
def test_shorter_side_to_size_and_centre_crop(tmp_path, rng):
    # A 2:1 image whose columns are numbered: the central 20 x 20 square (columns 10-29) becomes the 10 x 10 output.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :, 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = D.load_image(tmp_path / "wide.png", size=10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(a).resize((10, 10), Image.Resampling.BICUBIC, box=(10, 0, 30, 20)))
    np.testing.assert_array_equal(out, expected)
    # ... which is resizing the whole image to 20 x 10 and keeping its centre, up to the resampling's edges.
    whole = np.asarray(Image.fromarray(a).resize((20, 10), Image.Resampling.BICUBIC))[:, 5:15]
    assert np.abs(out[:, 1:-1].astype(int) - whole[:, 1:-1].astype(int)).max() <= 2


def test_an_extreme_aspect_ratio_is_cropped_before_resizing(tmp_path):
    Image.new("RGB", (20000, 2), (200, 100, 50)).save(tmp_path / "strip.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "strip.png", size=256), np.broadcast_to([200, 100, 50],
                                                                                                   (256, 256, 3)))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "1", "P with transparency"])
def test_every_mode_becomes_rgb(tmp_path, rng, mode):
    im = _photo(rng, 30, 24)
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 65536, (24, 30))).astype(np.uint16))
    elif mode == "P with transparency":
        im = im.convert("P")
    else:
        im = im.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path, **({"transparency": 0} if mode == "P with transparency" else {}))
    out = D.load_image(path, size=16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() > 128  # scaled from 16 bits, not clipped to white or to black
        assert out.min() < 128


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "t.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "t.png", size=8), 255)


def test_a_png_named_jpg_is_read_by_its_content(tmp_path, rng):
    im = _photo(rng, 16, 16)
    im.save(tmp_path / "liar.jpg", format="PNG")
    np.testing.assert_array_equal(D.load_image(tmp_path / "liar.jpg", size=16), np.asarray(im))


@pytest.mark.parametrize("damage", ["random bytes", "truncated jpeg", "empty", "text"])
def test_unreadable_files_raise_bad_image(tmp_path, rng, damage):
    path = tmp_path / "bad.jpg"
    if damage == "random bytes":
        path.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "truncated jpeg":
        _photo(rng, 300, 200).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("not an image\n")
    with pytest.raises(D.BadImage, match="bad.jpg"):
        D.load_image(path)


def test_jpeg_draft_decoding_of_a_large_photo(tmp_path, rng):
    big = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), 16, 0), 16, 1))
    big.save(tmp_path / "big.jpg", quality=90)  # 2400 x 1600: draft() decodes it at 1/4 scale
    out = D.load_image(tmp_path / "big.jpg", size=64)
    ref = np.asarray(big.resize((96, 64), Image.Resampling.BICUBIC))[:, 16:80]
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6  # the same picture, up to JPEG and scaling


# ---- prepare ------------------------------------------------------------------------------------------------------
def _folder(root, rng, classes=("a", "b", "c"), per_class=7, flat_val=True, corrupt=True):
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            _photo(rng, int(rng.integers(20, 40)), int(rng.integers(20, 40))).save(root / "train" / c / f"{i}.jpg")
    (root / "val").mkdir()
    lines = []
    for i, c in enumerate(classes):
        _photo(rng, 24, 30).save(root / "val" / f"v{i}.png")
        lines.append(f"v{i}.png {c}")
    if flat_val:
        (root / "val" / "labels.txt").write_text("\n".join(lines) + "\n")
    if corrupt:
        (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        (root / "train" / "c" / "notes.txt").write_text("ignored: not an image extension")


def test_prepare_writes_shards_mean_and_pca(tmp_path, rng, caplog):
    _folder(tmp_path / "src", rng)
    with caplog.at_level(logging.WARNING, logger="pyalexnet.data"):
        m = D.prepare(tmp_path / "src", tmp_path / "out", size=16, workers=1, shard_images=4, progress=False)
    assert m["classes"] == ["a", "b", "c"]
    assert m["splits"]["train"]["count"] == 21 and m["splits"]["val"]["count"] == 3
    assert len(m["skipped"]) == 1 and "broken.jpg" in m["skipped"][0]["file"]
    assert "broken.jpg" in caplog.text
    ds = D.Dataset(tmp_path / "out")
    train = ds.split("train")
    everything = train.gather(np.arange(len(train)))
    np.testing.assert_array_equal(np.bincount(train.labels), [7, 7, 7])
    # Shard order is file order: image 0 of class b is index 7 (broken.jpg sorts first and is skipped).
    np.testing.assert_array_equal(everything[7], D.load_image(tmp_path / "src/train/b/0.jpg", 16))
    assert rel_err(ds.mean, everything.mean(axis=0)) < 1e-6
    pixels = everything.reshape(-1, 3).astype(np.float64)
    cov = np.cov(pixels.T, bias=True)
    assert rel_err(ds.eigenvectors @ np.diag(ds.eigenvalues) @ ds.eigenvectors.T, cov) < 1e-9
    assert (np.diff(ds.eigenvalues) <= 0).all()
    val = ds.split("val")
    np.testing.assert_array_equal(val.labels, [0, 1, 2])


def test_val_in_class_folders(tmp_path, rng):
    _folder(tmp_path / "src", rng, flat_val=False, corrupt=False)
    for i, c in enumerate("abc"):
        (tmp_path / "src/val" / c).mkdir()
        os.rename(tmp_path / f"src/val/v{i}.png", tmp_path / f"src/val/{c}/v.png")
    m = D.prepare(tmp_path / "src", tmp_path / "out", size=8, workers=1, progress=False)
    assert m["splits"]["val"]["count"] == 3
    np.testing.assert_array_equal(D.Dataset(tmp_path / "out").split("val").labels, [0, 1, 2])


def test_bad_labels_file_is_a_clear_error(tmp_path, rng):
    _folder(tmp_path / "src", rng, corrupt=False)
    (tmp_path / "src/val/labels.txt").write_text("v0.png a\nv1.png zebra\n")
    with pytest.raises(ValueError, match="labels.txt:2: class 'zebra'"):
        D.prepare(tmp_path / "src", tmp_path / "out", size=8, workers=1, progress=False)


def test_prepare_resumes_only_unfinished_shards_and_in_parallel(tmp_path, rng):
    _folder(tmp_path / "src", rng)
    out = tmp_path / "out"
    first = D.prepare(tmp_path / "src", out, size=16, workers=2, shard_images=4, progress=False)
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("train-?????.npy")}
    # An interruption: shard 2 never got its .json (the marker written last), shard 3 was never started.
    (out / "train-00002.json").unlink()
    (out / "train-00003.npy").unlink()
    (out / "train-00003.json").unlink()
    (out / "dataset.json").unlink()
    again = D.prepare(tmp_path / "src", out, size=16, workers=2, shard_images=4, progress=False)
    assert again == first
    redone = {p.name for p in out.glob("train-?????.npy") if p.stat().st_mtime_ns != times.get(p.name)}
    assert redone == {"train-00002.npy", "train-00003.npy"}


def test_an_interrupted_rerun_never_keeps_a_stale_shard(tmp_path, rng):
    """Plan A finishes; plan B (one more image) is interrupted after rewriting shard 0's arrays but before its
    marker; back to plan A: shard 0 must be redone, not taken for plan A's."""
    _folder(tmp_path / "src", rng, corrupt=False)
    out = tmp_path / "out"
    first = D.prepare(tmp_path / "src", out, size=8, workers=1, shard_images=64, progress=False)
    extra = tmp_path / "src/train/a/extra.jpg"
    _photo(rng, 20, 20).save(extra)
    listing = D.scan(tmp_path / "src")
    files = [str(p) for p, _ in listing["train"]]
    labels = [label for _, label in listing["train"]]
    real_write = D.atomic_write

    def interrupted(path, write):
        if path.name == "train-00000.json":
            raise KeyboardInterrupt  # killed before the marker
        real_write(path, write)

    D.atomic_write = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            D._shard_task((str(out), "train", 0, files, labels, 8, D._plan_hash(files, labels, 8)))
    finally:
        D.atomic_write = real_write
    extra.unlink()
    again = D.prepare(tmp_path / "src", out, size=8, workers=1, shard_images=64, progress=False)
    assert again == first
    assert len(D.Dataset(out).split("train")) == 21


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path, rng):
    _folder(tmp_path / "src", rng, corrupt=False)
    (tmp_path / "src/train/.ipynb_checkpoints").mkdir()
    _photo(rng, 20, 20).save(tmp_path / "src/train/.ipynb_checkpoints/x.jpg")
    _photo(rng, 20, 20).save(tmp_path / "src/train/a/.hidden.jpg")
    listing = D.scan(tmp_path / "src")
    assert listing["classes"] == ["a", "b", "c"] and len(listing["train"]) == 21


def test_dataset_refuses_a_damaged_folder(tmp_path, rng):
    _folder(tmp_path / "src", rng, corrupt=False)
    out = tmp_path / "out"
    D.prepare(tmp_path / "src", out, size=8, workers=1, progress=False)
    np.save(out / "train-00000.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="does not match dataset.json"):
        D.Dataset(out)
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        D.Dataset(tmp_path / "nowhere")
    (tmp_path / "unprepared").mkdir()
    with pytest.raises(FileNotFoundError, match="run 'pyalexnet prepare"):
        D.Dataset(tmp_path / "unprepared")


# ---- the augmentation kernel ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,size,crop,scale", [(1, 9, 9, 1.0), (3, 20, 13, 0.5), (5, 37, 29, 1 / 64),
                                                   (2, 64, 1, 2.0)])
def test_augment_kernel_matches_numpy_given_the_same_draws(rng, batch, size, crop, scale):
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    mean = (rng.random((size, size, 3)) * 255).astype(np.float32)
    eigenvalues = np.array([4000.0, 300.0, 40.0])
    eigenvectors = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    params, shift = D.train_draws(rng, batch, size, crop, eigenvalues, eigenvectors)
    params[0, 2] = 1  # at least one flip
    out = pa.ops.augment_batch(pa.asarray(images), pa.asarray(mean), params, shift, crop, scale)
    expected = D.augment_reference(images, mean, params, shift, crop, scale)
    assert rel_err(pa.to_numpy(out), expected) < 1e-6


def test_eval_views_are_the_centre_corners_and_their_mirrors(rng):
    images = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    mean = np.zeros((12, 12, 3), np.float32)
    seen = []
    for view in range(10):
        params, shift = D.eval_draws(2, 12, 8, view)
        out = pa.to_numpy(pa.ops.augment_batch(pa.asarray(images), pa.asarray(mean), params, shift, 8))
        np.testing.assert_array_equal(out, D.augment_reference(images, mean, params, shift, 8))
        seen.append(tuple(params[0]))
    assert seen[0] == (2, 2, 0) and seen[5] == (2, 2, 1)
    assert sorted(seen[1:5]) == [(0, 0, 0), (0, 4, 0), (4, 0, 0), (4, 4, 0)]
    with pytest.raises(ValueError, match="view"):
        D.eval_draws(1, 12, 8, 10)


def test_pca_shift_has_the_documented_size(rng):
    eigenvalues = np.array([3000.0, 200.0, 20.0])
    params, shift = D.train_draws(np.random.default_rng(0), 20000, 8, 8, eigenvalues, np.eye(3))
    np.testing.assert_allclose(shift.std(axis=0), 0.1 * np.sqrt(eigenvalues), rtol=0.03)
    assert set(np.unique(params[:, 2])) == {0, 1} and params[:, :2].max() == 0


@pytest.mark.parametrize("bad,match", [
    (dict(params=np.array([[5, 0, 0]], np.int32)), "offsets must lie in"),
    (dict(params=np.array([[0, 0, 2]], np.int32)), "flips be 0 or 1"),
    (dict(params=np.array([[0, 0]], np.int32)), "params: expected"),
    (dict(crop=9), "does not fit"),
    (dict(images=np.zeros((1, 8, 8, 3), np.float32)), "uint8"),
    (dict(images=np.zeros((1, 8, 6, 3), np.uint8)), "size, size, 3"),
    (dict(mean=np.zeros((8, 8), np.float32)), "mean"),
    (dict(scale=float("nan")), "scale"),
])
def test_augment_refuses_bad_input(bad, match):
    args = dict(images=np.zeros((1, 8, 8, 3), np.uint8), mean=np.zeros((8, 8, 3), np.float32),
                params=np.array([[1, 1, 0]], np.int32), shift=np.zeros((1, 3), np.float32), crop=6, scale=1.0)
    args.update(bad)
    args["images"], args["mean"] = pa.asarray(args["images"]), pa.asarray(args["mean"])
    with pytest.raises((ValueError, TypeError), match=match):
        pa.ops.augment_batch(**args)


@pytest.mark.emu
def test_the_kernel_itself_writes_nan_for_out_of_range_params():
    """The binding's last line of defence when a caller skips ops' host check: NaN, never an outside read."""
    mod = pa._backend.active.module
    out = np.zeros((2, 3, 4, 4), np.float32)
    params = np.array([[0, 0, 0], [9, 0, 0]], np.int32)
    mod.augment_batch(np.full((2, 6, 6, 3), 7, np.uint8), np.zeros((6, 6, 3), np.float32), params,
                      np.zeros((2, 3), np.float32), out, 1.0)
    assert (out[0] == 7).all() and np.isnan(out[1]).all()


# ---- the loader ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    _folder(root / "src", np.random.default_rng(5), per_class=9, corrupt=False)
    D.prepare(root / "src", root / "out", size=12, workers=1, shard_images=5, progress=False)
    return D.Dataset(root / "out")


def test_loader_epochs_are_permutations_and_reproducible(small_dataset):
    loader = D.BatchLoader(small_dataset, "train", 4, 10, train=True, seed=3)
    assert loader.batches_per_epoch() == 6  # 27 images: the last 3 are dropped in training
    batches = list(loader.epoch(0))
    labels = np.concatenate([b[1] for b in batches])
    assert len(labels) == 24
    again = list(loader.epoch(0))
    for b1, b2 in zip(batches, again):
        for x, y in zip(b1, b2):
            np.testing.assert_array_equal(x, y)
    other = np.concatenate([b[1] for b in loader.epoch(1)])
    assert not np.array_equal(labels, other)  # a new permutation (seeded: these two differ)
    # Resuming at batch 4 gives exactly batches 4 and 5.
    tail = list(loader.epoch(0, start=4))
    assert len(tail) == 2
    for b1, b2 in zip(batches[4:], tail):
        for x, y in zip(b1, b2):
            np.testing.assert_array_equal(x, y)


def test_loader_images_match_their_labels(small_dataset):
    split = small_dataset.split("train")
    everything = split.gather(np.arange(len(split)))
    loader = D.BatchLoader(small_dataset, "train", 5, 12, train=True, seed=0)
    for images, labels, _, _ in loader.epoch(2):
        for im, lab in zip(images, labels):
            matches = np.nonzero((everything == im).all(axis=(1, 2, 3)))[0]
            assert lab in split.labels[matches]


def test_eval_loader_covers_every_image_once(small_dataset):
    loader = D.BatchLoader(small_dataset, "train", 4, 12, train=False)
    labels = np.concatenate([b[1] for b in loader.epoch()])
    np.testing.assert_array_equal(labels, small_dataset.split("train").labels)


def test_leaving_an_epoch_early_does_not_hang(small_dataset):
    loader = D.BatchLoader(small_dataset, "train", 2, 12, train=True, depth=1)
    for i, _ in enumerate(loader.epoch(0)):
        if i == 1:
            break  # the generator's finally stops the producer thread


def test_a_failure_in_the_loader_thread_reaches_the_caller(small_dataset, monkeypatch):
    loader = D.BatchLoader(small_dataset, "train", 2, 12, train=True)

    def broken(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(loader.split, "read_into", broken)
    with pytest.raises(OSError, match="disk gone"):
        list(loader.epoch(0))


def test_loader_refuses_bad_sizes(small_dataset):
    with pytest.raises(ValueError, match="crop"):
        D.BatchLoader(small_dataset, "train", 4, 13, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        D.BatchLoader(small_dataset, "train", 100, 12, train=True)


def test_dataset_json_is_written_last(tmp_path, rng):
    _folder(tmp_path / "src", rng, corrupt=False)
    m = D.prepare(tmp_path / "src", tmp_path / "out", size=8, workers=1, progress=False)
    on_disk = json.loads((tmp_path / "out/dataset.json").read_text())
    assert on_disk == m and on_disk["format"] == "pyalexnet-dataset"
