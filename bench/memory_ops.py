"""The paper's memory-bound layers at AlexNet's shapes (batch 128): LRN, max-pooling, dropout, in GB/s.

    python bench/memory_ops.py [--batch 128] [--iters 30] [--json PATH]

Each op is timed forward and backward on the cuda backend with CUDA events (warm-up, then the median of
--iters runs, the inputs rotated among buffers larger than L2 together), reported as GB/s of the bytes it
must move, as a percentage of the device's measured copy bandwidth, and against PyTorch's implementation of
the same op on the same inputs (F.local_response_norm with alpha * n, F.max_pool2d, F.dropout; backward
through autograd). Without a CUDA device it says so and exits 0: the emulator measures nothing about speed.
"""

from __future__ import annotations

import sys

import numpy as np
from pyalexnet.bench import cuda_timer, gpu_present, identity, script_args, strict_torch, write_result

# (op, layer, one image's input shape); the paper's hyperparameters (LRN 5/1e-4/0.75/2, pool 3/2, p = 0.5)
CASES = [
    ("lrn", "paper conv1", (96, 55, 55)),
    ("lrn", "paper conv2", (256, 27, 27)),
    ("maxpool", "paper conv1", (96, 55, 55)),
    ("maxpool", "torchvision conv1", (64, 55, 55)),
    ("maxpool", "paper conv2", (256, 27, 27)),
    ("maxpool", "torchvision conv2", (192, 27, 27)),
    ("maxpool", "conv5", (256, 13, 13)),
    ("dropout", "before fc6", (9216,)),
    ("dropout", "before fc7", (4096,)),
]


def copy_bandwidth(cp, time_ms) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + bytes written)."""
    a = cp.empty(1 << 28, dtype=cp.float32)
    b = cp.empty_like(a)
    ms = time_ms(lambda _: b.__setitem__(slice(None), a), 1)
    return 2 * a.nbytes / ms / 1e6


def bench_case(op, layer, full, rng, time_ms, peak, torch) -> dict:
    import cupy as cp

    import pyalexnet as pa

    n = int(np.prod(full))
    rotate = max(2, int(np.ceil(3 * 50e6 / (4 * n))))  # the rotated inputs together exceed a 50 MB L2
    xs = [cp.asarray(rng.standard_normal(full).astype(np.float32)) for _ in range(rotate)]
    if op == "lrn":
        ys = [pa.ops.lrn_forward(x) for x in xs]
        dys = [cp.ones_like(y) for y in ys]
        def fwd(i): return pa.ops.lrn_forward(xs[i])
        def bwd(i): return pa.ops.lrn_backward(dys[i], xs[i], ys[i])
        bytes_f, bytes_b = 2 * 4 * n, 4 * 4 * n
    elif op == "maxpool":
        ys = [pa.ops.maxpool_forward(x) for x in xs]
        dys = [cp.ones_like(y) for y in ys]
        out = ys[0].size
        def fwd(i): return pa.ops.maxpool_forward(xs[i])
        def bwd(i): return pa.ops.maxpool_backward(dys[i], xs[i], ys[i])
        bytes_f, bytes_b = 4 * (n + out), 4 * (2 * n + 2 * out)
    else:
        masks = [pa.ops.dropout_forward(x, 0.5, seed=i)[1] for i, x in enumerate(xs)]
        dys = [cp.ones_like(x) for x in xs]
        def fwd(i): return pa.ops.dropout_forward(xs[i], 0.5, seed=i)
        def bwd(i): return pa.ops.dropout_backward(dys[i], masks[i], 0.5)
        bytes_f, bytes_b = 8 * n + n // 8, 8 * n + n // 8
    row = {"op": op, "layer": layer, "shape": list(full)}
    for direction, fn, nbytes in (("forward", fwd, bytes_f), ("backward", bwd, bytes_b)):
        ms = time_ms(fn, rotate)
        row[direction] = {"ms": ms, "GB/s": nbytes / ms / 1e6, "pct_copy": 100 * nbytes / ms / 1e6 / peak}
    if torch is not None:
        F = torch.nn.functional
        torch_op = {
            "lrn": lambda t: F.local_response_norm(t, 5, alpha=1e-4 * 5, beta=0.75, k=2.0),
            "maxpool": lambda t: F.max_pool2d(t, 3, 2),
            "dropout": lambda t: F.dropout(t, 0.5, training=True),
        }[op]
        txs = [torch.as_tensor(x, device="cuda").requires_grad_() for x in xs]
        tys = [torch_op(t) for t in txs]
        tdys = [torch.ones_like(t) for t in tys]
        with torch.no_grad():
            t_fwd = time_ms(lambda i: torch_op(txs[i]), rotate)
        t_bwd = time_ms(lambda i: torch.autograd.grad(tys[i], txs[i], tdys[i], retain_graph=True), rotate)
        for direction, t_ms in (("forward", t_fwd), ("backward", t_bwd)):
            row[direction]["torch_ms"] = t_ms
            row[direction]["speedup"] = t_ms / row[direction]["ms"]
    return row


def run(args) -> dict:
    import cupy as cp

    torch = strict_torch()
    time_ms = cuda_timer(cp, args.iters)
    peak = copy_bandwidth(cp, time_ms)
    rng = np.random.default_rng(0)
    rows = [bench_case(op, layer, (args.batch, *shape), rng, time_ms, peak, torch) for op, layer, shape in CASES]
    return {"bench": "memory_ops", **identity(cp, torch), "batch": args.batch, "iters": args.iters,
            "copy_GBps": peak, "rows": rows}


def main() -> int:
    args = script_args(__doc__.splitlines()[0], iters=30)
    if not gpu_present():
        return 0
    result = run(args)
    print(f"{result['card']}, copy bandwidth {result['copy_GBps']:.0f} GB/s, batch {args.batch}")
    print(f"{'op':<9}{'layer':<19}{'dir':<9}{'ms':>8}{'GB/s':>8}{'% copy':>8}{'torch ms':>10}{'speedup':>11}")
    for r in result["rows"]:
        for d in ("forward", "backward"):
            m = r[d]
            torch_ms = f"{m['torch_ms']:>10.3f}{m['speedup']:>10.2f}x" if "torch_ms" in m else ""
            print(f"{r['op']:<9}{r['layer']:<19}{d:<9}{m['ms']:>8.3f}{m['GB/s']:>8.0f}{m['pct_copy']:>7.0f}%{torch_ms}")
    path = write_result(result, "memory_ops", args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
