"""cp.async on the emulator (kernels/async_copy.cuh, kernels/emu/runtime.cpp async_copy): the copies land when
their group is waited for, zero-filled past the bytes read, and the pipeline bugs show.

The planted kernel (kernels/selftest.cu, planted_async_copy) pipelines three tiles through two shared buffers.
In every emulator build a destination holds the poison (NaN) from the copy's issue until its wait, so reading
too early gives NaN; the race-check build reports the access itself, naming both lines; a misaligned copy is
a KernelError in every build. .ci/run runs this file against the plain, ucontext, ASan and race-check builds.
"""

import os
import re

import numpy as np
import pytest

import pyalexnet as pa

mod = pa._backend.active.module
pytestmark = pytest.mark.skipif(pa.backend_name() != "emu", reason="planted kernels run on the emulator only")
RACECHECK = getattr(mod, "sanitizer", None) == "race"


def _run(fault):
    s = np.arange(1024, dtype=np.float32)
    mod.selftest_planted(fault, s)
    return s


def _expected():
    """s[768 + t]: partner p = t ^ 1's float4 of each of the three tiles, the last one zero past 8 bytes for 63."""
    x = np.arange(768, dtype=np.float64).reshape(3, 64, 4)
    x[2, 63, 2:] = 0.0
    return x[:, np.arange(64) ^ 1, :].sum(axis=(0, 2))


def _line(site):
    path, line = site.rsplit(":", 1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, path)) as f:
        return f.read().splitlines()[int(line) - 1]


def test_the_pipeline_copies_and_zero_fills():
    s = _run("async_copy")
    np.testing.assert_array_equal(s[768:832], _expected().astype(np.float32))
    np.testing.assert_array_equal(s[:768], np.arange(768, dtype=np.float32))  # the source is only read
    np.testing.assert_array_equal(s[832:], np.arange(832, 1024, dtype=np.float32))


def test_a_misaligned_copy_is_a_kernel_error_naming_the_line():
    with pytest.raises(pa.KernelError) as info:
        _run("async_misaligned")
    msg = str(info.value)
    assert "misaligned shared destination" in msg and "for a 16-byte copy" in msg, msg
    site = re.search(r"cp\.async at (kernels/selftest\.cu:\d+), thread \(0,0,0\)", msg)
    assert site and "cp_async<16>(dst" in _line(site.group(1)), msg


# fault -> (the race-check build's report: a regular expression; the line the access is on, the line the copy is on)
PLANTED = {
    # A thread reads its own next copy before waiting for it.
    "async_read_before_wait": (r"cp\.async destination in flight: thread \(0,0,0\) of block \(0,0,0\) reads 0x[0-9a-f]+ "
                               r"at (kernels/selftest\.cu:\d+), which the cp\.async of the same thread at "
                               r"(kernels/selftest\.cu:\d+) is still copying",
                               "acc += tile[(n + 1) & 1][4 * t];", "cp_async<16>(dst"),
    # Thread 0 refills the buffer (no barrier after the reads of it) while thread 1 has not read its copy yet.
    "async_refill_too_early": (r"cp\.async destination in flight: thread \(1,0,0\) of block \(0,0,0\) reads 0x[0-9a-f]+ "
                               r"at (kernels/selftest\.cu:\d+), which the cp\.async of thread \(0,0,0\) at "
                               r"(kernels/selftest\.cu:\d+) is still copying",
                               "acc += tile[n & 1][4 * (t ^ 1) + e];", "cp_async<16>(dst"),
    # Thread 0 reads its partner's copy after its own wait but with no barrier: thread 1 copies into it later.
    "async_no_barrier_after_wait": (r"data race on shared memory at 0x[0-9a-f]+: thread \(1,0,0\) of block \(0,0,0\) "
                                    r"writes at (kernels/selftest\.cu:\d+), after thread \(0,0,0\) of block \(0,0,0\) "
                                    r"read at (kernels/selftest\.cu:\d+)",
                                    "cp_async<16>(dst", "acc += tile[n & 1][4 * (t ^ 1) + e];"),
}


@pytest.mark.parametrize("fault", sorted(PLANTED))
def test_a_pipeline_bug_is_caught(fault):
    pattern, first_line, second_line = PLANTED[fault]
    if not RACECHECK:
        # The poison shows where the copy had not landed: garbage in the result, not a plausible number.
        s = _run(fault)
        assert np.isnan(s[768:832]).any(), s[768:832]
        return
    with pytest.raises(pa.KernelError) as info:
        _run(fault)
    msg = str(info.value)
    m = re.search(pattern, msg)
    assert m, msg
    assert first_line in _line(m.group(1)), (m.group(1), _line(m.group(1)))
    assert second_line in _line(m.group(2)), (m.group(2), _line(m.group(2)))


def test_the_correct_pipeline_is_not_reported_and_the_next_launch_is_clean():
    if RACECHECK:
        with pytest.raises(pa.KernelError):
            _run("async_refill_too_early")
    test_the_pipeline_copies_and_zero_fills()
