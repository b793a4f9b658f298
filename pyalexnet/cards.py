"""The cards `pyalexnet profile` predicts for: one table, every figure with where it comes from.

Peaks are the vendor's (datasheets and architecture whitepapers) or the CUDA C++ Programming Guide's
per-SM rates; what no vendor publishes (L2 bandwidth, latencies, launch overhead) is an assumption, marked
"assumed" with the public measurement it is taken from, to be replaced by what `bench/gpu_check.sh` measures
(its calibration table in bench/RESULTS.md compares each prediction with the measured time).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Card:
    key: str
    name: str
    sass_arch: str              # the SASS the model reads (cuobjdump -arch)
    sms: int
    clock_ghz: float            # the boost clock the FP32 peak is quoted at
    fp32_lanes_per_sm: int      # FFMA lanes per SM per clock (warp FFMAs per clock: lanes / 32)
    issue_per_sm: int           # warp instructions issued per SM per clock (one per scheduler)
    dram_gbps: float            # GB/s
    l2_gbps: float              # GB/s, all SMs together
    l2_bytes: int
    l2_per_sm_bytes_per_clock: int  # what one SM can move to and from L2 per clock
    shared_per_sm: int          # bytes of shared memory per SM at the largest carve-out
    shared_per_block_max: int
    shared_reserved_per_block: int  # the runtime's 1 KB per resident block (sm_80 and newer)
    registers_per_sm: int
    register_unit: int          # registers are allocated per warp in units of this many
    max_threads_per_sm: int
    max_blocks_per_sm: int
    l2_latency_ns: float
    dram_latency_ns: float
    launch_overhead_us: float   # back-to-back launches on one stream, no CUDA graph
    host_link: str = "PCIe Gen5 x16"  # how input batches reach the card from the host
    host_link_gbps: float = 53.0  # GB/s, host to device, pinned memory, one direction
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def fp32_tflops(self) -> float:
        return self.sms * self.fp32_lanes_per_sm * 2 * self.clock_ghz / 1e3


_SHARED_SOURCES = {
    "shared memory": "CUDA C++ Programming Guide, 'Shared Memory' (cc 8.x/9.x): 32 banks of 4 bytes, one wavefront "
                     "(128 bytes) per SM per clock",
    "issue": "one warp instruction per clock per scheduler, four schedulers per SM (Ampere and Hopper whitepapers)",
    "registers": "CUDA C++ Programming Guide, 'Technical Specifications per Compute Capability': 64K 32-bit "
                 "registers per SM, allocated per warp in units of 256",
    "latency": "assumed: L2 hit and DRAM latency from public pointer-chase microbenchmarks (Chips and Cheese, "
               "Jia et al. 'Dissecting the Ampere/Hopper GPU architecture'); to be calibrated",
    "launch": "assumed: 2.5 us per back-to-back launch without CUDA graphs (typical measured figure); to be calibrated",
    "l2 bandwidth": "assumed: not published by NVIDIA; public microbenchmarks measure about 5.5 TB/s (H100) and "
                    "4.5 TB/s (A100); to be calibrated",
    "host link": "assumed: PCIe Gen5 x16 (H100/H200 SXM) carries 64 GB/s per direction raw, Gen4 x16 (A100 SXM) 32; "
                 "pinned copies taken to reach about 83% of that; to be calibrated by bench/data_pipeline.py",
}

_H100 = Card(
    key="h100", name="NVIDIA H100 SXM5 80GB (predicted)", sass_arch="sm_90", sms=132, clock_ghz=1.98,
    fp32_lanes_per_sm=128, issue_per_sm=4, dram_gbps=3350, l2_gbps=5500, l2_bytes=50 * 2**20,
    l2_per_sm_bytes_per_clock=64, shared_per_sm=228 * 1024, shared_per_block_max=227 * 1024,
    shared_reserved_per_block=1024, registers_per_sm=65536, register_unit=256, max_threads_per_sm=2048,
    max_blocks_per_sm=32, l2_latency_ns=150, dram_latency_ns=550, launch_overhead_us=2.5,
    sources={"sms, clock, fp32": "NVIDIA H100 datasheet: 67 TFLOPS FP32 = 132 SMs x 128 lanes x 2 x 1.98 GHz",
             "dram": "NVIDIA H100 datasheet: 3.35 TB/s HBM3", "l2": "NVIDIA H100 whitepaper: 50 MB L2",
             "shared": "CUDA C++ Programming Guide: 228 KB per SM, 227 KB per block (cc 9.0)", **_SHARED_SOURCES})

CARDS = {
    "h100": _H100,
    # The H100's GH100 chip with faster and larger memory: only the DRAM differs.
    "h200": replace(_H100, key="h200", name="NVIDIA H200 SXM 141GB (predicted)", dram_gbps=4800,
                    sources={**_H100.sources, "sms, clock, fp32": "NVIDIA H200 datasheet: 67 TFLOPS FP32 (GH100)",
                             "dram": "NVIDIA H200 datasheet: 4.8 TB/s HBM3e"}),
    "a100": Card(
        key="a100", name="NVIDIA A100 SXM4 80GB (predicted)", sass_arch="sm_80", sms=108, clock_ghz=1.41,
        fp32_lanes_per_sm=64, issue_per_sm=4, dram_gbps=2039, l2_gbps=4500, l2_bytes=40 * 2**20,
        l2_per_sm_bytes_per_clock=64, shared_per_sm=164 * 1024, shared_per_block_max=163 * 1024,
        shared_reserved_per_block=1024, registers_per_sm=65536, register_unit=256, max_threads_per_sm=2048,
        max_blocks_per_sm=32, l2_latency_ns=200, dram_latency_ns=600, launch_overhead_us=2.5,
        host_link="PCIe Gen4 x16", host_link_gbps=26.5,
        sources={"sms, clock, fp32": "NVIDIA A100 datasheet: 19.5 TFLOPS FP32 = 108 SMs x 64 lanes x 2 x 1.41 GHz",
                 "dram": "NVIDIA A100 datasheet: 2,039 GB/s HBM2e (80 GB SXM)", "l2": "NVIDIA A100 whitepaper: 40 MB L2",
                 "shared": "CUDA C++ Programming Guide: 164 KB per SM, 163 KB per block (cc 8.0)",
                 **_SHARED_SOURCES}),
}

def card(key: str) -> Card:
    """The card named `key` (h100, h200, a100; case and a '-sxm' suffix ignored)."""
    k = key.strip().lower().replace("-sxm", "").replace("_sxm", "")
    if k not in CARDS:
        raise ValueError(f"card: expected one of {', '.join(CARDS)}, got {key!r}")
    return CARDS[k]
