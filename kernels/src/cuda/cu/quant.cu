// GGUF block formats: dequantization and quantized matrix-vector products.
//
// Block layouts (GGML): Q4_0 = f16 d, 16 bytes qs, weight j = d·(nibble − 8)
// (j < 16: low nibble of qs[j]; j ≥ 16: high nibble of qs[j − 16]); Q4_1 =
// f16 d, f16 m, 16 bytes qs, weight = d·nibble + m; Q8_0 = f16 d, 32 × i8,
// weight = d·q. Blocks are only 2-byte aligned (18 and 34 bytes), so fields
// are read with 16-bit loads where the base address allows it, bytes
// otherwise. d·q is exact in f32 (11 × 8 significant bits), so a dequantized
// weight is rounded once at most (Q4_1's + m), whether or not the compiler
// fuses it, and dequantization is bit-exact against the CPU's. qmv keeps Q4_0's
// and Q8_0's scale out of the inner sums (d·Σ q·x per part of a block).

// Little-endian 16/32-bit reads at p: single loads when A (p is aligned for
// them), byte loads otherwise.
template <bool A>
__device__ __forceinline__ u32 qk_ld16(const u8* __restrict__ p) {
    if constexpr (A) return *reinterpret_cast<const u16*>(p);
    else return (u32)p[0] | ((u32)p[1] << 8);
}
template <bool A>
__device__ __forceinline__ u32 qk_ld32(const u8* __restrict__ p) {
    if constexpr (A) return *reinterpret_cast<const u32*>(p);
    else return qk_ld16<false>(p) | (qk_ld16<false>(p + 2) << 16);
}

struct __align__(8) qk_u32x2 {
    u32 a, b;
};

// Four consecutive activations at p as f32: one 8-byte load when A (p is
// 8-byte aligned), four 16-bit loads otherwise.
template <class T, bool A>
__device__ __forceinline__ void qk_x4(const u16* __restrict__ p, float* v) {
    if constexpr (A) {
        const qk_u32x2 q = *reinterpret_cast<const qk_u32x2*>(p);
        v[0] = T::load((u16)(q.a & 0xffffu));
        v[1] = T::load((u16)(q.a >> 16));
        v[2] = T::load((u16)(q.b & 0xffffu));
        v[3] = T::load((u16)(q.b >> 16));
    } else {
        for (int i = 0; i < 4; ++i) v[i] = T::load(p[i]);
    }
}

// Exact small integers as floats without an int-to-float conversion (a
// quarter-rate instruction): the bits 0x4B000000 | v are the float 2^23 + v
// for v < 2^23, so subtracting 2^23 + c leaves v − c exactly.
__device__ __forceinline__ float qk_int(u32 v, float two23_plus_c) { return __uint_as_float(0x4B000000u | v) - two23_plus_c; }
#define QK_2P23 8388608.0f

// Each format: BYTES per block; weight(blk, j), weight j of a block (for
// dequantization); part<A>(blk, p, w), which decodes the 8 weights of part p
// (0..3) of a block for qmv: w[i]·scale is weight i, for the positions
// [X1·p, X1·p + 4) then [X1·p + X2, X1·p + X2 + 4) of the block, and the
// scale is returned (Q4_1's weights come scaled, scale 1). A: blk is 4-byte
// aligned modulo the block size (the matrix base is 4-byte aligned), so
// fields may be loaded whole.
struct QkQ4_0 {
    static constexpr u32 BYTES = 18, X1 = 4, X2 = 16;
    static __device__ __forceinline__ float weight(const u8* __restrict__ blk, u32 j) {
        const u32 q = blk[2 + (j & 15)];
        return h2f((u16)qk_ld16<false>(blk)) * (float)((int)((j < 16 ? q : q >> 4) & 15) - 8);
    }
    template <bool A>
    static __device__ __forceinline__ float part(const u8* __restrict__ blk, u32 p, float* w) {
        const u32 q = qk_ld16<A>(blk + 2 + 4 * p) | (qk_ld16<A>(blk + 4 + 4 * p) << 16);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[i] = qk_int((q >> (8 * i)) & 15u, QK_2P23 + 8.0f);
            w[4 + i] = qk_int((q >> (8 * i + 4)) & 15u, QK_2P23 + 8.0f);
        }
        return h2f((u16)qk_ld16<A>(blk));
    }
};
struct QkQ4_1 {
    static constexpr u32 BYTES = 20, X1 = 4, X2 = 16;
    static __device__ __forceinline__ float weight(const u8* __restrict__ blk, u32 j) {
        const u32 q = blk[4 + (j & 15)];
        const float d = h2f((u16)qk_ld16<false>(blk)), m = h2f((u16)qk_ld16<false>(blk + 2));
        return d * (float)((j < 16 ? q : q >> 4) & 15) + m;
    }
    template <bool A>
    static __device__ __forceinline__ float part(const u8* __restrict__ blk, u32 p, float* w) {
        const u32 dm = qk_ld32<A>(blk), q = qk_ld32<A>(blk + 4 + 4 * p);
        const float d = h2f((u16)(dm & 0xffffu)), m = h2f((u16)(dm >> 16));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[i] = d * qk_int((q >> (8 * i)) & 15u, QK_2P23) + m;
            w[4 + i] = d * qk_int((q >> (8 * i + 4)) & 15u, QK_2P23) + m;
        }
        return 1.0f;
    }
};
struct QkQ8_0 {
    static constexpr u32 BYTES = 34, X1 = 8, X2 = 4;
    static __device__ __forceinline__ float weight(const u8* __restrict__ blk, u32 j) {
        return h2f((u16)qk_ld16<false>(blk)) * (float)(i8)blk[2 + j];
    }
    // A signed byte b: (b ^ 0x80) = b + 128 as an unsigned byte.
    template <bool A>
    static __device__ __forceinline__ float part(const u8* __restrict__ blk, u32 p, float* w) {
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const u32 q = qk_ld16<A>(blk + 2 + 8 * p + 2 * h) ^ 0x8080u;
            w[2 * h] = qk_int(q & 0xffu, QK_2P23 + 128.0f);
            w[2 * h + 1] = qk_int(q >> 8, QK_2P23 + 128.0f);
        }
        return h2f((u16)qk_ld16<A>(blk));
    }
};

// ---- dequant: one warp per block, lane j writes weight j (coalesced).
template <class T, class Q>
__device__ __forceinline__ void dequant_impl(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    const u32 lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (u64 b = (u64)blockIdx.x * warps + (threadIdx.x >> 5); b < n_blocks; b += (u64)gridDim.x * warps)
        out[b * 32 + lane] = T::store(Q::weight(blocks + b * Q::BYTES, lane));
}

extern "C" __global__ void dequant_q4_0_f16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<F16, QkQ4_0>(blocks, out, n_blocks);
}
extern "C" __global__ void dequant_q4_0_bf16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<BF16, QkQ4_0>(blocks, out, n_blocks);
}
extern "C" __global__ void dequant_q4_1_f16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<F16, QkQ4_1>(blocks, out, n_blocks);
}
extern "C" __global__ void dequant_q4_1_bf16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<BF16, QkQ4_1>(blocks, out, n_blocks);
}
extern "C" __global__ void dequant_q8_0_f16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<F16, QkQ8_0>(blocks, out, n_blocks);
}
extern "C" __global__ void dequant_q8_0_bf16(const u8* __restrict__ blocks, u16* __restrict__ out, u64 n_blocks) {
    dequant_impl<BF16, QkQ8_0>(blocks, out, n_blocks);
}

// ---- qmv: y[j][row] = Σ_i x[j][i]·W[row][i] for the m ≤ 8 activation rows.
// One warp per weight row. The warp walks the row 32 blocks at a time: lane
// (4s + p) takes part p of blocks b0 + s, b0 + 8 + s, b0 + 16 + s,
// b0 + 24 + s, so each load instruction of the warp reads 8 consecutive
// blocks and their activations contiguously, and each lane has four blocks'
// loads in flight. The weights are decoded once for all m rows; each row's
// sum runs in an order independent of m (a row's result does not depend on
// the batch). A: the fast path's alignment (W 4-byte, x 8-byte aligned and
// x_stride a multiple of 4), chosen at run time.
template <class T, class Q, bool A>
__device__ __forceinline__ void qmv_rows(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                         u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    const u32 lane = threadIdx.x & 31, row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // Warp-uniform: a warp past the last row takes no part in any shuffle, and
    // the kernel has no block barrier.
    if (row < n) {
        const u32 nb = k / 32, s = lane >> 2, p = lane & 3;
        const u8* wr = w + (u64)row * nb * Q::BYTES;
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        for (u32 b0 = 0; b0 < nb; b0 += 32) {
            float wv[4][8], dv[4];
#pragma unroll
            for (u32 u = 0; u < 4; ++u) {
                const u32 b = b0 + 8 * u + s;
                if (b < nb) dv[u] = Q::template part<A>(wr + (u64)b * Q::BYTES, p, wv[u]);
            }
#pragma unroll
            for (u32 j = 0; j < 8; ++j) {
                if (j < m) {
                    const u16* xr = x + (u64)j * x_stride + Q::X1 * p;
#pragma unroll
                    for (u32 u = 0; u < 4; ++u) {
                        const u32 b = b0 + 8 * u + s;
                        if (b < nb) {
                            float xv[8];
                            qk_x4<T, A>(xr + 32 * b, xv);
                            qk_x4<T, A>(xr + 32 * b + Q::X2, xv + 4);
                            float d = 0.0f;
#pragma unroll
                            for (int i = 0; i < 8; ++i) d += wv[u][i] * xv[i];
                            acc[j] += dv[u] * d;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (u32 j = 0; j < 8; ++j) {
            if (j < m) {  // m is uniform: all 32 lanes shuffle
                const float sum = warp_sum(acc[j]);
                if (lane == j) {
                    const u64 at = (u64)j * n + row;
                    if (y_f32)
                        static_cast<float*>(y)[at] = sum;
                    else
                        static_cast<u16*>(y)[at] = T::store(sum);
                }
            }
        }
    }
}

template <class T, class Q>
__device__ __forceinline__ void qmv_impl(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                         u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    if (((u64)w & 3) == 0 && ((u64)x & 7) == 0 && x_stride % 4 == 0)
        qmv_rows<T, Q, true>(w, x, y, n, k, m, x_stride, y_f32);
    else
        qmv_rows<T, Q, false>(w, x, y, n, k, m, x_stride, y_f32);
}

extern "C" __global__ void qmv_q4_0_f16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<F16, QkQ4_0>(w, x, y, n, k, m, x_stride, y_f32);
}
extern "C" __global__ void qmv_q4_0_bf16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<BF16, QkQ4_0>(w, x, y, n, k, m, x_stride, y_f32);
}
extern "C" __global__ void qmv_q4_1_f16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<F16, QkQ4_1>(w, x, y, n, k, m, x_stride, y_f32);
}
extern "C" __global__ void qmv_q4_1_bf16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<BF16, QkQ4_1>(w, x, y, n, k, m, x_stride, y_f32);
}
extern "C" __global__ void qmv_q8_0_f16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<F16, QkQ8_0>(w, x, y, n, k, m, x_stride, y_f32);
}
extern "C" __global__ void qmv_q8_0_bf16(const u8* __restrict__ w, const u16* __restrict__ x, void* __restrict__ y,
                                       u32 n, u32 k, u32 m, u32 x_stride, u32 y_f32) {
    qmv_impl<BF16, QkQ8_0>(w, x, y, n, k, m, x_stride, y_f32);
}
