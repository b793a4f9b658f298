"""Our kernels inside PyTorch (pyalexnet.torch_compat): each autograd Function's forward and backward against
PyTorch's own op on float64 copies, only the gradients autograd asks for, clear refusals, no copies, and a small
model mixing our modules with PyTorch's that trains like the pure-PyTorch one. On this backend's device: CPU
tensors on the emulator, CUDA tensors on cuda (the gpu test)."""

import numpy as np
import pytest
from conftest import ON_CUDA, rel_err, run_python

import pyalexnet as pa
from pyalexnet import torch_compat as tc

torch = pytest.importorskip("torch")
F = torch.nn.functional
DEVICE = "cuda" if ON_CUDA else "cpu"
TOL = 1e-5

needs_avgpool = pytest.mark.skipif(not tc.has_adaptive_avgpool(), reason="this build has no adaptive_avgpool kernels")


def _host(t):
    return t.detach().cpu().numpy()


def _check_against_torch(rng, ours, theirs, shapes, tol=TOL):
    """ours(*float32 tensors) vs theirs(*float64 copies): the output, then every input's gradient of
    sum(y * g) for a random g (through loss.backward(), not gradcheck: that is float64-only)."""
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mine = [torch.tensor(a, device=DEVICE, requires_grad=True) for a in arrays]
    ref = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    y, y_ref = ours(*mine), theirs(*ref)
    assert y.dtype == torch.float32 and y.device.type == DEVICE
    assert rel_err(_host(y), _host(y_ref)) <= tol
    g = rng.standard_normal(tuple(y.shape))
    (y * torch.tensor(g, dtype=torch.float32, device=DEVICE)).sum().backward()
    (y_ref * torch.tensor(g)).sum().backward()
    for i, (a, b) in enumerate(zip(mine, ref)):
        assert rel_err(_host(a.grad), _host(b.grad)) <= tol, f"gradient of input {i}"


@pytest.mark.parametrize("n, c, h, w, k, r, s, stride, padding, groups", [
    (1, 4, 7, 9, 6, 3, 3, 2, 1, 2),   # batch 1, odd sizes, two groups
    (2, 3, 5, 6, 5, 5, 3, 1, 2, 1),   # a rectangular kernel, padding 2
    (1, 2, 6, 6, 2, 6, 6, 3, 0, 1),   # the kernel covers the whole input
])
def test_conv2d_matches_torch(rng, n, c, h, w, k, r, s, stride, padding, groups):
    _check_against_torch(
        rng, lambda x, wt, b: tc.conv2d(x, wt, b, stride, padding, groups),
        lambda x, wt, b: F.conv2d(x, wt, b, stride, padding, groups=groups),
        [(n, c, h, w), (k, c // groups, r, s), (k,)])


def test_conv2d_without_bias(rng):
    _check_against_torch(rng, lambda x, wt: tc.conv2d(x, wt, None, 1, 1),
                         lambda x, wt: F.conv2d(x, wt, None, 1, 1), [(1, 3, 5, 4), (2, 3, 3, 3)])


@pytest.mark.parametrize("shape, size, alpha, beta, k", [((1, 7, 3, 5), 5, 1e-2, 0.75, 2.0),
                                                         ((2, 4, 1, 3), 3, 0.5, 0.6, 1.0)])
def test_local_response_norm_matches_torch_with_alpha_times_size(rng, shape, size, alpha, beta, k):
    _check_against_torch(rng, lambda x: tc.local_response_norm(x, size, alpha, beta, k),
                         lambda x: F.local_response_norm(x, size, alpha * size, beta, k), [shape])


@pytest.mark.parametrize("shape, size, stride", [((1, 3, 7, 9), 3, 2), ((2, 2, 8, 5), 2, 1), ((1, 1, 3, 3), 3, 2)])
def test_max_pool2d_matches_torch(rng, shape, size, stride):
    _check_against_torch(rng, lambda x: tc.max_pool2d(x, size, stride), lambda x: F.max_pool2d(x, size, stride),
                         [shape])


@needs_avgpool
@pytest.mark.parametrize("shape, out", [((1, 3, 5, 7), (3, 2)), ((2, 2, 13, 13), 6), ((1, 1, 1, 1), (6, 6))])
def test_adaptive_avg_pool2d_matches_torch(rng, shape, out):
    _check_against_torch(rng, lambda x: tc.adaptive_avg_pool2d(x, out), lambda x: F.adaptive_avg_pool2d(x, out),
                         [shape])


@pytest.mark.parametrize("batch, fin, fout", [(1, 5, 3), (3, 7, 1)])
def test_linear_matches_torch(rng, batch, fin, fout):
    _check_against_torch(rng, tc.linear, F.linear, [(batch, fin), (fout, fin), (fout,)])
    _check_against_torch(rng, lambda x, w: tc.linear(x, w), lambda x, w: F.linear(x, w), [(batch, fin), (fout, fin)])


def test_relu_matches_torch(rng):
    _check_against_torch(rng, tc.relu, torch.relu, [(2, 3, 5)])


def test_a_non_contiguous_grad_output_is_made_contiguous(rng):
    # y.t() hands backward a transposed (non-contiguous) gradient
    _check_against_torch(rng, lambda x, w: tc.linear(x, w).t(), lambda x, w: F.linear(x, w).t(), [(3, 4), (5, 4)])


def test_double_backward_is_refused():
    x = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(tc.relu(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched, in order."""
    names, call = [], pa.ops._call

    def spy(name, *args):
        names.append(name)
        return call(name, *args)

    monkeypatch.setattr(pa.ops, "_call", spy)
    return names


@pytest.mark.parametrize("frozen", ["input", "weights", "none"])
def test_conv2d_computes_only_the_gradients_autograd_asks_for(rng, launches, frozen):
    x = torch.randn(1, 2, 6, 5, device=DEVICE, requires_grad=frozen != "input")
    conv = tc.Conv2d(2, 4, 3, padding=1, groups=2).to(DEVICE)
    conv.requires_grad_(frozen != "weights")
    ref = torch.nn.Conv2d(2, 4, 3, padding=1, groups=2).to(DEVICE)
    ref.load_state_dict(conv.state_dict())
    ref.requires_grad_(frozen != "weights")
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    conv(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    expected = {"input": "conv_backward_filter", "weights": "conv_backward_data", "none": "conv_backward"}[frozen]
    assert launches == ["conv_forward", expected]
    assert (x.grad is None) == (frozen == "input") and (conv.weight.grad is None) == (frozen == "weights")
    for mine, theirs in ((x, x_ref), (conv.weight, ref.weight), (conv.bias, ref.bias)):
        if theirs.grad is not None:
            assert rel_err(_host(mine.grad), _host(theirs.grad)) < TOL


def test_linear_with_frozen_weights_runs_only_the_data_gradient(rng, launches):
    lin = tc.Linear(6, 3).to(DEVICE).requires_grad_(False)
    x = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    lin(x).sum().backward()
    assert launches == ["linear_forward", "sgemm"]
    assert lin.weight.grad is None
    assert rel_err(_host(x.grad), _host(lin.weight.sum(0).expand(2, 6))) < TOL


def test_no_backward_kernel_runs_when_nothing_needs_a_gradient(launches):
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    y = tc.max_pool2d(tc.local_response_norm(tc.relu(x)))
    assert not y.requires_grad
    assert launches == ["relu_forward", "lrn_forward", "maxpool_forward"]


def test_the_output_is_our_array_and_the_input_is_not_copied(monkeypatch):
    made, seen, empty, call = [], [], pa.ops._empty, pa.ops._call
    monkeypatch.setattr(pa.ops, "_empty", lambda *a, **k: made.append(empty(*a, **k)) or made[-1])
    monkeypatch.setattr(pa.ops, "_call", lambda name, *args: seen.append(args) or call(name, *args))
    x = torch.randn(1, 3, 7, 7, device=DEVICE, requires_grad=True)
    y = tc.max_pool2d(x)
    (ours,), (args,) = made, seen
    if ON_CUDA:
        assert y.data_ptr() == ours.data.ptr and args[0].data.ptr == x.data_ptr()
    else:
        assert y.data_ptr() == ours.ctypes.data and np.shares_memory(args[0], x.detach().numpy())
    assert args[1] is ours


def test_bad_tensors_are_refused_with_the_argument_named():
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32, got torch.float64; convert with x.float"):
        tc.conv2d(x.double(), w)
    with pytest.raises(ValueError, match=r"weight: must be contiguous .*weight.contiguous\(\)"):
        tc.conv2d(x, w.transpose(2, 3))
    with pytest.raises(ValueError, match=r"x: must be contiguous"):
        tc.max_pool2d(x.to(memory_format=torch.channels_last))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got numpy.ndarray"):
        tc.relu(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32"):
        tc.linear(torch.randn(2, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE),
                  torch.zeros(4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="groups"):
        tc.conv2d(x, w, groups=2)
    if not ON_CUDA:  # a tensor that is not on the CPU; a CUDA one on this backend says the same (the gpu test)
        with pytest.raises(TypeError, match=r"x: is on meta, but pyalexnet's active backend is 'emu'.*x.cpu\(\)"):
            tc.relu(torch.empty(3, device="meta"))


def test_modules_are_torchs_with_our_kernels():
    conv, ref = tc.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.nn.Conv2d(4, 6, 3, 2, 1, groups=2)
    assert isinstance(conv, torch.nn.Conv2d) and conv.state_dict().keys() == ref.state_dict().keys()
    assert {k: v.shape for k, v in conv.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(tc.Linear(3, 2), torch.nn.Linear) and tc.Linear(3, 2, bias=False).bias is None
    with pytest.raises(TypeError, match="stride"):
        tc.Conv2d(3, 3, 3, stride=(1, 2))
    with pytest.raises(ValueError, match="size: expected an odd window"):
        tc.LocalResponseNorm(4)
    assert "alpha not divided by size" in repr(tc.LocalResponseNorm())
    assert tc.AdaptiveAvgPool2d(6).output_size == (6, 6)


def _mixed(avgpool):
    nn = torch.nn
    return nn.Sequential(
        tc.Conv2d(3, 6, 5, stride=2, padding=1), tc.ReLU(), tc.LocalResponseNorm(3, alpha=1e-2),
        tc.MaxPool2d(3, 2), nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.ReLU(),
        tc.AdaptiveAvgPool2d(2) if avgpool else nn.AdaptiveAvgPool2d(2), nn.Flatten(), tc.Linear(16, 10), nn.ReLU(),
        tc.Linear(10, 5))


def _pure_torch():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=1), nn.ReLU(), nn.LocalResponseNorm(3, alpha=1e-2 * 3, k=2.0),
        nn.MaxPool2d(3, 2), nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 5))


def test_a_mixed_model_trains_like_the_pure_torch_one(rng):
    torch.manual_seed(0)
    mixed = _mixed(tc.has_adaptive_avgpool()).to(DEVICE)
    ref = _pure_torch().double()
    ref.load_state_dict({k: v.double().cpu() for k, v in mixed.state_dict().items()})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (mixed, ref)]
    for _ in range(3):
        x = rng.standard_normal((2, 3, 15, 13)).astype(np.float32)
        labels = torch.tensor(rng.integers(0, 5, 2))
        losses = []
        runs = ((mixed, opts[0], torch.float32, DEVICE), (ref, opts[1], torch.float64, "cpu"))
        for model, opt, dtype, device in runs:
            opt.zero_grad()
            loss = F.cross_entropy(model(torch.tensor(x, dtype=dtype, device=device)), labels.to(device))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs = dict(ref.named_parameters())
    for k, v in mixed.named_parameters():
        assert rel_err(_host(v), _host(theirs[k])) < 1e-4, k


def test_torch_model_has_torchvisions_layout():
    net = pa.AlexNet("torchvision", num_classes=10, width=1 / 16, input_size=67)
    model = tc.torch_model(torch, net)
    assert [name for name, _ in model.named_children()] == ["features", "avgpool", "classifier"]
    layers = tc.model_layers(torch, model, "torchvision")
    assert len(layers) == len(net.specs)
    for spec, layer in zip(net.specs, layers):
        if spec[0] == "avgpool":
            assert isinstance(layer, torch.nn.AdaptiveAvgPool2d) and layer.output_size == spec[1:]
    assert model(torch.zeros(1, 3, 67, 67)).shape == (1, 10)


def test_importing_pyalexnet_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import pyalexnet, pyalexnet.torch_compat as tc\n"
            "try:\n    tc.Conv2d\nexcept ImportError as e:\n    print('refused:', e)\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "refused: pyalexnet.torch_compat's autograd functions and modules need PyTorch" in done.stdout


@pytest.mark.gpu
def test_cuda_tensors_on_the_current_stream(rng, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    streams, call = [], pa.ops._call
    monkeypatch.setattr(pa.ops, "_call", lambda name, *a: streams.append(pa._backend.active.stream()) or call(name, *a))
    side = torch.cuda.Stream()
    x = torch.randn(2, 4, 9, 9, device="cuda", requires_grad=True)
    conv = tc.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).cuda()
    with torch.cuda.stream(side):
        y = tc.max_pool2d(tc.local_response_norm(tc.relu(conv(x))), 3, 2)
        y.square().sum().backward()
    torch.cuda.synchronize()
    assert streams and set(streams) == {side.cuda_stream}
    assert y.is_cuda and x.grad.is_cuda and conv.weight.grad.is_cuda
    ref = torch.nn.Conv2d(4, 6, 3, 2, 1, groups=2).cuda().double()
    ref.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    y_ref = F.max_pool2d(F.local_response_norm(torch.relu(ref(x64)), 5, 5e-4, 0.75, 2.0), 3, 2)
    y_ref.square().sum().backward()
    assert rel_err(_host(y), _host(y_ref)) < TOL
    assert rel_err(_host(x.grad), _host(x64.grad)) < 1e-4
    assert rel_err(_host(conv.weight.grad), _host(ref.weight.grad)) < 1e-4
    streams.clear()
    tc.relu(torch.randn(3, device="cuda"))  # outside the block: the default stream
    assert streams == [torch.cuda.current_stream().cuda_stream]
    with pytest.raises(TypeError, match=r"x: is on cpu, but pyalexnet's active backend is 'cuda'.*x.cuda\(\)"):
        tc.relu(torch.randn(3))
