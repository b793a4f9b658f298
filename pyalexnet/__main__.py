"""pyalexnet's command line.

    pyalexnet info     which backend runs the kernels, and how
    pyalexnet check    runs every kernel on the active backend against the float64 reference, prints the errors
    pyalexnet bench    training throughput and per-layer times against PyTorch + cuDNN (see pyalexnet/bench.py)
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import pyalexnet as pa
from pyalexnet import reference as R


def info() -> int:
    be = pa._backend.active
    print(f"pyalexnet {pa.__version__}")
    print(f"backend:  {be.name}")
    if be.name == "emu":
        print(f"emulator: {be.module.worker_count()} worker threads, fibers switched with {be.module.fiber_switch}")
        print("          (no usable CUDA device: the kernels run on the CPU emulator, for correctness, not speed)")
    else:
        dev = be.xp.cuda.Device()
        props = be.xp.cuda.runtime.getDeviceProperties(dev.id)
        print(f"device:   {props['name'].decode()} (compute capability {dev.compute_capability})")
    return 0


def _checks(rng):
    """(name, tolerance, function returning (ours, reference) pairs) for every kernel."""
    f32 = np.float32

    def host(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    def relu():
        x, dy = host(3, 96, 27, 27), host(3, 96, 27, 27)
        y = pa.ops.relu_forward(pa.asarray(x))
        dx = pa.ops.relu_backward(pa.asarray(dy), y)
        return [(y, R.relu_forward(x)), (dx, R.relu_backward(dy, pa.to_numpy(y)))]

    def linear():
        x, w, b, dy = host(7, 1000), host(300, 1000, scale=0.03), host(300), host(7, 300)
        y = pa.ops.linear_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b))
        grads = pa.ops.linear_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(w))
        return [(y, R.linear_forward(x, w, b)), *zip(grads, R.linear_backward(dy, x, w))]

    def softmax_xent():
        z, labels = host(5, 1000, scale=3.0), rng.integers(0, 1000, 5).astype(np.int64)
        loss, dz = pa.ops.softmax_cross_entropy(pa.asarray(z), pa.asarray(labels))
        ref_loss, ref_dz = R.softmax_cross_entropy(z, labels)
        return [(np.array([loss]), np.array([ref_loss])), (dz, ref_dz)]

    def sgd():
        w, dw, v = host(4097), host(4097), host(4097)
        ref = R.sgd_update(w, dw, v, 0.01)
        wd, vd = pa.asarray(w), pa.asarray(v)
        pa.ops.sgd_update(wd, pa.asarray(dw), vd, 0.01)
        return list(zip((wd, vd), ref))

    def conv():
        x, w, b = host(2, 48, 13, 13), host(64, 24, 3, 3, scale=0.1), host(64)
        y = pa.ops.conv2d_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b), 1, 1, 2)
        dy = host(*y.shape)
        grads = pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(w), 1, 1, 2)
        return [(y, R.conv2d_forward(x, w, b, 1, 1, 2)), *zip(grads, R.conv2d_backward(dy, x, w, 1, 1, 2))]

    def lrn():
        x, dy = host(2, 96, 13, 13, scale=20.0), host(2, 96, 13, 13)
        y = pa.ops.lrn_forward(pa.asarray(x))
        dx = pa.ops.lrn_backward(pa.asarray(dy), pa.asarray(x), y)
        return [(y, R.lrn_forward(x)), (dx, R.lrn_backward(dy, x))]

    def maxpool():
        x = host(2, 96, 27, 27)
        y = pa.ops.maxpool_forward(pa.asarray(x))
        dy = host(*y.shape)
        dx = pa.ops.maxpool_backward(pa.asarray(dy), pa.asarray(x), y)
        return [(y, R.maxpool_forward(x)), (dx, R.maxpool_backward(dy, x))]

    def dropout():
        x, dy = host(8, 4096), host(8, 4096)
        y, mask = pa.ops.dropout_forward(pa.asarray(x), 0.5, seed=1)
        keep = R.dropout_mask(x.shape, 0.5, 1)
        dx = pa.ops.dropout_backward(pa.asarray(dy), mask)
        return [(y, R.dropout_forward(x, keep)), (dx, R.dropout_backward(dy, keep))]

    return [("conv", conv), ("relu", relu), ("lrn", lrn), ("maxpool", maxpool), ("dropout", dropout),
            ("linear (sgemm)", linear), ("softmax_xent", softmax_xent), ("sgd_update", sgd)]


def check() -> int:
    info()
    rng = np.random.default_rng(0)
    tol = 1e-5
    print(f"\n{'kernel':<16}{'outputs':>8}{'max rel err':>14}{'ms':>10}  vs float64 reference (bound {tol:g})")
    failed = 0
    for name, run in _checks(rng):
        start = time.perf_counter()
        pairs = run()
        pa.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        errs = []
        for ours, ref in pairs:
            ours = np.asarray(pa.to_numpy(ours), np.float64)
            errs.append(float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-300)))
        worst = max(errs)
        ok = worst < tol
        failed += not ok
        print(f"{name:<16}{len(pairs):>8}{worst:>14.2e}{ms:>10.1f}  {'ok' if ok else 'FAILED'}")
    print("\nall kernels agree with the reference" if not failed else f"\n{failed} kernel(s) FAILED")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pyalexnet", description="AlexNet from hand-written CUDA kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backend runs the kernels")
    sub.add_parser("check", help="run every kernel against the float64 reference")
    sub.add_parser("bench", help="training throughput and per-layer times against PyTorch (pyalexnet bench --help)")
    args = parser.parse_args(argv)
    return {"info": info, "check": check}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
