"""Split-K (kernels/tile.cuh): the rule that picks the ranges, and the split filter gradients and GEMMs against
the float64 reference, bitwise reproducible, with the bias gradient folded into the filter gradient's split.

On the emulator the split follows the SM count it stands for (132 unless set), so the same shapes are run once
as the H100 splits them and once on one SM, where they split into as many ranges or fewer."""

import numpy as np
import pytest
from conftest import ON_CUDA, rel_err

import pyalexnet as pa
from pyalexnet import reference as R

mod = pa._backend.active.module
TOL = 1e-5
BK = 16  # the tile engine's slice depth (conv.cu kConvBK, gemm.cu kBK)
H100_SMS = 132


def plan(tiles, K, layers=1, sms=H100_SMS):
    return mod.split_k_plan(tiles, layers, K, BK, sms)


def wgrad_tiles(k, c, r, s, groups):
    """Tiles per group of the filter gradient's GEMM as conv.cu lays them out: rows of 128 filters, or of 64 where
    128-row tiles would leave more than an eighth empty (tile.cuh, tile_rows_for); columns of 128 over
    C/groups x R x S and the column of ones (the bias gradient)."""
    kg, n = k // groups, c // groups * r * s + 1
    rows = 64 if -(-kg // 128) * 128 * 8 > -(-kg // 64) * 64 * 9 else 128
    return -(-kg // rows) * -(-n // 128)


@pytest.fixture(params=[H100_SMS, 1], ids=["132-sms", "1-sm"])
def sms(request):
    """The emulator stands for a card of this many SMs for the test (on a GPU: the device's own)."""
    if ON_CUDA:
        if request.param != H100_SMS:
            pytest.skip("the SM count is the device's on the cuda backend")
        yield None
        return
    saved = mod.emulated_sm_count()
    mod.set_emulated_sm_count(request.param)
    yield request.param
    mod.set_emulated_sm_count(saved)


# ---- the rule -----------------------------------------------------------------------------------------------------

# (layer, filter-gradient tiles per group, groups, K = N P Q at batch 128) for AlexNet's layers.
WGRAD = [("conv1", wgrad_tiles(64, 3, 11, 11, 1), 1, 128 * 55 * 55),
         ("conv2", wgrad_tiles(192, 64, 5, 5, 1), 1, 128 * 27 * 27),
         ("conv3", wgrad_tiles(384, 192, 3, 3, 1), 1, 128 * 13 * 13),
         ("conv4", wgrad_tiles(256, 384, 3, 3, 1), 1, 128 * 13 * 13),
         ("conv5", wgrad_tiles(256, 256, 3, 3, 1), 1, 128 * 13 * 13),
         ("paper conv2", wgrad_tiles(256, 96, 5, 5, 2), 2, 128 * 27 * 27),
         ("paper conv4", wgrad_tiles(384, 384, 3, 3, 2), 2, 128 * 13 * 13)]


@pytest.mark.parametrize("name,tiles,groups,K", WGRAD, ids=[w[0] for w in WGRAD])
def test_filter_gradients_fill_two_waves_evenly(name, tiles, groups, K):
    count, chunk = plan(tiles, K, groups)
    grid = tiles * groups * count
    assert grid >= 8 * H100_SMS, (name, count)  # two waves at up to 4 resident CTAs per SM
    assert chunk % BK == 0 and chunk >= 8 * BK
    assert (count - 1) * chunk < K <= count * chunk  # every range non-empty, the last one ends at K
    waves = -(-grid // H100_SMS)
    assert grid / (waves * H100_SMS) > 0.9, (name, count, grid)  # no ragged last wave


def test_the_rule_leaves_full_grids_and_shallow_sums_alone():
    assert plan(8 * H100_SMS, 100_000) == (1, 100_000)  # enough tiles already
    assert plan(338 * 6, 3456) == (1, 3456)  # conv3's forward
    assert plan(6, 15 * BK) == (1, 15 * BK)  # fewer than 2 x 8 slices: nothing to split
    assert plan(6, 16 * BK) == (2, 8 * BK)
    assert plan(1, 0) == (1, 0)
    count, chunk = plan(1, 10**9 // 4, sms=132)  # a thin grid over a deep K: as many ranges as it needs
    assert count * 1 >= 8 * 132 and (count - 1) * chunk < 10**9 // 4 <= count * chunk


def test_the_rule_caps_the_grid_layers():
    count, _ = plan(1, 2**30, layers=30000)  # groups x ranges must stay within gridDim.z's 65535
    assert count * 30000 <= 65535


@pytest.mark.parametrize("tiles,K", [(1, 1000), (7, 5000), (75, 93312), (128, 9216), (32, 4096), (288, 4096)])
def test_the_plan_covers_k_exactly(tiles, K):
    count, chunk = plan(tiles, K)
    if count == 1:
        assert chunk == K
    else:
        assert chunk % BK == 0 and (count - 1) * chunk < K <= count * chunk


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="split_k_plan"):
        mod.split_k_plan(0, 1, 10, BK, 132)


@pytest.mark.emu
def test_emulated_sm_count_is_validated():
    with pytest.raises(ValueError, match="expected >= 1"):
        mod.set_emulated_sm_count(0)


# ---- the split passes -------------------------------------------------------------------------------------------

def _conv_case(rng, n, c, h, w, k, r, stride, padding, groups):
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c // groups, r, r)) / np.sqrt(c // groups * r * r)).astype(np.float32)
    p = (h + 2 * padding - r) // stride + 1
    q = (w + 2 * padding - r) // stride + 1
    dy = rng.standard_normal((n, k, p, q)).astype(np.float32)
    return x, wt, dy


# (n, c, h, w, k, r, stride, padding, groups): a conv1-like strided layer with 3 channels; 70 and 130 filters
# (128-row tiles, the second nearly empty, whose bias rows must still be summed); 8 x 4 x 4 = 128 columns of dw,
# which puts the column of ones (the bias gradient) in a tile of its own; two groups; batch 1; K = N P Q not a
# multiple of the slice or of the range.
CONV_CASES = [(2, 3, 67, 61, 16, 11, 4, 2, 1), (1, 8, 17, 19, 70, 3, 1, 1, 1), (3, 6, 13, 11, 10, 5, 1, 2, 2),
              (1, 4, 40, 37, 5, 3, 1, 0, 1), (2, 32, 15, 15, 24, 3, 1, 1, 2), (2, 8, 20, 20, 130, 4, 1, 1, 1)]


@pytest.mark.parametrize("case", CONV_CASES)
def test_split_filter_gradient_and_bias_against_reference(rng, sms, case):
    n, c, h, w, k, r, stride, padding, groups = case
    x, wt, dy = _conv_case(rng, *case)
    P, Q = dy.shape[2:]
    tiles = wgrad_tiles(k, c, r, r, groups)
    if sms == H100_SMS:
        assert plan(tiles, n * P * Q, groups)[0] > 1, "this case is meant to split"
    ref_dx, ref_dw, ref_db = R.conv2d_backward(dy, x, wt, stride, padding, groups)
    runs = [pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(wt), stride, padding, groups)
            for _ in range(2)]
    for got, ref in zip(runs[0], (ref_dx, ref_dw, ref_db)):
        assert rel_err(got, ref) < TOL
    for a, b in zip(*runs):  # bitwise the same on every run
        assert np.array_equal(pa.to_numpy(a), pa.to_numpy(b))


def test_filter_gradient_with_the_ones_in_a_tile_of_their_own_unsplit(rng, sms):
    # 130 filters over 8 x 4 x 4 = 128 dw columns and K = 64 pixels: one range, the bias column alone in tile 2.
    x, wt, dy = _conv_case(rng, 1, 8, 9, 9, 130, 4, 1, 1, 1)
    assert plan(wgrad_tiles(130, 8, 4, 4, 1), 64)[0] == 1
    _, ref_dw, ref_db = R.conv2d_backward(dy, x, wt, 1, 1, 1)
    dw, db = pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(wt), 1, 1, 1)[1:]
    assert rel_err(dw, ref_dw) < TOL and rel_err(db, ref_db) < TOL


def test_split_filter_gradient_of_conv1_at_full_width(rng, sms):
    # conv1 of the torchvision variant at batch 1 (K = 3,025 pixels): 3 tiles, split on an H100's SMs.
    x, wt, dy = _conv_case(rng, 1, 3, 224, 224, 64, 11, 4, 2, 1)
    _, ref_dw, ref_db = R.conv2d_backward(dy, x, wt, 4, 2, 1)
    dw, db = pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(wt), 4, 2, 1)[1:]
    assert rel_err(dw, ref_dw) < TOL and rel_err(db, ref_db) < TOL


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", [(5, 70, 3001), (128, 33, 1030), (1, 1, 4096)])
def test_split_sgemm_with_the_whole_epilogue(rng, sms, trans_a, trans_b, m, n, k):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if sms == H100_SMS:
        assert plan(-(-m // 128) * -(-n // 128), k)[0] > 1
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    ref = 0.5 * (opa.astype(np.float64) @ opb) - 2.0 * c0 + bias
    outs = []
    for _ in range(2):
        c = pa.asarray(c0.copy())
        mod.sgemm(pa.asarray(a), pa.asarray(b), c, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=-2.0,
                  bias=pa.asarray(bias), stream=pa._backend.active.stream())
        outs.append(pa.to_numpy(c))
    assert rel_err(outs[0], ref) < TOL
    assert np.array_equal(outs[0], outs[1])


def test_split_linear_layers_against_reference(rng, sms):
    # fc-like: batch 3 into 2,000 inputs and 50 outputs (the forward's and the data gradient's grids are thin).
    x = rng.standard_normal((3, 2000)).astype(np.float32)
    w = (rng.standard_normal((50, 2000)) / 45).astype(np.float32)
    b = rng.standard_normal(50).astype(np.float32)
    dy = rng.standard_normal((3, 50)).astype(np.float32)
    y = pa.ops.linear_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b))
    assert rel_err(y, R.linear_forward(x, w, b)) < TOL
    for got, ref in zip(pa.ops.linear_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(w)),
                        R.linear_backward(dy, x, w)):
        assert rel_err(got, ref) < TOL
