"""The emulator's sanitizer build catches what it exists to catch.

`.ci/run` builds the emulator with AddressSanitizer + UBSan (-DPYALEXNET_EMU_SANITIZE=ON) into a folder named by
PYALEXNET_SANITIZER_BUILD, runs the kernel tests against it, then this file: each planted bug runs in its own
process (a sanitizer report ends the process), which must die with the sanitizer's report AND the emulator's
line naming the kernel, block and thread. Without that variable (a plain `pytest`) these tests skip.
"""

import os
import subprocess
import sys

import pytest

BUILD = os.environ.get("PYALEXNET_SANITIZER_BUILD")
pytestmark = pytest.mark.skipif(not BUILD, reason="needs the sanitizer build (PYALEXNET_SANITIZER_BUILD; see .ci/run)")

PLANTED = {
    "global_overflow": ("AddressSanitizer: heap-buffer-overflow", "planted_global_overflow", "thread (0,0,0)"),
    # UBSan's bounds check sees the static array's overflow first (ASan would report a global-buffer-overflow).
    "shared_overflow": ("runtime error: index 32 out of bounds for type 'float [32]'", "planted_shared_overflow",
                        "thread (31,0,0)"),
    "misaligned_float4": ("misaligned address", "planted_misaligned_float4", "thread (0,0,0)"),
    # The kernels every emulator build has (test_emulator.py): one float past a __shared__ array, and one past 20
    # bytes of dynamic shared memory, inside the 16-byte rounding before the guard page (poisoned for ASan).
    "shared_past_end": ("runtime error: index 32 out of bounds for type 'float [32]'", "planted_shared_past_end<false>",
                        "thread (31,0,0)"),
    "dynamic_past_end": ("AddressSanitizer: use-after-poison", "planted_dynamic_past_end", "thread (5,0,0)"),
}


def _preload():
    libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True, check=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")]  # libstdc++ too, so ASan can intercept C++ throws
    return " ".join(libs)


@pytest.mark.parametrize("fault", sorted(PLANTED))
def test_planted_memory_bug_is_reported_with_the_emulated_thread(fault, tmp_path):
    code = ("import numpy as np, pyalexnet as pa\n"
            f"pa._backend.active.module.selftest_planted({fault!r}, np.zeros(1024, np.float32))\n"
            "print('NOT CAUGHT')\n")
    env = dict(os.environ, PYTHONPATH=BUILD, LD_PRELOAD=_preload(), ASAN_OPTIONS="detect_leaks=0",
               PYALEXNET_BACKEND="emu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    report, kernel, thread = PLANTED[fault]
    assert out.returncode != 0 and "NOT CAUGHT" not in out.stdout
    assert report in out.stderr, out.stderr[-2000:]
    assert f"pyalexnet emulator: the fault above is in kernel {kernel}" in out.stderr
    assert f"block (0,0,0), thread {thread[len('thread '):]}" in out.stderr
