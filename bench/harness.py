"""What every GPU benchmark script shares: the CUDA-event timer, the run's identity, the results file."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cuda_timer(cp, iters: int):
    """time_ms(fn, rotate=1): median over `iters` runs of fn(i % rotate), in ms, timed with CUDA events after 3
    warm-up runs (`rotate` lets a caller cycle through input buffers so that L2 flatters no one)."""

    def time_ms(fn, rotate: int = 1) -> float:
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


def identity(cp, torch) -> dict:
    """Card, date, commit and software versions: a number without them is not a result."""
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    return {
        "date": datetime.date.today().isoformat(),
        "card": props["name"].decode(),
        "commit": commit or "unknown",
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "torch": None if torch is None else torch.__version__,
        "cudnn": None if torch is None else torch.backends.cudnn.version(),
    }


def write_result(result: dict, name: str, path: Path | None) -> Path:
    path = path or ROOT / "bench" / "results" / (
        f"{result['date']}-{result['card'].replace(' ', '_')}-{result['commit']}-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def has_gpu() -> bool:
    """True on the cuda backend; otherwise says why nothing is measured (the caller then exits 0)."""
    import pyalexnet as pa

    if pa.backend_name() == "cuda":
        return True
    print("no CUDA device here (pyalexnet runs on the CPU emulator): nothing to measure; run this on a GPU machine")
    return False
