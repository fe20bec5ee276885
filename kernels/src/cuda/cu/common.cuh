// parallm CUDA kernels: shared prelude.
//
// The program includes no headers (NVRTC needs no toolkit beside it). 16-bit
// values are stored as `u16` and converted with PTX instructions; kernels load
// through a type tag (`F16` or `BF16`) and compute in f32. With PARALLM_EMU
// defined, the host emulation (emu.h) supplies the CUDA built-ins instead.

#ifdef PARALLM_EMU
#include "emu.h"
#else
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef signed char i8;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#define PARALLM_INFINITY __int_as_float(0x7f800000)
#define DYNAMIC_SHARED(type, name)                         \
    extern __shared__ __align__(16) u8 parallm_smem_raw[]; \
    type* name = reinterpret_cast<type*>(parallm_smem_raw)
#endif

// Type tags: how a 16-bit element is read and written.
struct F16 {
    static __device__ __forceinline__ float load(u16 v) { return h2f(v); }
    static __device__ __forceinline__ u16 store(float v) { return f2h(v); }
};
struct BF16 {
    static __device__ __forceinline__ float load(u16 v) { return bf2f(v); }
    static __device__ __forceinline__ u16 store(float v) { return f2bf(v); }
};

// Sum over the 32 lanes of a warp; every lane gets the result. All 32 lanes
// must call it.
__device__ __forceinline__ float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024);
// every thread gets the result. `scratch` is 32 floats of shared memory. All
// threads must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : -PARALLM_INFINITY;
    return warp_max(t);
}
