// Attention over the paged KV cache.
//
// Causal grouped-query attention: query head h reads KV head
// h / (n_heads / n_kv_heads); position p of a sequence sits in cache row
// (slot) table[p / block_size] · block_size + p % block_size, each row
// n_kv_heads · head_dim values. Scores are (q·scale)·k in f32, softmax in f32
// (online: running max m, sum l, accumulator rescaled as the max grows), the
// output rounded once to the 16-bit type.
//
// The prefill kernel runs 128 threads (4 warps) per block, the decode kernel
// 1 to ATTN_DEC_WARPS warps (the launch decides); both are templated on
// E = head_dim / 32 (1..8), the number of consecutive head elements each lane
// owns. Alignment: the caches and the output must be 8-byte aligned (device
// allocations are); queries are read element by element (any stride).

#define ATTN_WARPS 4
#define ATTN_DEC_WARPS 16
#define ATTN_MAX_D 256
#define ATTN_CHUNK 32
#define ATTN_TILE 16
#define ATTN_FULL 0xffffffffu

struct __align__(16) attn_f4 {
    float x, y, z, w;
};

// E consecutive 16-bit values at p as f32. p must be aligned to 8 bytes when
// E % 4 == 0, 4 bytes when E % 2 == 0.
template <class T, int E>
__device__ __forceinline__ void attn_load(const u16* __restrict__ p, float* f) {
    if constexpr (E % 4 == 0) {
#pragma unroll
        for (int i = 0; i < E / 4; ++i) {
            const u64 w = reinterpret_cast<const u64*>(p)[i];
            f[4 * i + 0] = T::load((u16)w);
            f[4 * i + 1] = T::load((u16)(w >> 16));
            f[4 * i + 2] = T::load((u16)(w >> 32));
            f[4 * i + 3] = T::load((u16)(w >> 48));
        }
    } else if constexpr (E % 2 == 0) {
#pragma unroll
        for (int i = 0; i < E / 2; ++i) {
            const u32 w = reinterpret_cast<const u32*>(p)[i];
            f[2 * i + 0] = T::load((u16)w);
            f[2 * i + 1] = T::load((u16)(w >> 16));
        }
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) f[i] = T::load(p[i]);
    }
}

__device__ __forceinline__ u32 attn_slot(const u32* __restrict__ table, u32 p, u32 block_size) {
    return table[p / block_size] * block_size + p % block_size;
}

// ---- decode ----
//
// Block (h, r): one query head of one row. Of the block's W warps
// (blockDim.x / 32, at most ATTN_DEC_WARPS), warp w takes the w-th of W
// contiguous spans of the positions 0..=pos[r] and walks it G positions at a
// time: the G key and value rows are loaded together (G·E values per lane in
// flight), G dot products reduced across the warp, then one online-softmax
// update for the group. The warps' (m, l, acc) are combined through shared
// memory. More warps shorten each warp's walk: the launch takes more when
// there are few blocks (small batches), so a row's positions are read by
// more of the device at once.

template <class T, int E>
__device__ __forceinline__ void attn_decode_impl(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                                 const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                                 const u32* __restrict__ table_start, const u32* __restrict__ pos,
                                                 u16* __restrict__ out, u32 q_stride, u32 n_heads, u32 n_kv_heads,
                                                 u32 block_size, float scale, float* sm_m, float* sm_l,
                                                 float* sm_f, float* sm_acc) {
    constexpr u32 D = 32 * E;
    constexpr u32 G = E <= 4 ? 8 : 4;
    const u32 h = blockIdx.x, r = blockIdx.y;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 kvh = h / (n_heads / n_kv_heads);
    const u64 kv_width = (u64)n_kv_heads * D;
    const u32* __restrict__ table = tables + table_start[r];
    const u32 n = pos[r] + 1;

    float qf[E], acc[E];
    const u16* qr = q + (u64)r * q_stride + (u64)h * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qf[e] = T::load(qr[e]) * scale;
        acc[e] = 0.0f;
    }
    float m = -PARALLM_INFINITY, l = 0.0f;

    const u32 warps = blockDim.x >> 5;
    const u32 span = ((n + warps - 1) / warps + G - 1) / G * G;
    const u32 beg = warp * span;
    const u32 end = beg + span < n ? beg + span : n;
    const u16* kb = k_cache + (u64)kvh * D + lane * E;
    const u16* vb = v_cache + (u64)kvh * D + lane * E;

    for (u32 base = beg; base < end; base += 32) {  // warp-uniform
        const u32 p = base + lane;
        const u32 my_slot = p < end ? attn_slot(table, p, block_size) : 0;
        for (u32 g = 0; g < 32 && base + g < end; g += G) {  // warp-uniform
            float kf[G][E], vf[G][E];
#pragma unroll
            for (u32 t = 0; t < G; ++t) {
                const u64 slot = __shfl_sync(ATTN_FULL, my_slot, g + t);
                if (base + g + t < end) {
                    attn_load<T, E>(kb + slot * kv_width, kf[t]);
                    attn_load<T, E>(vb + slot * kv_width, vf[t]);
                } else {
#pragma unroll
                    for (int e = 0; e < E; ++e) kf[t][e] = vf[t][e] = 0.0f;
                }
            }
            float s[G];
#pragma unroll
            for (u32 t = 0; t < G; ++t) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < E; ++e) d += qf[e] * kf[t][e];
                s[t] = d;
            }
#pragma unroll
            for (u32 t = 0; t < G; ++t) s[t] = warp_sum(s[t]);
            float gm = -PARALLM_INFINITY;
#pragma unroll
            for (u32 t = 0; t < G; ++t) {
                if (base + g + t >= end) s[t] = -PARALLM_INFINITY;
                gm = fmaxf(gm, s[t]);
            }
            const float mn = fmaxf(m, gm);  // finite: the group has a position
            const float alpha = __expf(m - mn);
            l *= alpha;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
            for (u32 t = 0; t < G; ++t) {
                const float pt = __expf(s[t] - mn);
                l += pt;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[e] += pt * vf[t][e];
            }
            m = mn;
        }
    }

    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp * D + lane * E + e] = acc[e];
    __syncthreads();
    float mm = -PARALLM_INFINITY;
    for (u32 w = 0; w < warps; ++w) mm = fmaxf(mm, sm_m[w]);  // warp 0 is never empty
    // Each warp's weight, once per block (an empty warp's is 0).
    if (threadIdx.x < warps) sm_f[threadIdx.x] = __expf(sm_m[threadIdx.x] - mm);
    __syncthreads();
    float sum = 0.0f;
    for (u32 w = 0; w < warps; ++w) sum += sm_l[w] * sm_f[w];
    const float inv = 1.0f / sum;
    u16* o = out + (u64)r * n_heads * D + (u64)h * D;
    for (u32 d = threadIdx.x; d < D; d += blockDim.x) {
        float v = 0.0f;
        for (u32 w = 0; w < warps; ++w) v += sm_acc[w * D + d] * sm_f[w];
        o[d] = T::store(v * inv);
    }
}

template <class T>
__device__ __forceinline__ void attn_decode(const u16* q, const u16* k_cache, const u16* v_cache,
                                            const u32* tables, const u32* table_start, const u32* pos, u16* out,
                                            u32 q_stride, u32 n_heads, u32 n_kv_heads, u32 head_dim,
                                            u32 block_size, float scale) {
    __shared__ float sm_m[ATTN_DEC_WARPS], sm_l[ATTN_DEC_WARPS], sm_f[ATTN_DEC_WARPS];
    __shared__ float sm_acc[ATTN_DEC_WARPS * ATTN_MAX_D];
#define ATTN_DECODE_CASE(E)                                                                                   \
    case E:                                                                                                   \
        attn_decode_impl<T, E>(q, k_cache, v_cache, tables, table_start, pos, out, q_stride, n_heads,        \
                               n_kv_heads, block_size, scale, sm_m, sm_l, sm_f, sm_acc);                      \
        break;
    switch (head_dim / 32) {
        ATTN_DECODE_CASE(1)
        ATTN_DECODE_CASE(2)
        ATTN_DECODE_CASE(3)
        ATTN_DECODE_CASE(4)
        ATTN_DECODE_CASE(5)
        ATTN_DECODE_CASE(6)
        ATTN_DECODE_CASE(7)
        ATTN_DECODE_CASE(8)
        default:
            break;
    }
#undef ATTN_DECODE_CASE
}

extern "C" __global__ void attn_decode_f16(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                           const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                           const u32* __restrict__ table_start, const u32* __restrict__ pos,
                                           u16* __restrict__ out, u32 rows, u32 q_stride, u32 n_heads,
                                           u32 n_kv_heads, u32 head_dim, u32 block_size, float scale) {
    attn_decode<F16>(q, k_cache, v_cache, tables, table_start, pos, out, q_stride, n_heads, n_kv_heads, head_dim,
                     block_size, scale);
}

extern "C" __global__ void attn_decode_bf16(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                            const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                            const u32* __restrict__ table_start, const u32* __restrict__ pos,
                                            u16* __restrict__ out, u32 rows, u32 q_stride, u32 n_heads,
                                            u32 n_kv_heads, u32 head_dim, u32 block_size, float scale) {
    attn_decode<BF16>(q, k_cache, v_cache, tables, table_start, pos, out, q_stride, n_heads, n_kv_heads, head_dim,
                      block_size, scale);
}

// ---- prefill ----
//
// Block (h, tile): one query head of one tile of up to 16 rows at
// consecutive positions. Row i of the tile is handled by warp i % 4 (so the
// four warps share the causal work evenly). The tile's queries sit in shared
// memory as f32 (pre-scaled). Keys, then values, of 32 positions at a time
// are staged in one shared buffer that all rows use, so each key and value
// row is read from global memory once per tile:
//   scores: lane j computes the dot products of position j with the warp's
//           4 rows (keys read conflict-free thanks to the row padding),
//           then one online-softmax update per row (warp max; the sum l is
//           kept per lane and reduced at the end); the weights go to shared;
//   values: lane owns E head elements and accumulates weight · value over
//           the 32 positions for its 4 rows.
// The next chunk's keys (and this chunk's values) are loaded into registers
// while the current phase computes.
//
// Shared memory: 16·256·4 (queries) + 32·260·2 (keys/values) + 4·32·4·4
// (weights) = 35,072 bytes, static.

// Chunk staging: thread t holds words t + 128·x (x < 2E) of the chunk's
// 32 × D/4 eight-byte words; word w is position w / (D/4), column w % (D/4).
template <int E>
__device__ __forceinline__ void attn_chunk_load(u64* reg, const u16* __restrict__ cache, const u32* __restrict__ table,
                                                u32 c0, u32 n_pos, u32 block_size, u64 kv_width, u32 kvh) {
    constexpr u32 D = 32 * E, WPR = D / 4;
#pragma unroll
    for (int x = 0; x < 2 * E; ++x) {
        const u32 w = threadIdx.x + 128 * x;
        const u32 p = c0 + w / WPR;
        reg[x] = 0;
        if (p < n_pos) {
            const u64 slot = attn_slot(table, p, block_size);
            reg[x] = *reinterpret_cast<const u64*>(cache + slot * kv_width + (u64)kvh * D + (w % WPR) * 4);
        }
    }
}

template <int E>
__device__ __forceinline__ void attn_chunk_store(const u64* reg, u16* skv) {
    constexpr u32 D = 32 * E, WPR = D / 4, KS = D + 4;
#pragma unroll
    for (int x = 0; x < 2 * E; ++x) {
        const u32 w = threadIdx.x + 128 * x;
        *reinterpret_cast<u64*>(skv + (w / WPR) * KS + (w % WPR) * 4) = reg[x];
    }
}

template <class T, int E>
__device__ __forceinline__ void attn_prefill_impl(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                                  const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                                  const u32* __restrict__ tiles, u16* __restrict__ out, u32 q_stride,
                                                  u32 n_heads, u32 n_kv_heads, u32 block_size, float scale, float* sq,
                                                  u16* skv, float* sp) {
    constexpr u32 D = 32 * E, KS = D + 4, R = ATTN_TILE / ATTN_WARPS;
    const u32* tile = tiles + 4 * (u64)blockIdx.y;
    const u32 first_row = tile[0], n_rows = tile[1], first_pos = tile[3];
    const u32* __restrict__ table = tables + tile[2];
    const u32 h = blockIdx.x;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 kvh = h / (n_heads / n_kv_heads);
    const u64 kv_width = (u64)n_kv_heads * D;
    const u32 n_pos = first_pos + n_rows;  // positions 0..n_pos are read

    for (u32 x = threadIdx.x; x < ATTN_TILE * D; x += blockDim.x) {
        const u32 i = x / D, d = x % D;
        sq[x] = i < n_rows ? T::load(q[(u64)(first_row + i) * q_stride + (u64)h * D + d]) * scale : 0.0f;
    }

    float acc[R][E], m[R], l[R];
#pragma unroll
    for (u32 s = 0; s < R; ++s) {
        m[s] = -PARALLM_INFINITY;
        l[s] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[s][e] = 0.0f;
    }

    u64 reg[2 * E];
    attn_chunk_load<E>(reg, k_cache, table, 0, n_pos, block_size, kv_width, kvh);

    for (u32 c0 = 0; c0 < n_pos; c0 += ATTN_CHUNK) {
        const u32 cnt = n_pos - c0 < ATTN_CHUNK ? n_pos - c0 : ATTN_CHUNK;
        attn_chunk_store<E>(reg, skv);
        attn_chunk_load<E>(reg, v_cache, table, c0, n_pos, block_size, kv_width, kvh);
        __syncthreads();

        // Scores: lane j is position c0 + j.
        const u32 p = c0 + lane;
        float dot[R];
#pragma unroll
        for (u32 s = 0; s < R; ++s) dot[s] = 0.0f;
        if (warp < n_rows) {  // warp-uniform
            const u16* krow = skv + lane * KS;
#pragma unroll 4
            for (u32 c = 0; c < D / 4; ++c) {
                const u64 w = *reinterpret_cast<const u64*>(krow + 4 * c);
                const float k0 = T::load((u16)w), k1 = T::load((u16)(w >> 16));
                const float k2 = T::load((u16)(w >> 32)), k3 = T::load((u16)(w >> 48));
#pragma unroll
                for (u32 s = 0; s < R; ++s) {
                    const attn_f4 qq = *reinterpret_cast<const attn_f4*>(sq + (warp + ATTN_WARPS * s) * D + 4 * c);
                    dot[s] += qq.x * k0 + qq.y * k1 + qq.z * k2 + qq.w * k3;
                }
            }
        }
#pragma unroll
        for (u32 s = 0; s < R; ++s) {
            const u32 i = warp + ATTN_WARPS * s;
            float pj = 0.0f;
            if (i < n_rows) {  // warp-uniform
                const float sc = lane < cnt && p <= first_pos + i ? dot[s] : -PARALLM_INFINITY;
                // Chunk 0 holds position 0, so m is finite from then on.
                const float mn = fmaxf(m[s], warp_max(sc));
                const float alpha = __expf(m[s] - mn);
                pj = __expf(sc - mn);
                l[s] = l[s] * alpha + pj;
                m[s] = mn;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[s][e] *= alpha;
            }
            sp[(warp * ATTN_CHUNK + lane) * R + s] = pj;
        }
        __syncthreads();

        attn_chunk_store<E>(reg, skv);
        if (c0 + ATTN_CHUNK < n_pos)
            attn_chunk_load<E>(reg, k_cache, table, c0 + ATTN_CHUNK, n_pos, block_size, kv_width, kvh);
        __syncthreads();

        // Values: lane owns elements lane·E .. lane·E + E.
        if (warp < n_rows) {  // warp-uniform
            for (u32 j = 0; j < cnt; ++j) {
                const attn_f4 pw = *reinterpret_cast<const attn_f4*>(sp + (warp * ATTN_CHUNK + j) * R);
                float v[E];
                attn_load<T, E>(skv + j * KS + lane * E, v);
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    acc[0][e] += pw.x * v[e];
                    acc[1][e] += pw.y * v[e];
                    acc[2][e] += pw.z * v[e];
                    acc[3][e] += pw.w * v[e];
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (u32 s = 0; s < R; ++s) {
        const u32 i = warp + ATTN_WARPS * s;
        if (i < n_rows) {  // warp-uniform
            const float inv = 1.0f / warp_sum(l[s]);
            u16* o = out + (u64)(first_row + i) * n_heads * D + (u64)h * D + lane * E;
#pragma unroll
            for (int e = 0; e < E; ++e) o[e] = T::store(acc[s][e] * inv);
        }
    }
}

template <class T>
__device__ __forceinline__ void attn_prefill(const u16* q, const u16* k_cache, const u16* v_cache, const u32* tables,
                                             const u32* tiles, u16* out, u32 q_stride, u32 n_heads, u32 n_kv_heads,
                                             u32 head_dim, u32 block_size, float scale) {
    __shared__ __align__(16) float sq[ATTN_TILE * ATTN_MAX_D];
    __shared__ __align__(16) u16 skv[ATTN_CHUNK * (ATTN_MAX_D + 4)];
    __shared__ __align__(16) float sp[ATTN_WARPS * ATTN_CHUNK * (ATTN_TILE / ATTN_WARPS)];
#define ATTN_PREFILL_CASE(E)                                                                                  \
    case E:                                                                                                   \
        attn_prefill_impl<T, E>(q, k_cache, v_cache, tables, tiles, out, q_stride, n_heads, n_kv_heads,      \
                                block_size, scale, sq, skv, sp);                                              \
        break;
    switch (head_dim / 32) {
        ATTN_PREFILL_CASE(1)
        ATTN_PREFILL_CASE(2)
        ATTN_PREFILL_CASE(3)
        ATTN_PREFILL_CASE(4)
        ATTN_PREFILL_CASE(5)
        ATTN_PREFILL_CASE(6)
        ATTN_PREFILL_CASE(7)
        ATTN_PREFILL_CASE(8)
        default:
            break;
    }
#undef ATTN_PREFILL_CASE
}

// Launch bounds (declared ahead so that the definitions keep the plain form
// the kernel list is read from): at most 128 registers, so that 4 blocks
// (16 warps) fit on an SM whatever head_dim the instantiations cover.
extern "C" __global__ __launch_bounds__(128, 4) void attn_prefill_f16(
    const u16* __restrict__ q, const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
    const u32* __restrict__ tables, const u32* __restrict__ tiles, u16* __restrict__ out, u32 n_tiles, u32 q_stride,
    u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 block_size, float scale);
extern "C" __global__ __launch_bounds__(128, 4) void attn_prefill_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
    const u32* __restrict__ tables, const u32* __restrict__ tiles, u16* __restrict__ out, u32 n_tiles, u32 q_stride,
    u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 block_size, float scale);

extern "C" __global__ void attn_prefill_f16(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                            const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                            const u32* __restrict__ tiles, u16* __restrict__ out, u32 n_tiles,
                                            u32 q_stride, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 block_size,
                                            float scale) {
    attn_prefill<F16>(q, k_cache, v_cache, tables, tiles, out, q_stride, n_heads, n_kv_heads, head_dim, block_size,
                      scale);
}

extern "C" __global__ void attn_prefill_bf16(const u16* __restrict__ q, const u16* __restrict__ k_cache,
                                             const u16* __restrict__ v_cache, const u32* __restrict__ tables,
                                             const u32* __restrict__ tiles, u16* __restrict__ out, u32 n_tiles,
                                             u32 q_stride, u32 n_heads, u32 n_kv_heads, u32 head_dim,
                                             u32 block_size, float scale) {
    attn_prefill<BF16>(q, k_cache, v_cache, tables, tiles, out, q_stride, n_heads, n_kv_heads, head_dim,
                       block_size, scale);
}
