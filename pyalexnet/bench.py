"""`pyalexnet bench`: AlexNet training throughput and per-layer times, ours against PyTorch + cuDNN and cuBLAS.

On a GPU (the cuda backend):
  - whole network: images/s of a training step (forward, softmax cross-entropy, backward, SGD update) at
    --batch, ours against the same network in PyTorch (torchvision's layout for that variant) on the same
    inputs, in two modes: "strict" (TF32 off on both sides: fp32 SIMT against fp32 SIMT) and "default"
    (PyTorch's defaults, which let cuDNN use TF32 tensor cores for convolutions);
  - per layer: forward and backward of every layer at its shape, ours against PyTorch (cuDNN) and, for the
    fully-connected layers, cuBLAS through CuPy's matmul;
  - the device's measured peaks (copy bandwidth, an fp32 GEMM), so each figure is also a % of what the card
    does; CUDA-event timing after warm-up, the median of --iters runs; the whole-network inputs rotate between
    two buffers larger than L2 (per-layer timings repeat one input: a small layer's may sit in L2).
  Writes bench/results/<date>-<card>-<commit>-bench.json in the git checkout it is run from (every number,
  card, driver, versions) and, with matplotlib installed, a PNG chart beside it.
Without a GPU: runs the same pipeline on the CPU emulator on a small network, checks its results against the
float64 reference, and prints its times labelled as what they are (not a speed figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pyalexnet as pa

from . import _backend
from ._cli import POSITIVE_INT, Parser
from ._files import atomic_write
from .torch_compat import model_layers, torch_model

EMULATED = "emulated — a correctness run, not a speed figure"
EMULATED_BATCH = 4  # the emulator's step at width 1/16: seconds, not minutes


def _progress(total: int, desc: str):
    """tqdm when installed (the bench extra), else a plain counter on stderr."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        class Counter:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self):
                print(file=sys.stderr)

        return Counter()


def conv_flops(net) -> float:
    """Forward FLOPs of one image (multiply-adds count 2)."""
    total = 0.0
    for spec, shape_in, shape_out in zip(net.specs, net.shapes, net.shapes[1:]):
        if spec[0] == "conv":
            _, _, out, kernel, _, _, groups, _ = spec
            total += 2.0 * out * shape_out[1] * shape_out[2] * (shape_in[0] // groups) * kernel * kernel
        elif spec[0] == "linear":
            total += 2.0 * spec[2] * shape_in[0]
    return total


class TrainStep:
    """One of our training steps on preallocated buffers: no allocation, no host synchronisation."""

    def __init__(self, net, opt, batch):
        xp = _backend.active.xp
        self.net, self.opt = net, opt
        self.dlogits = xp.empty((batch, net.num_classes), np.float32)
        self.row_loss = xp.empty((batch,), np.float32)
        self.result = xp.empty((2,), np.float32)

    def __call__(self, x, labels):
        be = _backend.active
        logits = self.net.forward(x, train=True)
        be.module.softmax_xent(logits, labels, self.dlogits, self.row_loss, self.result, stream=be.stream())
        self.net.backward(self.dlogits)
        self.opt.step()


def torch_flags(torch, mode):
    """strict: TF32 off on both sides; default: PyTorch's defaults. cuDNN picks its fastest algorithms."""
    strict = mode == "strict"
    torch.backends.cudnn.allow_tf32 = not strict  # PyTorch's default is True for cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False  # and False for matmuls, in both modes
    torch.backends.cudnn.benchmark = True


# ---- on a GPU -------------------------------------------------------------------------------------------------------
def strict_torch():
    """PyTorch with TF32 off (torch_flags "strict"), or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch_flags(torch, "strict")
    return torch


def cuda_timer(cp, iters):
    """time_ms(fn, rotate=1): the median over `iters` runs of fn(i % rotate), in ms, timed with CUDA events after 3
    warm-up runs (`rotate` cycles through input buffers, so that L2 flatters no one)."""

    def time_ms(fn, rotate=1):
        for i in range(3):
            fn(i % rotate)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for i in range(iters):
            start.record()
            fn(i % rotate)
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    return time_ms


def _peaks(cp, time_ms):
    a = cp.empty(1 << 28, dtype=cp.float32)
    b = cp.empty_like(a)
    copy = 2 * a.nbytes / time_ms(lambda _: b.__setitem__(slice(None), a)) / 1e6
    del a, b
    n = 8192
    m1, m2 = cp.random.rand(n, n, dtype=cp.float32), cp.random.rand(n, n, dtype=cp.float32)
    gemm = 2.0 * n**3 / time_ms(lambda _: cp.matmul(m1, m2)) / 1e9
    return {"copy_GBps": copy, "fp32_gemm_TFLOPs": gemm}


def _whole_network(cp, torch, variant, batch, mode, time_ms, compare):
    net = pa.AlexNet(variant, seed=0)
    opt = pa.SGD(net, lr=0.01)
    step = TrainStep(net, opt, batch)
    size = net.input_size
    rng = np.random.default_rng(0)
    rotate = 2
    xs = [cp.asarray(rng.standard_normal((batch, 3, size, size)).astype(np.float32)) for _ in range(rotate)]
    ys = [cp.asarray(rng.integers(0, 1000, batch).astype(np.int64)) for _ in range(rotate)]
    ours = time_ms(lambda i: step(xs[i], ys[i]), rotate)
    # Forward, backward-data and backward-filter, less conv1's backward-data, which training skips.
    flops = (3 * conv_flops(net) - conv_flops_layer(net, 0)) * batch
    row = {"variant": variant, "mode": mode, "batch": batch, "ms": ours, "images_per_s": batch / ours * 1e3,
           "tflops": flops / ours / 1e9}
    if compare and torch is not None:
        torch_flags(torch, mode)
        model = torch_model(torch, net).cuda().train()
        topt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        txs, tys = [torch.as_tensor(x, device="cuda") for x in xs], [torch.as_tensor(y, device="cuda") for y in ys]

        def torch_step(i):
            topt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(txs[i]), tys[i]).backward()
            topt.step()

        theirs = time_ms(torch_step, rotate)
        row.update(torch_ms=theirs, torch_images_per_s=batch / theirs * 1e3, speedup=theirs / ours)
    return row


def _per_layer(cp, torch, variant, batch, time_ms, compare, peaks):
    """Forward and backward of each layer at its shape: ours, PyTorch's module, and cuBLAS for the FC layers."""
    be = _backend.active
    mod, stream = be.module, be.stream
    net = pa.AlexNet(variant, seed=0)
    rng = np.random.default_rng(1)
    x0 = cp.asarray(rng.standard_normal((batch, 3, net.input_size, net.input_size)).astype(np.float32))
    net.forward(x0, train=True)  # fills the workspace: every layer's input and output at its shape
    ws, params, grads = net._ws, net.parameters(), net.gradients()
    if compare and torch is not None:
        torch_flags(torch, "strict")
        tlayers = model_layers(torch, torch_model(torch, net).cuda(), variant)
    rows = []
    for i, spec in enumerate(net.specs):
        kind = spec[0]
        a, out, dx = ws["acts"][i], ws["acts"][i + 1], ws["grads"][i]
        # A conv or linear layer with its ReLU fused (model.fused_relus) made no output of its own; each is timed
        # here on its own anyway, into the buffers the workspace keeps for them.
        a = ws["outs"][i - 1] if a is None else a
        out = ws["outs"][i] if out is None else out
        if kind == "flatten" or out is a:  # a view, or the adaptive pool at 224 x 224 (the identity, no launch)
            continue
        g = cp.ones_like(out)
        if kind == "conv":
            _, name, _, _, s_, p_, groups, _ = spec
            w, b, dw, db = params[f"{name}.weight"], params[f"{name}.bias"], grads[f"{name}.weight"], grads[f"{name}.bias"]
            fwd = lambda: mod.conv_forward(a, w, b, out, s_, p_, groups, stream=stream())  # noqa: E731
            def bwd():
                mod.conv_backward_filter(g, a, dw, db, s_, p_, groups, stream=stream())
                if dx is not None:  # conv1: training needs no gradient of the images, and has no buffer for one
                    mod.conv_backward_data(g, w, dx, s_, p_, groups, stream=stream())
        elif kind == "linear":
            name = spec[1]
            w, b, dw, db = params[f"{name}.weight"], params[f"{name}.bias"], grads[f"{name}.weight"], grads[f"{name}.bias"]
            fwd = lambda: mod.linear_forward(a, w, b, out, stream=stream())  # noqa: E731
            bwd = lambda: mod.linear_backward(g, a, w, dx, dw, db, stream=stream())  # noqa: E731
        elif kind == "relu":
            fwd = lambda: mod.relu_forward(a, out, stream=stream())  # noqa: E731
            bwd = lambda: mod.relu_backward(g, out, dx, stream=stream())  # noqa: E731
        elif kind == "lrn":
            fwd = lambda: mod.lrn_forward(a, out, 5, 1e-4, 0.75, 2.0, stream=stream())  # noqa: E731
            bwd = lambda: mod.lrn_backward(g, a, out, dx, 5, 1e-4, 0.75, 2.0, stream=stream())  # noqa: E731
        elif kind == "pool":
            fwd = lambda: mod.maxpool_forward(a, out, 3, 2, stream=stream())  # noqa: E731
            bwd = lambda: mod.maxpool_backward(g, a, out, dx, 3, 2, stream=stream())  # noqa: E731
        elif kind == "avgpool":
            fwd = lambda: mod.adaptive_avgpool_forward(a, out, stream=stream())  # noqa: E731
            bwd = lambda: mod.adaptive_avgpool_backward(g, dx, stream=stream())  # noqa: E731
        else:  # dropout
            mask = ws["masks"][i]
            fwd = lambda: mod.dropout_forward(a, out, mask, 0.5, 1, stream=stream())  # noqa: E731
            bwd = lambda: mod.dropout_backward(g, mask, dx, 0.5, stream=stream())  # noqa: E731
        row = {"variant": variant, "layer": i, "kind": kind, "name": spec[1] if kind in ("conv", "linear") else kind,
               "input": list(a.shape), "forward_ms": time_ms(lambda _: fwd()), "backward_ms": time_ms(lambda _: bwd())}
        if kind in ("conv", "linear"):
            flops = conv_flops_layer(net, i) * batch
            row["forward_tflops"] = flops / row["forward_ms"] / 1e9
            row["forward_pct_gemm_peak"] = 100 * row["forward_tflops"] / peaks["fp32_gemm_TFLOPs"]
        else:
            moved = 4 * (a.size + out.size)
            row["forward_GBps"] = moved / row["forward_ms"] / 1e6
            row["forward_pct_copy"] = 100 * row["forward_GBps"] / peaks["copy_GBps"]
        if compare and torch is not None:
            layer = tlayers[i].train(kind == "dropout")
            ta, tg = torch.as_tensor(a, device="cuda").requires_grad_(), torch.as_tensor(g, device="cuda")
            with torch.no_grad():
                row["torch_forward_ms"] = time_ms(lambda _: layer(ta))
            tout = layer(ta)
            wrt = [*layer.parameters()] if i == 0 else [ta, *layer.parameters()]  # as ours: no image gradient
            row["torch_backward_ms"] = time_ms(lambda _: torch.autograd.grad(tout, wrt, tg, retain_graph=True))
            if kind == "linear":
                wt = w.T
                row["cublas_forward_ms"] = time_ms(lambda _: cp.matmul(a, wt))
                row["cublas_backward_ms"] = time_ms(lambda _: (cp.matmul(g, w), cp.matmul(g.T, a)))
        rows.append(row)
    return rows


def conv_flops_layer(net, i) -> float:
    spec, shape_in, shape_out = net.specs[i], net.shapes[i], net.shapes[i + 1]
    if spec[0] == "conv":
        _, _, out, kernel, _, _, groups, _ = spec
        return 2.0 * out * shape_out[1] * shape_out[2] * (shape_in[0] // groups) * kernel * kernel
    return 2.0 * spec[2] * shape_in[0]


CHECKOUT = Path(".")  # the git checkout whose commit names a result (--checkout)


def _git(*args) -> str:
    """git's answer about CHECKOUT, or '' outside a checkout."""
    try:
        return subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def identity(cp, torch) -> dict:
    """Card, date, commit and versions: a number without them is not a result."""
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    commit = _git("describe", "--always", "--dirty")
    return {"date": datetime.date.today().isoformat(), "card": props["name"].decode(), "commit": commit or "unknown",
            "driver": cp.cuda.runtime.driverGetVersion(), "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cupy": cp.__version__, "torch": None if torch is None else torch.__version__,
            "cudnn": None if torch is None else torch.backends.cudnn.version(), "pyalexnet": pa.__version__}


def script_args(description: str, iters: int) -> argparse.Namespace:
    """The options every bench/ script takes: --batch, --iters, --json."""
    parser = Parser(description=description)
    parser.add_argument("--batch", type=POSITIVE_INT, default=128, help="images per step")
    parser.add_argument("--iters", type=POSITIVE_INT, default=iters, help="timed runs per measurement")
    parser.add_argument("--json", type=Path, help="where to write the results (default bench/results/...)")
    return parser.parse_args()


def gpu_present() -> bool:
    """True on the cuda backend; otherwise says that nothing can be measured here."""
    if _backend.active.name == "cuda":
        return True
    print("no CUDA device here (pyalexnet runs on the CPU emulator): nothing to measure; run this on a GPU")
    return False


def write_result(result: dict, name: str, path: Path | None = None) -> Path:
    """bench/results/<date>-<card>-<commit>-<name>.json in the checkout being measured, unless `path` says."""
    root = Path(_git("rev-parse", "--show-toplevel") or ".")
    path = path or root / "bench" / "results" / (
        f"{result['date']}-{result['card'].replace(' ', '_')}-{result['commit']}-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def _chart(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: matplotlib is not installed; pip install 'pyalexnet[bench]')")
        return None
    rows = result["whole_network"]
    labels = [f"{r['variant']}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["images_per_s"] for r in rows], 0.4, label="pyalexnet")
    if all("torch_images_per_s" in r for r in rows):
        ax.bar(xs + 0.2, [r["torch_images_per_s"] for r in rows], 0.4, label="PyTorch + cuDNN")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("training images / s")
    ax.set_title(f"AlexNet training, batch {rows[0]['batch']}, {result['card']} ({result['date']}, {result['commit']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_gpu(args) -> int:
    import cupy as cp

    try:
        import torch
    except ImportError:
        torch = None
        if args.compare:
            print("(PyTorch is not installed: ours only)")
    time_ms = cuda_timer(cp, args.iters)
    variants = ["paper", "torchvision"] if args.variant == "both" else [args.variant]
    modes = ["strict", "default"] if args.mode == "both" else [args.mode]
    progress = _progress(1 + len(variants) * (len(modes) + 1), "pyalexnet bench")
    peaks = _peaks(cp, time_ms)
    progress.update()
    whole, layers = [], []
    for variant in variants:
        for mode in modes:
            whole.append(_whole_network(cp, torch, variant, args.batch, mode, time_ms, args.compare))
            progress.update()
        if args.layers:
            layers += _per_layer(cp, torch, variant, args.batch, time_ms, args.compare, peaks)
        progress.update()
    progress.close()
    result = {"bench": "pyalexnet bench", **identity(cp, torch), "iters": args.iters, "peaks": peaks,
              "whole_network": whole, "layers": layers}
    print(f"{result['card']} ({result['date']}, commit {result['commit']}): copy {peaks['copy_GBps']:.0f} GB/s, "
          f"fp32 GEMM {peaks['fp32_gemm_TFLOPs']:.1f} TFLOP/s")
    print(f"\n{'variant':<12}{'mode':<9}{'ours img/s':>11}{'TFLOP/s':>9}{'torch img/s':>12}{'ours/torch':>11}")
    for r in whole:
        peer = f"{r['torch_images_per_s']:>12.0f}{r['speedup']:>10.2f}x" if "torch_ms" in r else ""
        print(f"{r['variant']:<12}{r['mode']:<9}{r['images_per_s']:>11.0f}{r['tflops']:>9.2f}{peer}")
    if layers:
        print(f"\n{'variant':<12}{'layer':<13}{'fwd ms':>8}{'bwd ms':>8}{'torch fwd':>10}{'torch bwd':>10}"
              f"{'cuBLAS fwd':>11}{'% peak':>8}")
        for r in layers:
            pct = r.get("forward_pct_gemm_peak", r.get("forward_pct_copy", 0.0))
            tf = f"{r['torch_forward_ms']:>10.3f}{r['torch_backward_ms']:>10.3f}" if "torch_forward_ms" in r else " " * 20
            cb = f"{r['cublas_forward_ms']:>11.3f}" if "cublas_forward_ms" in r else " " * 11
            print(f"{r['variant']:<12}{r['name']:<13}{r['forward_ms']:>8.3f}{r['backward_ms']:>8.3f}{tf}{cb}{pct:>7.0f}%")
    path = write_result(result, "bench", args.json)
    print(f"\nwrote {path}")
    chart = _chart(result, path.with_suffix(".png"))
    if chart:
        print(f"wrote {chart}")
    return 0


# ---- without a GPU --------------------------------------------------------------------------------------------------
def run_emulated(args) -> int:
    from . import reference as R

    print("no CUDA device: running the same pipeline on the CPU emulator at a small size")
    print(f"({EMULATED})\n")
    variants = ["paper", "torchvision"] if args.variant == "both" else [args.variant]
    batch, failures, rows = min(args.batch, EMULATED_BATCH), 0, []
    if batch != args.batch:
        print(f"--batch {args.batch}: the emulator runs batch {batch} (its small network; a GPU runs {args.batch})")
    print(f"{'variant':<12}{'step ms':>9}{'logits err':>12}{'worst grad err':>16}  vs float64 reference")
    for variant in variants:
        net = pa.AlexNet(variant, num_classes=10, seed=0, width=1 / 16, input_size=67)
        opt = pa.SGD(net, lr=0.01)
        step = TrainStep(net, opt, batch)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 3, 67, 67)).astype(np.float32)
        labels = rng.integers(0, 10, batch).astype(np.int64)
        step(x, labels)  # warm-up
        start = time.perf_counter()
        iters = max(1, min(args.iters, 5))
        for _ in range(iters):
            step(x, labels)
        ms = (time.perf_counter() - start) / iters * 1e3
        # Check one forward and backward against the reference (backward on our activations: see test_model.py).
        logits = net.forward(x, train=True)
        masks = net.dropout_masks()
        params = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
        ref_logits, _ = R.network_forward(net.specs, params, x, masks)
        _, dlogits = pa.ops.softmax_cross_entropy(logits, labels)
        net.backward(dlogits)
        acts = [None if a is None else np.asarray(a, np.float64) for a in net._ws["acts"]]
        ref_grads = R.network_backward(net.specs, params, acts, np.asarray(dlogits), masks)

        def rel(a, b):
            return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))

        logit_err = rel(logits, ref_logits)
        grad_err = max(rel(g, ref_grads[k]) for k, g in net.gradients().items())
        ok = logit_err < 1e-4 and grad_err < 1e-4
        failures += not ok
        print(f"{variant:<12}{ms:>9.1f}{logit_err:>12.2e}{grad_err:>16.2e}  {'ok' if ok else 'MISMATCH'}")
        rows.append({"variant": variant, "emulator_step_ms": ms, "logits_rel_err": logit_err,
                     "worst_grad_rel_err": grad_err, "ok": ok})
    print(f"\nsmall network (width 1/16, 67 x 67 input, batch {batch}); {EMULATED}")
    if args.json is not None:  # only when asked: bench/results/ holds GPU measurements
        result = {"bench": "pyalexnet bench", "backend": "emu", "measured": False, "what": (
                  "a correctness check of the training step on the CPU emulator; its times are the emulator's, "
                  "not a GPU's"), "requested_batch": args.batch, "batch": batch, "width": 1 / 16,
                  "input_size": 67, "iters": max(1, min(args.iters, 5)), "date": datetime.date.today().isoformat(),
                  "commit": _git("rev-parse", "--short", "HEAD") or "unknown", "pyalexnet": pa.__version__,
                  "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
        print(f"wrote {args.json}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = Parser(prog="pyalexnet bench", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["paper", "torchvision", "both"], default="both", help="which network")
    parser.add_argument("--batch", type=POSITIVE_INT, default=128,
                        help=f"images per training step (the emulator runs at most {EMULATED_BATCH}, and says so)")
    parser.add_argument("--iters", type=POSITIVE_INT, default=20,
                        help="timed runs per measurement (the median is reported)")
    parser.add_argument("--mode", choices=["strict", "default", "both"], default="both",
                        help="strict: TF32 off on both sides; default: PyTorch's defaults")
    parser.add_argument("--json", type=Path, help="results file (default on a GPU: bench/results/<date>-<card>-<commit>-"
                                                  "bench.json; on the emulator: written only when given)")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="time ours only")
    parser.add_argument("--no-layers", dest="layers", action="store_false", help="skip the per-layer table")
    parser.add_argument("--checkout", type=Path, default=Path("."),
                        help="the git checkout being measured: its commit names the result (default: here)")
    args = parser.parse_args(argv)
    global CHECKOUT
    CHECKOUT = args.checkout
    if _backend.active.name != "cuda":
        return run_emulated(args)
    if args.iters < 20:
        print(f"(--iters {args.iters}: fewer than 20 runs per median)")
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
