"""`pyalexnet profile`: the speed of a training step on a named GPU, predicted without one.

Three sources, all from the code as it is now:
  1. static facts of every kernel from the CUDA build's SASS (pyalexnet.sass): registers, shared memory, spills,
     and the instruction mix of the hot loop per iteration;
  2. dynamic counts from the counting emulator (pyalexnet._emu_profile, kernels/emu/counters.h): per warp-level
     memory instruction the 32-byte sectors and the shared-memory wavefronts, unique bytes per buffer, barriers,
     CTAs, from a stratified sample of each launch's CTAs, scaled to the grid;
  3. a model per card (pyalexnet.cards), below, turning both into a time per launch and the resource it is
     bound by.

The model, per launch (every rate is per SM unless it says otherwise):
  occupancy    resident CTAs per SM = the smallest of what registers, shared memory, threads and the block
               limit allow; the limiter is reported;
  distribution the busiest SM runs ceil(CTAs / SMs) CTAs; waves = ceil(CTAs / (resident x SMs));
  instructions the hot loop's iterations = the emulator's dynamic count of the loop's most frequent memory
               instruction class / its count per iteration in SASS; dynamic warp instructions = iterations x
               the loop's length + the straight-line code once per warp; FFMAs likewise. Where the hot loop sits
               in another (a k loop inside the slice loop), that loop's own part counts the same way, anchored
               on a memory class the hot loop lacks (its global loads or shared stores);
  fma          busiest SM's FFMAs / (FP32 lanes / 32) per clock;       issue   its instructions / 4 per clock;
  smem         busiest SM's wavefronts / 1 per clock;
  l2           sectors x 32 B over the L2 bandwidth (or over what the busy SMs can pull: 64 B per clock each);
  dram         unique bytes read and written over the DRAM bandwidth (L2 is assumed to catch all reuse), per
               pointer argument, plus those reached through pointers passed inside a struct;
  latency      each barrier step waits at least one memory latency (L2 hit, or DRAM for the share of traffic
               that misses), per wave; and Little's law: the bytes in flight (resident warps x the hot loop's
               global loads x bytes per load) over the latency bound the bandwidth;
  time         the largest of these plus the launch overhead. Its bound names the largest, except that an
               on-chip bound (fma, issue, smem) inflated more than 1.5x by too few CTAs for the SMs, or by a
               nearly empty last wave, is "tail", and a launch that the overhead dominates is "latency".
Everything this module prints is a prediction from static analysis and emulator counts, not a measurement:
`bench/gpu_check.sh` records both side by side when a GPU is at hand, so the model can be calibrated.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import _backend, cards, sass
from ._cli import NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, Parser
from ._files import atomic_write
from .bench import _git as git
from .bench import conv_flops_layer

NOTE = "predicted from static analysis and emulator counts, not measured"
DEFAULT_INTERIOR = 4  # interior CTAs sampled per grid dimension (plus the first and the last)
BASELINE = Path("bench") / "perf-baseline.json"
GUARD_TOLERANCE = 0.03
DEFAULT_LOADER_THREADS = 4  # the input pipeline's staging threads (the loader's default on a machine of 4+ CPUs)

# ---- running the step on the counting emulator ----------------------------------------------------------------


class _AlignedHost:
    """NumPy with every new array 256-byte aligned and zeroed, as cudaMalloc's are aligned: sector counts then
    see the alignment a GPU buffer has, and the blocks that profile mode skips leave zeros, not garbage."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def _aligned(shape, dtype):
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        raw = np.zeros(nbytes + 256, np.uint8)
        offset = (-raw.ctypes.data) % 256
        return raw[offset:offset + nbytes].view(dtype).reshape(shape)

    def empty(self, shape, dtype=np.float64):
        return self._aligned(shape, dtype)

    zeros = empty

    def zeros_like(self, a, dtype=None):
        return self._aligned(a.shape, dtype or a.dtype)

    def full(self, shape, value, dtype=None):
        out = self._aligned(shape, dtype or np.asarray(value).dtype)
        out[...] = value
        return out

    def asarray(self, a, dtype=None):
        a = np.asarray(a, dtype=dtype)
        out = self._aligned(a.shape, a.dtype)
        out[...] = a
        return out


def counting_module():
    """pyalexnet._emu_profile, or a clear error saying how to get it."""
    try:
        from . import _emu_profile
    except ImportError as e:
        raise RuntimeError(f"pyalexnet._emu_profile is not built ({e}): it is part of the default build; "
                           "reinstall without -DPYALEXNET_EMU_PROFILE=OFF (checking builds omit it)") from e
    return _emu_profile


@contextlib.contextmanager
def counting_backend(interior: int = DEFAULT_INTERIOR, sms: int | None = None):
    """Runs everything inside on the counting emulator, `interior` CTAs sampled per grid dimension (0: all),
    standing for a card of `sms` SMs (None: the emulator's default), so that the launchers shape their grids
    (split-K) as they would on that card."""
    from . import ops

    mod = counting_module()
    saved, saved_samples, saved_poison = _backend.active, mod.profile_interior_samples(), ops._poison_outputs
    saved_sms = mod.emulated_sm_count()
    _backend.active = _backend.Backend("emu", mod, _AlignedHost())
    mod.profile_set_interior_samples(int(interior))
    if sms is not None:
        mod.set_emulated_sm_count(int(sms))
    # A sampled run leaves the outputs of the CTAs it skips unwritten, by design: no unwritten-output check then.
    ops._poison_outputs = saved_poison and int(interior) == 0
    mod.profile_take()
    try:
        yield mod
    finally:
        mod.profile_take()
        mod.profile_set_interior_samples(saved_samples)
        mod.set_emulated_sm_count(saved_sms)
        _backend.active = saved
        ops._poison_outputs = saved_poison


def record_step(variant="torchvision", batch=128, interior=DEFAULT_INTERIOR, seed=0, sms=None):
    """One training step (forward with dropout, loss, backward, SGD) on the counting emulator standing for a card
    of `sms` SMs: the network and [(layer, pass, launch counts)] in launch order."""
    from . import model, ops
    from .model import AlexNet
    from .optim import SGD

    launches = []
    with counting_backend(interior, sms) as mod:
        net = AlexNet(variant, seed=seed)
        opt = SGD(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
        xp = _backend.active.xp
        rng = np.random.default_rng(seed)
        x = xp.asarray(rng.standard_normal((batch, 3, net.input_size, net.input_size), dtype=np.float32))
        labels = xp.asarray(rng.integers(0, net.num_classes, batch).astype(np.int64))
        current = [("input", "none")]

        def flush():
            records = mod.profile_take()
            layer, pass_ = current[0]
            gemms = 0
            for rec in records:
                # A linear layer's backward launches the GEMM of dx (and its split-K reduction), then that of dw
                # (and its reduction) and db's kernel (kernels/linear.cu).
                gemms += "sgemm_kernel" in rec["kernel"]
                p = pass_ if not (layer.startswith("fc") and pass_ == "backward") else ("dgrad" if gemms <= 1 else "wgrad")
                launches.append((layer, p, rec))

        def trace(layer, pass_):
            flush()
            current[0] = (layer, pass_)

        model.trace = trace
        try:
            logits = net.forward(x, train=True)
            trace("loss", "softmax+xent")
            _, dlogits = ops.softmax_cross_entropy(logits, labels)
            net.backward(dlogits)
            trace("sgd", "update")
            opt.step()
            flush()
        finally:
            model.trace = None
    return net, launches


WRAPPERS = "/kernels/async_copy.cuh"  # instruction wrappers, always inlined: their call site is the line


def source_lines(pcs) -> dict[int, str]:
    """pc offset in pyalexnet._emu_profile -> 'kernels/file:line' (the innermost frame in kernel source, as
    addr2line names it with inlining, past the emulator's frames and the instruction wrappers of
    kernels/async_copy.cuh), or the hex offset where addr2line is missing."""
    pcs = sorted({int(p) for p in pcs})
    out = {p: hex(p) for p in pcs}
    if not pcs:
        return out
    path = counting_module().__file__
    try:
        r = subprocess.run(["addr2line", "-a", "-i", "-e", path, *[hex(p - 1) for p in pcs]], capture_output=True,
                           text=True, check=False)
    except OSError:
        return out
    blocks, block = [], None
    for line in r.stdout.splitlines():
        if line.startswith("0x"):
            block = []
            blocks.append(block)
        elif block is not None:
            block.append(line.split(" (discriminator")[0].strip())
    for p, frames in zip(pcs, blocks):
        kernel = [f for f in frames if "/kernels/" in f and "/kernels/emu/" not in f and WRAPPERS not in f]
        chosen = (kernel or frames or [hex(p)])[0]
        k = chosen.rfind("/kernels/")
        out[p] = chosen[k + 1:] if k >= 0 else chosen
    return out


# ---- the model ---------------------------------------------------------------------------------------------------

_CLASS_KEY = {"LDS": ("shared", "load", (1, 2, 4)), "LDS.64": ("shared", "load", (8,)),
              "LDS.128": ("shared", "load", (16,)), "STS": ("shared", "store", (1, 2, 4, 8)),
              "STS.128": ("shared", "store", (16,)), "LDG": ("global", "load", (1, 2, 4, 8)),
              "LDG.128": ("global", "load", (16,)), "STG": ("global", "store", (1, 2, 4, 8)),
              "STG.128": ("global", "store", (16,))}


def _dynamic(rec, cls) -> float:
    space, kind, widths = _CLASS_KEY[cls]
    return sum(i["instructions"] for i in rec["instructions"]
               if i["space"] == space and i["kind"] == kind and i["width"] in widths)


def occupancy(rec, facts, card) -> tuple[int, str]:
    """(resident CTAs per SM, what limits them) for this launch's block and the kernel's resources."""
    threads = math.prod(rec["block"])
    warps = math.ceil(threads / 32)
    regs = max(1, facts.registers if facts else 32)
    per_warp = math.ceil(regs * 32 / card.register_unit) * card.register_unit
    static = facts.static_shared if facts else max(0, rec["static_shared"])
    smem = math.ceil((static + rec["dynamic_shared"]) / 128) * 128 + card.shared_reserved_per_block  # 128 B units
    # The register file is split among the four schedulers: warps per scheduler, times four (cuda_occupancy.h).
    warps_by_registers = (card.registers_per_sm // 4 // per_warp) * 4
    limits = {"registers": warps_by_registers // warps,
              "shared memory": card.shared_per_sm // smem,
              "threads": card.max_threads_per_sm // (warps * 32),
              "blocks": card.max_blocks_per_sm}
    limiter = min(limits, key=lambda k: (limits[k], k != "blocks"))
    return limits[limiter], limiter


def predict(rec, facts, card) -> dict:
    """Predicted time (us), bound and the figures behind them for one launch's counts on `card`."""
    clock = card.clock_ghz * 1e9
    ctas = rec["ctas"]
    threads = math.prod(rec["block"])
    warps_cta = math.ceil(threads / 32)
    resident, limiter = occupancy(rec, facts, card)
    if resident < 1:
        raise ValueError(f"{rec['kernel']}: one block does not fit on an SM of the {card.name} ({limiter})")
    per_sm = math.ceil(ctas / card.sms)
    waves = math.ceil(ctas / (resident * card.sms))
    active = min(ctas, card.sms)
    imbalance = per_sm * card.sms / ctas

    memory = sum(i["instructions"] for i in rec["instructions"])
    hot = facts.hot_loop if facts else None
    anchor = None
    if hot is not None:
        counted = [(hot.mix.get(c, 0), c) for c in _CLASS_KEY if hot.mix.get(c, 0) and _dynamic(rec, c) > 0]
        anchor = max(counted)[1] if counted else None
    outer = facts.outer_loop if facts else None
    if anchor is not None:
        iterations = _dynamic(rec, anchor) / hot.mix[anchor]
        instructions = iterations * hot.instructions + facts.straight * warps_cta * ctas
        ffma = iterations * hot.mix.get("FFMA", 0)
        own = [(outer.mix.get(c, 0), c) for c in _CLASS_KEY
               if outer is not None and outer.mix.get(c, 0) and not hot.mix.get(c, 0) and _dynamic(rec, c) > 0]
        if own:
            # Shared stores first: they run every slice, where a bounds-checked gather may skip a whole warp's load.
            outer_anchor = max(own, key=lambda nc: (nc[1].startswith("STS"), nc))[1]
            outer_iterations = _dynamic(rec, outer_anchor) / outer.mix[outer_anchor]
            instructions += outer_iterations * outer.instructions
            ffma += outer_iterations * outer.mix.get("FFMA", 0)
    elif facts is not None and facts.instructions:
        static_memory = sum(facts.mix.get(c, 0) for c in _CLASS_KEY) or 1
        instructions = max(memory * facts.instructions / static_memory, facts.instructions * warps_cta * ctas)
        ffma = instructions * facts.mix.get("FFMA", 0) / facts.instructions
    else:  # no SASS for this kernel: count its memory instructions eight times over, no FFMA
        instructions, ffma = 8.0 * memory, 0.0

    wavefronts = sum(i["wavefronts"] for i in rec["instructions"] if i["space"] == "shared")
    sectors = sum(i["sectors"] for i in rec["instructions"] if i["space"] == "global")
    global_requests = sum(i["instructions"] for i in rec["instructions"] if i["space"] == "global")
    # Bytes the kernel reached through pointers it got inside a struct (sgd_update_many's table) have no pointer
    # argument to be counted against: the emulator sums them apart, block by block (blocks do not share them).
    dram = sum(b["read_bytes"] + b["write_bytes"] for b in rec["buffers"]) + rec.get("other_global_bytes", 0.0)

    t = {}
    t["fma"] = per_sm * (ffma / ctas) / (card.fp32_lanes_per_sm / 32 * clock)
    t["issue"] = per_sm * (instructions / ctas) / (card.issue_per_sm * clock)
    t["smem"] = per_sm * (wavefronts / ctas) / clock
    t["l2"] = max(sectors * 32 / (card.l2_gbps * 1e9),
                  per_sm * (sectors / ctas) * 32 / (card.l2_per_sm_bytes_per_clock * clock))
    t["dram"] = dram / (card.dram_gbps * 1e9)
    miss = min(1.0, dram / (sectors * 32)) if sectors else 1.0
    latency = (card.l2_latency_ns + miss * (card.dram_latency_ns - card.l2_latency_ns)) * 1e-9
    steps = rec["barriers"] / ctas + 1 if global_requests else 0
    # The global loads a warp has in flight: those of the hot loop, or of the loop around it that issues them.
    loads = [lp for lp in (hot, outer) if lp is not None and any(lp.mix.get(c, 0) for c in ("LDG", "LDG.128"))]
    in_flight_loads = max(1, sum(loads[0].mix.get(c, 0) for c in ("LDG", "LDG.128"))) if loads else 1
    bytes_per_load = sectors * 32 / global_requests if global_requests else 0
    in_flight = active * min(resident, per_sm) * warps_cta * in_flight_loads * bytes_per_load
    little = sectors * 32 * latency / in_flight if in_flight else 0
    t["latency"] = max(waves * steps * latency, little)
    overhead = card.launch_overhead_us * 1e-6
    bound = max(t, key=t.get)
    if bound in ("fma", "issue", "smem") and imbalance > 1.5:
        bound = "tail"
    if overhead > max(t.values()):
        bound = "latency"
    total = max(t.values()) + overhead
    return {"us": total * 1e6, "bound": bound, "components_us": {k: v * 1e6 for k, v in t.items()},
            "resident_ctas": resident, "occupancy_limiter": limiter, "waves": waves, "ctas_per_sm": per_sm,
            "warp_instructions": instructions, "ffma": ffma, "wavefronts": wavefronts, "sectors": sectors,
            "dram_bytes": dram, "hot_loop_anchor": anchor}


def _waste(rec, lines, card) -> dict[str, dict]:
    """Per source line: the time its excess sectors and wavefronts cost beyond the fewest its bytes need."""
    clock = card.clock_ghz * 1e9
    out = {}
    for i in rec["instructions"]:
        line = lines.get(i["pc"], hex(i["pc"]))
        w = out.setdefault(line, {"excess_us": 0.0, "sectors": 0.0, "ideal_sectors": 0.0, "wavefronts": 0.0,
                                  "ideal_wavefronts": 0.0, "instructions": 0.0})
        for k in ("sectors", "ideal_sectors", "wavefronts", "ideal_wavefronts", "instructions"):
            w[k] += i[k]
        w["excess_us"] += 1e6 * ((i["sectors"] - i["ideal_sectors"]) * 32 / (card.l2_gbps * 1e9) +
                                 (i["wavefronts"] - i["ideal_wavefronts"]) / (card.sms * clock))
    return out


def _describe_line(line, w) -> str:
    parts = []
    if w["ideal_sectors"] and w["sectors"] > w["ideal_sectors"]:
        parts.append(f"{w['sectors'] / w['ideal_sectors']:.1f}x sectors")
    if w["ideal_wavefronts"] and w["wavefronts"] > w["ideal_wavefronts"]:
        parts.append(f"{w['wavefronts'] / w['ideal_wavefronts']:.1f}x wavefronts")
    return f"{line} ({', '.join(parts)})" if parts else line


def _useful_flops(net, layer, pass_, batch) -> float:
    """A conv or linear pass's FLOPs as bench counts them (each pass the same); 0 for everything else."""
    if pass_ not in ("forward", "dgrad", "wgrad") or layer not in net.labels:
        return 0.0
    i = net.labels.index(layer)
    return conv_flops_layer(net, i) * batch if net.specs[i][0] in ("conv", "linear") else 0.0


def profile(variant="torchvision", batch=128, card="h100", interior=DEFAULT_INTERIOR, seed=0,
            loader_threads=DEFAULT_LOADER_THREADS, staging_rate=None, image_size=256) -> dict:
    """The whole prediction as plain data (what --json writes). `staging_rate` (images/s per staging thread)
    None: measured here (measure_staging_rate)."""
    spec = cards.card(card)
    facts = sass.kernel_facts(spec.sass_arch)
    started = time.perf_counter()
    net, launches = record_step(variant, batch, interior, seed, sms=spec.sms)
    emulated_s = time.perf_counter() - started
    lines = source_lines(i["pc"] for _, _, rec in launches for i in rec["instructions"])
    peak = spec.fp32_tflops * 1e12

    passes, order = {}, []
    for layer, pass_, rec in launches:
        k = facts.get(rec["kernel"])
        p = predict(rec, k, spec)
        entry = {"kernel": rec["kernel"], "grid": list(rec["grid"]), "block": list(rec["block"]),
                 "ctas": rec["ctas"], "sampled_ctas": rec["sampled_ctas"], "sass": k is not None,
                 "registers": k.registers if k else None, "static_shared": k.static_shared if k else None,
                 "spills": k.local if k else None, **p}
        waste = _waste(rec, lines, spec)
        key = (layer, pass_)
        if key not in passes:
            passes[key] = {"layer": layer, "pass": pass_, "launches": [], "waste": {}}
            order.append(key)
        passes[key]["launches"].append(entry)
        for line, w in waste.items():
            agg = passes[key]["waste"].setdefault(line, dict.fromkeys(w, 0.0))
            for f, v in w.items():
                agg[f] += v

    rows = []
    for key in order:
        ps = passes[key]
        us = sum(e["us"] for e in ps["launches"])
        main = max(ps["launches"], key=lambda e: e["us"])
        flops = _useful_flops(net, ps["layer"], ps["pass"], batch)
        dram = sum(e["dram_bytes"] for e in ps["launches"])
        floor_us = 1e6 * max(flops / peak, dram / (spec.dram_gbps * 1e9))
        worst = max(ps["waste"].items(), key=lambda kv: kv[1]["excess_us"], default=None)
        if worst is not None and worst[1]["excess_us"] <= 0:
            worst = max(ps["waste"].items(), key=lambda kv: kv[1]["sectors"] + kv[1]["wavefronts"])
        rows.append({"layer": ps["layer"], "pass": ps["pass"], "ms": us / 1e3, "flops": flops,
                     "pct_fp32_peak": 100.0 * flops / (us * 1e-6) / peak if flops else None,
                     "bound": main["bound"], "floor_ms": floor_us / 1e3,
                     "worst_line": _describe_line(*worst) if worst else None,
                     "worst_line_excess_us": worst[1]["excess_us"] if worst else 0.0,
                     "launches": ps["launches"]})
    step_ms = sum(r["ms"] for r in rows)
    floor_ms = sum(r["floor_ms"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    if staging_rate is None:
        staging_rate, source = measure_staging_rate(image_size), "measured here, one thread, page cache"
    else:
        source = "given"
    feed = input_pipeline(batch, spec, step_ms, loader_threads, staging_rate, image_size, source)
    return {"kind": "predicted", "note": NOTE, "date": datetime.date.today().isoformat(),
            "commit": git("describe", "--always", "--dirty") or "unknown", "card": spec.name, "card_key": spec.key,
            "sass_arch": spec.sass_arch, "variant": variant, "batch": batch, "interior_samples": interior,
            "step_ms": step_ms, "floor_ms": floor_ms, "step_flops": flops,
            "step_pct_fp32_peak": 100.0 * flops / (step_ms * 1e-3) / peak, "images_per_s": batch / (step_ms * 1e-3),
            "launch_count": len(launches), "emulated_seconds": emulated_s, "passes": rows, "input": feed,
            "card_spec": {k: v for k, v in vars(spec).items()},
            "kernels": {name: facts[name].as_dict() for name in sorted({e["kernel"] for r in rows
                                                                        for e in r["launches"]}) if name in facts}}


# ---- the input pipeline ------------------------------------------------------------------------------------------

def measure_staging_rate(image_size: int = 256, images: int = 512, seconds: float = 1.0, batch: int = 128) -> float:
    """Images/s one staging thread reads here, now: random batches of rows of a page-cached shard of
    `images` images, by the loader's own read path (data.Split.read_into), for about `seconds`."""
    import tempfile

    from .data import Split, _npy_pixels

    shape = (image_size, image_size, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.npy"
        np.save(path, np.zeros((images, *shape), np.uint8))
        _, _, offset = _npy_pixels(path)
        split = Split([path], [offset], [images], np.zeros(images, np.int32), shape)
        out = np.empty((min(batch, images), *shape), np.uint8)
        rng = np.random.default_rng(0)
        split.read_into(out, np.arange(len(out)), rng.permutation(images)[: len(out)])  # warm: in the page cache
        read, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or read == 0:
            split.read_into(out, np.arange(len(out)), rng.permutation(images)[: len(out)])
            read += len(out)
        split.files.close()
    return read / elapsed


def input_pipeline(batch: int, spec: cards.Card, step_ms: float, threads: int, staging_rate: float,
                   image_size: int = 256, source: str = "given") -> dict:
    """The input side of a training step, predicted: staging a batch at `staging_rate` images/s per thread over
    `threads` threads (scaling linearly: what the loader's threads do until memory bandwidth), and its copy to
    the card over the host link. Both overlap the step (the loader's own stream), so the end-to-end step is
    the largest of the three, and that one is the bound."""
    batch_bytes = batch * (image_size * image_size * 3 + 8)  # uint8 pixels and int64 labels
    staging_ms = 1e3 * batch / (staging_rate * threads)
    copy_ms = 1e3 * batch_bytes / (spec.host_link_gbps * 1e9)
    parts = {"compute": step_ms, "staging": staging_ms, "copy": copy_ms}
    bound = max(parts, key=parts.get)
    return {"image_size": image_size, "batch_bytes": batch_bytes, "threads": threads,
            "staging_images_per_s_per_thread": staging_rate, "staging_rate_source": source,
            "staging_ms": staging_ms, "copy_ms": copy_ms, "host_link": spec.host_link,
            "host_link_gbps": spec.host_link_gbps, "end_to_end_ms": parts[bound], "bound": bound,
            "end_to_end_images_per_s": batch / (parts[bound] * 1e-3),
            "threads_to_keep_up": math.ceil(batch / (staging_rate * step_ms * 1e-3))}


def format_input(result) -> list[str]:
    i = result["input"]
    return [f"input pipeline (predicted): a batch of {result['batch']} {i['image_size']} x {i['image_size']} images, "
            f"{i['batch_bytes'] / 1e6:.1f} MB; staging {i['threads']} thread(s) x "
            f"{i['staging_images_per_s_per_thread']:,.0f} images/s ({i['staging_rate_source']}) = {i['staging_ms']:.2f} ms; "
            f"copy over {i['host_link']} at {i['host_link_gbps']:g} GB/s = {i['copy_ms']:.2f} ms; both overlap the step",
            f"end-to-end training (predicted): {i['end_to_end_ms']:.2f} ms per step, "
            f"{i['end_to_end_images_per_s']:,.0f} images/s, bound by {i['bound']}; staging threads needed to keep up "
            f"with the step: {i['threads_to_keep_up']}"]


# ---- reports -----------------------------------------------------------------------------------------------------

def pass_name(row) -> str:
    return f"{row['layer']} {row['pass']}"


def format_table(result) -> str:
    head = (f"pyalexnet profile: {result['variant']} batch {result['batch']} on {result['card']}, "
            f"commit {result['commit']} -- {NOTE}")
    lines = [head, "", f"{'pass':<22} {'time':>21} {'%fp32':>6} {'bound':<8} {'launches':>8}  worst source line"]
    for r in result["passes"]:
        pct = f"{r['pct_fp32_peak']:.0f}" if r["pct_fp32_peak"] is not None else "-"
        lines.append(f"{pass_name(r):<22} {r['ms']:8.3f} ms predicted {pct:>6} {r['bound']:<8} "
                     f"{len(r['launches']):>8}  {r['worst_line'] or '-'}")
    lines += ["", f"whole step (predicted): {result['step_ms']:.2f} ms, {result['images_per_s']:,.0f} images/s, "
                  f"{result['step_pct_fp32_peak']:.0f}% of fp32 peak, {result['launch_count']} launches",
              f"fp32 roofline floor (predicted): {result['floor_ms']:.2f} ms "
              f"(each pass at the larger of its FLOPs at fp32 peak and its unique bytes at DRAM bandwidth); "
              f"the step is {result['step_ms'] / result['floor_ms']:.1f}x the floor",
              *(format_input(result) if "input" in result else []),
              f"every figure above is {NOTE}"]
    return "\n".join(lines)


def demangle(names) -> dict[str, str]:
    """Mangled -> readable kernel names (through c++filt where binutils has it)."""
    names = list(names)
    try:
        r = subprocess.run(["c++filt", *names], capture_output=True, text=True, check=False)
        out = r.stdout.splitlines()
    except OSError:
        out = []
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def format_kernels(result) -> str:
    """The static facts (SASS) of every kernel the step launches, with the occupancy of its first launch."""
    first = {}
    for r in result["passes"]:
        for e in r["launches"]:
            first.setdefault(e["kernel"], e)
    readable = demangle(first)
    classes = ["FFMA", "LDS.128", "LDS", "STS", "LDG", "LDG.128", "STG", "BAR", "integer", "division"]
    lines = [f"kernels of the step, {result['sass_arch']} SASS -- {NOTE}", "",
             f"{'regs':>4} {'smem':>6} {'spill':>5} {'CTAs/SM':>7} {'limit':<13} {'loop':>5} " +
             " ".join(f"{c:>7}" for c in classes) + "  kernel"]
    for name, e in first.items():
        k = result["kernels"].get(name)
        if k is None:
            lines.append(f"{'?':>4} {'?':>6} {'?':>5} {e['resident_ctas']:>7} {e['occupancy_limiter']:<13}  (no SASS)  "
                         f"{readable[name]}")
            continue
        hot = k["hot_loop"] or {"instructions": 0, "mix": {}}
        lines.append(f"{k['registers']:>4} {k['static_shared']:>6} {k['spills']:>5} {e['resident_ctas']:>7} "
                     f"{e['occupancy_limiter']:<13} {hot['instructions']:>5} " +
                     " ".join(f"{hot['mix'].get(c, 0):>7}" for c in classes) + f"  {readable[name]}")
    lines.append("(loop: instructions per iteration of the hot loop, and its mix per iteration)")
    return "\n".join(lines)


def format_markdown(result) -> str:
    """The per-pass table as Markdown (README)."""
    out = ["| pass | predicted ms | % fp32 peak | bound | worst source line |", "|---|---:|---:|---|---|"]
    for r in result["passes"]:
        pct = f"{r['pct_fp32_peak']:.0f}" if r["pct_fp32_peak"] is not None else "-"
        out.append(f"| {pass_name(r)} | {r['ms']:.3f} | {pct} | {r['bound']} | {r['worst_line'] or '-'} |")
    out.append(f"| **whole step** | **{result['step_ms']:.2f}** | {result['step_pct_fp32_peak']:.0f} | | "
               f"floor {result['floor_ms']:.2f} ms |")
    return "\n".join(out)


def baseline_of(result) -> dict:
    return {"kind": "predicted", "note": NOTE + "; the CI guard (tests/test_profile.py) compares each change with it",
            "commit": result["commit"], "date": result["date"], "variant": result["variant"], "batch": result["batch"],
            "card": result["card_key"], "interior_samples": result["interior_samples"], "step_ms": result["step_ms"],
            "floor_ms": result["floor_ms"], "passes": {pass_name(r): r["ms"] for r in result["passes"]}}


def compare_with_baseline(result, baseline, tolerance=GUARD_TOLERANCE) -> list[str]:
    """What is wrong with `result` against the committed baseline: [] when the step is within the tolerance."""
    for k in ("variant", "batch", "card", "interior_samples"):
        mine = result["card_key"] if k == "card" else result[k]
        if baseline.get(k) != mine:
            return [f"the baseline is for {k}={baseline.get(k)!r}, this profile for {mine!r}"]
    problems = []
    old, new = baseline["step_ms"], result["step_ms"]
    change = new / old - 1
    if abs(change) > tolerance:
        moved = [f"{name}: {baseline['passes'].get(name, float('nan')):.3f} -> {ms:.3f} ms"
                 for name, ms in ((pass_name(r), r["ms"]) for r in result["passes"])
                 if abs(ms - baseline["passes"].get(name, 0.0)) > max(0.01, tolerance * ms)]
        what = "slower" if change > 0 else "faster"
        problems.append(f"the predicted step is {abs(change) * 100:.1f}% {what} than {BASELINE} ({old:.3f} -> {new:.3f}"
                        f" ms); if that is intended, commit the new baseline with the change "
                        f"(pyalexnet profile --update-baseline) and say why. Passes that moved: " + "; ".join(moved))
    return problems


def _repo_root() -> Path:
    return Path(git("rev-parse", "--show-toplevel") or ".")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def main(argv=None) -> int:
    parser = Parser(prog="pyalexnet profile", description=(
        "Predict a training step's time per layer pass on a named GPU, without one: SASS of the CUDA build + "
        "counting emulator + a model per card. " + NOTE + "."))
    parser.add_argument("--variant", default="torchvision", choices=["paper", "torchvision"], help="which network")
    parser.add_argument("--batch", type=POSITIVE_INT, default=128, help="images per training step")
    parser.add_argument("--card", default="h100", help=f"one of {', '.join(cards.CARDS)} (default h100)")
    parser.add_argument("--samples", type=NONNEGATIVE_INT, default=DEFAULT_INTERIOR,
                        help="interior CTAs sampled per grid dimension besides the first and the last (0: every CTA)")
    parser.add_argument("--json", type=Path, help="where to write the result (default bench/results/"
                                                  "<date>-predicted-<card>-<commit>-profile.json)")
    parser.add_argument("--loader-threads", type=POSITIVE_INT, default=DEFAULT_LOADER_THREADS,
                        help="staging threads of the input pipeline")
    parser.add_argument("--staging-rate", type=POSITIVE, default=None,
                        help="images/s one staging thread reads (default: measured here, from the page cache)")
    parser.add_argument("--image-size", type=POSITIVE_INT, default=256, help="the stored images' side")
    parser.add_argument("--no-json", action="store_true", help="print only")
    parser.add_argument("--update-baseline", action="store_true", help=f"also write {BASELINE} from this run")
    parser.add_argument("--markdown", action="store_true", help="print the per-pass table as Markdown too")
    parser.add_argument("--kernels", action="store_true",
                        help="also print every kernel's registers, shared memory, spills, occupancy and hot-loop mix")
    args = parser.parse_args(argv)
    try:
        result = profile(args.variant, args.batch, args.card, args.samples, loader_threads=args.loader_threads,
                         staging_rate=args.staging_rate, image_size=args.image_size)
    except (sass.SassUnavailable, RuntimeError, ValueError) as e:
        print(f"pyalexnet profile: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.kernels:
        print()
        print(format_kernels(result))
    if args.markdown:
        print()
        print(format_markdown(result))
    root = _repo_root()
    if not args.no_json:
        path = args.json or root / "bench" / "results" / (
            f"{result['date']}-predicted-{result['card_key']}-{result['commit']}-profile.json")
        _write_json(path, result)
        print(f"wrote {path}")
    if args.update_baseline:
        path = root / BASELINE
        _write_json(path, baseline_of(result))
        print(f"wrote {path}")
    return 0
