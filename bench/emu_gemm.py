"""How fast the CPU emulator runs a tiled GEMM: GFLOP/s per worker at 256 x 256 x 256.

    python bench/emu_gemm.py [--size 256] [--repeat 5]

Runs, for 1 worker and for all cores, the textbook 16 x 16 shared-memory GEMM (selftest_tiled_gemm: two
barriers per 16-deep K-slice) and the production SGEMM (64 x 64 tiles, 4 x 4 per thread). Each worker
count runs in its own process because the pool size is fixed at first launch. An emulator figure measures
the emulator, never the kernel's speed on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import pyalexnet as pa
n, repeat = int(sys.argv[1]), int(sys.argv[2])
mod = pa._backend.active.module
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
c = np.empty((n, n), np.float32)
runs = {"tiled16": lambda: mod.selftest_tiled_gemm(a, b, c), "sgemm64": lambda: mod.sgemm(a, b, c)}
out = {"workers": mod.worker_count(), "fiber_switch": mod.fiber_switch}
for name, run in runs.items():
    run()
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    out[name] = 2 * n**3 / sorted(times)[len(times) // 2] / 1e9
print(json.dumps(out))
"""


def measure(workers: int, size: int, repeat: int) -> dict:
    env = dict(os.environ, PYALEXNET_BACKEND="emu", PYALEXNET_EMU_WORKERS=str(workers))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(size), str(repeat)], env=env, capture_output=True,
                          text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"emulated GEMM {args.size}^3, median of {args.repeat} (GFLOP/s; an emulator figure, not a GPU one)")
    print(f"{'workers':>8}{'fibers':>15}{'tiled16':>10}{'/worker':>9}{'sgemm64':>10}{'/worker':>9}")
    for workers in sorted({1, cores}):
        r = measure(workers, args.size, args.repeat)
        w = r["workers"]
        print(f"{w:>8}{r['fiber_switch']:>15}{r['tiled16']:>10.2f}{r['tiled16'] / w:>9.2f}"
              f"{r['sgemm64']:>10.2f}{r['sgemm64'] / w:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
