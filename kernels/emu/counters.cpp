// The memory counters of the counting build (pyalexnet._emu_profile): the __tsan_* functions that
// -fsanitize=thread instrumentation calls in the kernel translation units, the warp-instruction rebuild, the
// sector and wavefront rules, per-block footprints and the CTA sample. The model is described in counters.h.
// This file is not instrumented itself. Blocks run on several workers at once: everything a block counts is
// the worker's own (thread-local) until the block ends, when it is scaled and merged under a lock.
#include "counters.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace pa_emu::prof {

namespace {

constexpr int kGlobal = 0, kShared = 1;
constexpr int kLoad = 0, kStore = 1, kAtomic = 2;

std::atomic<int> g_interior{0};
constexpr long long kMinSample = 32;  // blocks a sampled launch runs at least (or all it has)
uintptr_t g_module_base = 0;

// A small open-addressing map from a 64-bit key (never 0) to a 32-bit value, cleared in O(capacity).
struct FlatMap {
    std::vector<uint64_t> keys = std::vector<uint64_t>(64, 0);
    std::vector<uint32_t> values = std::vector<uint32_t>(64, 0);
    size_t used = 0;

    uint32_t* find_or_insert(uint64_t key, uint32_t fresh, bool& inserted) {
        if (2 * (used + 1) > keys.size()) grow();
        size_t mask = keys.size() - 1, i = mix(key) & mask;
        while (keys[i] != 0 && keys[i] != key) i = (i + 1) & mask;
        inserted = keys[i] == 0;
        if (inserted) {
            keys[i] = key;
            values[i] = fresh;
            ++used;
        }
        return &values[i];
    }
    void clear() {
        if (used == 0) return;
        std::fill(keys.begin(), keys.end(), 0);
        used = 0;
    }
    static uint64_t mix(uint64_t k) {
        k ^= k >> 33;
        k *= 0xff51afd7ed558ccdull;
        k ^= k >> 33;
        return k;
    }
    void grow() {
        std::vector<uint64_t> old_keys(keys.size() * 2, 0);
        std::vector<uint32_t> old_values(values.size() * 2, 0);
        old_keys.swap(keys);
        old_values.swap(values);
        used = 0;
        bool ins;
        for (size_t i = 0; i < old_keys.size(); ++i)
            if (old_keys[i]) *find_or_insert(old_keys[i], old_values[i], ins) = old_values[i];
    }
};

// One warp-level instruction being rebuilt from its lanes.
struct Pending {
    uint64_t key;  // (pc offset << 32) | occurrence
    uintptr_t pc;
    uint32_t occurrence;
    uint32_t mask;
    uint8_t width, space, kind;
    bool done;
    uintptr_t addr[32];
};

struct PcTotals {
    int space = 0, kind = 0, width = 0;
    uint64_t instructions = 0, lanes = 0, sectors = 0, ideal_sectors = 0, wavefronts = 0, ideal_wavefronts = 0;
};

// Which sectors of a 4 KB page a block read and wrote (128 sectors: two 64-bit words each).
struct PageBits {
    uint64_t read[2] = {0, 0}, write[2] = {0, 0};
};

struct Lane {
    FlatMap occurrences;  // pc -> times this lane has executed it
    int warp = 0, lane = 0;
};

struct Warp {
    std::vector<Pending> pending;
    FlatMap index;  // (pc, occurrence) -> position in `pending`
    uint32_t exited = 0;  // lanes that have exited, or do not exist: an instruction waits for the others only
    size_t compact_at = 4096;
};

// Everything one worker counts for the block it runs.
struct BlockState {
    BlockMemory memory;
    std::vector<Lane> lanes = std::vector<Lane>(1024);
    std::vector<Warp> warps = std::vector<Warp>(32);
    std::unordered_map<uintptr_t, PcTotals> pcs;
    std::unordered_map<uintptr_t, PageBits> pages;
    uintptr_t cached_page = ~uintptr_t(0);
    PageBits* cached_bits = nullptr;
    uint64_t barriers = 0;
    double weight = 1;
    int nthreads = 0;
};

__thread BlockState* t_block = nullptr;
__thread Lane* t_lane = nullptr;

// The launch being counted (one at a time: the runtime holds the profile lock from begin to end).
struct LaunchState {
    std::mutex mutex;
    LaunchCounts counts;
    std::vector<uintptr_t> bases;          // pointer arguments, sorted, with their argument positions
    std::vector<int> base_argument;
    std::vector<double> read_bytes, write_bytes, extent;
    std::unordered_map<uintptr_t, InstructionCounts> pcs;
    double other = 0;
};
LaunchState g_launch;
std::mutex g_done_mutex;
std::vector<LaunchCounts> g_done;

BlockState& block_state() {
    static thread_local BlockState* state = new BlockState;  // never freed: workers live as long as the process
    return *state;
}

bool within(const std::vector<std::pair<const unsigned char*, const unsigned char*>>& ranges, const unsigned char* p) {
    for (const auto& [b, e] : ranges)
        if (p >= b && p < e) return true;
    return false;
}

// ---- the rules for one complete warp instruction -----------------------------------------------------------
unsigned distinct(uint64_t* v, int n) {
    std::sort(v, v + n);
    return unsigned(std::unique(v, v + n) - v);
}

void finish(BlockState& b, Pending& p) {
    if (p.done) return;
    p.done = true;
    const int n = __builtin_popcount(p.mask);
    PcTotals& t = b.pcs[p.pc];
    t.space = p.space, t.kind = p.kind, t.width = p.width;
    t.instructions += 1;
    t.lanes += unsigned(n);
    uint64_t v[64];
    int m = 0;
    if (p.space == kGlobal) {
        for (int l = 0; l < 32; ++l) {
            if (!(p.mask >> l & 1u)) continue;
            v[m++] = p.addr[l] >> 5;
            if ((p.addr[l] + p.width - 1) >> 5 != p.addr[l] >> 5) v[m++] = (p.addr[l] + p.width - 1) >> 5;
        }
        t.sectors += distinct(v, m);
        m = 0;
        for (int l = 0; l < 32; ++l)
            if (p.mask >> l & 1u) v[m++] = p.addr[l];
        t.ideal_sectors += (uint64_t(distinct(v, m)) * p.width + 31) / 32;
        return;
    }
    // Shared: narrower accesses use their 4-byte word; a word of w bytes takes w/4 banks.
    const unsigned w = p.width >= 16 ? 16 : p.width >= 8 ? 8 : 4;
    for (int l = 0; l < 32; ++l)
        if (p.mask >> l & 1u) v[m++] = p.addr[l] / w;
    const unsigned words = distinct(v, m);
    const unsigned groups = 128 / w;
    unsigned per_group[32] = {};
    unsigned worst = 0;
    for (unsigned i = 0; i < words; ++i) worst = std::max(worst, ++per_group[v[i] % groups]);
    t.wavefronts += worst;
    t.ideal_wavefronts += (words * w + 127) / 128;
}

void flush_warp(BlockState& b, Warp& w) {
    for (Pending& p : w.pending) finish(b, p);
    w.pending.clear();
    w.index.clear();
}

// The warp has reconverged (a barrier, or a collective every live lane joined): lanes that skipped an access
// since the last such point (a predicated load at a tile edge) would otherwise pair their k-th execution with
// another lane's k-th of a later iteration, so open instructions are closed and the occurrence counts restart.
void reconverge(BlockState& b, int warp) {
    flush_warp(b, b.warps[warp]);
    for (int i = warp * 32; i < std::min(b.nthreads, warp * 32 + 32); ++i) b.lanes[i].occurrences.clear();
}

// Finished instructions are dropped from a long-running warp's list now and then, so a kernel without
// barriers keeps only its open instructions.
void compact(Warp& w) {
    size_t j = 0;
    for (size_t i = 0; i < w.pending.size(); ++i)
        if (!w.pending[i].done) w.pending[j++] = w.pending[i];
    w.pending.resize(j);
    w.index.clear();
    bool inserted;
    for (size_t i = 0; i < j; ++i) *w.index.find_or_insert(w.pending[i].key, uint32_t(i), inserted) = uint32_t(i);
    w.compact_at = std::max<size_t>(4096, 2 * j);
}

void touch_pages(BlockState& b, uintptr_t addr, size_t size, bool write) {
    for (uintptr_t s = addr >> 5, last = (addr + size - 1) >> 5; s <= last; ++s) {
        const uintptr_t page = s >> 7;
        if (page != b.cached_page) {
            b.cached_bits = &b.pages[page];
            b.cached_page = page;
        }
        const unsigned bit = unsigned(s & 127);
        (write ? b.cached_bits->write : b.cached_bits->read)[bit >> 6] |= 1ull << (bit & 63);
    }
}

void access(const volatile void* ptr, size_t size, int kind, uintptr_t pc) {
    Lane* lane = t_lane;
    if (!lane || size == 0) return;
    BlockState& b = *t_block;
    const auto* c = reinterpret_cast<const unsigned char*>(const_cast<const void*>(ptr));
    if (c >= b.memory.stacks_begin && c < b.memory.stacks_end) return;  // registers and locals on the GPU
    if (within(b.memory.ignored, c)) return;
    const int space = within(b.memory.shared, c) ? kShared : kGlobal;
    const auto addr = reinterpret_cast<uintptr_t>(c);
    if (space == kGlobal) touch_pages(b, addr, size, kind != kLoad);

    bool inserted;
    const uint32_t k = (*lane->occurrences.find_or_insert(pc, 0, inserted))++;
    Warp& w = b.warps[lane->warp];
    // The exact key: the instruction's offset in this module (under 4 GB, never 0) and the occurrence.
    const uint64_t key = uint64_t(pc - g_module_base) << 32 | k;
    uint32_t* slot = w.index.find_or_insert(key, uint32_t(w.pending.size()), inserted);
    if (inserted) {
        Pending& p = w.pending.emplace_back();
        p.key = key;
        p.pc = pc;
        p.occurrence = k;
        p.mask = 0;
        p.width = uint8_t(std::min<size_t>(size, 255));
        p.space = uint8_t(space);
        p.kind = uint8_t(kind);
        p.done = false;
    }
    Pending& p = w.pending[*slot];
    if (p.done || (p.mask >> lane->lane & 1u)) return;  // cannot happen for one instruction; be safe
    p.mask |= 1u << lane->lane;
    p.addr[lane->lane] = addr;
    if ((p.mask | w.exited) == ~0u) {
        finish(b, p);
        if (w.pending.size() >= w.compact_at) compact(w);
    }
}

// ---- the sample -------------------------------------------------------------------------------------------
std::vector<std::pair<unsigned, double>> dimension_sample(unsigned n, int interior) {
    std::vector<std::pair<unsigned, double>> out;
    if (interior <= 0 || n <= unsigned(interior) + 2) {
        for (unsigned i = 0; i < n; ++i) out.emplace_back(i, 1.0);
        return out;
    }
    out.emplace_back(0, 1.0);
    const double span = double(n - 2) / interior;
    for (int j = 0; j < interior; ++j) out.emplace_back(1 + unsigned(std::floor((j + 0.5) * span)), span);
    out.emplace_back(n - 1, 1.0);
    return out;
}

}  // namespace

void async_copy_access(const void* src, size_t src_bytes, void* dst, size_t bytes, uintptr_t pc) {
    access(src, src_bytes, 0, pc);     // the global side of the LDGSTS (none for a zero-filled copy)
    access(dst, bytes, 1, pc - 1);     // its shared side, counted as an instruction of its own
}

void set_interior_samples(int n) { g_interior.store(std::max(0, n)); }
int interior_samples() { return g_interior.load(); }

std::vector<Sample> begin_launch(const LaunchInfo& info, const std::string& kernel, long long static_shared) {
    if (!g_module_base) {
        Dl_info self;
        if (dladdr(reinterpret_cast<void*>(&begin_launch), &self)) g_module_base = uintptr_t(self.dli_fbase);
    }
    LaunchState& L = g_launch;
    L.counts = LaunchCounts{};
    L.counts.kernel = kernel;
    L.counts.static_shared = static_shared;
    L.counts.name = info.name;
    L.counts.file = info.file;
    L.counts.line = info.line;
    L.counts.grid[0] = info.grid.x, L.counts.grid[1] = info.grid.y, L.counts.grid[2] = info.grid.z;
    L.counts.block[0] = info.block.x, L.counts.block[1] = info.block.y, L.counts.block[2] = info.block.z;
    L.counts.dynamic_shared = info.dynamic_shared;
    L.counts.ctas = (long long)info.grid.x * info.grid.y * info.grid.z;
    L.pcs.clear();
    L.other = 0;
    // The pointer arguments, sorted by address, each remembered with its position; duplicates (a kernel given
    // the same buffer twice) count once, under the first position.
    std::vector<std::pair<uintptr_t, int>> ptrs;
    for (int i = 0; i < info.npointers; ++i)
        if (info.pointers[i]) ptrs.emplace_back(info.pointers[i], i);
    std::sort(ptrs.begin(), ptrs.end());
    L.bases.clear();
    L.base_argument.clear();
    for (const auto& [p, i] : ptrs) {
        if (!L.bases.empty() && L.bases.back() == p) continue;
        L.bases.push_back(p);
        L.base_argument.push_back(i);
    }
    L.read_bytes.assign(L.bases.size(), 0);
    L.write_bytes.assign(L.bases.size(), 0);
    L.extent.assign(L.bases.size(), 0);

    std::vector<Sample> sample;
    const int interior = g_interior.load();
    // At least kMinSample blocks where the grid has them: a thin sample of a long one-dimensional grid aliases
    // with the period of the data (a block that straddles two image planes costs more sectors), so the largest
    // dimension not yet taken whole gets more interior samples until the sample is large enough.
    const unsigned dims[3] = {info.grid.x, info.grid.y, info.grid.z};
    int per_dim[3] = {interior, interior, interior};
    auto taken = [&](int d) { return per_dim[d] <= 0 || dims[d] <= unsigned(per_dim[d]) + 2 ? dims[d] : unsigned(per_dim[d]) + 2; };
    while (interior > 0 && (long long)taken(0) * taken(1) * taken(2) < kMinSample) {
        int grow = -1;
        for (int d = 0; d < 3; ++d)
            if (taken(d) < dims[d] && (grow < 0 || dims[d] > dims[grow])) grow = d;
        if (grow < 0) break;
        ++per_dim[grow];
    }
    const auto xs = dimension_sample(info.grid.x, per_dim[0]), ys = dimension_sample(info.grid.y, per_dim[1]),
               zs = dimension_sample(info.grid.z, per_dim[2]);
    if (xs.size() * ys.size() * zs.size() == size_t(L.counts.ctas)) return sample;  // every block runs
    for (const auto& [z, wz] : zs)
        for (const auto& [y, wy] : ys)
            for (const auto& [x, wx] : xs)
                sample.push_back({(long long)x + (long long)info.grid.x * (y + (long long)info.grid.y * z), wx * wy * wz});
    return sample;
}

void begin_block(const BlockMemory& memory, int nthreads, double weight) {
    BlockState& b = block_state();
    t_block = &b;
    b.memory = memory;
    b.nthreads = nthreads;
    b.weight = weight;
    b.barriers = 0;
    b.pcs.clear();
    b.pages.clear();
    b.cached_page = ~uintptr_t(0);
    b.cached_bits = nullptr;
    for (int i = 0; i < nthreads; ++i) {
        Lane& l = b.lanes[i];
        l.occurrences.clear();
        l.warp = i / 32;
        l.lane = i % 32;
    }
    for (int w = 0; w * 32 < nthreads; ++w) {
        b.warps[w].pending.clear();
        b.warps[w].index.clear();
        const int lanes = std::min(32, nthreads - w * 32);
        b.warps[w].exited = lanes == 32 ? 0u : ~((1u << lanes) - 1u);
        b.warps[w].compact_at = 4096;
    }
}

void set_thread(int thread) { t_lane = thread >= 0 && t_block ? &t_block->lanes[thread] : nullptr; }

void barrier() {
    BlockState& b = *t_block;
    ++b.barriers;
    for (int w = 0; w * 32 < b.nthreads; ++w) reconverge(b, w);
}

void warp_converged(int warp) {
    if (t_block) reconverge(*t_block, warp);
}

void lane_exited(int thread) {
    if (!t_block) return;
    BlockState& b = *t_block;
    Warp& w = b.warps[thread / 32];
    w.exited |= 1u << (thread % 32);
    for (Pending& p : w.pending)
        if (!p.done && (p.mask | w.exited) == ~0u) finish(b, p);
}

void end_block() {
    BlockState& b = *t_block;
    t_lane = nullptr;
    for (int w = 0; w * 32 < b.nthreads; ++w) flush_warp(b, b.warps[w]);
    LaunchState& L = g_launch;
    // The block's footprint in each pointer argument's buffer: the argument with the largest address at or below
    // each sector owns it.
    std::vector<uint64_t> read(L.bases.size(), 0), write(L.bases.size(), 0);
    std::vector<uintptr_t> furthest(L.bases.size(), 0);
    uint64_t other = 0;
    for (const auto& [page, bits] : b.pages) {
        for (unsigned s = 0; s < 128; ++s) {
            const bool r = bits.read[s >> 6] >> (s & 63) & 1u, w = bits.write[s >> 6] >> (s & 63) & 1u;
            if (!r && !w) continue;
            const uintptr_t addr = (page << 12) + (uintptr_t(s) << 5);
            auto it = std::upper_bound(L.bases.begin(), L.bases.end(), addr + 31);
            if (it == L.bases.begin()) {
                other += (r ? 32 : 0) + (w ? 32 : 0);  // read and written: both, as a buffer's bytes are counted
                continue;
            }
            const size_t i = size_t(it - L.bases.begin()) - 1;
            read[i] += r ? 32 : 0;
            write[i] += w ? 32 : 0;
            furthest[i] = std::max(furthest[i], addr + 32 - L.bases[i]);
        }
    }
    std::lock_guard<std::mutex> lk(L.mutex);
    L.counts.sampled_ctas += 1;
    L.counts.barriers += b.weight * double(b.barriers);
    L.other += b.weight * double(other);
    for (size_t i = 0; i < L.bases.size(); ++i) {
        L.read_bytes[i] += b.weight * double(read[i]);
        L.write_bytes[i] += b.weight * double(write[i]);
        L.extent[i] = std::max(L.extent[i], double(furthest[i]));
    }
    for (const auto& [pc, t] : b.pcs) {
        InstructionCounts& c = L.pcs[pc];
        c.pc = pc - g_module_base;
        c.space = t.space, c.kind = t.kind, c.width = t.width;
        c.instructions += b.weight * double(t.instructions);
        c.lanes += b.weight * double(t.lanes);
        c.sectors += b.weight * double(t.sectors);
        c.ideal_sectors += b.weight * double(t.ideal_sectors);
        c.wavefronts += b.weight * double(t.wavefronts);
        c.ideal_wavefronts += b.weight * double(t.ideal_wavefronts);
    }
    t_block = nullptr;
}

void end_launch(bool failed) {
    LaunchState& L = g_launch;
    if (failed) return;
    LaunchCounts out = std::move(L.counts);
    out.other_global_bytes = L.other;
    for (auto& [pc, c] : L.pcs) out.instructions.push_back(c);
    std::sort(out.instructions.begin(), out.instructions.end(),
              [](const InstructionCounts& a, const InstructionCounts& b) { return a.pc < b.pc; });
    for (size_t i = 0; i < L.bases.size(); ++i) {
        // The grid's unique bytes lie between the largest footprint any one buffer extent allows and the sum of
        // every block's own footprint (no sharing): the smaller of the sum and the extent is the estimate.
        BufferCounts bc;
        bc.argument = L.base_argument[i];
        bc.extent = L.extent[i];
        bc.read_bytes = std::min(L.read_bytes[i], L.extent[i]);
        bc.write_bytes = std::min(L.write_bytes[i], L.extent[i]);
        if (bc.read_bytes > 0 || bc.write_bytes > 0) out.buffers.push_back(bc);
    }
    std::lock_guard<std::mutex> lk(g_done_mutex);
    g_done.push_back(std::move(out));
}

std::vector<LaunchCounts> take_launches() {
    std::lock_guard<std::mutex> lk(g_done_mutex);
    std::vector<LaunchCounts> out;
    out.swap(g_done);
    return out;
}

}  // namespace pa_emu::prof

// ---- the ThreadSanitizer interface (tsan_hooks.h) -------------------------------------------------------------
#include "tsan_hooks.h"

// Atomic loads and stores count as loads and stores; read-modify-writes as atomics.
void pa_emu_tsan_access(const volatile void* p, size_t bytes, pa_emu::TsanAccess kind, uintptr_t pc) {
    using pa_emu::TsanAccess;
    const int k = kind == TsanAccess::Read || kind == TsanAccess::AtomicLoad ? 0
                  : kind == TsanAccess::Write || kind == TsanAccess::AtomicStore ? 1 : 2;
    pa_emu::prof::access(p, bytes, k, pc);
}

