// Host emulation of the CUDA built-ins the kernels use (PARALLM_EMU only).
//
// A launch runs its blocks one after another, on the launching OS thread;
// within a block every CUDA thread is a fiber with its own stack, and the
// launcher runs them round-robin. A fiber runs until it waits
// at a barrier: __syncthreads is a barrier over the block, and warp shuffles
// exchange through per-warp slots between two barriers over the warp. A sweep
// in which no fiber arrives anywhere or finishes is a deadlock (threads
// waiting at different barriers) and fails the launch instead of hanging.
// __shared__ variables become function statics (one block runs at a time, so
// they are the block's shared memory). Block sizes must be whole warps.
// Numerics: f32 on the host; 16-bit conversions round to nearest even like
// the PTX cvt.rn instructions.
#pragma once
#include <math.h>
#include <ucontext.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef signed char i8;

struct dim3 {
    u32 x = 1, y = 1, z = 1;
};

// Fiber contexts. On x86-64 a switch saves the callee-saved registers on
// the old stack and pops them from the new one, with no system call (the
// kernels never change the FP control state, so MXCSR and the x87 control
// word are left alone); elsewhere ucontext does it, at the price of a
// sigprocmask call per switch.
#if defined(__x86_64__)
extern "C" void parallm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .pushsection .text
    .globl parallm_emu_switch
    .hidden parallm_emu_switch
    .type parallm_emu_switch, @function
parallm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size parallm_emu_switch, .-parallm_emu_switch
    .popsection
)");
struct EmuContext {
    void* sp = nullptr;
};
// A context that starts `entry` (which must never return) on the stack.
inline void emu_context_init(EmuContext& c, char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top) - 8;
    // r15, r14, r13, r12, rbx, rbp, then `ret` pops entry; the last slot
    // stands for the return address a call would have pushed, so entry
    // starts with the stack aligned as the ABI expects.
    for (int i = 0; i < 6; ++i) slot[i] = nullptr;
    slot[6] = reinterpret_cast<void*>(entry);
    slot[7] = nullptr;
    c.sp = slot;
}
inline void emu_context_switch(EmuContext& from, EmuContext& to) { parallm_emu_switch(&from.sp, to.sp); }
#else
struct EmuContext {
    ucontext_t uc;
};
inline void emu_context_init(EmuContext& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void emu_context_switch(EmuContext& from, EmuContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// The running fiber's state. Launches are serialized process-wide, so one
// set of globals serves every launch; the launcher sets threadIdx before it
// switches to a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline EmuContext emu_launcher;
inline EmuContext* emu_current = nullptr;
// Arrivals and finished fibers, for the launcher's deadlock check.
inline u64 emu_progress = 0;

// Back to the launcher; resumes at the next sweep.
inline void emu_yield() { emu_context_switch(*emu_current, emu_launcher); }

struct EmuBarrier {
    u32 n;
    u32 arrived = 0;
    u64 generation = 0;
    explicit EmuBarrier(u32 count) : n(count) {}
    void arrive_and_wait() {
        const u64 g = generation;
        ++emu_progress;
        if (++arrived == n) {
            arrived = 0;
            ++generation;
            return;
        }
        while (generation == g) emu_yield();
    }
};

struct EmuWarp {
    EmuBarrier bar{32};
    u32 slot[32];
};

struct EmuBlock {
    std::unique_ptr<EmuBarrier> bar;
    std::vector<std::unique_ptr<EmuWarp>> warps;
    std::vector<u8> dynamic_shared;
};

inline EmuBlock* emu_block = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define PARALLM_INFINITY INFINITY
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu_block->dynamic_shared.data())

inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }

inline u32 emu_lane() { return threadIdx.x & 31; }

template <class T>
inline T emu_exchange(T v, u32 src_lane) {
    static_assert(sizeof(T) == 4, "shuffles move 32-bit values");
    EmuWarp& w = *emu_block->warps[threadIdx.x >> 5];
    u32 bits;
    std::memcpy(&bits, &v, 4);
    w.slot[emu_lane()] = bits;
    w.bar.arrive_and_wait();
    bits = w.slot[src_lane & 31];
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &bits, 4);
    return r;
}
template <class T>
inline T __shfl_xor_sync(u32, T v, int mask) { return emu_exchange(v, emu_lane() ^ (u32)mask); }
template <class T>
inline T __shfl_sync(u32, T v, int src) { return emu_exchange(v, (u32)src); }
template <class T>
inline T __shfl_down_sync(u32, T v, u32 d) {
    u32 src = emu_lane() + d;
    return emu_exchange(v, src < 32 ? src : emu_lane());
}

inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
inline u32 __float_as_uint(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
template <class T>
inline T __ldg(const T* p) { return *p; }

inline float h2f(u16 h) { return (float)std::bit_cast<_Float16>(h); }
inline u16 f2h(float f) { return std::bit_cast<u16>((_Float16)f); }
inline float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
inline u16 f2bf(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}
