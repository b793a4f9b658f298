"""What train() promises its user (issue 17): it never trains into another run's folder by accident, its defaults
train, its summary and messages describe the call that made them, the plateau schedule has PyTorch's knobs, the
augmentations can be switched off (and eval follows), and the logs and curves say what happened."""

import datetime
import inspect
import json
import math
import sys
import time
import types

import numpy as np
import pytest

import pyalexnet as pa
from pyalexnet import train as T
from pyalexnet.demo import write_demo_data
from pyalexnet.optim import Plateau, schedule_from_state

pytest.importorskip("PIL")

TINY = dict(width=0.25, crop=67, batch_size=16, progress=False)  # 240 images: 15 steps an epoch
QUIET = dict(TINY, echo=lambda *a: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pyalexnet.data import prepare

    root = tmp_path_factory.mktemp("ux")
    write_demo_data(root / "images", train_per_class=24, val_per_class=6, size=72, seed=1)
    prepare(root / "images", root / "data", size=72, workers=1, shard_images=64, progress=False)
    return root / "data"


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _steps(out):
    return [r for r in _log(out) if r["kind"] == "step"]


# ---- A: a folder with a run in it ---------------------------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(data, tmp_path):
    out = tmp_path / "run"
    T.train(data, out, max_steps=2, log_every=1, **QUIET)
    for name in ("log.jsonl", "last.npz", "best.npz"):
        only = tmp_path / f"only-{name}"
        only.mkdir()
        (only / name).write_bytes(b"x")
        with pytest.raises(ValueError, match="--resume") as e:
            T.train(data, only, max_steps=1, **QUIET)
        assert "--overwrite" in str(e.value) and name in str(e.value)
    before = (out / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a training run.*--resume.*--overwrite"):
        T.train(data, out, max_steps=1, **QUIET)
    assert (out / "log.jsonl").read_text() == before  # refused before touching anything

    # overwrite: the old run's files go, including a curves.png and TensorBoard events, before anything starts
    (out / "curves.png").write_bytes(b"stale")
    (out / "tb").mkdir(exist_ok=True)
    (out / "tb" / "events.out.tfevents.1.host").write_bytes(b"old")
    (out / "best.npz").write_bytes(b"stale")
    r = T.train(data, out, max_steps=3, log_every=1, overwrite=True, tensorboard=False, **QUIET)
    assert r["steps"] == 3 and [s["step"] for s in _steps(out)] == [1, 2, 3]
    assert _log(out)[0]["kind"] == "config" and _log(out)[0]["args"]["overwrite"] is True
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "best.npz").exists() and not (out / "tb").exists()
    assert pa.load(out / "last.npz").optimizer.steps == 3

    with pytest.raises(ValueError, match="would delete"):
        T.train(data, out, resume=out / "last.npz", overwrite=True, **QUIET)
    other = tmp_path / "other"
    T.train(data, other, max_steps=1, **QUIET)
    with pytest.raises(ValueError, match="holds another training run"):
        T.train(data, other, resume=out / "last.npz", **QUIET)


# ---- B: defaults that train ---------------------------------------------------------------------------------------
def _torchvision_runs():
    try:
        net = pa.AlexNet("torchvision", num_classes=10, width=0.25, input_size=67)
        net.forward(pa.asarray(np.zeros((1, 3, 67, 67), np.float32)), train=False)
        return True
    except AttributeError:  # an op of the variant not built into this extension yet
        return False


@pytest.mark.parametrize("init", ["paper", "kaiming"])
@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_every_documented_combination_trains_at_the_defaults(data, tmp_path, init, variant):
    if variant == "torchvision" and not _torchvision_runs():
        pytest.skip("the torchvision variant's kernels are not in this build")
    out = tmp_path / "run"
    lines = []
    r = T.train(data, out, variant=variant, init=init, max_steps=20, log_every=1, echo=lines.append, **TINY)
    losses = [s["loss"] for s in _steps(out)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
    assert max(losses) < 3 * math.log(10), losses  # chance is ln 10: nothing blew up
    assert np.mean(losses[-5:]) <= np.mean(losses[:5]) + 0.25, losses
    assert r["loss"] == losses[-1] and r["scale"] == pytest.approx(T.default_scale(init, pa_dataset(data)))
    assert lines[-1].startswith("20 steps in ") and lines[-1].endswith(f"last loss {losses[-1]:.4f}")


def pa_dataset(path):
    from pyalexnet.data import Dataset

    return Dataset(path)


def test_the_default_scale_follows_the_init_and_the_pixels(data):
    ds = pa_dataset(data)
    assert T.default_scale("paper", ds) == 1.0
    std = math.sqrt(np.mean(ds.eigenvalues))
    assert T.default_scale("kaiming", ds) == pytest.approx(0.5 / std) and 20 < std < 120


def test_divergence_names_only_a_checkpoint_that_exists_and_draws_the_curves(data, tmp_path):
    out = tmp_path / "diverged"
    # He's init on raw 0-255 pixels: what the old default did. No checkpoint is due before the blow-up.
    with pytest.raises(T.TrainingDiverged) as e:
        T.train(data, out, init="kaiming", scale=1.0, epochs=1, log_every=1, **QUIET)
    message = str(e.value)
    assert "no checkpoint was written" in message and "last.npz" not in message and not (out / "last.npz").exists()
    assert "--scale" in message
    assert _log(out)[-1]["kind"] == "diverged"
    assert (out / "curves.png").stat().st_size > 1000

    out2 = tmp_path / "diverged2"
    with pytest.raises(T.TrainingDiverged) as e:
        T.train(data, out2, init="kaiming", scale=1.0, epochs=1, log_every=1, checkpoint_every=2, **QUIET)
    assert f"the last good checkpoint ({out2 / 'last.npz'}) is untouched" in str(e.value)
    assert (out2 / "last.npz").exists()


# ---- C and F: the summary describes this call -------------------------------------------------------------------
def test_the_summary_counts_this_call_and_a_finished_resume_says_nothing_to_do(data, tmp_path):
    out = tmp_path / "run"
    first = T.train(data, out, epochs=1, max_steps=7, log_every=5, schedule="step", **QUIET)
    assert (first["steps"], first["total_steps"], first["stopped"]) == (7, 7, "max_steps")
    lines = []
    t0 = time.perf_counter()
    second = T.train(data, out, epochs=1, log_every=5, resume=out / "last.npz", echo=lines.append, **TINY)
    assert (second["steps"], second["total_steps"], second["stopped"]) == (8, 15, None)
    assert second["seconds"] <= time.perf_counter() - t0  # its own clock
    assert second["images_per_s"] > 0 and lines[-1].startswith("8 steps (15 in all) in ")
    # The resumed call's first window (steps 8-10) counts its own 3 batches, not the interrupted call's.
    windows = {s["step"]: s["images"] for s in _steps(out)}
    assert windows[5] == 5 * 16 and windows[10] == 3 * 16 and windows[15] == 5 * 16
    kinds = [r["kind"] for r in _log(out)]
    assert kinds[0] == "config" and "resume" in kinds and kinds[-1] == "end"
    lines.clear()
    third = T.train(data, out, epochs=1, resume=out / "last.npz", echo=lines.append, **TINY)
    assert (third["steps"], third["total_steps"], third["stopped"], third["loss"]) == (0, 15, "nothing_to_do", None)
    assert any("nothing to do: the checkpoint is already at epoch 1 of 1" in x for x in lines), lines


# ---- D: the plateau schedule's knobs, the augmentation switches ------------------------------------------------
def test_plateau_knobs():
    def run(errors, **kw):
        s, lr, out = Plateau(**kw), 1.0, []
        for i, e in enumerate(errors, 1):
            lr = s.next_lr(lr, i, e)
            out.append(lr)
        return out, s

    noisy = [0.5, 0.52, 0.49, 0.51, 0.53, 0.50, 0.52, 0.54, 0.55, 0.56]
    lrs, _ = run(noisy)  # the default patience (4) rides out the wobbles; the fifth epoch in a row without a new best lowers lr
    assert lrs == pytest.approx([1] * 7 + [0.1] * 3)
    assert run(noisy, patience=0)[0][1] == pytest.approx(0.1)  # PyTorch's patience=0: the first wobble
    assert run(noisy, patience=3)[0] == pytest.approx([1] * 6 + [0.1] * 4)  # more than 3 bad epochs in a row
    # threshold: 0.499 is not better than 0.5 by 1% (rel) or by 0.01 (abs)
    assert run([0.5, 0.499], patience=0, threshold=0.01)[0] == pytest.approx([1, 0.1])
    assert run([0.5, 0.499], patience=0, threshold=0.01, threshold_mode="abs")[0] == pytest.approx([1, 0.1])
    assert run([0.5, 0.499], patience=0, threshold=1e-4)[0] == pytest.approx([1, 1])
    # cooldown: after a reduction, two epochs are not counted
    assert run([0.5, 0.6, 0.6, 0.6, 0.6], patience=0, cooldown=2)[0] == pytest.approx([1, 0.1, 0.1, 0.1, 0.01])
    assert run([0.5] + [0.6] * 8, patience=0)[0][-1] == pytest.approx(1e-3)  # at most 3 reductions
    assert run([0.5] + [0.6] * 8, patience=0, max_reductions=1)[0][-1] == pytest.approx(0.1)
    for bad, match in [({"threshold_mode": "max"}, "threshold_mode"), ({"patience": -1}, "patience"),
                       ({"factor": 2.0}, "factor"), ({"threshold": -1}, "threshold"), ({"cooldown": -1}, "cooldown")]:
        with pytest.raises(ValueError, match=match):
            Plateau(**bad)


def test_plateau_state_round_trips_through_a_checkpoint(tmp_path):
    net = pa.AlexNet("paper", num_classes=10, width=0.25, input_size=67)
    s = Plateau(patience=1, factor=0.5, max_reductions=4, threshold=0.02, threshold_mode="abs", cooldown=3)
    opt = pa.SGD(net, lr=0.1, schedule=s)
    for e in (0.5, 0.6, 0.6):  # a reduction, then in cooldown
        opt.end_epoch(e)
    assert s.reductions == 1 and s.cooldown_left == 3
    pa.save(tmp_path / "c.npz", net, opt)
    back = pa.load(tmp_path / "c.npz").optimizer.schedule
    assert back.state() == s.state()
    for e in (0.6, 0.6, 0.6, 0.6, 0.6, 0.4):
        assert back.next_lr(1.0, 0, e) == s.next_lr(1.0, 0, e)
    # a checkpoint from before the knobs: the old behaviour (any decrease a new best, no cooldown)
    old = schedule_from_state({"kind": "plateau", "patience": 1, "factor": 0.1, "max_reductions": 3, "best": 0.5,
                               "bad_epochs": 0, "reductions": 0})
    assert old.next_lr(1.0, 0, 0.49999) == 1.0 and old.next_lr(1.0, 0, 0.6) == pytest.approx(0.1)


def test_augmentations_can_be_switched_off_and_eval_follows(data, tmp_path, monkeypatch):
    seen = []
    real = pa.ops.augment_batch

    def spy(images, mean, params, shift, crop, scale=1.0):
        seen.append((np.array(params), np.array(shift)))
        return real(images, mean, params, shift, crop, scale)

    monkeypatch.setattr(pa.ops, "augment_batch", spy)
    out = tmp_path / "plain"
    T.train(data, out, flip=False, pca=False, random_crop=False, max_steps=3, **QUIET)
    centre = (72 - 67) // 2
    for params, shift in seen:
        assert (params[:, 0] == centre).all() and (params[:, 1] == centre).all() and (params[:, 2] == 0).all()
        assert (shift == 0).all()
    extra = pa.load(out / "last.npz").extra
    assert (extra["train"]["flip"], extra["train"]["pca"], extra["train"]["random_crop"]) == (False, False, False)
    assert T.eval_views(extra) == [0]
    assert T.eval_views({"train": {"flip": False}}) == [0, 1, 2, 3, 4]
    assert T.eval_views({"train": {"random_crop": False}}) == [0, 5]
    assert T.eval_views({}) == list(range(10))

    seen.clear()  # on: the loader's draws pass through untouched (flips, corners, colour shifts all occur)
    T.train(data, tmp_path / "full", max_steps=3, **QUIET)
    params = np.concatenate([p for p, _ in seen])
    assert params[:, 2].any() and (params[:, :2] != centre).any() and any(s.any() for _, s in seen)

    seen.clear()
    ck = pa.load(out / "last.npz")
    r = T.evaluate(ck.net, pa_dataset(data), "val", 32, True, ck.extra["train"]["scale"], views=[0, 5])
    assert r["views"] == [0, 5] and len(seen) == 2 * 2  # two batches of val: the centre and its mirror
    assert all((p[:, :2] == centre).all() for p, _ in seen) and {int(p[0, 2]) for p, _ in seen} == {0, 1}


# ---- E: logs, curves, TensorBoard ---------------------------------------------------------------------------------
def test_every_log_line_is_timed_and_the_first_is_the_full_config(data, tmp_path):
    out = tmp_path / "run"
    T.train(data, out, epochs=1, max_steps=4, log_every=2, **QUIET)
    T.train(data, out, epochs=1, log_every=2, resume=out / "last.npz", **QUIET)
    log = _log(out)
    for rec in log:
        t = datetime.datetime.fromisoformat(rec["time"])
        assert t.utcoffset() == datetime.timedelta(0), rec
    config = log[0]
    assert config["kind"] == "config" and config["backend"] == pa.backend_name() and config["version"] == pa.__version__
    params = set(inspect.signature(T.train).parameters) - {"echo"}
    assert set(config["args"]) == params
    assert config["data"] == str(data) and config["scale"] == pytest.approx(1.0) and config["crop"] == 67
    resume = [r for r in log if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 4 and resume[0]["from"] == str(out / "last.npz")


def test_curves_have_axes_and_a_log_scale(data, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    log = tmp_path / "log.jsonl"
    recs = [{"kind": "step", "step": s, "loss": 2.3 * 0.9**s} for s in range(1, 31)]
    recs += [{"kind": "epoch", "epoch": e, "step": 15 * e, "val_top1_error": 0.8 / e, "val_top5_error": 0.4 / e}
             for e in (1, 2)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "st')
    T.plot_curves(log, tmp_path / "linear.png")
    T.plot_curves(log, tmp_path / "log.png", log_scale=True)
    def pixels(name):
        with Image.open(tmp_path / name) as im:
            return np.asarray(im.convert("L"))

    a, b = pixels("linear.png"), pixels("log.png")
    assert a.shape == b.shape and a.shape[1] >= 1000 and (a != b).any()


def test_curves_fall_back_to_pillow_without_matplotlib(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"kind": "step", "step": 1, "loss": 2.0}) + "\n")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setattr(T, "_warned_without_matplotlib", False)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        T.plot_curves(log, tmp_path / "a.png")
    T.plot_curves(log, tmp_path / "b.png")  # once only: under the suite's warnings-as-errors this would raise
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").exists()


def test_tensorboard_scalars_when_a_writer_imports(data, tmp_path, monkeypatch):
    made = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            made.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            self.closed = True

    fake = types.ModuleType("tensorboardX")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # torch's writer unavailable: the fallback is used
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    out = tmp_path / "run"
    T.train(data, out, epochs=1, max_steps=4, log_every=2, schedule="step", **QUIET)
    T.train(data, out, epochs=1, log_every=5, schedule="step", resume=out / "last.npz", **QUIET)
    assert len(made) == 2 and all(w.closed for w in made) and made[0].log_dir == str(out / "tb")
    assert made[0].purge_step is None and made[1].purge_step == 5
    tags = {t for t, _, _ in made[0].scalars}
    assert {"train/loss", "train/lr", "train/images_per_s"} <= tags
    assert ("val/top1_error" in {t for t, _, _ in made[1].scalars}) and [s for t, _, s in made[1].scalars
                                                                          if t == "train/loss"] == [5, 10, 15]
    T.train(data, tmp_path / "off", max_steps=1, tensorboard=False, **QUIET)
    assert len(made) == 2


def test_no_tensorboard_is_no_error(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert T._summary_writer() is None
    assert T.train(data, tmp_path / "run", max_steps=1, **QUIET)["steps"] == 1


def test_the_time_spent_waiting_for_input_is_logged_and_an_input_bound_epoch_says_so(tmp_path, monkeypatch):
    from pyalexnet import data as D

    write_demo_data(tmp_path / "images", train_per_class=4, val_per_class=1, size=72, seed=2)
    D.prepare(tmp_path / "images", tmp_path / "data", size=72, workers=1, progress=False)
    read = D.Split.read_into

    def slow(self, *args):  # a disk far slower than the step
        time.sleep(1.0)
        return read(self, *args)

    monkeypatch.setattr(D.Split, "read_into", slow)
    said = []
    r = T.train(tmp_path / "data", tmp_path / "run", width=0.25, crop=67, init="kaiming", batch_size=16, epochs=1,
                schedule="constant", log_every=1, loader_threads=1, progress=False, tensorboard=False,
                echo=said.append)
    steps = _steps(tmp_path / "run")
    assert steps and all(0.0 <= x["data_wait"] <= 1.0 for x in steps)
    assert sum(x["data_wait"] for x in steps) / len(steps) > 0.3
    assert 0.3 < r["data_wait"] <= 1.0
    assert any(line.startswith("input-bound: the training step waited for input") and "--loader-threads" in line
               for line in said)
    assert "waiting for input" in said[-1]
