"""Every AlexNet convolution (both variants, batch 128): our kernels against cuDNN through PyTorch, fp32.

    python bench/conv_layers.py [--batch 128] [--iters 20] [--json PATH]

For each layer: forward, backward-data and backward-filter (+ bias gradient), timed with CUDA events after
warm-up, the median of --iters runs; cuDNN on the same inputs with TF32 off (torch.backends.cudnn.allow_tf32 =
False), so both sides do fp32 SIMT arithmetic. Prints ms, TFLOP/s and ours/cuDNN (a speed ratio: above 1 we are
faster) and writes bench/results/<date>-<card>-<commit>-conv_layers.json. Without a CUDA device it says it
cannot measure and exits 0.
"""

from __future__ import annotations

import sys

import numpy as np
from pyalexnet.bench import cuda_timer, gpu_present, identity, script_args, strict_torch, write_result

from pyalexnet.architecture import named_conv_layers

ALEXNET_LAYERS = named_conv_layers()


def bench_layer(layer, batch, time_ms, torch) -> dict:
    import cupy as cp

    import pyalexnet as pa

    name, c, h, w, k, r, stride, padding, groups = layer
    mod = pa._backend.active.module
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch, c, h, w)).astype(np.float32))
    wt = cp.asarray((rng.standard_normal((k, c // groups, r, r)) * 0.01).astype(np.float32))
    b = cp.zeros(k, cp.float32)
    y = pa.ops.conv2d_forward(x, wt, b, stride, padding, groups)
    dy = cp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    dx, dw, db = cp.empty_like(x), cp.empty_like(wt), cp.empty_like(b)
    flops = 2.0 * batch * k * y.shape[2] * y.shape[3] * (c // groups) * r * r
    stream = pa._backend.active.stream
    ours = {
        "forward": lambda: mod.conv_forward(x, wt, b, y, stride, padding, groups, stream=stream()),
        "backward_data": lambda: mod.conv_backward_data(dy, wt, dx, stride, padding, groups, stream=stream()),
        "backward_filter": lambda: mod.conv_backward_filter(dy, x, dw, db, stride, padding, groups, stream=stream()),
    }
    row = {"layer": name, "shape": [batch, c, h, w], "filters": [k, c // groups, r, r], "stride": stride,
           "padding": padding, "groups": groups, "gflop": flops / 1e9}
    for direction, fn in ours.items():
        ms = time_ms(lambda _, fn=fn: fn())
        row[direction] = {"ms": ms, "tflops": flops / ms / 1e9}
    if torch is not None:
        tx, tw, tdy = (torch.as_tensor(a, device="cuda") for a in (x, wt, dy))
        tb = torch.as_tensor(b, device="cuda")
        conv = torch.nn.functional.conv2d
        theirs = {
            "forward": lambda: conv(tx, tw, tb, stride=stride, padding=padding, groups=groups),
            "backward_data": lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdy, stride, padding, groups=groups),
            "backward_filter": lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, stride, padding, groups=groups),
        }
        for direction, fn in theirs.items():
            ms = time_ms(lambda _, fn=fn: fn())
            row[direction]["cudnn_ms"] = ms
            row[direction]["ratio"] = ms / row[direction]["ms"]
    return row


def run(args) -> dict:
    import cupy as cp

    torch = strict_torch()
    time_ms = cuda_timer(cp, args.iters)
    rows = [bench_layer(layer, args.batch, time_ms, torch) for layer in ALEXNET_LAYERS]
    return {"bench": "conv_layers", **identity(cp, torch), "precision": "fp32, TF32 off on both sides",
            "batch": args.batch, "iters": args.iters, "rows": rows}


def main() -> int:
    args = script_args(__doc__.splitlines()[0], iters=20)
    if not gpu_present():
        return 0
    result = run(args)
    print(f"{result['card']}, batch {args.batch}, {result['precision']}, cuDNN {result['cudnn']}")
    print(f"{'layer':<20}{'pass':<17}{'ms':>8}{'TFLOP/s':>9}{'cuDNN ms':>10}{'ours/cuDNN':>11}")
    for r in result["rows"]:
        for d in ("forward", "backward_data", "backward_filter"):
            m = r[d]
            peer = f"{m['cudnn_ms']:>10.3f}{m['ratio']:>10.2f}x" if "cudnn_ms" in m else ""
            print(f"{r['layer']:<20}{d:<17}{m['ms']:>8.3f}{m['tflops']:>9.2f}{peer}")
    path = write_result(result, "conv_layers", args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
