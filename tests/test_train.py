"""The whole pipeline end to end on the emulator: demo-data -> prepare -> train -> eval / predict / show-filters,
with the small-input configuration. Training must learn, resume exactly, stop cleanly on a NaN loss and on
Ctrl-C, and leave a loadable checkpoint when killed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ON_CUDA

import pyalexnet as pa
from pyalexnet.__main__ import main
from pyalexnet.demo import CLASSES, write_demo_data

pytest.importorskip("PIL")

SMALL = ["--width", "0.25", "--crop", "67", "--init", "kaiming", "--scale", "0.015625", "--batch-size", "16",
         "--no-progress"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_demo_data(root / "images", train_per_class=24, val_per_class=6, size=72, seed=1)
    assert main(["prepare", str(root / "images"), str(root / "data"), "--size", "72", "--no-progress",
                 "--workers", "2", "--shard-images", "64"]) == 0
    return root


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _params(ckpt):
    return {k: pa.to_numpy(v) for k, v in pa.load(ckpt).net.parameters().items()}


def test_training_learns_and_eval_beats_chance(prepared, capsys):
    out = prepared / "run"
    assert main(["train", "--data", str(prepared / "data"), "--out", str(out), "--epochs", "5", "--log-every", "3",
                 *SMALL]) == 0
    log = _log(out / "log.jsonl")
    losses = [r["loss"] for r in log if r["kind"] == "step"]
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:2]), losses
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert len(epochs) == 5 and epochs[-1]["val_top1_error"] < 0.7  # chance: 0.9
    assert (out / "curves.png").stat().st_size > 1000 and (out / "best.npz").exists()
    capsys.readouterr()
    assert main(["eval", "--data", str(prepared / "data"), "--weights", str(out / "best.npz"), "--batch-size", "16",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    top1 = float(text.split("centre crop: top-1 error ")[1].split()[0])
    top1_10 = float(text.split("10 crops:    top-1 error ")[1].split()[0])
    assert top1 < 0.7 and top1_10 < 0.7, text
    assert "60 images" in text


def test_predict_and_show_filters(prepared, capsys, tmp_path):
    ckpt = prepared / "run" / "best.npz"
    if not ckpt.exists():
        pytest.skip("needs the training test's checkpoint")
    images = sorted((prepared / "images" / "val").glob("*.jpg"))[:3]
    capsys.readouterr()
    assert main(["predict", *map(str, images), "--weights", str(ckpt), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 4 and lines[0] == str(images[0])
    probs = [float(line.split()[0]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert lines[1].split()[1] in CLASSES
    from PIL import Image

    from pyalexnet.infer import filter_grid

    grid = filter_grid(ckpt, columns=6, zoom=2)  # 24 kernels of 11 x 11 on a 6-column grid, 1-pixel gaps, zoom 2
    g = np.asarray(grid)
    assert grid.size == ((6 * 12 + 1) * 2, (4 * 12 + 1) * 2) and grid.mode == "RGB"
    png = tmp_path / "filters.png"
    assert main(["show-filters", "--weights", str(ckpt), "-o", str(png), "--columns", "6", "--zoom", "2"]) == 0
    with Image.open(png) as im:  # the labelled figure: the grid with a title and row/column labels around it
        assert im.format == "PNG" and im.size[0] > grid.size[0] and im.size[1] > grid.size[1]
    from pyalexnet.infer import filter_figure

    ax = filter_figure(ckpt, columns=6, zoom=2).axes[0]
    assert ax.get_title() == "best.npz: conv1, 24 kernels of 11 x 11 x 3 (each stretched to its own range)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "6", "12", "18"]  # the first kernel of each row
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"+{c}" for c in range(6)]
    shown = np.asarray(ax.get_images()[0].get_array())
    assert shown.shape == (4 * 12 + 1, 6 * 12 + 1, 3) and (np.repeat(np.repeat(shown, 2, 0), 2, 1) == g).all()


@pytest.mark.parametrize("shuffle", ["full", "window"])
def test_resume_continues_exactly_where_it_stopped(prepared, shuffle):
    data = str(prepared / "data")
    straight, split = prepared / f"straight-{shuffle}", prepared / f"split-{shuffle}"
    common = ["--data", data, "--epochs", "2", "--log-every", "1", "--schedule", "step", "--step-every", "1", *SMALL]
    # window: 2 shards of 64 a window, and 3 staging threads; the resumed call asks for neither and must get
    # the checkpoint's shuffle (the thread count is free: it does not change a batch)
    first = ["--shuffle", "window", "--shuffle-window", "2", "--loader-threads", "3"] if shuffle == "window" else []
    assert main(["train", "--out", str(straight), *common, *first]) == 0
    # The same run, stopped mid-epoch (step 7 of 15) and resumed from its checkpoint.
    assert main(["train", "--out", str(split), "--max-steps", "7", *common, *first]) == 0
    state = pa.load(split / "last.npz").extra["train"]
    assert state["batch"] == 7 and state["shuffle"] == shuffle
    assert main(["train", "--out", str(split), "--resume", str(split / "last.npz"), *common,
                 "--loader-threads", "1"]) == 0
    a, b = _params(straight / "last.npz"), _params(split / "last.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    losses = lambda p: [(r["step"], r["loss"]) for r in _log(p / "log.jsonl") if r["kind"] == "step"]  # noqa: E731
    assert losses(straight) == losses(split)
    ck = pa.load(split / "last.npz")
    assert ck.optimizer.lr == pytest.approx(0.0001) and ck.optimizer.steps == 30


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(prepared, capsys):
    out = prepared / "diverged"
    code = main(["train", "--data", str(prepared / "data"), "--out", str(out), "--epochs", "3", "--lr", "1e6",
                 "--checkpoint-every", "1", "--schedule", "constant", *SMALL])
    assert code == 3
    err = capsys.readouterr().err
    # Either the loss turned NaN/inf, or an update made the weights so before the loss could show it.
    assert ("the loss became" in err or "became inf or NaN" in err) and "last good checkpoint" in err, err
    ck = pa.load(out / "last.npz")  # loadable, and from before the NaN
    steps = ck.optimizer.steps
    assert all(np.isfinite(pa.to_numpy(v)).all() for v in ck.net.parameters().values())
    assert ck.extra["train"]["batch"] == steps
    logged = [r["step"] for r in _log(out / "log.jsonl") if r["kind"] == "step"] if (out / "log.jsonl").exists() else []
    assert all(s <= steps for s in logged)


def _train_process(prepared, out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pyalexnet", "train", "--data", str(prepared / "data"), "--out",
                             str(out), "--epochs", "50", "--log-every", "1", *SMALL, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(prepared))


def _wait_for_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count('"kind": "step"') >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training made no progress")


@pytest.mark.skipif(ON_CUDA, reason="the same code on both backends; the emulator run is enough")
def test_ctrl_c_writes_a_checkpoint_and_exits(prepared):
    out = prepared / "interrupted"
    proc = _train_process(prepared, out)
    _wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: checkpoint written" in stdout
    assert (out / "curves.png").stat().st_size > 1000  # drawn on the way out, before the first epoch's end
    ck = pa.load(out / "last.npz")
    assert ck.optimizer.steps >= 3 and ck.extra["train"]["batch"] == ck.optimizer.steps % 15


@pytest.mark.skipif(ON_CUDA, reason="the same code on both backends; the emulator run is enough")
@pytest.mark.parametrize("delay", [0.0, 0.13])
def test_a_kill_while_checkpointing_every_step_leaves_a_loadable_checkpoint(prepared, delay):
    out = prepared / f"killed-{delay}"
    proc = _train_process(prepared, out, "--checkpoint-every", "1")
    _wait_for_steps(out, 3, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ck = pa.load(out / "last.npz")  # whichever step's: whole
    assert ck.optimizer.steps >= 2
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1  # at most the write the kill interrupted, never a damaged last.npz


def test_eval_and_predict_refuse_a_dataset_of_other_classes(prepared, capsys, tmp_path):
    ckpt = prepared / "run" / "best.npz"
    if not ckpt.exists():
        pytest.skip("needs the training test's checkpoint")
    import shutil

    other = tmp_path / "other"
    shutil.copytree(prepared / "images", other)
    (other / "train" / "circle").rename(other / "train" / "disc")
    (other / "val" / "labels.txt").write_text((other / "val" / "labels.txt").read_text().replace(" circle", " disc"))
    assert main(["prepare", str(other), str(tmp_path / "data"), "--size", "72", "--no-progress", "--workers", "1"]) == 0
    assert main(["eval", "--data", str(tmp_path / "data"), "--weights", str(ckpt), "--no-progress"]) == 2
    assert "trained on other classes" in capsys.readouterr().err
    img = str(next((other / "val").glob("*.jpg")))
    assert main(["predict", img, "--weights", str(ckpt), "--data", str(tmp_path / "data")]) == 2
    assert "trained on other classes" in capsys.readouterr().err


def test_resume_truncates_the_log_to_the_checkpoint_and_refuses_another_dataset(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(prepared / "data"), "--out", str(out), "--epochs", "1", "--log-every", "1", *SMALL]
    assert main(["train", "--max-steps", "4", *common]) == 0
    with open(out / "log.jsonl", "a") as f:  # steps logged after the checkpoint, then a kill mid-line
        f.write(json.dumps({"kind": "step", "epoch": 1, "step": 5, "loss": 9.0, "lr": 0.01, "images_per_s": 1.0}))
        f.write("\n{\"kind\": \"st")
    assert main(["train", "--resume", str(out / "last.npz"), *common]) == 0
    steps = [r["step"] for r in _log(out / "log.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 16)), steps
    # The same classes, re-prepared at another size: not the dataset the run trained on.
    assert main(["prepare", str(prepared / "images"), str(tmp_path / "data70"), "--size", "70", "--no-progress",
                 "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.npz"), "--data", str(tmp_path / "data70"), "--out", str(out),
                 "--epochs", "2", "--no-progress"]) == 2
    assert "is not the prepared dataset this run trained on" in capsys.readouterr().err


def test_training_refuses_what_it_cannot_do(prepared, capsys):
    data = str(prepared / "data")
    assert main(["train", "--data", data, "--out", str(prepared / "x"), "--crop", "99", "--no-progress"]) == 2
    assert "larger than the prepared images (72)" in capsys.readouterr().err
    assert main(["train", "--data", str(prepared / "nothing"), "--out", str(prepared / "x")]) == 2
    assert "nothing: no such folder" in capsys.readouterr().err
    assert main(["eval", "--data", data, "--weights", str(prepared / "images" / "val" / "labels.txt")]) == 2
    assert "not a pyalexnet checkpoint (not a zip archive" in capsys.readouterr().err
    assert main(["eval", "--data", data, "--weights", str(prepared / "images")]) == 2  # a directory: OSError
    assert "error:" in capsys.readouterr().err
    assert main(["train", "--data", data, "--out", str(prepared / "x"), "--max-steps", "0", *SMALL]) == 2
    assert "argument --max-steps: expected an integer >= 1, got 0" in capsys.readouterr().err
