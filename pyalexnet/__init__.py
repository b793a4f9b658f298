"""pyalexnet: AlexNet from hand-written CUDA kernels, with a CPU emulator that runs the same kernel source.

    import pyalexnet as pa
    pa.backend_name()            # 'cuda' on a GPU machine, 'emu' elsewhere (PYALEXNET_BACKEND forces one)
    x = pa.asarray(numpy_array)  # onto the active backend
    y = pa.ops.relu_forward(x)
    pa.to_numpy(y)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backend, ops, reference
from .checkpoint import Checkpoint, Preprocess, load, save
from .model import AlexNet, IncompatibleKeys
from .optim import SGD, Constant, Plateau, StepDecay

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # KernelError is the backend module's exception class; the backend is chosen at first use (_backend), so
    # that `pyalexnet --help` works whatever PYALEXNET_BACKEND says.
    if name == "KernelError":  # raised when a launch fails or the emulator finds a fault, naming kernel and place
        return _backend.active.module.KernelError
    raise AttributeError(f"module 'pyalexnet' has no attribute {name!r}")


def backend_name() -> str:
    """'cuda' or 'emu': which backend runs the kernels."""
    return _backend.active.name


def asarray(a: Any) -> Any:
    """``a`` on the active backend (a NumPy array on emu, a CuPy array on cuda), C-contiguous, same dtype.

    Copies only when it must: across devices, or to make a strided array contiguous.
    """
    be = _backend.active
    if be.name == "cuda":
        return be.xp.ascontiguousarray(be.xp.asarray(a))
    return np.ascontiguousarray(to_numpy(a))


def to_numpy(a: Any) -> np.ndarray:
    """``a`` as a NumPy array on the host (a CuPy array or a PyTorch tensor is copied back)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):  # CuPy
        return a.get()
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # PyTorch, on any device
        return a.detach().cpu().numpy()
    return np.asarray(a)


def synchronize() -> None:
    """Waits until every launched kernel has finished (a no-op on the emulator, whose launches are synchronous)."""
    _backend.active.module.synchronize()


__all__ = ["SGD", "AlexNet", "Checkpoint", "Constant", "IncompatibleKeys", "KernelError", "Plateau", "Preprocess",
           "StepDecay",
           "asarray", "backend_name", "load", "ops", "reference", "save", "synchronize", "to_numpy"]
