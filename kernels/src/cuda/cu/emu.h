// Host emulation of the CUDA built-ins the kernels use (PARALLM_EMU only).
//
// A launch runs its blocks one after another; within a block every CUDA
// thread is an OS thread. __syncthreads is a barrier over the block, warp
// shuffles exchange through per-warp slots between two barriers over the
// warp, and __shared__ variables become function statics (one block runs at
// a time, so they are the block's shared memory). Block sizes must be whole
// warps. Numerics: f32 on the host; 16-bit conversions round to nearest even
// like the PTX cvt.rn instructions.
#pragma once
#include <math.h>

#include <barrier>
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

struct EmuWarp {
    std::barrier<> bar{32};
    u32 slot[32];
};

struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<EmuWarp>> warps;
    std::vector<u8> dynamic_shared;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local EmuBlock* emu_block = nullptr;

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
