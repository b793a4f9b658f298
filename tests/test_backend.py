"""Backend selection: PYALEXNET_BACKEND, and a clear error when the cuda backend is forced where it cannot run."""

import pytest
from conftest import run_python as _run

import pyalexnet as pa


def test_forcing_emu():
    out = _run("import pyalexnet as pa; print(pa.backend_name())", PYALEXNET_BACKEND="emu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "emu"


def test_forcing_cuda_without_a_gpu_says_why_at_first_use():
    if pa.backend_name() == "cuda":
        pytest.skip("this machine has a GPU")
    # The import succeeds (the command line needs it for --help and one-line errors); the first use says why,
    # every time it is tried.
    out = _run("import pyalexnet as pa\nfor _ in range(2):\n    try:\n        pa.backend_name()\n"
               "    except RuntimeError as e:\n        print(e)\npa.asarray([1.0])", PYALEXNET_BACKEND="cuda")
    assert out.returncode != 0
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("PYALEXNET_BACKEND=cuda, but ") for line in lines), out.stdout
    assert "RuntimeError: PYALEXNET_BACKEND=cuda, but" in out.stderr


def test_unknown_backend_name():
    out = _run("import pyalexnet as pa; pa.ops.relu_forward(pa.asarray([1.0]))", PYALEXNET_BACKEND="opencl")
    assert out.returncode != 0
    assert "PYALEXNET_BACKEND must be 'cuda' or 'emu', got 'opencl'" in out.stderr
    assert "Traceback" not in _run("import pyalexnet", PYALEXNET_BACKEND="opencl").stderr


def test_default_is_cuda_only_with_a_device():
    expected = "cuda" if pa._backend._load_cuda()[0] is not None else "emu"
    out = _run("import pyalexnet as pa; print(pa.backend_name())", PYALEXNET_BACKEND=None)
    assert out.stdout.strip() == expected, out.stderr


def test_cupy_is_not_imported_without_a_device():
    if pa.backend_name() == "cuda":
        pytest.skip("this machine has a GPU")
    out = _run("import sys, pyalexnet; print('cupy' in sys.modules)")
    assert out.stdout.strip() == "False", out.stderr
