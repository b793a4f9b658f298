"""Argument checks for the public functions: each failure names the argument and what was expected.

Arrays are never copied or converted silently: an array on the wrong device, of the wrong dtype, or not
C-contiguous is rejected. Arrays from other libraries are wrapped without a copy where the active backend can
read their memory (NumPy from a CPU DLPack tensor; CuPy from ``__cuda_array_interface__`` or DLPack).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend


class DTypeError(TypeError, ValueError):
    """An array of the wrong dtype: a TypeError, and a ValueError too, for callers that catch either."""


def _describe(a) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _on_emu(a, name: str):
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError(
            f"{name}: is a GPU array ({_describe(a)}), but the active backend is 'emu' (the CPU emulator); "
            f"bring it to the host with pyalexnet.to_numpy({name})"
        )
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            raise TypeError(f"{name}: cannot view {_describe(a)} as a host array without a copy ({e})") from None
    raise TypeError(f"{name}: expected a NumPy array, got {_describe(a)}")


def _on_cuda(a, name: str, cp):
    if isinstance(a, np.ndarray):
        raise TypeError(
            f"{name}: is a host (NumPy) array, but the active backend is 'cuda'; "
            f"move it to the GPU with pyalexnet.asarray({name})"
        )
    if not isinstance(a, cp.ndarray):
        if hasattr(a, "__cuda_array_interface__"):
            a = cp.asarray(a)  # a view of the same memory
        elif hasattr(a, "__dlpack__"):
            try:
                a = cp.from_dlpack(a)
            except (BufferError, RuntimeError, TypeError, ValueError) as e:
                raise TypeError(f"{name}: cannot view {_describe(a)} as a CUDA array without a copy ({e})") from None
        else:
            raise TypeError(f"{name}: expected a CuPy array, got {_describe(a)}")
    current = cp.cuda.Device().id
    if a.device.id != current:
        raise ValueError(f"{name}: is on CUDA device {a.device.id}, but the current device is {current}")
    return a


def array(a, name: str, *, dtype=np.float32, ndim: int | None = None):
    """``a`` as an array of the active backend, after checking its type, dtype, rank and layout."""
    be = _backend.active
    a = _on_emu(a, name) if be.name == "emu" else _on_cuda(a, name, be.xp)
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        expected = " or ".join(np.dtype(d).name for d in dtypes)
        how = ""
        if len(dtypes) == 1 and np.dtype(dtypes[0]) == np.float32:
            how = f"; convert with {name}.astype(np.float32) (a PyTorch tensor: .float()): pyalexnet never casts silently"
        raise DTypeError(f"{name}: expected dtype {expected}, got {a.dtype}{how}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(a.shape)}")
    if not getattr(a.flags, "aligned", True):  # NumPy can view a buffer at any byte offset; a GPU cannot load that
        raise ValueError(f"{name}: is not aligned to its {a.dtype.itemsize}-byte elements; pass an aligned copy")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: must be C-contiguous (got strides {a.strides} for shape {tuple(a.shape)}); "
            "pass a contiguous copy, e.g. np.ascontiguousarray(a): pyalexnet never copies silently"
        )
    return a


# Index arithmetic. GEMM, linear, convolution and softmax index with 32-bit ints (cheaper address arithmetic in
# their inner loops, and no AlexNet tensor comes near the limit); ReLU, LRN, pooling, dropout and SGD use 64-bit
# offsets. An op of the first kind refuses any tensor past this many elements (the margin keeps grid-stride
# counters from overflowing); the bindings enforce the same limit, and so do the kernels' own callers.
INDEX32_LIMIT = 2**31 - 1 - 4096


def index32(shape, name: str) -> None:
    count = math.prod(int(d) for d in shape)
    if count > INDEX32_LIMIT:
        raise ValueError(
            f"{name}: {count} elements (shape {tuple(int(d) for d in shape)}) exceed {INDEX32_LIMIT}, the most "
            "this op indexes with 32-bit integers; split the batch"
        )


def same_shape(a, name: str, shape) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")


def writable(a, name: str) -> None:
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{name}: is read-only, but it is updated in place")


def real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}")
    return float(value)


def positive_finite(value, name: str) -> float:
    v = real(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {value!r}")
    return v


def nonnegative_finite(value, name: str) -> float:
    v = real(value, name)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
    return v


def unit_interval(value, name: str) -> float:
    """A value in [0, 1)."""
    v = real(value, name)
    if not (0 <= v < 1):
        raise ValueError(f"{name}: expected a value in [0, 1), got {value!r}")
    return v


def integer(value, name: str, low: int, high: int | None = None) -> int:
    """An int (not a bool, not a float that happens to be whole) in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {_describe(value)}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}: expected an integer {bound}, got {value!r}")
    return int(value)


def positive_int(value, name: str) -> int:
    return integer(value, name, 1)


def nonnegative_int(value, name: str) -> int:
    return integer(value, name, 0)


def seed(value, name: str = "seed") -> int:
    return integer(value, name, 0, 2**64)
