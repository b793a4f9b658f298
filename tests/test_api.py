"""The network's PyTorch-style surface (issue 17): results that belong to the caller, train() / eval() / net(x),
repr, load_state_dict(strict=False), one dtype rule everywhere, the torchvision variant at any input size >= 63,
dropout where each variant's source puts it, and the typing marker."""

from pathlib import Path

import numpy as np
import pytest

import pyalexnet as pa
from pyalexnet import reference as R
from pyalexnet.model import layer_labels, layer_specs

from conftest import rel_err


def small(variant="paper", **kw):
    kw.setdefault("input_size", 67 if variant == "paper" else 63)
    return pa.AlexNet(variant, num_classes=7, width=0.125, seed=3, **kw)


def images(rng, net, batch):
    return pa.asarray(rng.standard_normal((batch, 3, net.input_size, net.input_size)).astype(np.float32))


def test_forward_returns_the_callers_array_each_time(rng):
    net = small().eval()
    batches = [images(rng, net, 2) for _ in range(3)]
    outs = [net.forward(b, train=False) for b in batches]
    assert len({id(o) for o in outs}) == 3
    for b, o in zip(batches, outs):  # each still holds its own batch's logits after the later calls
        np.testing.assert_array_equal(pa.to_numpy(o), pa.to_numpy(net.forward(b, train=False)))
    assert not np.array_equal(pa.to_numpy(outs[0]), pa.to_numpy(outs[1]))
    outs[0][...] = np.nan  # writing into a result does not touch what backward reads
    net.forward(batches[2], train=False)
    net.backward(pa.asarray(np.ones((2, 7), np.float32)))
    assert all(np.isfinite(pa.to_numpy(g)).all() for g in net.gradients().values())


def test_train_eval_and_call(rng):
    net = small()
    assert net.training  # PyTorch's default
    x = images(rng, net, 3)
    assert net.eval() is net and not net.training
    np.testing.assert_array_equal(pa.to_numpy(net(x)), pa.to_numpy(net.forward(x, train=False)))
    assert net.dropout_calls == 0  # evaluation forwards draw no masks
    net.train()
    net(x)
    assert net.dropout_calls == 1 and len(net.dropout_masks()) == 2
    net(x, train=False)  # an explicit train= wins over the mode
    assert net.dropout_calls == 1
    with pytest.raises(TypeError, match="mode: expected True or False"):
        net.train("no")
    with pytest.raises(TypeError, match="train: expected True, False or None"):
        net.forward(x, train=1)


def test_repr_names_the_layers():
    text = repr(small("torchvision"))
    assert text.startswith("AlexNet(variant='torchvision', num_classes=7")
    assert "(conv1) features.0: 11x11, stride 4, padding 2 -> " in text
    assert "(avgpool5) adaptive average pool to 6x6 -> " in text
    assert f"parameters={small('torchvision').num_parameters():,}" in text


def test_load_state_dict_strict_and_not(rng):
    net, other = small(), small()
    other.load_state_dict({k: v + 1 for k, v in net.state_dict().items()})
    partial = {k: v for k, v in other.state_dict().items() if k.startswith("conv1.")}
    partial["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['conv2.weight'.*unexpected keys \['extra.weight'\]"):
        net.load_state_dict(partial)
    before = net.state_dict()
    missing, unexpected = net.load_state_dict(partial, strict=False)
    assert unexpected == ["extra.weight"] and "conv1.weight" not in missing and "fc8.bias" in missing
    after = net.state_dict()
    np.testing.assert_array_equal(after["conv1.weight"], partial["conv1.weight"])
    np.testing.assert_array_equal(after["conv2.weight"], before["conv2.weight"])
    result = net.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_one_dtype_rule_float64_is_refused_everywhere_with_the_conversion(rng):
    net = small()
    state = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match=r"expected float32 values, got float64; convert with .astype\(np.float32\)"):
        net.load_state_dict(state)
    x = rng.standard_normal((1, 3, 67, 67))
    with pytest.raises(TypeError, match=r"x: expected dtype float32, got float64; convert with x.astype\(np.float32\)"):
        net.forward(pa.asarray(x))
    with pytest.raises(TypeError, match=r"convert with x.astype\(np.float32\)"):
        pa.ops.relu_forward(pa.asarray(x))


@pytest.mark.parametrize("size", [63, 64, 100, 224])
def test_torchvision_takes_any_input_from_63(rng, size):
    net = pa.AlexNet("torchvision", num_classes=5, width=0.0625 if size == 224 else 0.125, seed=1, input_size=size)
    i = net.specs.index(("avgpool", 6, 6))
    assert net.shapes[i + 1] == (net.shapes[i][0], 6, 6)
    x = images(rng, net, 2)
    params = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    ref, _ = R.network_forward(net.specs, params, np.asarray(pa.to_numpy(x), np.float64))
    assert rel_err(net.forward(x, train=False), ref) < 1e-4
    with pytest.raises(ValueError, match="too small"):
        pa.AlexNet("torchvision", width=0.125, input_size=62)


def test_torchvision_adaptive_pool_backward_against_the_reference(rng):
    net = small("torchvision", input_size=95)  # conv5 gives 2 x 2 -> pooled to 6 x 6: a real pool, not the identity
    i = net.specs.index(("avgpool", 6, 6))
    assert net.shapes[i][1:] != (6, 6)
    x = images(rng, net, 2)
    net.forward(x, train=False)
    dlogits = rng.standard_normal((2, 7)).astype(np.float32)
    net.backward(pa.asarray(dlogits))
    params = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    _logits, acts = R.network_forward(net.specs, params, np.asarray(pa.to_numpy(x), np.float64))
    grads = R.network_backward(net.specs, params, acts, dlogits.astype(np.float64))
    for k, g in net.gradients().items():
        assert rel_err(g, grads[k]) < 1e-4, k


def test_dropout_sits_where_each_source_puts_it():
    paper, tv = layer_specs("paper"), layer_specs("torchvision")
    kinds = lambda specs: [s[0] if s[0] != "linear" else s[1] for s in specs[specs.index(("flatten",)) + 1:]]  # noqa: E731
    assert kinds(paper) == ["fc6", "relu", "dropout", "fc7", "relu", "dropout", "fc8"]  # section 4.2: outputs
    assert kinds(tv) == ["dropout", "classifier.1", "relu", "dropout", "classifier.4", "relu", "classifier.6"]
    assert [label for label in layer_labels(paper) if label.startswith("dropout")] == ["dropout6", "dropout7"]
    net = small()
    net.forward(pa.asarray(np.ones((2, 3, 67, 67), np.float32)), train=True)
    assert [m.shape for m in net.dropout_masks()] == [(2, net.shapes[-2][0]), (2, net.shapes[-2][0])]


def test_the_package_is_typed():
    assert (Path(pa.__file__).parent / "py.typed").is_file()
    assert pa.AlexNet.forward.__annotations__ and pa.AlexNet.load_state_dict.__annotations__
