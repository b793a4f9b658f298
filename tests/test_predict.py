"""A checkpoint that predicts on its own (issue 17, items 4, 6, 11): it carries its classes and preprocessing and no
absolute path; torchvision's normalisation is expressible and matches an independent NumPy version of its
transform; predict goes in batches, skips what it cannot read and says so; datasets are refused as
torchvision's ImageFolder refuses them; `extra` takes NumPy scalars."""

import json
import shutil
import zipfile

import numpy as np
import pytest
from conftest import cli, tiny_run

import pyalexnet as pa
from pyalexnet import Preprocess
from pyalexnet import reference as R
from pyalexnet.data import load_image

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared demo dataset and a 3-step checkpoint trained on it, without flips."""
    return tiny_run(tmp_path_factory.mktemp("predict"), seed=5, max_steps=3, flip=False)


def _meta(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(np.load(z.open("meta.npy")).tobytes().decode())


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_a_training_checkpoint_carries_its_preprocessing_and_no_path(run):
    ck = pa.load(run / "run" / "last.npz")
    from pyalexnet.data import Dataset

    ds = Dataset(run / "data")
    pre = ck.preprocess
    assert pre.classes == tuple(ds.classes) and pre.size == 72 and pre.crop == 67
    np.testing.assert_array_equal(pre.mean, ds.mean)
    assert pre.scale == pytest.approx([ck.extra["train"]["scale"]] * 3)
    assert pre.views == (0, 1, 2, 3, 4)  # trained without flips: no mirrored views
    meta = _meta(run / "run" / "last.npz")
    leaked = [s for s in _strings(meta) if s.startswith("/") or str(run) in s]
    assert not leaked, leaked


def test_predict_needs_only_the_checkpoint(run, tmp_path):
    images = sorted((run / "images" / "val").glob("*.jpg"))[:5]
    with_data = cli("predict", *images, "--weights", run / "run" / "last.npz", "--data", run / "data", "--top", "3",
                    cwd=tmp_path)
    assert with_data.returncode == 0, with_data.stderr
    # Elsewhere, with the dataset and the run folder gone: the same answers.
    moved = tmp_path / "ship"
    shutil.copytree(run, moved)
    shutil.copy(moved / "run" / "last.npz", tmp_path / "model.npz")
    shutil.rmtree(moved)
    alone = cli("predict", *images, "--weights", tmp_path / "model.npz", "--top", "3", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout == with_data.stdout and not alone.stderr
    lines = alone.stdout.splitlines()
    assert len(lines) == 5 * 4 and lines[0] == str(images[0])
    # in batches: the same numbers whatever the batch size
    one = cli("predict", *images, "--weights", tmp_path / "model.npz", "--top", "3", "--batch-size", "2",
              cwd=tmp_path)
    assert one.stdout == alone.stdout


def test_predict_skips_what_it_cannot_read_and_goes_on(run, tmp_path):
    good = sorted((run / "images" / "val").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good[0].read_bytes()[:200])  # a truncated JPEG
    r = cli("predict", good[0], bad, tmp_path / "absent.png", good[1], "--weights", run / "run" / "last.npz",
            "--batch-size", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert printed == [str(good[0]), str(good[1])]
    err = r.stderr.splitlines()
    assert err[0].startswith(f"pyalexnet predict: skipped {bad}") and err[1].startswith(
        f"pyalexnet predict: skipped {tmp_path / 'absent.png'}")
    assert err[2] == "pyalexnet predict: 2 of 4 file(s) skipped" and "Traceback" not in r.stderr
    r = cli("predict", bad, "--weights", run / "run" / "last.npz", cwd=tmp_path)
    assert r.returncode == 2 and not r.stdout

    from pyalexnet.infer import predict

    results = predict([good[0], bad], run / "run" / "last.npz", top=2)
    assert results[1].top == [] and "broken.jpg" in results[1].error and results[0].error is None
    assert len(results[0].top) == 2 and results[0].top[0][1] >= results[0].top[1][1]


def test_ten_crop_uses_the_checkpoints_views(run):
    from pyalexnet.infer import predict

    img = sorted((run / "images" / "val").glob("*.jpg"))[0]
    ck = pa.load(run / "run" / "last.npz")
    pre = ck.preprocess
    image = load_image(img, pre.size).astype(np.float64)
    params = {k: v.astype(np.float64) for k, v in ck.net.state_dict().items()}
    expected = 0
    for view in pre.views:  # 0-4: centre and corners, none mirrored
        oy, ox = [(2, 2), (0, 0), (0, 5), (5, 0), (5, 5)][view]
        x = ((image[oy : oy + 67, ox : ox + 67] - pre.mean[oy : oy + 67, ox : ox + 67]) * pre.scale[0])
        z, _ = R.network_forward(ck.net.specs, params, x.transpose(2, 0, 1)[None], None)
        expected = expected + np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    expected = expected[0] / len(pre.views)
    top = predict([img], run / "run" / "last.npz", top=10, ten_crop=True)[0].top
    got = {name: p for name, p in top}
    np.testing.assert_allclose([got[c] for c in pre.classes], expected, rtol=1e-4, atol=1e-6)


def test_torchvision_preprocessing_matches_torchvisions_transform(tmp_path):
    """A net built from torchvision-style weights predicts with Preprocess.torchvision: checked against the
    transform written out in NumPy (Resize(72) + CenterCrop(67), x / 255, (x - mean) / std)."""
    from PIL import Image

    from pyalexnet.infer import predict

    classes = ["cat", "dog", "bird"]
    net = pa.AlexNet("torchvision", num_classes=3, width=0.25, input_size=67, init="kaiming", seed=4)
    pre = Preprocess.torchvision(classes, size=72, crop=67)
    pa.save(tmp_path / "tv.npz", net, preprocess=pre)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 72).astype(np.float64) / 255.0  # Resize(72) on the shorter side
    crop = image[2:69, 2:69]  # CenterCrop(67): offset (72 - 67) // 2 = 2, as torchvision rounds
    x = ((crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1)[None]
    params = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    z, _ = R.network_forward(net.specs, params, x, None)
    expected = np.exp(z[0] - z.max()) / np.exp(z[0] - z.max()).sum()
    top = predict([tmp_path / "wide.png"], tmp_path / "tv.npz", top=3)[0].top
    got = dict(top)
    np.testing.assert_allclose([got[c] for c in classes], expected, rtol=1e-4, atol=1e-6)
    ck = pa.load(tmp_path / "tv.npz")
    assert ck.preprocess.mean.shape == (3,) and ck.preprocess.scale == pytest.approx(pre.scale)
    assert "preprocess/mean" not in np.load(tmp_path / "tv.npz").files  # three numbers, no image


def test_preprocess_and_save_refuse_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        Preprocess([], 72, 67, [1, 2, 3])
    with pytest.raises(ValueError, match="crop: 80 does not fit"):
        Preprocess(["a"], 72, 80, [1, 2, 3])
    with pytest.raises(ValueError, match="mean"):
        Preprocess(["a"], 72, 67, np.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="scale"):
        Preprocess(["a"], 72, 67, [1, 2, 3], scale=[1, -1, 1])
    with pytest.raises(ValueError, match="views"):
        Preprocess(["a"], 72, 67, [1, 2, 3], views=[0, 10])
    net = pa.AlexNet("paper", num_classes=3, width=0.25, input_size=67)
    with pytest.raises(ValueError, match="names 2 classes, the network has 3"):
        pa.save(tmp_path / "x.npz", net, preprocess=Preprocess.torchvision(["a", "b"], 72, 67))
    with pytest.raises(ValueError, match="crops 64 x 64, the network's input is 67"):
        pa.save(tmp_path / "x.npz", net, preprocess=Preprocess.torchvision(["a", "b", "c"], 72, 64))
    pa.save(tmp_path / "bare.npz", net)
    assert pa.load(tmp_path / "bare.npz").preprocess is None
    from pyalexnet.infer import predict

    with pytest.raises(ValueError, match="holds no preprocessing.*--data"):
        predict(["x.jpg"], tmp_path / "bare.npz")


def test_extra_takes_numpy_scalars_and_refuses_arrays_with_a_hint(tmp_path):
    net = pa.AlexNet("paper", num_classes=3, width=0.25, input_size=67)
    extra = {"acc": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True), "nested": [np.float64(1.25)]}
    pa.save(tmp_path / "x.npz", net, extra=extra)
    back = pa.load(tmp_path / "x.npz").extra
    assert back == {"acc": 0.5, "n": 3, "ok": True, "nested": [1.25]}
    assert type(back["acc"]) is float and type(back["n"]) is int and type(back["ok"]) is bool
    with pytest.raises(TypeError, match=r"tolist"):
        pa.save(tmp_path / "y.npz", net, extra={"a": np.zeros(3)})
    assert not (tmp_path / "y.npz").exists()


def test_datasets_are_refused_as_imagefolder_refuses_them(tmp_path):
    from pyalexnet.data import Dataset, prepare, scan
    from pyalexnet.demo import write_demo_data

    write_demo_data(tmp_path / "src", train_per_class=2, val_per_class=0, size=32, seed=0)
    (tmp_path / "src" / "train" / "zebra").mkdir()
    (tmp_path / "src" / "train" / "zebra" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image files: zebra"):
        scan(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "train" / "zebra")
    for f in (tmp_path / "src" / "train" / "ring").iterdir():
        f.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"class\(es\) ring: no training image decodes"):
        prepare(tmp_path / "src", tmp_path / "out", size=32, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Dataset(tmp_path / "absent")
