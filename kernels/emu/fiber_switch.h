// The emulator's own fiber switch, for x86-64 (System V) and AArch64: a function call that returns on another
// stack. Include it in exactly one translation unit (emu/runtime.cpp; tests/emu/fiber_switch_test.cpp, which
// also runs under qemu for the other architecture).
//
//   pa_fiber_switch(&from_sp, to_sp)  pushes the callee-saved registers onto the current stack, stores the stack pointer in from_sp, loads to_sp
//                                     and pops what the other side pushed, then returns there.
//   pa_fiber_init(top, entry, arg)    lays out a new stack (top: 16-byte aligned, one past its highest byte) as
//                                     if it had switched out just before running pa_fiber_start, which calls
//                                     entry(arg); returns the stack pointer to switch to. entry never returns.
//
// Why not ucontext: swapcontext saves and restores the signal mask with a system call on every switch, about
// 20x the cost of the few instructions here; the emulator switches at every barrier and warp collective.
// Why not Boost.Context: the same technique, but a dependency a fresh machine lacks (and the device machine).
// Only what the ABI says a call preserves is saved: the caller-saved registers are dead across a call anyway.
// The floating-point control state (MXCSR and the x87 control word, FPCR) is not: it belongs to the worker
// thread, and no emulated code changes it (nothing in kernels/ sets a rounding or flush mode), so every fiber
// of a worker runs with the same modes; restoring them (ldmxcsr, fldcw) would cost more than the rest.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__aarch64__)
#define PA_EMU_OWN_SWITCH 1

extern "C" void pa_fiber_switch(void** from_sp, void* to_sp);
extern "C" void pa_fiber_start();

#if defined(__x86_64__)
// Frame, from the saved stack pointer up: r15 r14 r13 r12 rbx rbp and the return address. At entry rsp = 8 mod
// 16 (the call pushed the return address), so the saved pointer is 8 mod 16 too, and after the pops rsp is
// 16-byte aligned, which is what pa_fiber_start's call needs. The return goes through popq + jmpq, not ret: a
// ret to another stack's caller would mispredict, and leave the return-stack predictor off by one for every
// ret after it (measured: the textbook GEMM 25 % slower per worker with ret).
__asm__(
    ".pushsection .text\n"
    ".globl pa_fiber_switch\n"
    ".hidden pa_fiber_switch\n"
    ".type pa_fiber_switch,@function\n"
    ".p2align 4\n"
    "pa_fiber_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    popq %rcx\n"
    "    jmpq *%rcx\n"
    ".size pa_fiber_switch, .-pa_fiber_switch\n"
    // A new fiber's first switch returns here, with rsp 16-byte aligned: entry in r13, its argument in r12.
    ".globl pa_fiber_start\n"
    ".hidden pa_fiber_start\n"
    ".type pa_fiber_start,@function\n"
    ".p2align 4\n"
    "pa_fiber_start:\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"  // entry returned: it must switch away for good instead
    ".size pa_fiber_start, .-pa_fiber_start\n"
    ".popsection\n");

inline void* pa_fiber_init(unsigned char* top, void (*entry)(void*), void* arg) {
    // 16 bytes of zeros at the top stand for the caller of pa_fiber_start (an unwinder stops there).
    auto* sp = reinterpret_cast<uint64_t*>(top) - 2 - 7;
    std::memset(sp, 0, 9 * sizeof(uint64_t));
    sp[2] = reinterpret_cast<uint64_t>(entry);  // r13
    sp[3] = reinterpret_cast<uint64_t>(arg);    // r12
    sp[6] = reinterpret_cast<uint64_t>(&pa_fiber_start);  // the return address; rbp (sp[5]) 0 ends the chain
    return sp;
}
#else  // __aarch64__
// Frame (160 bytes, from the saved sp up): x19-x28, x29 (frame pointer), x30 (link register: where ret goes),
// d8-d15 (the low halves of v8-v15 are callee-saved).
__asm__(
    ".pushsection .text\n"
    ".globl pa_fiber_switch\n"
    ".hidden pa_fiber_switch\n"
    ".type pa_fiber_switch,%function\n"
    ".p2align 4\n"
    "pa_fiber_switch:\n"
    "    sub sp, sp, #160\n"
    "    stp x19, x20, [sp, #0]\n"
    "    stp x21, x22, [sp, #16]\n"
    "    stp x23, x24, [sp, #32]\n"
    "    stp x25, x26, [sp, #48]\n"
    "    stp x27, x28, [sp, #64]\n"
    "    stp x29, x30, [sp, #80]\n"
    "    stp d8, d9, [sp, #96]\n"
    "    stp d10, d11, [sp, #112]\n"
    "    stp d12, d13, [sp, #128]\n"
    "    stp d14, d15, [sp, #144]\n"
    "    mov x9, sp\n"
    "    str x9, [x0]\n"
    "    mov sp, x1\n"
    "    ldp x19, x20, [sp, #0]\n"
    "    ldp x21, x22, [sp, #16]\n"
    "    ldp x23, x24, [sp, #32]\n"
    "    ldp x25, x26, [sp, #48]\n"
    "    ldp x27, x28, [sp, #64]\n"
    "    ldp x29, x30, [sp, #80]\n"
    "    ldp d8, d9, [sp, #96]\n"
    "    ldp d10, d11, [sp, #112]\n"
    "    ldp d12, d13, [sp, #128]\n"
    "    ldp d14, d15, [sp, #144]\n"
    "    add sp, sp, #160\n"
    "    ret\n"
    ".size pa_fiber_switch, .-pa_fiber_switch\n"
    // A new fiber's first switch returns here: entry in x20, its argument in x19.
    ".globl pa_fiber_start\n"
    ".hidden pa_fiber_start\n"
    ".type pa_fiber_start,%function\n"
    ".p2align 4\n"
    "pa_fiber_start:\n"
    "    mov x0, x19\n"
    "    blr x20\n"
    "    brk #0\n"  // entry returned: it must switch away for good instead
    ".size pa_fiber_start, .-pa_fiber_start\n"
    ".popsection\n");

inline void* pa_fiber_init(unsigned char* top, void (*entry)(void*), void* arg) {
    auto* sp = reinterpret_cast<uint64_t*>(top) - 20;
    std::memset(sp, 0, 20 * sizeof(uint64_t));
    sp[0] = reinterpret_cast<uint64_t>(arg);    // x19
    sp[1] = reinterpret_cast<uint64_t>(entry);  // x20
    sp[11] = reinterpret_cast<uint64_t>(&pa_fiber_start);  // x30; x29 (sp[10]) 0 ends the frame chain
    return sp;
}
#endif
#endif
