"""The less common CUDA intrinsics the emulator provides (issue 16 item 7), each against what the CUDA programming
guide and the PTX ISA define, from one block of 48 threads (kernels/selftest.cu: selftest_intrinsics). The same
kernel is correct CUDA, so on a GPU the test checks the hardware's answers against the same expectations. The
atomics CUDA lacks for a type must not compile, as under nvcc."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pyalexnet as pa

mod = pa._backend.active.module
ROOT = Path(__file__).resolve().parent.parent
SLOTS = 29
T = np.arange(48, dtype=np.uint64)
M32 = 0xFFFFFFFF


def brev(v: int) -> int:
    return int(f"{v & M32:032b}"[::-1], 2)


def funnel(lo, hi, shift, left, clamp):
    s = min(shift, 32) if clamp else shift & 31
    both = (hi << 32) | lo
    return ((both << s) >> 32) & M32 if left else (both >> s) & M32


def float_to_int(x: float, how: str, low: int, high: int) -> int:
    r = {"rn": np.rint, "rz": np.trunc, "ru": np.ceil, "rd": np.floor}[how](x)
    return int(min(max(r, low), high))


def warps(t):
    """(first lane's thread, lanes) of the warp holding thread t, in a block of 48."""
    w = t // 32
    return [u for u in range(48) if u // 32 == w]


@pytest.fixture(scope="module")
def out():
    o = pa.asarray(np.full(48 * SLOTS, 0xDEADBEEF, np.uint32))
    mod.selftest_intrinsics(o)
    return pa.to_numpy(o).reshape(48, SLOTS).astype(np.int64)


def test_bit_intrinsics(out):
    for t in range(48):
        assert out[t, 0] == brev(t * 0x01234567 + 1), t
        lo, hi = (0x89ABCDEF * t) & M32, (0x01234567 + t) & M32
        assert [out[t, k] for k in (1, 2, 3, 4)] == [funnel(lo, hi, t, True, False), funnel(lo, hi, t, True, True),
                                                     funnel(lo, hi, t, False, False), funnel(lo, hi, t, False, True)], t


def test_float_to_int_rounds_each_way_and_clamps(out):
    for t in range(48):
        f = float(np.float32((t - 24.0) * 0.75))
        got = [np.int32(np.uint32(out[t, k])) for k in (5, 6, 7, 8)]
        assert got == [float_to_int(f, h, -(2**31), 2**31 - 1) for h in ("rn", "rz", "ru", "rd")], (t, f)
        assert out[t, 9] == float_to_int(f, "rn", 0, M32), (t, f)  # __float2uint_rn clamps negatives to 0
    assert np.int32(np.uint32(out[26, 5])) == 2  # 1.5 rounds to the even 2
    assert np.int32(np.uint32(out[22, 5])) == -2  # -1.5 too


def test_match_and_reduce_over_the_lanes_that_exist(out):
    for t in range(48):
        lanes = warps(t)
        assert out[t, 10] == sum(1 << (u % 32) for u in lanes if u % 5 == t % 5), t
        assert out[t, 11] == sum(1 << (u % 32) for u in lanes) and out[t, 12] == 1, t  # t / 32: one value a warp
        assert out[t, 13] == sum(lanes), t
        assert np.int32(np.uint32(out[t, 14])) == min(u - 20 for u in lanes), t  # signed: the negatives win
        assert out[t, 15] == max(u * 7 % 13 for u in lanes), t
        x = 0
        for u in lanes:
            x ^= u * u
        assert out[t, 16] == x, t


def test_activemask_and_the_counting_barriers(out):
    assert (out[:32, 17] == M32).all() and (out[32:, 17] == 0xFFFF).all()
    assert (out[:, 18] == sum(t % 3 == 0 for t in range(48))).all()
    assert (out[:, 19] == 1).all() and (out[:, 20] == 1).all()


def test_atomics_spin_waits_and_the_clock(out):
    x = 0
    for t in range(48):
        x ^= t
    # atomicInc wraps past 9 to 0 (48 increments: 8); atomicDec from 0 goes to 9 and down (48 decrements: 2).
    assert (out[:, 21] == 48 % 10).all() and (out[:, 22] == 2).all()
    assert (out[:, 23] == 0).all() and (out[:, 24] == M32).all() and (out[:, 25] == x).all()
    assert (out[:, 26] == 1).all()  # thread 0 polled with __nanosleep until thread 47 set the flag
    assert (out[:, 27] == 1).all()
    assert (out[:, 28] == 1).all()  # thread 1 spun on an atomic alone until thread 46 set it


@pytest.mark.parametrize("code, error", [
    ("float f; atomicAnd(&f, 1.0f);", "atomicAnd: CUDA has it for int, unsigned, unsigned long long"),
    ("int i; atomicInc(&i, 3);", "atomicInc: CUDA has it for unsigned only"),
    ("double d; atomicMax(&d, 1.0);", "atomicMax: CUDA has it for int, unsigned, long long"),
    ("long long l; atomicExch(&l, 1LL);", "atomicExch: CUDA has it for"),
    ("unsigned m = 0; short s = 1; __match_any_sync(m, s);", "__match_any_sync: CUDA has it for"),
    ("float v = 1; __reduce_add_sync(0xffffffffu, v);", "__reduce_*_sync: CUDA has them for int and unsigned"),
])
def test_atomics_and_collectives_on_types_cuda_lacks_do_not_compile(tmp_path, code, error):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    ok = "unsigned u = 0; atomicInc(&u, 3u); int i = 0; atomicAnd(&i, 1); double d = 0; atomicAdd(&d, 1.0);"
    for body, should_compile in [(ok, True), (code, False)]:
        src = tmp_path / "k.cpp"
        src.write_text(f'#include "emu/cuda_emu.h"\n__global__ void k() {{ {body} }}\n')
        r = subprocess.run([compiler, "-std=c++20", "-fsyntax-only", f"-I{ROOT / 'kernels'}", str(src)],
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode == 0) == should_compile, (body, r.stderr[-2000:])
        if not should_compile:
            assert error in r.stderr, r.stderr[-2000:]
