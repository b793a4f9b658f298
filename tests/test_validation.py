"""Bad input gets a clear exception naming the argument and what was expected: never a crash or garbage."""

import numpy as np
import pytest
from conftest import ON_CUDA, randn

import pyalexnet as pa


def test_wrong_dtype(rng):
    with pytest.raises(TypeError, match=r"x: expected dtype float32, got float64"):
        pa.ops.relu_forward(pa.asarray(rng.standard_normal(5)))


def test_not_an_array():
    with pytest.raises(TypeError, match=r"x: expected a (NumPy|CuPy) array, got list"):
        pa.ops.relu_forward([1.0, 2.0])


def test_wrong_rank(rng):
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions, got shape \(3, 4, 5\)"):
        pa.ops.linear_forward(randn(rng, 3, 4, 5), randn(rng, 2, 4), None)


def test_linear_weight_shape_mismatch(rng):
    with pytest.raises(ValueError, match=r"w: expected shape \(out_features, 4\)"):
        pa.ops.linear_forward(randn(rng, 3, 4), randn(rng, 2, 5), None)


def test_linear_bias_shape_mismatch(rng):
    with pytest.raises(ValueError, match=r"b: expected shape \(2,\), got \(3,\)"):
        pa.ops.linear_forward(randn(rng, 3, 4), randn(rng, 2, 4), randn(rng, 3))


def test_linear_backward_dy_shape_mismatch(rng):
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 2\), got \(3, 3\)"):
        pa.ops.linear_backward(randn(rng, 3, 3), randn(rng, 3, 4), randn(rng, 2, 4))


def test_relu_backward_shape_mismatch(rng):
    with pytest.raises(ValueError, match=r"y: expected shape \(4,\), got \(5,\)"):
        pa.ops.relu_backward(randn(rng, 4), randn(rng, 5))


def test_non_contiguous_is_rejected_not_copied(rng):
    x = randn(rng, 6, 8)
    with pytest.raises(ValueError, match=r"x: must be C-contiguous"):
        pa.ops.relu_forward(x.T)
    with pytest.raises(ValueError, match=r"x: must be C-contiguous"):
        pa.ops.linear_forward(x[:, ::2], randn(rng, 3, 4), None)


@pytest.mark.skipif(ON_CUDA, reason="the emu backend's wrong-device case")
def test_gpu_array_on_the_emu_backend():
    class FakeDeviceArray:  # stands for a CuPy array: what the check reads is the interface it exposes
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match=r"x: is a GPU array .* active backend is 'emu'"):
        pa.ops.relu_forward(FakeDeviceArray())


@pytest.mark.gpu
def test_host_array_on_the_cuda_backend():
    with pytest.raises(TypeError, match=r"x: is a host \(NumPy\) array, but the active backend is 'cuda'"):
        pa.ops.relu_forward(np.ones(3, np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-0.1), r"lr: expected a finite value > 0"),
        (dict(lr=0.0), r"lr: expected a finite value > 0"),
        (dict(lr=float("nan")), r"lr: expected a finite value > 0"),
        (dict(lr=float("inf")), r"lr: expected a finite value > 0"),
        (dict(lr=0.1, momentum=1.0), r"momentum: expected a value in \[0, 1\)"),
        (dict(lr=0.1, momentum=-0.1), r"momentum: expected a value in \[0, 1\)"),
        (dict(lr=0.1, weight_decay=-1e-4), r"weight_decay: expected a finite value >= 0"),
    ],
)
def test_sgd_hyperparameters_out_of_range(rng, kwargs, match):
    w, dw, v = randn(rng, 4), randn(rng, 4), randn(rng, 4)
    with pytest.raises(ValueError, match=match):
        pa.ops.sgd_update(w, dw, v, **kwargs)


def test_sgd_hyperparameter_of_the_wrong_type(rng):
    with pytest.raises(TypeError, match=r"lr: expected a real number, got str"):
        pa.ops.sgd_update(randn(rng, 4), randn(rng, 4), randn(rng, 4), lr="0.1")


def test_sgd_shape_mismatch(rng):
    with pytest.raises(ValueError, match=r"v: expected shape \(4,\), got \(5,\)"):
        pa.ops.sgd_update(randn(rng, 4), randn(rng, 4), randn(rng, 5), lr=0.1)


@pytest.mark.skipif(ON_CUDA, reason="read-only flags are a NumPy notion")
def test_sgd_read_only_weights(rng):
    w = randn(rng, 4)
    w.flags.writeable = False
    with pytest.raises(ValueError, match=r"w: is read-only"):
        pa.ops.sgd_update(w, randn(rng, 4), randn(rng, 4), lr=0.1)


@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_labels_out_of_range(rng, bad):
    labels = np.array([0, bad, 3], np.int64)
    with pytest.raises(ValueError, match=r"labels: 1 value\(s\) outside \[0, 10\)"):
        pa.ops.softmax_cross_entropy(randn(rng, 3, 10), pa.asarray(labels))


def test_labels_of_the_wrong_dtype(rng):
    with pytest.raises(TypeError, match=r"labels: expected dtype int32 or int64, got float32"):
        pa.ops.softmax_cross_entropy(randn(rng, 3, 10), pa.asarray(np.zeros(3, np.float32)))


def test_labels_of_the_wrong_length(rng):
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\), got \(4,\)"):
        pa.ops.softmax_cross_entropy(randn(rng, 3, 10), pa.asarray(np.zeros(4, np.int32)))


def test_empty_logits(rng):
    with pytest.raises(ValueError, match=r"logits: expected shape \(batch >= 1, classes >= 1\)"):
        pa.ops.softmax_cross_entropy(pa.asarray(np.zeros((0, 10), np.float32)), pa.asarray(np.zeros(0, np.int32)))


# The bindings check again, so even a direct call into the compiled module cannot touch memory out of bounds.
def test_binding_rejects_a_short_output(rng):
    mod = pa._backend.active.module
    with pytest.raises(ValueError, match=r"y: expected shape \(10,\), got \(9,\)"):
        mod.relu_forward(randn(rng, 10), randn(rng, 9))


def test_binding_rejects_wrong_dtype_and_layout(rng):
    mod = pa._backend.active.module
    with pytest.raises(TypeError, match=r"x: expected dtype f4"):
        mod.relu_forward(pa.asarray(np.ones(3)), randn(rng, 3))
    with pytest.raises(ValueError, match=r"a: must be C-contiguous"):
        mod.sgemm(randn(rng, 4, 6)[:, ::2], randn(rng, 3, 2), randn(rng, 4, 2))
    with pytest.raises(ValueError, match=r"b: inner dimensions disagree"):
        mod.sgemm(randn(rng, 4, 3), randn(rng, 2, 2), randn(rng, 4, 2))
    with pytest.raises(TypeError, match=r"x: expected a"):
        mod.relu_forward(object(), randn(rng, 3))


@pytest.mark.skipif(ON_CUDA, reason="read-only flags are a NumPy notion")
def test_binding_rejects_read_only_output(rng):
    y = randn(rng, 3)
    y.flags.writeable = False
    with pytest.raises(ValueError, match=r"y: is read-only"):
        pa._backend.active.module.relu_forward(randn(rng, 3), y)


def test_torch_cpu_tensor_is_accepted_without_copy_on_emu(torch, rng):
    if ON_CUDA:
        pytest.skip("a CPU tensor is on the wrong device for the cuda backend")
    t = torch.randn(5)
    y = pa.ops.relu_forward(t)
    np.testing.assert_array_equal(y, np.maximum(t.numpy(), 0))


@pytest.mark.skipif(ON_CUDA, reason="host-memory interface cases")
def test_binding_rejects_hostile_array_interfaces():
    mod = pa._backend.active.module
    y = np.zeros(16, np.float32)

    class Fake:
        def __init__(self, **iface):
            self.__array_interface__ = {"version": 3, "typestr": "<f4", "shape": (16,), "data": (y.ctypes.data, False),
                                        **iface}

    with pytest.raises(TypeError, match=r"x: expected \(pointer, read_only\)"):
        mod.relu_forward(Fake(data=bytearray(64)), y)  # the spec allows a buffer here; we refuse it
    with pytest.raises(ValueError, match=r"x: negative dimension"):
        mod.relu_forward(Fake(shape=(-4, -4)), y)
    with pytest.raises(ValueError, match=r"x: is not aligned to its 4-byte elements"):
        mod.relu_forward(Fake(data=(y.ctypes.data + 1, False)), y)
    with pytest.raises(TypeError, match=r"labels: expected a host array"):
        mod.softmax_xent(np.zeros((2, 3), np.float32), [0, 1], np.zeros((2, 3), np.float32), np.zeros(2, np.float32),
                         np.zeros(2, np.float32))


@pytest.mark.skipif(ON_CUDA, reason="NumPy's unaligned views")
def test_unaligned_numpy_array_is_rejected():
    x = np.ndarray((4,), np.float32, buffer=bytearray(17), offset=1)
    with pytest.raises(ValueError, match=r"x: is not aligned to its 4-byte elements"):
        pa.ops.relu_forward(x)


def test_binding_rejects_overlapping_outputs(rng):
    mod = pa._backend.active.module
    base = randn(rng, 65)
    with pytest.raises(ValueError, match=r"y: shares memory with x"):
        mod.relu_forward(base[:-1], base[1:])
    c = randn(rng, 8, 8)
    with pytest.raises(ValueError, match=r"c: shares memory with a"):
        mod.sgemm(c, randn(rng, 8, 8), c)
    w = randn(rng, 10)
    with pytest.raises(ValueError, match=r"w: shares memory with v"):
        mod.sgd_update(w, randn(rng, 10), w, 0.1, 0.9, 0.0)
    logits = randn(rng, 2, 5)
    with pytest.raises(ValueError, match=r"dlogits: shares memory with logits"):
        mod.softmax_xent(logits, pa.asarray(np.zeros(2, np.int32)), logits, randn(rng, 2), randn(rng, 2))


def test_exact_in_place_relu_is_allowed(rng):
    x = randn(rng, 100)
    expect = np.maximum(pa.to_numpy(x), 0)
    pa._backend.active.module.relu_forward(x, x)
    np.testing.assert_array_equal(pa.to_numpy(x), expect)


def test_sizes_beyond_32_bit_indexing_are_refused_before_any_allocation():
    # The check reads only the interface: these logical arrays of 2^31 rows never touch memory.
    mod = pa._backend.active.module
    key = "__cuda_array_interface__" if ON_CUDA else "__array_interface__"

    def fake(shape, address):
        obj = type("Huge", (), {})()
        setattr(obj, key, {"version": 3, "typestr": "<f4", "shape": shape, "data": (address, False)})
        return obj

    x, w, y = fake((2**31, 1), 1 << 44), fake((1, 1), 1 << 45), fake((2**31, 1), 1 << 46)
    with pytest.raises(ValueError, match=r"x's element count = 2147483648 exceeds"):
        mod.linear_forward(x, w, None, y)


# ---- the functional API's namespace ---------------------------------------------------------------------------------
# DESIGN.md section 5's pa.ops functions, plus adaptive average pooling, the mask and augmentation helpers, to_host.
OPS_API = sorted([
    "adaptive_avgpool_backward", "adaptive_avgpool_forward", "augment_batch", "conv2d_backward", "conv2d_forward",
    "dropout_backward", "dropout_forward", "dropout_keep", "linear_backward", "linear_forward", "lrn_backward",
    "lrn_forward", "maxpool_backward", "maxpool_forward", "relu_backward", "relu_forward", "sgd_update",
    "softmax_cross_entropy", "to_host",
])


def test_ops_namespace_is_the_api():
    assert sorted(n for n in dir(pa.ops) if not n.startswith("_")) == OPS_API
    assert sorted(pa.ops.__all__) == OPS_API
    namespace = {}
    exec("from pyalexnet.ops import *", namespace)
    assert sorted(n for n in namespace if n != "__builtins__") == OPS_API


@pytest.mark.parametrize("name", OPS_API)
def test_ops_are_annotated_and_documented(name):
    import inspect
    import typing

    f = getattr(pa.ops, name)
    assert f.__doc__
    signature = inspect.signature(f)
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return annotation"
    for p in signature.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}: parameter {p.name} has no annotation"
    typing.get_type_hints(f)  # every annotation resolves (on every supported Python)
