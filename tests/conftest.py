import numpy as np
import pytest

import pyalexnet as pa

ON_CUDA = pa.backend_name() == "cuda"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not ON_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs the cuda backend"))
        if "emu" in item.keywords and ON_CUDA:
            item.add_marker(pytest.mark.skip(reason="tests the CPU emulator itself"))


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output starts as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(pa.ops, "_poison_outputs", True)


@pytest.fixture
def rng():
    return np.random.default_rng(20121203)  # NIPS 2012


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref||, in float64; NaN anywhere in out makes it NaN (and every bound fail)."""
    out = np.asarray(pa.to_numpy(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def randn(rng, *shape, scale=1.0):
    """Random float32 on the active backend (never zeros: every element is informative)."""
    return pa.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def numeric_grad(f, x, dy, eps=1e-6):
    """d/dx of sum(f(x) * dy) by central differences, float64."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        old = x[i]
        x[i] = old + eps
        plus = np.sum(f(x) * dy)
        x[i] = old - eps
        minus = np.sum(f(x) * dy)
        x[i] = old
        g[i] = (plus - minus) / (2 * eps)
    return g


def run_python(code, timeout=120, **env):
    """Runs `code` in a fresh interpreter with extra environment variables, outside the source tree (where
    `import pyalexnet` would find the uncompiled sources)."""
    import os
    import subprocess
    import sys
    import tempfile

    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None removes a variable
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=timeout
    )


def cli(*args, cwd, timeout=300, **env):
    """`python -m pyalexnet ARGS` in `cwd`, with extra environment variables (None removes one)."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "pyalexnet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout)


def tiny_run(root, seed, max_steps, **train_args):
    """Under `root`: the demo's images (4 + 2 a class, 72 x 72), prepared into data/, and a checkpoint of the small
    network trained `max_steps` steps on them in run/."""
    from pyalexnet.data import prepare
    from pyalexnet.demo import write_demo_data
    from pyalexnet.train import train

    write_demo_data(root / "images", train_per_class=4, val_per_class=2, size=72, seed=seed)
    prepare(root / "images", root / "data", size=72, workers=1, progress=False)
    train(root / "data", root / "run", width=0.25, crop=67, init="kaiming", batch_size=8, max_steps=max_steps,
          schedule="constant", progress=False, echo=lambda *a: None, **train_args)
    return root

