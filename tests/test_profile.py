"""pyalexnet profile: the counting emulator's exact counts on planted kernels, the CTA sample against every CTA,
the SASS reader, the model's bounds, and the CI guard against bench/perf-baseline.json."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pyalexnet import profile, sass
from pyalexnet.cards import CARDS, card

ROOT = Path(__file__).resolve().parent.parent
prof = pytest.importorskip("pyalexnet._emu_profile", reason="the counting build is part of the default install")


def _sass_or_skip(arch="sm_90"):
    try:
        return sass.kernel_facts(arch)
    except sass.SassUnavailable as e:  # only where pyalexnet was built without nvcc
        pytest.skip(f"no SASS to read here: {e}")


def _pattern(name, interior=0):
    x = profile._AlignedHost().asarray(np.arange(65536, dtype=np.float32))
    y = profile._AlignedHost().zeros(4096, np.float32)
    prof.profile_set_interior_samples(interior)
    prof.profile_take()
    try:
        prof.selftest_memory_pattern(name, x, y)
        (rec,) = prof.profile_take()
    finally:
        prof.profile_set_interior_samples(0)
    return rec, x, y


def _by(rec, space, kind):
    rows = [i for i in rec["instructions"] if i["space"] == space and i["kind"] == kind]
    return {k: sum(r[k] for r in rows) for k in ("instructions", "lanes", "sectors", "wavefronts")}


@pytest.mark.parametrize("interior", [0, 4])
def test_coalesced_copy_is_four_sectors_per_request(interior):
    rec, x, y = _pattern("coalesced", interior)
    np.testing.assert_array_equal(y[:4096] if interior == 0 else y[:32], x[:4096] if interior == 0 else x[:32])
    # sampled: the first and last blocks and 30 interior ones, each of those standing for 126 / 30 blocks
    assert rec["ctas"] == 128 and rec["sampled_ctas"] == (128 if interior == 0 else 32)
    exact = {"instructions": 128, "lanes": 4096, "sectors": 512, "wavefronts": 0}  # scaled: exact but for rounding
    assert _by(rec, "global", "load") == pytest.approx(exact, rel=1e-12)
    assert _by(rec, "global", "store") == pytest.approx(exact, rel=1e-12)
    read = {b["argument"]: b for b in rec["buffers"]}
    assert read[0]["read_bytes"] == pytest.approx(16384, rel=1e-12) and read[0]["write_bytes"] == 0
    assert read[1]["write_bytes"] == pytest.approx(16384, rel=1e-12) and read[1]["read_bytes"] == 0


def test_stride32_read_is_32_sectors_per_request():
    rec, x, y = _pattern("stride32")
    np.testing.assert_array_equal(y[:2048], x[::32][:2048])
    assert _by(rec, "global", "load") == {"instructions": 64, "lanes": 2048, "sectors": 64 * 32, "wavefronts": 0}
    assert _by(rec, "global", "store") == {"instructions": 64, "lanes": 2048, "sectors": 64 * 4, "wavefronts": 0}
    (load,) = [i for i in rec["instructions"] if i["kind"] == "load"]
    assert load["ideal_sectors"] == 64 * 4  # the same bytes, packed, would need 4 sectors per request


def test_bank_conflict_and_broadcast_wavefronts():
    rec, x, y = _pattern("bank32")
    np.testing.assert_array_equal(y[:32], x[:32])
    assert _by(rec, "shared", "store") == {"instructions": 1, "lanes": 32, "sectors": 0, "wavefronts": 32}
    assert _by(rec, "shared", "load") == {"instructions": 1, "lanes": 32, "sectors": 0, "wavefronts": 32}
    rec, x, y = _pattern("broadcast")
    np.testing.assert_array_equal(y[:32], np.full(32, x[0]))
    assert _by(rec, "shared", "store") == {"instructions": 1, "lanes": 1, "sectors": 0, "wavefronts": 1}
    assert _by(rec, "shared", "load") == {"instructions": 1, "lanes": 32, "sectors": 0, "wavefronts": 1}


def test_lanes_that_skip_a_load_pair_up_again_at_each_barrier():
    rec, x, y = _pattern("predicated")
    np.testing.assert_array_equal(y[:32], [sum(x[32 * i + lane] for i in range(8) if lane >= i) for lane in range(32)])
    assert _by(rec, "global", "load") == {"instructions": 8, "lanes": 256 - 28, "sectors": 32, "wavefronts": 0}
    assert _by(rec, "global", "store") == {"instructions": 1, "lanes": 32, "sectors": 4, "wavefronts": 0}
    assert rec["barriers"] == 8


def test_six_ctas_on_132_sms_are_a_tail():
    facts = _sass_or_skip()
    rec, _, _ = _pattern("tail6")
    assert rec["ctas"] == 6
    p = profile.predict(rec, facts[rec["kernel"]], card("h100"))
    assert p["bound"] == "tail", p
    assert p["ctas_per_sm"] == 1
    # 6 x 256 threads x 1024 iterations x 4 FFMAs: the SASS loop count times the emulator's iterations
    assert p["ffma"] == pytest.approx(6 * 8 * 1024 * 4, rel=0.02)


def test_unknown_pattern_is_a_kernel_error():
    with pytest.raises(Exception, match="unknown pattern"):
        _pattern("nonsense")


def _counts(fn, interior):
    """Totals of the launches fn() makes on the counting backend with `interior` samples per dimension."""
    with profile.counting_backend(interior) as mod:
        fn()
        recs = mod.profile_take()
    tot = {"sectors": 0.0, "wavefronts": 0.0, "instructions": 0.0, "dram": 0.0, "barriers": 0.0}
    for r in recs:
        for i in r["instructions"]:
            tot["sectors"] += i["sectors"]
            tot["wavefronts"] += i["wavefronts"]
            tot["instructions"] += i["instructions"]
        tot["dram"] += sum(b["read_bytes"] + b["write_bytes"] for b in r["buffers"])
        tot["barriers"] += r["barriers"]
    return tot, recs


@pytest.mark.parametrize("layer", ["conv forward", "pool1 forward"])
def test_sampled_ctas_within_two_percent_of_every_cta(layer):
    """A mid-size layer (batch 8; the conv one 3 x 3 on 27 x 27, 138 CTAs of 64 x 128): the stratified sample,
    scaled, against all CTAs."""
    import pyalexnet as pa

    rng = np.random.default_rng(0)

    def run():
        host = profile._AlignedHost()
        if layer == "conv forward":
            x = host.asarray(rng.standard_normal((8, 64, 27, 27), dtype=np.float32))
            w = host.asarray(rng.standard_normal((192, 64, 3, 3), dtype=np.float32))
            pa.ops.conv2d_forward(x, w, host.zeros(192, np.float32), stride=1, padding=1)
        else:
            pa.ops.maxpool_forward(host.asarray(rng.standard_normal((8, 64, 55, 55), dtype=np.float32)))

    full, full_recs = _counts(run, 0)
    sampled, recs = _counts(run, 4)
    assert recs[0]["sampled_ctas"] < recs[0]["ctas"] / 2  # a real sample
    for k, v in full.items():
        assert sampled[k] == pytest.approx(v, rel=0.02), k
    facts = None
    try:
        facts = sass.kernel_facts("sm_90")
    except sass.SassUnavailable:
        pass
    if facts is not None:
        t_full = sum(profile.predict(r, facts.get(r["kernel"]), card("h100"))["us"] for r in full_recs)
        t_sampled = sum(profile.predict(r, facts.get(r["kernel"]), card("h100"))["us"] for r in recs)
        assert t_sampled == pytest.approx(t_full, rel=0.02)


def test_sass_reader_finds_loops_and_classes():
    res = " Function _Z1kPf:\n  REG:40 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:360\n"
    body = "\n".join([
        "\t\tFunction : _Z1kPf",
        "        /*0000*/                   S2R R0, SR_TID.X ;",
        "        /*0010*/                   I2F.U32.RP R5, R2 ;",
        "        /*0020*/                   MUFU.RCP R5, R5 ;",
        "        /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64] ;",
        "        /*0040*/                   LDS.128 R12, [R0] ;",
        "        /*0050*/                   FFMA R1, R12, R13, R1 ;",
        "        /*0060*/                   FFMA R1, R14, R15, R1 ;",
        "        /*0070*/               @P0 BRA 0x40 ;",
        "        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",
        "        /*0090*/                   EXIT ;"])
    facts = sass.parse(res, body)["_Z1kPf"]
    assert (facts.registers, facts.static_shared, facts.local) == (40, 2048, 0)
    assert facts.instructions == 10 and facts.mix["division"] == 1 and facts.mix["LDG.128"] == 1
    hot = facts.hot_loop
    assert (hot.start, hot.end, hot.instructions) == (0x40, 0x70, 4)
    assert hot.mix == {"FFMA": 2, "LDS.128": 1, "branch": 1}
    assert facts.straight == 6


def test_every_launch_of_the_step_has_sass_and_a_line():
    """The real kernels: every kernel the step launches is found in the sm_90 SASS, spills none."""
    facts = _sass_or_skip()
    _, launches = profile.record_step("torchvision", 1, interior=1)
    kernels = {rec["kernel"] for _, _, rec in launches}
    assert kernels and kernels <= set(facts), kernels - set(facts)
    assert all(facts[k].local == 0 for k in kernels)
    lines = profile.source_lines(i["pc"] for _, _, r in launches for i in r["instructions"])
    assert all(v.startswith("kernels/") and ":" in v for v in lines.values()), set(lines.values())
    passes = {(layer, p) for layer, p, _ in launches}
    assert ("conv1", "wgrad") in passes and ("conv2", "dgrad") in passes and ("fc6", "dgrad") in passes
    assert ("conv1", "dgrad") not in passes  # nobody needs the gradient of the images


def test_occupancy_limits():
    h100 = card("h100")
    rec = {"block": (256, 1, 1), "static_shared": 18432, "dynamic_shared": 0}
    facts = sass.KernelFacts("k", registers=80, static_shared=18432)
    # 80 registers x 32 lanes = 2560 per warp; per scheduler 16384 / 2560 = 6 warps, 24 an SM; 8 a block: 3 blocks
    assert profile.occupancy(rec, facts, h100) == (3, "registers")
    facts = sass.KernelFacts("k", registers=32, static_shared=100 * 1024)
    assert profile.occupancy(rec, facts, h100) == (2, "shared memory")
    assert card("H100-SXM") is CARDS["h100"]
    with pytest.raises(ValueError, match="card"):
        card("v100")


def _result(step, passes):
    return {"variant": "torchvision", "batch": 128, "card_key": "h100", "interior_samples": 4, "step_ms": step,
            "passes": [{"layer": k.split()[0], "pass": k.split()[1], "ms": v} for k, v in passes.items()]}


def test_guard_logic():
    base = {"variant": "torchvision", "batch": 128, "card": "h100", "interior_samples": 4, "step_ms": 10.0,
            "passes": {"conv1 forward": 4.0, "conv2 forward": 6.0}}
    assert profile.compare_with_baseline(_result(10.2, {"conv1 forward": 4.2, "conv2 forward": 6.0}), base) == []
    (slower,) = profile.compare_with_baseline(_result(10.5, {"conv1 forward": 4.5, "conv2 forward": 6.0}), base)
    assert "5.0% slower" in slower and "conv1 forward: 4.000 -> 4.500" in slower and "conv2" not in slower
    (faster,) = profile.compare_with_baseline(_result(9.0, {"conv1 forward": 3.0, "conv2 forward": 6.0}), base)
    assert "faster" in faster
    (other,) = profile.compare_with_baseline({**_result(10.0, {}), "batch": 64}, base)
    assert "batch" in other


@pytest.fixture(scope="module")
def baseline_profile():
    _sass_or_skip()
    base = json.loads((ROOT / profile.BASELINE).read_text())
    return base, profile.profile(base["variant"], base["batch"], base["card"], base["interior_samples"])


@pytest.mark.profile_guard
def test_predicted_step_matches_the_committed_baseline(baseline_profile):
    """The CI guard: a change that makes the predicted step more than 3 % slower (or faster) must update
    bench/perf-baseline.json in the same commit."""
    base, result = baseline_profile
    assert profile.compare_with_baseline(result, base) == []


@pytest.mark.profile_guard
def test_profile_result_is_labelled_predicted(baseline_profile):
    _, result = baseline_profile
    assert result["kind"] == "predicted" and result["note"] == profile.NOTE
    text = profile.format_table(result)
    assert profile.NOTE in text.splitlines()[0] and profile.NOTE in text.splitlines()[-1]
    assert result["floor_ms"] < result["step_ms"]
    assert all(r["bound"] in ("fma", "issue", "smem", "l2", "dram", "tail", "latency") for r in result["passes"])
    for r in result["passes"]:
        for e in r["launches"]:
            assert e["sass"] and e["spills"] == 0 and e["us"] > 0 and not math.isnan(e["us"])


def test_the_input_pipeline_model_names_its_bound():
    h100 = card("h100")
    fast = profile.input_pipeline(128, h100, step_ms=10.0, threads=2, staging_rate=16000.0)
    assert fast["batch_bytes"] == 128 * (256 * 256 * 3 + 8)
    assert fast["staging_ms"] == pytest.approx(1e3 * 128 / 32000) and fast["bound"] == "compute"
    assert fast["copy_ms"] == pytest.approx(1e3 * fast["batch_bytes"] / 53e9)
    assert fast["end_to_end_ms"] == 10.0 and fast["threads_to_keep_up"] == 1
    starved = profile.input_pipeline(128, h100, step_ms=2.0, threads=2, staging_rate=16000.0)
    assert starved["bound"] == "staging" and starved["end_to_end_ms"] == pytest.approx(4.0)
    assert starved["threads_to_keep_up"] == 4  # 128 images in 2 ms at 16,000 per thread
    slow_link = profile.input_pipeline(128, card("a100"), step_ms=0.5, threads=64, staging_rate=16000.0)
    assert slow_link["bound"] == "copy" and slow_link["host_link"] == "PCIe Gen4 x16"
    text = profile.format_input({"batch": 128, "input": starved})
    assert "bound by staging" in text[1] and "predicted" in text[0] and "given" in text[0]


def test_the_staging_rate_is_measured_by_the_loaders_read_path(monkeypatch):
    from pyalexnet import data

    calls, read = [], data.Split.read_into

    def counted(self, out, positions, indices):
        calls.append(len(indices))
        return read(self, out, positions, indices)

    monkeypatch.setattr(data.Split, "read_into", counted)
    rate = profile.measure_staging_rate(image_size=32, images=64, seconds=0.05, batch=16)
    assert len(calls) >= 2 and set(calls) == {16}  # the warm-up read and at least one timed one
    assert 100 < rate < 1e8
