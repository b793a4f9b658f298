"""The emulator's mechanisms, each exercised by a small kernel, and each fault report triggered on purpose.

The working self-tests run on both backends (the same kernels are correct CUDA); the planted faults run on
the emulator only.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ON_CUDA, run_python

import pyalexnet as pa

mod = pa._backend.active.module
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 33, 15), (64, 48, 80)])
def test_tiled_gemm_in_shared_memory(rng, m, n, k):
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (k, n)).astype(np.float32)
    c = pa.asarray(np.full((m, n), np.nan, np.float32))
    mod.selftest_tiled_gemm(pa.asarray(a), pa.asarray(b), c)
    np.testing.assert_array_equal(pa.to_numpy(c), a.astype(np.float64) @ b)


@pytest.mark.parametrize("variant", range(6))
@pytest.mark.parametrize("n", [1, 100, 128, 1000])
def test_warp_shuffles_and_votes(rng, variant, n):
    x = rng.integers(-5, 6, n).astype(np.float32)  # integers: every summation order gives the same result
    out = pa.asarray(np.full((n + 127) // 128, np.nan, np.float32))
    mod.selftest_shuffle_sum(pa.asarray(x), out, variant)
    padded = np.zeros(len(out) * 128, np.float32)
    padded[:n] = x
    blocks = padded.reshape(-1, 4, 32)  # (block, warp, lane)
    if variant in (0, 1, 2, 5):
        expect = blocks.sum(axis=(1, 2))
    elif variant == 3:
        expect = (blocks > 0).sum(axis=(1, 2))
    else:
        expect = (blocks > 0).any(axis=2).sum(axis=1) + 1000 * (blocks > 0).all(axis=2).sum(axis=1)
    np.testing.assert_array_equal(pa.to_numpy(out), expect)


@pytest.mark.parametrize("tile", [1, 100, 4096, 15000])  # 15000 floats = 60000 bytes: needs the opt-in
def test_dynamic_shared_memory(rng, tile):
    n = 2 * tile + 7
    x = rng.standard_normal(n).astype(np.float32)
    y = pa.asarray(np.full(n, np.nan, np.float32))
    mod.selftest_dynamic_shared(pa.asarray(x), y, tile)
    expect = np.concatenate([x[i : i + tile][::-1] for i in range(0, n, tile)])
    np.testing.assert_array_equal(pa.to_numpy(y), expect)


def test_atomics_across_blocks(rng):
    x = rng.integers(-1000, 1000, 100_000).astype(np.int32)
    counters = pa.asarray(np.array([0, np.iinfo(np.int32).min, 0, np.iinfo(np.int32).max], np.int32))
    mod.selftest_atomics(pa.asarray(x), counters)
    np.testing.assert_array_equal(pa.to_numpy(counters), [x.sum(), x.max(), len(x), x.min()])


PLANTED = {
    "divergent_barrier": r"divergent __syncthreads\(\): thread \(0,0,0\) waits at kernels/selftest\.cu:\d+ "
    r"but thread \(16,0,0\) waits at kernels/selftest\.cu:\d+",
    "exit_before_barrier": r"divergent __syncthreads\(\): thread \(5,0,0\) exited without reaching the barrier",
    "deadlock": r"deadlock: thread \(1,0,0\) waits in __shfl_sync at kernels/selftest\.cu:\d+ .* lane 0 "
    r"\(thread \(0,0,0\)\) waits at __syncthreads\(\)",
    "mask_mismatch": r"thread \(16,0,0\) \(lane 16\): called with mask 0xffff0000 while lanes 0x0000ffff wait",
    "too_many_threads": r"invalid block \(2048,1,1\)",
    "grid_too_large": r"invalid grid \(1,70000,1\)",
    "dynamic_shared_over_limit": r"requests 65536 bytes of dynamic shared memory but the kernel may use 49152",
    "dynamic_shared_over_optin": r"307200 bytes exceeds the device's 232448 bytes",
    "static_shared_over_limit": r"declares 65536 bytes of static __shared__ memory; a kernel may declare at most 49152",
    "stack_overflow": r"thread \(7,0,0\) overflowed its \d+ KB emulator stack",
    "assert": r"assertion failed at kernels/selftest\.cu:\d+, thread \(5,0,0\): threadIdx\.x != 5",
}


@pytest.mark.emu
@pytest.mark.parametrize("fault", sorted(PLANTED))
def test_planted_fault_is_reported(fault):
    if fault == "stack_overflow" and getattr(mod, "sanitizer", None) == "address,undefined":
        pytest.skip("under AddressSanitizer the overflow is ASan's to report, and it ends the process")
    scratch = np.zeros(1024, np.float32)
    with pytest.raises(pa.KernelError, match=PLANTED[fault]) as info:
        mod.selftest_planted(fault, scratch)
    message = str(info.value)
    if fault != "dynamic_shared_over_optin":  # that one fails before any launch
        assert "kernel planted_" in message and "launched at kernels/selftest.cu:" in message
    if fault in ("divergent_barrier", "exit_before_barrier", "deadlock", "mask_mismatch", "stack_overflow", "assert"):
        assert "block (0,0,0)" in message
    # The pool survives a fault: the next launch works.
    test_tiled_gemm_in_shared_memory(np.random.default_rng(0), 5, 6, 7)


@pytest.mark.emu
@pytest.mark.parametrize("fault", ["inactive_lane", "reads_exited_lane"])
def test_a_shuffle_from_a_lane_outside_the_mask_or_exited_reads_an_undefined_value(fault):
    # Legal CUDA with an undefined result: lanes 0-15 read lanes 16-31, outside their mask (0x0000ffff) or
    # exited. The emulator gives all bits set (a NaN), so a result that is used shows; the other lanes keep theirs.
    s = np.arange(1024, dtype=np.float32)
    mod.selftest_planted(fault, s)
    assert (s[:16].view(np.uint32) == 0xFFFFFFFF).all(), s[:16]
    if fault == "inactive_lane":
        np.testing.assert_array_equal(s[16:32], np.arange(16, 32, dtype=np.float32))


def test_collectives_wait_only_for_lanes_still_running(rng):
    # A full-mask __syncwarp and __ballot_sync in a block of 48 threads of which 8 have exited: valid CUDA.
    x = rng.standard_normal(48).astype(np.float32)
    out = pa.asarray(np.full(48, np.nan, np.float32))
    mod.selftest_exited_lanes(pa.asarray(x), out)
    out = pa.to_numpy(out)
    np.testing.assert_array_equal(out[:32], np.full(32, (x[:32] > 0).sum()))
    np.testing.assert_array_equal(out[32:40], np.full(8, (x[32:40] > 0).sum()))
    assert np.isnan(out[40:]).all()


@pytest.mark.emu
def test_shared_memory_starts_poisoned_in_every_block():
    # Static and dynamic shared memory read before any write: all NaN (0xffffffff), in the second block too,
    # so neither zeros nor the first block's values can pass for initialised data.
    # The race-check build goes further: such a read is a KernelError naming the thread and the line.
    out = np.zeros(128, np.float32)
    if getattr(mod, "sanitizer", None) == "race":
        with pytest.raises(pa.KernelError, match=r"uninitialised shared memory at 0x[0-9a-f]+: thread \(0,0,0\) of "
                           r"block \(0,0,0\) reads it at kernels/selftest\.cu:\d+, but no thread of its block wrote it"):
            mod.selftest_uninitialised_shared(out)
        return
    mod.selftest_uninitialised_shared(out)
    assert (out.view(np.uint32) == 0xFFFFFFFF).all()


def test_static_shared_memory_is_measured():
    # As__[16][16] + Bs[16][17] floats = 2112 bytes, the figure ptxas reports for this kernel.
    assert mod.selftest_static_shared_bytes() == 2112


@pytest.mark.emu
def test_kernel_error_is_a_runtime_error():
    assert issubclass(pa.KernelError, RuntimeError)


@pytest.mark.emu
def test_worker_pool_size_comes_from_the_environment():
    if getattr(mod, "sanitizer", None):
        pytest.skip("the sanitizer build runs one worker whatever the environment says")
    code = "import pyalexnet as pa; print(pa._backend.active.module.worker_count())"
    out = run_python(code, PYALEXNET_BACKEND="emu", PYALEXNET_EMU_WORKERS="3")
    assert out.stdout.strip() == "3"


@pytest.mark.emu
def test_a_forked_child_gets_its_own_worker_pool():
    # The child inherits none of the parent's worker threads; without a pool of its own it would hang.
    code = (
        "import os, numpy as np, pyalexnet as pa\n"
        "x = np.arange(-3, 4, dtype=np.float32)\n"
        "pa.ops.relu_forward(x)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if pa.ops.relu_forward(x).sum() == 6 else 1)\n"
        "print('child exit', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    out = run_python(code, PYALEXNET_BACKEND="emu", timeout=60)
    assert out.stdout.strip() == "child exit 0", out.stderr


@pytest.mark.emu
@pytest.mark.parametrize("variable, value, error", [
    ("PYALEXNET_EMU_WORKERS", "zero", "PYALEXNET_EMU_WORKERS must be an integer in [1, 1024], got 'zero'"),
    ("PYALEXNET_EMU_WATCHDOG", "soon", "PYALEXNET_EMU_WATCHDOG must be a number of seconds in [0, 1e6] (0: off), "
                                       "got 'soon'"),
])
def test_a_bad_emulator_setting_is_a_clear_error(variable, value, error):
    code = (
        "import numpy as np, pyalexnet as pa\n"
        "try:\n    pa.ops.relu_forward(np.ones(3, np.float32))\n"
        "except pa.KernelError as e:\n    print('ERR', e)\n"
    )
    out = run_python(code, PYALEXNET_BACKEND="emu", **{variable: value})
    assert f"ERR {error}" in out.stdout


@pytest.mark.skipif(ON_CUDA, reason="planted faults are emulator-only")
def test_planted_faults_are_refused_by_name():
    with pytest.raises(pa.KernelError, match="unknown fault 'nope'"):
        mod.selftest_planted("nope", np.zeros(1024, np.float32))


def test_an_output_element_left_unwritten_is_an_error():
    # Under the tests' poison every output starts as the signalling NaN 0x7FA0DEAD; selftest_exited_lanes writes
    # only the 40 threads that do not exit, so 8 of its 48 outputs keep the poison.
    x = pa.asarray(np.ones(48, np.float32))
    out = pa.ops._empty((48,))
    assert (pa.to_numpy(out).view(np.uint32) == 0x7FA0DEAD).all()
    with pytest.raises(pa.KernelError, match=r"selftest_exited_lanes: 8 of 48 elements of its \(48,\) output were "
                       r"never written \(the first at flat index 40\)"):
        pa.ops._call("selftest_exited_lanes", x, out)
    assert not pa.ops._poisoned  # nothing left pending
    full = pa.ops._empty((48,))
    pa.ops._call("relu_forward", x, full)  # writes every element: no error
    np.testing.assert_array_equal(pa.to_numpy(full), np.ones(48, np.float32))


@pytest.mark.emu
def test_a_fault_on_a_guard_page_is_a_kernel_error_and_the_pool_goes_on():
    if getattr(mod, "sanitizer", None) == "address,undefined":
        pytest.skip("under AddressSanitizer the fault is ASan's to report")
    with pytest.raises(pa.KernelError, match=r"kernel planted_shared_guard_page \(launched at kernels/selftest\.cu:\d+\)"
                       r".*block \(0,0,0\): thread \(0,0,0\) accessed address 0x[0-9a-f]+, past the 1024 bytes of "
                       r"dynamic shared memory the launch gave it"):
        mod.selftest_planted("shared_guard_page", np.zeros(1024, np.float32))
    test_tiled_gemm_in_shared_memory(np.random.default_rng(0), 5, 6, 7)


@pytest.mark.emu
def test_a_thread_may_have_half_a_megabyte_of_local_memory():
    if getattr(mod, "sanitizer", None) == "address,undefined":
        pytest.skip("the ASan build's stacks are 256 KB")
    s = np.zeros(1024, np.float32)
    mod.selftest_planted("large_local_array", s)
    assert s[3] == float(sum(i % 7 for i in range(131072)))


@pytest.mark.emu
@pytest.mark.parametrize("where", ["shared", "global"])
def test_a_spin_wait_on_a_volatile_flag_completes(where):
    # Legal since Volta: thread 0 polls a flag thread 63 (another warp) sets, thread 1 one thread 30 (its own warp)
    # sets, with plain volatile loads that never yield. The emulator preempts the spinning fiber.
    s = np.zeros(1024, np.float32)
    if getattr(mod, "sanitizer", None) == "race":
        # Volatile is not atomic: the race checker reports the flag's store against the spinning loads.
        with pytest.raises(pa.KernelError, match=r"race"):
            mod.selftest_planted(f"spin_volatile_{where}", s)
        return
    mod.selftest_planted(f"spin_volatile_{where}", s)
    assert s[0] == 63 * 3 and s[1] == 30 * 3, s[:2]


@pytest.mark.emu
@pytest.mark.parametrize("fault, where", [
    ("livelock_spin", r"thread \(0,0,0\) at kernels/selftest\.cu:\d+"),
    ("livelock_nanosleep", r"thread \(0,0,0\) in __nanosleep at kernels/selftest\.cu:\d+"),
])
def test_a_spin_wait_that_nothing_releases_is_reported_by_the_watchdog(fault, where):
    # Thread 0 waits for a flag that nothing sets while the others wait at a barrier: a GPU would hang. The watchdog
    # fails the block after PYALEXNET_EMU_WATCHDOG seconds without progress, naming the spinning thread's line, and
    # the pool goes on.
    code = (
        "import time, numpy as np, pyalexnet as pa\n"
        "mod = pa._backend.active.module\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    mod.selftest_planted({fault!r}, np.zeros(1024, np.float32))\n"
        "except pa.KernelError as e:\n"
        "    print('ERR', e)\n"
        "print('after %.1f s' % (time.perf_counter() - t))\n"
        "s = np.zeros(1024, np.float32)\n"
        "mod.selftest_planted('bounds_at_limit', s)\n"
        "print('then', s[:64].sum())\n"
    )
    out = run_python(code, PYALEXNET_BACKEND="emu", PYALEXNET_EMU_WATCHDOG="0.5", timeout=60)
    assert out.returncode == 0, out.stderr
    err, after, then = out.stdout.strip().splitlines()
    assert re.search(rf"kernel planted_{fault} \(launched at kernels/selftest\.cu:\d+\), block \(0,0,0\): livelock: "
                     rf"for 0\.5 s no thread of the block reached a barrier.*still running: {where}\.", err), err
    assert 0.4 < float(after.split()[1]) < 10, after
    assert then == "then 64.0"  # the next launch runs as usual


@pytest.mark.emu
@pytest.mark.parametrize("fault, report", [
    ("bounds_exceeded", (r"kernel planted_bounded \(launched at kernels/selftest\.cu:\d+\): block \(65,1,1\) has 65 "
                         r"threads, more than the kernel's __launch_bounds__\(64\): a GPU refuses the launch")),
    ("bounds_template_exceeded", (r"kernel planted_bounded_square<8> \(launched at kernels/selftest\.cu:\d+\): "
                                  r"block \(8,9,1\) has 72 threads, more than the kernel's __launch_bounds__\(64\)")),
])
def test_a_launch_past_the_kernels_launch_bounds_fails(fault, report):
    s = np.zeros(1024, np.float32)
    with pytest.raises(pa.KernelError, match=report):
        mod.selftest_planted(fault, s)
    assert (s == 0).all()  # refused before any thread ran
    mod.selftest_planted(fault.replace("exceeded", "at_limit"), s)  # at the bound it runs
    assert (s[:64] > 0).all() and (s[64:] == 0).all()


def _declared_launch_bounds():
    """kernel name -> its __launch_bounds__ expression, from the sources, and the named constants they use."""
    sources = "\n".join(p.read_text() for p in (ROOT / "kernels").glob("*.cu*"))  # .cu and .cuh
    declared = {name: expr for expr, name in re.findall(r"__launch_bounds__\(([^()]*)\)\s*(\w+)\s*\(", sources)}
    constants = {}
    for decl in re.findall(r"constexpr int ([^;]*);", sources):
        for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", decl):
            constants[name] = int(value)
    return declared, constants


@pytest.mark.emu
def test_every_kernel_of_a_training_step_carries_its_launch_bounds():
    # The emulator reads each kernel's bound from its code (cuda_emu.h); a kernel whose declared bound it missed
    # would be launched unchecked. Run every op of a training step, then compare with what the sources declare.
    net = pa.AlexNet("paper", num_classes=10, seed=2, width=1 / 16, input_size=67)
    opt = pa.SGD(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = np.random.default_rng(0).standard_normal((2, 3, 67, 67)).astype(np.float32)
    _, d = pa.ops.softmax_cross_entropy(net.forward(pa.asarray(x), train=True), pa.asarray(np.array([1, 7], np.int32)))
    net.backward(d)
    opt.step()
    declared, constants = _declared_launch_bounds()
    seen = {re.sub(r"<.*", "", name.strip("()")): bound for name, bound in mod.launch_bounds_seen().items()}
    checked = 0
    for name, bound in seen.items():
        if name not in declared:
            assert bound == 0, (name, bound)  # no bound declared, none read
            continue
        expr = declared[name].split(",")[0].strip()
        want = int(expr) if expr.isdigit() else constants.get(expr)
        assert bound == want if want is not None else bound > 0, (name, expr, bound)
        checked += 1
    assert checked >= 8, seen  # conv, gemm, pool, LRN, dropout, softmax, ... all bounded


@pytest.mark.emu
def test_shared_memory_past_its_end_is_reported():
    # One float past a __shared__ array (thread 31) and past 20 bytes of dynamic shared memory (thread 5, inside the
    # 16-byte rounding before the guard page). The race-check build names thread and line for both; the default
    # builds see the dynamic write after the block (a static overrun reads the next object there: the race-check
    # and ASan builds are the ones that report it); ASan's reports end the process (test_sanitizers.py).
    sanitizer = getattr(mod, "sanitizer", None)
    if sanitizer == "address,undefined":
        pytest.skip("ASan reports these and ends the process: tests/test_sanitizers.py")
    s = np.zeros(1024, np.float32)
    mod.selftest_planted("shared_in_bounds", s)
    np.testing.assert_array_equal(s[:32], (np.arange(32) + 1) % 32)
    mod.selftest_planted("dynamic_in_bounds", s)
    np.testing.assert_array_equal(s[:5], np.arange(5))
    if sanitizer == "race":
        with pytest.raises(pa.KernelError, match=r"out-of-bounds shared memory: thread \(31,0,0\) of block \(0,0,0\) "
                           r"reads 4 bytes at 0x[0-9a-f]+, just past the end of a __shared__ array, at "
                           r"kernels/selftest\.cu:\d+"):
            mod.selftest_planted("shared_past_end", s)
        with pytest.raises(pa.KernelError, match=r"thread \(5,0,0\) of block \(0,0,0\) writes 4 bytes at 0x[0-9a-f]+, "
                           r"just past the end of the 20 bytes of dynamic shared memory the launch gave it, at "
                           r"kernels/selftest\.cu:\d+"):
            mod.selftest_planted("dynamic_past_end", s)
    else:
        with pytest.raises(pa.KernelError, match=r"kernel planted_dynamic_past_end .*block \(0,0,0\): a thread wrote "
                           r"past the 20 bytes of dynamic shared memory the launch gave it \(byte 20"):
            mod.selftest_planted("dynamic_past_end", s)
    mod.selftest_planted("dynamic_in_bounds", s)  # the pool goes on
