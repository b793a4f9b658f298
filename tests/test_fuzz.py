"""Fuzzing the public ops with hypothesis: every call gives a result that matches the float64 reference, or a
clean ValueError/TypeError; never a crash, a hang or silent garbage.

Shapes and hyperparameters include hostile ones: zero-size dimensions, windows larger than the input, strides and
paddings far beyond it, values past 32-bit ranges, NaN and infinite inputs and hyperparameters, wrong dtypes and
layouts. Each call runs in a worker process (tests/_fuzz_worker.py) that is restarted after a crash, so a
segfault fails one example instead of ending the run, and a call taking over two minutes counts as a hang.

Judging a reply:
  - refused (ValueError or TypeError, with a message): fine, unless the call was plainly valid (every size >= 1,
    every hyperparameter in range, float32 C-contiguous arrays), which must succeed;
  - a result: the reference must agree (NaN where it has NaN, the same infinities, finite values within float32
    rounding). Where the reference refuses the call, our result must be empty: anything else is garbage.
Sizes past 2^31 elements are tested in test_indexing.py (without allocating them).

PYALEXNET_FUZZ_EXAMPLES sets the examples per test (default 300); PYALEXNET_FUZZ_REPORT=path writes the counts.
"""

import json
import os
import pickle
import select
import struct
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyalexnet as pa  # noqa: E402
from pyalexnet import reference as ref  # noqa: E402

EXAMPLES = int(os.environ.get("PYALEXNET_FUZZ_EXAMPLES", "300"))
TIMEOUT_S = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
OUTCOMES = defaultdict(Counter)  # op -> {"matched": n, "refused": n}


# ---- the worker process ------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None

    def start(self):
        self.stderr = open(os.path.join(self.tmp, "fuzz-worker.stderr"), "w+b")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuzz_worker.py")
        self.proc = subprocess.Popen([sys.executable, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, cwd=self.tmp)

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:  # unsent bytes to a dead worker
                    pass
            self.proc = None

    def close(self):
        self.stop()
        if getattr(self, "stderr", None):
            self.stderr.close()

    def _read(self, n):
        out = b""
        while len(out) < n:
            ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
            if not ready:
                return None  # a hang
            chunk = os.read(self.proc.stdout.fileno(), n - len(out))
            if not chunk:
                return b""  # the worker died
            out += chunk
        return out

    def call(self, op, *args, **kwargs):
        if self.proc is None:
            self.start()
        data = pickle.dumps((op, args, kwargs))
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        head = self._read(8)
        body = self._read(struct.unpack("<Q", head)[0]) if head else head
        if not body:
            what = f"hung for {TIMEOUT_S} s" if body is None else "crashed"
            self.stop()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-3000:]
            self.stderr.close()
            pytest.fail(f"{op}{_describe(args, kwargs)} {what}; worker stderr:\n{tail}")
        return pickle.loads(body)


def _describe(args, kwargs):
    parts = [f"array{a.shape}:{a.dtype}" if isinstance(a, np.ndarray) else repr(a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(str(tmp_path_factory.mktemp("fuzz")))
    yield w
    w.close()
    if os.environ.get("PYALEXNET_FUZZ_REPORT"):
        with open(os.environ["PYALEXNET_FUZZ_REPORT"], "w") as f:
            json.dump({op: dict(c) for op, c in sorted(OUTCOMES.items())}, f, indent=1)


# ---- judging --------------------------------------------------------------------------------------------------------
def _close(ours, expected, what):
    ours = np.asarray(ours)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.asarray(expected, dtype=np.float64)
        as_f32 = expected.astype(np.float32)  # what float32 can hold: beyond its range the reference is inf too
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape}, reference {expected.shape}"
    nan_ours, nan_ref = np.isnan(ours), np.isnan(as_f32)
    assert np.array_equal(nan_ours, nan_ref), f"{what}: NaN at {np.argwhere(nan_ours != nan_ref)[:5].tolist()}"
    inf_ours, inf_ref = np.isinf(ours), np.isinf(as_f32)
    assert np.array_equal(inf_ours, inf_ref), f"{what}: inf at {np.argwhere(inf_ours != inf_ref)[:5].tolist()}"
    assert np.array_equal(ours[inf_ours], as_f32[inf_ref]), f"{what}: infinities of the wrong sign"
    finite = ~(nan_ours | inf_ours)
    if finite.any():
        scale = float(np.abs(expected[finite]).max())
        err = np.abs(ours[finite].astype(np.float64) - expected[finite])
        bound = 1e-4 * np.abs(expected[finite]) + 1e-5 * (1.0 + scale)
        assert (err <= bound).all(), f"{what}: max error {err.max():.3g} at scale {scale:.3g}"


def judge(op, reply, valid, reference, names):
    """reference() returns the expected outputs, or raises ValueError where the reference refuses the call."""
    if reply[0] == "raise":
        _, name, is_value, is_type, message = reply
        assert is_value or is_type, f"{op}: an unclean {name}: {message}"
        assert message.strip(), f"{op}: {name} without a message"
        assert not valid, f"{op}: a plainly valid call was refused: {name}: {message}"
        OUTCOMES[op]["refused"] += 1
        return
    outputs = reply[1]
    try:
        with np.errstate(all="ignore"):  # inf - inf and the like: the reference's NaN is the expected answer
            expected = reference()
    except ValueError as e:
        sizes = [np.asarray(o).size for o in outputs if not isinstance(o, float)]
        assert all(s == 0 for s in sizes), f"{op}: accepted a call the reference refuses ({e}) and returned data"
        OUTCOMES[op]["empty"] += 1
        return
    for name, o, e in zip(names, outputs, expected):
        _close(o, e, f"{op} {name}")
    OUTCOMES[op]["matched"] += 1


# ---- values ------------------------------------------------------------------------------------------------------------
KINDS = ["normal", "normal", "nan", "inf", "extreme"]


def values(shape, kind, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    x = np.asarray(scale * rng.standard_normal(shape), dtype=np.float32)  # an array even for shape ()
    if x.size and kind != "normal":
        specials = {"nan": [np.nan], "inf": [np.inf, -np.inf], "extreme": [3e38, -3e38, 1e-42, -0.0]}[kind]
        where = rng.random(shape) < 0.2
        x[where] = rng.choice(np.array(specials, np.float32), size=int(where.sum()))
    return x


LAYOUTS = ["ok"] * 6 + ["transposed", "float64", "int32"]


def layout(a, how):
    """The first array argument in a hostile layout; returns (array, whether it is still acceptable)."""
    if how == "transposed" and a.ndim >= 2 and not a.T.flags.c_contiguous:
        return a.T, False
    if how == "float64":
        return a.astype(np.float64), False
    if how == "int32":
        with np.errstate(invalid="ignore"):  # NaN and inf have no int32 value: any will do
            return a.astype(np.int32), False
    return a, True


dims = st.integers(0, 6)
seeds = st.integers(0, 2**32 - 1)
kinds = st.sampled_from(KINDS)
layouts = st.sampled_from(LAYOUTS)
hostile_ints = st.sampled_from([0, -1, -(2**31), 2**31, 2**40, 2**64])


def sometimes_hostile(good):
    return st.one_of(good, good, good, hostile_ints)


hostile_reals = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e300])


# ---- the ops ----------------------------------------------------------------------------------------------------------
@FUZZ
@given(shape=st.lists(dims, min_size=0, max_size=4), kind=st.sampled_from(KINDS), seed=seeds, how=layouts)
def test_relu(worker, shape, kind, seed, how):
    x, ok = layout(values(shape, kind, seed), how)
    valid = ok and all(d >= 1 for d in shape)
    judge("relu_forward", worker.call("relu_forward", x), valid, lambda: [ref.relu_forward(x)], ["y"])
    dy = values(x.shape, "normal", seed + 1)
    y = np.asarray(np.maximum(values(x.shape, kind, seed), 0))
    judge("relu_backward", worker.call("relu_backward", dy, y), all(d >= 1 for d in shape),
          lambda: [ref.relu_backward(dy, y)], ["dx"])


@st.composite
def conv_cases(draw):
    """Mostly consistent geometry (so most calls are computed, not refused), sometimes anything at all."""
    sane = draw(st.integers(0, 3)) > 0
    groups = draw(st.integers(1, 3) if sane else sometimes_hostile(st.integers(1, 3)))
    g = groups if isinstance(groups, int) and 1 <= groups <= 3 else 1
    if sane:
        c, k = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
        cg = c // g
        n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
        stride, padding = draw(st.integers(1, 4)), draw(st.integers(0, 3))
        r, s = draw(st.integers(1, h + 2 * padding)), draw(st.integers(1, w + 2 * padding))
        r, s = min(r, 6), min(s, 6)
    else:
        c, k, cg = draw(st.integers(0, 7)), draw(st.integers(0, 7)), draw(st.integers(0, 4))
        n, h, w = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 9))
        r, s = draw(st.integers(0, 6)), draw(st.integers(0, 6))
        stride = draw(sometimes_hostile(st.integers(1, 4)))
        padding = draw(st.one_of(st.integers(0, 3), st.just(12), hostile_ints))
    bias = draw(st.booleans())
    return (n, c, h, w), (k, cg, r, s), stride, padding, groups, bias


def _conv_valid(xs, ws, stride, padding, groups):
    (_, c, h, w), (k, cg, r, s) = xs, ws
    return (all(d >= 1 for d in (*xs, *ws)) and 1 <= stride < 2**31 and 0 <= padding < 2**20 and 1 <= groups
            and c % groups == 0 and k % groups == 0 and cg == c // groups and h + 2 * padding >= r
            and w + 2 * padding >= s)


@FUZZ
@given(case=conv_cases(), kind=st.sampled_from(["normal", "normal", "nan", "inf"]), seed=seeds, how=layouts)
def test_conv2d(worker, case, kind, seed, how):
    xs, ws, stride, padding, groups, with_bias = case
    x, ok = layout(values(xs, kind, seed), how)
    w = values(ws, "normal", seed + 1, 0.3)
    b = values((ws[0],), "normal", seed + 2) if with_bias else None
    valid = ok and _conv_valid(xs, ws, stride, padding, groups)
    hyper = dict(stride=stride, padding=padding, groups=groups)
    reply = worker.call("conv2d_forward", x, w, b, **hyper)
    judge("conv2d_forward", reply, valid, lambda: [ref.conv2d_forward(x, w, b, **hyper)], ["y"])
    if reply[0] == "ok":
        dy = values(reply[1][0].shape, "normal", seed + 3)
        judge("conv2d_backward", worker.call("conv2d_backward", dy, x, w, **hyper), valid,
              lambda: ref.conv2d_backward(dy, x, w, **hyper), ["dx", "dw", "db"])


@FUZZ
@given(batch=st.integers(0, 5), fin=st.integers(0, 40), fout=st.integers(0, 40),
       wrong_in=st.sampled_from([False, False, False, True]),
       bias=st.booleans(), kind=st.sampled_from(["normal", "normal", "nan", "inf"]), seed=seeds, how=layouts)
def test_linear(worker, batch, fin, fout, wrong_in, bias, kind, seed, how):
    x, ok = layout(values((batch, fin), kind, seed), how)
    w = values((fout, fin + 1 if wrong_in else fin), "normal", seed + 1, 0.2)
    b = values((fout,), "normal", seed + 2) if bias else None
    valid = ok and not wrong_in and min(batch, fin, fout) >= 1
    judge("linear_forward", worker.call("linear_forward", x, w, b), valid, lambda: [ref.linear_forward(x, w, b)], ["y"])
    dy = values((batch, fout), "normal", seed + 3)
    judge("linear_backward", worker.call("linear_backward", dy, x, w), valid, lambda: ref.linear_backward(dy, x, w),
          ["dx", "dw", "db"])


@FUZZ
@given(batch=st.integers(0, 6), classes=st.integers(0, 12), label_dtype=st.sampled_from([np.int32, np.int64]),
       bad_label=st.sampled_from([None, None, None, None, -1, "classes", 2**40]), kind=st.sampled_from(["normal", "nan", "inf"]),
       scale=st.sampled_from([1.0, 1e4]), seed=seeds, how=layouts)
def test_softmax_cross_entropy(worker, batch, classes, label_dtype, bad_label, kind, scale, seed, how):
    logits, ok = layout(values((batch, classes), kind, seed, scale), how)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(classes, 1), batch).astype(np.int64)
    if bad_label is not None and batch:
        labels[rng.integers(batch)] = classes if bad_label == "classes" else bad_label
    if label_dtype == np.int32:
        labels = labels.astype(np.int32) if np.abs(labels).max(initial=0) < 2**31 else labels
    valid = ok and bad_label is None and batch >= 1 and classes >= 1

    def reference():
        loss, d = ref.softmax_cross_entropy(logits, labels)
        return [loss, d]

    judge("softmax_cross_entropy", worker.call("softmax_cross_entropy", logits, labels), valid, reference,
          ["loss", "dlogits"])


@st.composite
def lrn_cases(draw):
    shape = (draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.integers(0, 5)), draw(st.integers(0, 5)))
    if draw(st.integers(0, 3)) > 0:
        return shape, draw(st.sampled_from([1, 3, 5, 7, 9, 11])), draw(st.floats(0, 1e-2)), draw(st.floats(0, 2)), \
            draw(st.floats(0.5, 3))
    size = draw(st.one_of(st.sampled_from([1, 3, 5, 7, 9, 11]), st.sampled_from([2, 4]), hostile_ints))
    alpha = draw(st.one_of(st.floats(0, 1e-2), hostile_reals))
    beta = draw(st.one_of(st.floats(0, 2), hostile_reals))
    k = draw(st.one_of(st.floats(0.5, 3), hostile_reals))
    return shape, size, alpha, beta, k


# No "extreme" values: LRN squares its input in float32, so |x| > 1.8e19 overflows there (as in PyTorch and cuDNN)
# where the float64 reference does not.
@FUZZ
@given(case=lrn_cases(), kind=st.sampled_from(["normal", "normal", "nan", "inf"]), seed=seeds, how=layouts)
def test_lrn(worker, case, kind, seed, how):
    shape, size, alpha, beta, k = case
    x, ok = layout(values(shape, kind, seed), how)
    hyper = dict(size=size, alpha=alpha, beta=beta, k=k)
    # The kernels take float32 hyperparameters: the reference gets the same rounded values (a beta of 1e-240 is 0).
    hyper32 = dict(size=size, **{name: float(np.float32(v)) if abs(v) < 1e300 else v
                                 for name, v in dict(alpha=alpha, beta=beta, k=k).items()})
    in_range = (1 <= size < 2**31 and size % 2 == 1 and 0 <= alpha < 1e300 and 0 <= beta < 1e300 and 0 < k < 1e300)
    valid = ok and in_range and min(shape) >= 1
    reply = worker.call("lrn_forward", x, **hyper)
    judge("lrn_forward", reply, valid, lambda: [ref.lrn_forward(x, **hyper32)], ["y"])
    if reply[0] == "ok":
        dy = values(x.shape, "normal", seed + 1)
        y = reply[1][0]
        judge("lrn_backward", worker.call("lrn_backward", dy, x, y, **hyper), valid,
              lambda: [ref.lrn_backward(dy, x, y, **hyper32)], ["dx"])


@FUZZ
@given(shape=st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 12), st.integers(0, 12)),
       size=sometimes_hostile(st.integers(1, 5)), stride=sometimes_hostile(st.integers(1, 4)), kind=kinds, seed=seeds,
       how=layouts)
def test_maxpool(worker, shape, size, stride, kind, seed, how):
    x, ok = layout(values(shape, kind, seed), how)
    valid = ok and min(shape) >= 1 and 1 <= size <= min(shape[2:]) and 1 <= stride < 2**31
    reply = worker.call("maxpool_forward", x, size=size, stride=stride)
    judge("maxpool_forward", reply, valid, lambda: [ref.maxpool_forward(x, size, stride)], ["y"])
    if reply[0] == "ok":
        y = reply[1][0]
        dy = values(y.shape, "normal", seed + 1)
        judge("maxpool_backward", worker.call("maxpool_backward", dy, x, y, size=size, stride=stride), valid,
              lambda: [ref.maxpool_backward(dy, x, y, size, stride)], ["dx"])


@FUZZ
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       p=st.one_of(st.floats(0, 0.95), st.sampled_from([1.0, -0.1, float("nan"), float("inf")])),
       seed=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64, 2**70])), kind=kinds,
       data_seed=seeds, how=layouts)
def test_dropout(worker, shape, p, seed, kind, data_seed, how):
    x, ok = layout(values(shape, kind, data_seed), how)
    valid = ok and min(shape, default=1) >= 1 and 0 <= p < 1 and 0 <= seed < 2**64
    reply = worker.call("dropout_forward", x, p=p, seed=seed)

    def reference():
        if not (0 <= seed < 2**64):
            raise ValueError("seed out of range")
        keep = ref.dropout_mask(x.shape, p, seed)
        return [ref.dropout_forward(x, keep, p)]

    judge("dropout_forward", reply, valid, reference, ["y"])
    if reply[0] == "ok":
        mask = reply[1][1]
        np.testing.assert_array_equal(pa.ops.dropout_keep(mask, x.shape), ref.dropout_mask(x.shape, p, seed))
        dy = values(x.shape, "normal", data_seed + 1)
        judge("dropout_backward", worker.call("dropout_backward", dy, mask, p=p), valid,
              lambda: [ref.dropout_backward(dy, ref.dropout_mask(x.shape, p, seed), p)], ["dx"])


@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       lr=st.one_of(st.floats(1e-5, 1.0), hostile_reals), momentum=st.one_of(st.floats(0, 0.99), hostile_reals),
       weight_decay=st.one_of(st.floats(0, 1e-2), hostile_reals), kind=kinds, seed=seeds, how=layouts)
def test_sgd_update(worker, shape, lr, momentum, weight_decay, kind, seed, how):
    dw, ok = layout(values(shape, kind, seed + 1), how)
    w = values(dw.shape, kind, seed)
    v = values(dw.shape, "normal", seed + 2)
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    in_range = 0 < lr < 1e300 and 0 <= momentum < 1 and 0 <= weight_decay < 1e300
    valid = ok and in_range and min(shape, default=1) >= 1

    def reference():
        if not in_range:
            raise ValueError("hyperparameter out of range")
        return list(ref.sgd_update(w, dw, v, **hyper))

    judge("sgd_update", worker.call("sgd_update", w, dw, v, **hyper), valid, reference, ["w", "v"])


@FUZZ
@given(batch=st.integers(0, 4), size=st.integers(0, 12),
       crop=st.one_of(st.integers(1, 12), sometimes_hostile(st.integers(1, 12))),
       clamp=st.sampled_from([True, True, True, False]),
       hostile_params=st.sampled_from([None] * 12 + ["negative", "past the edge", "flip 2", "huge"]),
       scale=st.one_of(st.floats(-2, 2), st.floats(-2, 2), hostile_reals), seed=seeds,
       how=st.sampled_from(["ok"] * 12 + ["float32"]))
def test_augment_batch(worker, batch, size, crop, clamp, hostile_params, scale, seed, how):
    from pyalexnet.data import augment_reference

    if clamp and isinstance(crop, int) and 1 <= crop:
        crop = min(crop, max(size, 1))  # mostly a crop that fits
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    if how == "float32":
        images = images.astype(np.float32)
    mean = (rng.random((size, size, 3)) * 255).astype(np.float32)
    fits = isinstance(crop, int) and 1 <= crop <= size
    room = size - crop if fits else 0
    params = np.stack([rng.integers(0, room + 1, batch), rng.integers(0, room + 1, batch),
                       rng.integers(0, 2, batch)], axis=1).astype(np.int32)
    if hostile_params and batch:
        params[rng.integers(batch)] = {"negative": (-1, 0, 0), "past the edge": (room + 1, 0, 0),
                                       "flip 2": (0, 0, 2), "huge": (2**31 - 1, 0, 0)}[hostile_params]
    shift = rng.normal(0, 5, (batch, 3)).astype(np.float32)
    valid = how == "ok" and fits and batch >= 1 and not hostile_params and abs(scale) < 1e300
    reply = worker.call("augment_batch", images, mean, params, shift, crop, scale)

    def reference():
        if not valid:
            raise ValueError("not a valid call")
        return [augment_reference(images, mean, params, shift, crop, scale)]

    judge("augment_batch", reply, valid, reference, ["out"])


def test_a_crash_in_the_worker_is_a_failure_not_a_dead_run(tmp_path):
    """The harness itself: a worker that dies mid-call fails the example with its stderr."""
    w = Worker(str(tmp_path))
    w.start()
    w.proc.kill()
    w.proc.wait()
    with pytest.raises(pytest.fail.Exception, match="crashed"):
        w.call("relu_forward", np.zeros(3, np.float32))
    assert w.call("relu_forward", np.ones(3, np.float32))[0] == "ok"  # restarted
    w.close()
