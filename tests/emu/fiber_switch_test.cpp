// The emulator's fiber switch (kernels/emu/fiber_switch.h) on its own, for tests/test_fiber_switch.py: built for
// the host and, where a cross compiler and qemu-user are installed, for the other architecture.
//
// A scheduler runs kFibers fibers round-robin, each switching back kRounds times. Every fiber keeps integer and
// floating-point values live across its switches (the compiler holds them in callee-saved registers, or spills
// them to the fiber's own stack: either way a wrong save, restore or stack pointer changes them), checks that
// its stack is where it was given and 16-byte aligned at every call, and the scheduler checks the same of its
// own values. Prints "ok <switches>" and exits 0, or names what broke and exits 1.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "emu/fiber_switch.h"

#if !defined(PA_EMU_OWN_SWITCH)
int main() {
    std::puts("no own fiber switch for this architecture");
    return 2;
}
#else
namespace {

constexpr int kFibers = 7;
constexpr int kRounds = 1000;
constexpr size_t kStack = 64 * 1024;

struct Fiber {
    void* sp = nullptr;
    unsigned char* stack = nullptr;
    int id = 0;
    bool done = false;
    long long sum = 0;
};

void* g_scheduler_sp = nullptr;
Fiber* g_current = nullptr;
int g_failures = 0;

void fail(const char* what, int id) {
    std::printf("FAILED: %s (fiber %d)\n", what, id);
    ++g_failures;
}

// Not inlined: a real call, whose frame must be 16-byte aligned as the ABI promises.
__attribute__((noinline)) bool aligned_frame() {
    alignas(16) volatile unsigned char probe[16];
    probe[0] = 1;
    return (reinterpret_cast<uintptr_t>(&probe[0]) & 15) == 0 &&
           (reinterpret_cast<uintptr_t>(__builtin_frame_address(0)) & 15) == 0;
}

__attribute__((noinline)) void yield_to_scheduler(Fiber* f) { pa_fiber_switch(&f->sp, g_scheduler_sp); }

void body(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    // Many live values of both kinds: more than the caller-saved registers hold.
    long long a = f->id + 1, b = 3 * f->id + 7, c = 11, d = 13, e = 17, g = 19, h = 23, k = 29;
    double x = 0.5 + f->id, y = 1.25, z = -2.0, u = 3.5, v = 0.125, w = 7.0, p = 9.5, q = -1.5;
    for (int r = 0; r < kRounds; ++r) {
        const long long before_i = a + 2 * b + 3 * c + 5 * d + 7 * e + 11 * g + 13 * h + 17 * k;
        const double before_f = x + 2 * y + 3 * z + 5 * u + 7 * v + 11 * w + 13 * p + 17 * q;
        unsigned char here;
        if (&here < f->stack || &here >= f->stack + kStack) fail("running off its own stack", f->id);
        if (!aligned_frame()) fail("a misaligned frame", f->id);
        yield_to_scheduler(f);
        if (g_current != f) fail("resumed as another fiber", f->id);
        if (a + 2 * b + 3 * c + 5 * d + 7 * e + 11 * g + 13 * h + 17 * k != before_i) fail("integers changed", f->id);
        if (x + 2 * y + 3 * z + 5 * u + 7 * v + 11 * w + 13 * p + 17 * q != before_f) fail("doubles changed", f->id);
        a += 1, b ^= r, c += a, d -= 1, e += b & 7, g += 2, h ^= 5, k += c & 3;
        x += 0.5, y *= 1.0001, z -= 0.25, u += y, v *= 0.999, w += 1, p -= 0.5, q += v;
        f->sum += a + k;
    }
    f->done = true;
    pa_fiber_switch(&f->sp, g_scheduler_sp);  // never resumed
    fail("a finished fiber was resumed", f->id);
    std::abort();
}

}  // namespace

int main() {
    std::vector<Fiber> fibers(kFibers);
    for (int i = 0; i < kFibers; ++i) {
        // Each stack 16-byte aligned with a 16-byte aligned top, as the runtime's are.
        fibers[i].stack = static_cast<unsigned char*>(std::aligned_alloc(16, kStack));
        fibers[i].id = i;
        fibers[i].sp = pa_fiber_init(fibers[i].stack + kStack, body, &fibers[i]);
    }
    long long own = 12345;  // the scheduler's own live values, across every switch
    double own_f = 0.75;
    long switches = 0;
    for (bool any = true; any;) {
        any = false;
        for (Fiber& f : fibers) {
            if (f.done) continue;
            any = true;
            g_current = &f;
            pa_fiber_switch(&g_scheduler_sp, f.sp);
            ++switches;
            if (own != 12345 + switches - 1 || own_f != 0.75 + 0.5 * double(switches - 1)) fail("the scheduler's values changed", -1);
            own += 1;
            own_f += 0.5;
        }
    }
    for (const Fiber& f : fibers) {
        long long expect = 0, a = f.id + 1, c = 11, k = 29, b = 3 * f.id + 7;
        for (int r = 0; r < kRounds; ++r) {  // the same recurrence without switches
            a += 1, b ^= r, c += a, k += c & 3;
            expect += a + k;
        }
        if (f.sum != expect) fail("a wrong result", f.id);
        std::free(f.stack);
    }
    if (g_failures) return 1;
    std::printf("ok %ld\n", switches);
    return 0;
}
#endif
