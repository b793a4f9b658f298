"""Tensors past 2^31 elements: the 64-bit ops work, the 32-bit ops refuse them cleanly. Nothing allocates gigabytes.

The decision (pyalexnet/_checks.py, README "Limits"): GEMM, linear, convolution and softmax index with 32-bit
ints and refuse any tensor of more than INDEX32_LIMIT elements with a ValueError, before allocating an output or
launching; ReLU, LRN, pooling, dropout and SGD use 64-bit offsets. The refusals are tested with arrays that
claim a huge shape over a small buffer (an `__array_interface__` NumPy views without allocating): the check
must come before any read. The 64-bit arithmetic is tested by a kernel instance run at indices past 2^32.
"""

import numpy as np
import pytest
from conftest import ON_CUDA

import pyalexnet as pa
from pyalexnet._checks import INDEX32_LIMIT

mod = pa._backend.active.module


class _Huge:
    """Claims `shape` float32 elements starting at a real 64-byte buffer: never to be read past its first bytes."""

    def __init__(self, shape, dtype="<f4"):
        self.backing = np.zeros(16, np.float32)
        self.__array_interface__ = {"shape": tuple(shape), "typestr": dtype, "version": 3,
                                    "data": (self.backing.ctypes.data, False)}


def huge(shape, dtype="<f4"):
    if ON_CUDA:
        pytest.skip("host views only: the refusal is the same code on both backends (tests run on the emulator)")
    return np.asarray(_Huge(shape, dtype))


def test_the_64_bit_map_reaches_indices_past_2_to_the_32(rng):
    x = rng.standard_normal(3001).astype(np.float32)
    y = pa.asarray(np.full(3001, np.nan, np.float32))
    mod.selftest_index64(pa.asarray(x), y)
    np.testing.assert_array_equal(pa.to_numpy(y), 2 * x)


CASES_32 = {
    "conv x": lambda: pa.ops.conv2d_forward(huge((2**16, 2**15, 1, 1)), np.zeros((1, 2**15, 1, 1), np.float32)),
    "conv output": lambda: pa.ops.conv2d_forward(huge((1, 1, 2**16, 2**16)), np.zeros((1, 1, 1, 1), np.float32)),
    "conv backward": lambda: pa.ops.conv2d_backward(np.zeros((1, 1, 1, 1), np.float32),
                                                    huge((2**16, 2**15 + 1, 1, 1)),
                                                    np.zeros((1, 2**15 + 1, 1, 1), np.float32)),
    "conv padding": lambda: pa.ops.conv2d_forward(np.zeros((1, 1, 2, 2), np.float32),
                                                  np.zeros((1, 1, 1, 1), np.float32), padding=2**30),
    "linear x": lambda: pa.ops.linear_forward(huge((2**20, 2**11)), np.zeros((1, 2**11), np.float32)),
    "linear output": lambda: pa.ops.linear_forward(huge((2**21, 1)), huge((2**11, 1))),
    "softmax": lambda: pa.ops.softmax_cross_entropy(huge((2**20, 2**11)), np.zeros(2**20, np.int32)),
}


@pytest.mark.parametrize("case", sorted(CASES_32))
def test_32_bit_ops_refuse_tensors_past_the_limit(case):
    with pytest.raises(ValueError, match=f"exceed {INDEX32_LIMIT}, the most this op indexes with 32-bit integers"):
        CASES_32[case]()


def test_the_bindings_refuse_them_too():
    """The last line of defence, for callers of the module itself: the same limit, before any read."""
    x = huge((2**16, 2**15, 1, 1))
    w = np.zeros((1, 2**15, 1, 1), np.float32)
    y = np.zeros((2**16, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="exceeds 2147479551, the largest size the kernels index with 32-bit"):
        mod.conv_forward(x, w, None, y, 1, 0, 1)
    with pytest.raises(ValueError, match="exceeds 2147479551"):
        mod.sgemm(huge((2**16, 2**16)), np.zeros((2**16, 1), np.float32), np.zeros((2**16, 1), np.float32),
                  False, False, 1.0, 0.0, None)


def test_a_shape_past_2_to_the_63_elements_is_refused_not_overflowed():
    fake = _Huge((2**40, 2**40))  # NumPy itself refuses to view this; the module reads the interface directly
    with pytest.raises(ValueError, match="more than 2\\^63 elements"):
        mod.relu_forward(fake, np.zeros(1, np.float32))


def test_the_limit_is_just_below_2_to_the_31():
    assert 2**31 - 2 * 4096 < INDEX32_LIMIT < 2**31
