"""Which backend runs the kernels.

``cuda``: ``pyalexnet._cuda`` (the kernels built by nvcc) on CuPy arrays, chosen when the module loads, a
device answers and CuPy is usable. ``emu``: ``pyalexnet._emu`` (the same kernels built for the CPU
emulator) on NumPy arrays, chosen otherwise. ``PYALEXNET_BACKEND=cuda|emu`` forces one; forcing ``cuda``
where it cannot run is an error that says why. CuPy is imported only when the cuda module has found a device.

The choice is made at the first use of ``active`` (any array or kernel call, ``pa.backend_name()``), not at
``import pyalexnet``: the command line's --help and its one-line error for a bad PYALEXNET_BACKEND need the
package importable. A failed choice is not cached: every use raises the same error.
"""

from __future__ import annotations

import os

import numpy as np


class Backend:
    def __init__(self, name: str, module, xp):
        self.name = name
        self.module = module  # the pybind11 module: one function per launcher
        self.xp = xp  # numpy or cupy

    def stream(self) -> int:
        """The stream our kernels launch on: CuPy's current one, so CuPy work and ours stay ordered."""
        if self.name == "cuda":
            return self.xp.cuda.get_current_stream().ptr
        return 0


def _load_cuda():
    """(Backend, None) when the cuda backend can run here, else (None, the reason it cannot)."""
    try:
        from . import _cuda
    except ImportError as e:
        return None, f"pyalexnet._cuda is not available ({e}); it is built when nvcc is present at install"
    count, error = _cuda.device_status()
    if count < 1:
        return None, f"no CUDA device answers ({error or 'the driver reports none'})"
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install cupy-cuda13x, or the build matching your CUDA)"
    if not cupy.is_available():
        return None, "CuPy sees no usable CUDA device"
    if os.environ.get("PYALEXNET_CUPY_POOL") == "0":  # for compute-sanitizer: no pooled blocks to hide overruns in
        cupy.cuda.set_allocator(None)
    return Backend("cuda", _cuda, cupy), None


cuda_unavailable: str | None = None
"""Why the cuda backend is not in use (None when it is)."""


def _select() -> Backend:
    global cuda_unavailable
    forced = os.environ.get("PYALEXNET_BACKEND", "").strip().lower()
    if forced not in ("", "cuda", "emu"):
        raise ValueError(f"PYALEXNET_BACKEND must be 'cuda' or 'emu', got {forced!r}")
    if forced != "emu":
        backend, why = _load_cuda()
        if backend is not None:
            return backend
        cuda_unavailable = why
        if forced == "cuda":
            raise RuntimeError(f"PYALEXNET_BACKEND=cuda, but {why}")
    else:
        cuda_unavailable = "PYALEXNET_BACKEND=emu chose the emulator"
    try:
        from . import _emu
    except ImportError as e:
        raise ImportError(
            f"pyalexnet's compiled modules are missing ({e}). Install the package with 'pip install .' and import "
            "it from outside the source tree (python -m pytest adds the current directory to sys.path; run "
            "'pytest' instead)"
        ) from e
    return Backend("emu", _emu, np)


def __getattr__(name: str):
    global active
    if name == "active":
        active = _select()  # a module global from now on: later reads do not come here
        return active
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
