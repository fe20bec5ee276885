// Element-wise kernels.

extern "C" __global__ void add_f32(float* __restrict__ dst, const float* __restrict__ src, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x * 4 + threadIdx.x; i < n && i < ((u64)blockIdx.x + 1) * blockDim.x * 4; i += blockDim.x)
        dst[i] += src[i];
}

// Vector types for 8- and 16-byte accesses, used only where the addresses
// were checked to be aligned (ew_aligned).
struct __align__(16) ew_f32x4 {
    float a, b, c, d;
};
struct __align__(16) ew_u32x4 {
    u32 a, b, c, d;
};
struct __align__(8) ew_u32x2 {
    u32 a, b;
};

__device__ __forceinline__ bool ew_aligned(const void* p, u32 bytes) { return ((u64)p & (bytes - 1)) == 0; }

// Two packed 16-bit values (low half first) as floats, and back.
template <class T>
__device__ __forceinline__ float ew_lo(u32 v) { return T::load((u16)(v & 0xffffu)); }
template <class T>
__device__ __forceinline__ float ew_hi(u32 v) { return T::load((u16)(v >> 16)); }
template <class T>
__device__ __forceinline__ u32 ew_pack(float lo, float hi) { return (u32)T::store(lo) | ((u32)T::store(hi) << 16); }

// ---- embed: out[r] = table[tokens[r] - vocab_start] (f32), zero rows for
// tokens outside the shard. One block per row.
template <class T>
__device__ __forceinline__ void embed_impl(const u16* __restrict__ table, const u32* __restrict__ tokens,
                                           float* __restrict__ out, u32 rows, u32 hidden, u32 vocab_start,
                                           u32 vocab_len) {
    const bool vec = hidden % 8 == 0 && ew_aligned(table, 16) && ew_aligned(out, 16);
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u32 tok = tokens[r];
        const bool here = tok >= vocab_start && tok - vocab_start < vocab_len;
        const u16* src = table + (here ? (u64)(tok - vocab_start) * hidden : 0);
        float* dst = out + (u64)r * hidden;
        if (vec) {
            const ew_u32x4* s8 = reinterpret_cast<const ew_u32x4*>(src);
            ew_f32x4* d4 = reinterpret_cast<ew_f32x4*>(dst);
            for (u32 i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
                ew_f32x4 lo = {0.0f, 0.0f, 0.0f, 0.0f}, hi = {0.0f, 0.0f, 0.0f, 0.0f};
                if (here) {
                    const ew_u32x4 v = s8[i];
                    lo = ew_f32x4{ew_lo<T>(v.a), ew_hi<T>(v.a), ew_lo<T>(v.b), ew_hi<T>(v.b)};
                    hi = ew_f32x4{ew_lo<T>(v.c), ew_hi<T>(v.c), ew_lo<T>(v.d), ew_hi<T>(v.d)};
                }
                d4[2 * i] = lo;
                d4[2 * i + 1] = hi;
            }
        } else {
            for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = here ? T::load(src[i]) : 0.0f;
        }
    }
}

extern "C" __global__ void embed_f16(const u16* __restrict__ table, const u32* __restrict__ tokens,
                                     float* __restrict__ out, u32 rows, u32 hidden, u32 vocab_start, u32 vocab_len) {
    embed_impl<F16>(table, tokens, out, rows, hidden, vocab_start, vocab_len);
}
extern "C" __global__ void embed_bf16(const u16* __restrict__ table, const u32* __restrict__ tokens,
                                      float* __restrict__ out, u32 rows, u32 hidden, u32 vocab_start, u32 vocab_len) {
    embed_impl<BF16>(table, tokens, out, rows, hidden, vocab_start, vocab_len);
}

// ---- rms_norm: x += delta (if given, written back), then
// out = T(x * rsqrt(mean(x^2) + eps) * w). One block per row; the second pass
// re-reads what the same thread read (or wrote) in the first.
template <class T>
__device__ __forceinline__ void rms_norm_impl(float* __restrict__ x, const float* __restrict__ delta,
                                              const float* __restrict__ w, u16* __restrict__ out, u32 rows,
                                              u32 dim, float eps) {
    __shared__ float scratch[32];
    const bool vec = dim % 4 == 0 && ew_aligned(x, 16) && ew_aligned(w, 16) && ew_aligned(out, 8) &&
                     (delta == nullptr || ew_aligned(delta, 16));
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* xr = x + (u64)r * dim;
        const float* dr = delta != nullptr ? delta + (u64)r * dim : nullptr;
        u16* orow = out + (u64)r * dim;
        float ss = 0.0f;
        if (vec) {
            ew_f32x4* x4 = reinterpret_cast<ew_f32x4*>(xr);
            for (u32 i = threadIdx.x; i < dim / 4; i += blockDim.x) {
                ew_f32x4 v = x4[i];
                if (dr != nullptr) {
                    const ew_f32x4 d = reinterpret_cast<const ew_f32x4*>(dr)[i];
                    v.a += d.a;
                    v.b += d.b;
                    v.c += d.c;
                    v.d += d.d;
                    x4[i] = v;
                }
                ss += v.a * v.a + v.b * v.b + v.c * v.c + v.d * v.d;
            }
        } else {
            for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
                float v = xr[i];
                if (dr != nullptr) {
                    v += dr[i];
                    xr[i] = v;
                }
                ss += v * v;
            }
        }
        const float scale = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
        if (vec) {
            const ew_f32x4* x4 = reinterpret_cast<const ew_f32x4*>(xr);
            const ew_f32x4* w4 = reinterpret_cast<const ew_f32x4*>(w);
            ew_u32x2* o4 = reinterpret_cast<ew_u32x2*>(orow);
            for (u32 i = threadIdx.x; i < dim / 4; i += blockDim.x) {
                const ew_f32x4 v = x4[i], g = w4[i];
                o4[i] = ew_u32x2{ew_pack<T>(v.a * scale * g.a, v.b * scale * g.b),
                                 ew_pack<T>(v.c * scale * g.c, v.d * scale * g.d)};
            }
        } else {
            for (u32 i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = T::store(xr[i] * scale * w[i]);
        }
    }
}

extern "C" __global__ void rms_norm_f16(float* __restrict__ x, const float* __restrict__ delta,
                                        const float* __restrict__ w, u16* __restrict__ out, u32 rows, u32 dim,
                                        float eps) {
    rms_norm_impl<F16>(x, delta, w, out, rows, dim, eps);
}
extern "C" __global__ void rms_norm_bf16(float* __restrict__ x, const float* __restrict__ delta,
                                         const float* __restrict__ w, u16* __restrict__ out, u32 rows, u32 dim,
                                         float eps) {
    rms_norm_impl<BF16>(x, delta, w, out, rows, dim, eps);
}

// ---- rope: adjacent pairs (2i, 2i+1) of the first n_heads heads of each row
// turn by (cos, sin)[pos[r] * head_dim/2 + i]. Since heads are contiguous,
// pair t of the row is elements (2t, 2t+1) and i = t % (head_dim/2). One
// thread per pair: blockIdx.x · blockDim.x + threadIdx.x, of rows blockIdx.y,
// blockIdx.y + gridDim.y, ...
template <class T>
__device__ __forceinline__ void rope_impl(u16* __restrict__ qkv, const u32* __restrict__ pos,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          u32 rows, u32 row_stride, u32 n_heads, u32 head_dim) {
    const u32 half = head_dim / 2, pairs = n_heads * half;
    const bool vec = row_stride % 2 == 0 && ew_aligned(qkv, 4);
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs) return;
    for (u32 r = blockIdx.y; r < rows; r += gridDim.y) {
        const u64 at = (u64)pos[r] * half;
        u16* row = qkv + (u64)r * row_stride;
        {
            const u32 i = t % half;
            const float c = cos_t[at + i], s = sin_t[at + i];
            float a, b;
            if (vec) {
                const u32 v = reinterpret_cast<const u32*>(row)[t];
                a = ew_lo<T>(v);
                b = ew_hi<T>(v);
            } else {
                a = T::load(row[2 * t]);
                b = T::load(row[2 * t + 1]);
            }
            const float ra = a * c - b * s, rb = a * s + b * c;
            if (vec) {
                reinterpret_cast<u32*>(row)[t] = ew_pack<T>(ra, rb);
            } else {
                row[2 * t] = T::store(ra);
                row[2 * t + 1] = T::store(rb);
            }
        }
    }
}

extern "C" __global__ void rope_f16(u16* __restrict__ qkv, const u32* __restrict__ pos, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, u32 rows, u32 row_stride, u32 n_heads,
                                    u32 head_dim) {
    rope_impl<F16>(qkv, pos, cos_t, sin_t, rows, row_stride, n_heads, head_dim);
}
extern "C" __global__ void rope_bf16(u16* __restrict__ qkv, const u32* __restrict__ pos,
                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t, u32 rows,
                                     u32 row_stride, u32 n_heads, u32 head_dim) {
    rope_impl<BF16>(qkv, pos, cos_t, sin_t, rows, row_stride, n_heads, head_dim);
}

// ---- rope_neox: as rope, but pair i of a head is its elements (i, i + half)
// (GPT-NeoX's pairing). Threads, blocks and rows as rope's.
template <class T>
__device__ __forceinline__ void rope_neox_impl(u16* __restrict__ qkv, const u32* __restrict__ pos,
                                               const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                               u32 rows, u32 row_stride, u32 n_heads, u32 head_dim) {
    const u32 half = head_dim / 2, pairs = n_heads * half;
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs) return;
    for (u32 r = blockIdx.y; r < rows; r += gridDim.y) {
        const u64 at = (u64)pos[r] * half;
        u16* row = qkv + (u64)r * row_stride;
        {
            const u32 h = t / half, i = t - h * half;
            u16* head = row + h * head_dim;
            const float c = cos_t[at + i], s = sin_t[at + i];
            const float a = T::load(head[i]), b = T::load(head[i + half]);
            head[i] = T::store(a * c - b * s);
            head[i + half] = T::store(a * s + b * c);
        }
    }
}

extern "C" __global__ void rope_neox_f16(u16* __restrict__ qkv, const u32* __restrict__ pos,
                                         const float* __restrict__ cos_t, const float* __restrict__ sin_t, u32 rows,
                                         u32 row_stride, u32 n_heads, u32 head_dim) {
    rope_neox_impl<F16>(qkv, pos, cos_t, sin_t, rows, row_stride, n_heads, head_dim);
}
extern "C" __global__ void rope_neox_bf16(u16* __restrict__ qkv, const u32* __restrict__ pos,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t, u32 rows,
                                          u32 row_stride, u32 n_heads, u32 head_dim) {
    rope_neox_impl<BF16>(qkv, pos, cos_t, sin_t, rows, row_stride, n_heads, head_dim);
}

// ---- add_bias: x[r][i] = T(x[r][i] + bias[i]) for rows of width. One block
// per row.
template <class T>
__device__ __forceinline__ void add_bias_impl(u16* __restrict__ x, const float* __restrict__ bias, u32 rows,
                                              u32 width) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        u16* row = x + (u64)r * width;
        for (u32 i = threadIdx.x; i < width; i += blockDim.x) row[i] = T::store(T::load(row[i]) + bias[i]);
    }
}

extern "C" __global__ void add_bias_f16(u16* __restrict__ x, const float* __restrict__ bias, u32 rows, u32 width) {
    add_bias_impl<F16>(x, bias, rows, width);
}
extern "C" __global__ void add_bias_bf16(u16* __restrict__ x, const float* __restrict__ bias, u32 rows, u32 width) {
    add_bias_impl<BF16>(x, bias, rows, width);
}

// ---- head_norm: RMSNorm, in place, of each of the first n_q + n_k heads of
// each row (q heads with qw, then k heads with kw). One block per head of a
// row; the second pass re-reads what the same thread read in the first.
template <class T>
__device__ __forceinline__ void head_norm_impl(u16* __restrict__ qkv, const float* __restrict__ qw,
                                               const float* __restrict__ kw, u32 rows, u32 row_stride, u32 n_q,
                                               u32 n_k, u32 head_dim, float eps) {
    __shared__ float scratch[32];
    const u32 heads = n_q + n_k;
    for (u64 b = blockIdx.x; b < (u64)rows * heads; b += gridDim.x) {
        const u32 r = (u32)(b / heads), h = (u32)(b - (u64)r * heads);
        u16* head = qkv + (u64)r * row_stride + (u64)h * head_dim;
        const float* w = h < n_q ? qw : kw;
        float ss = 0.0f;
        for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
            const float v = T::load(head[i]);
            ss += v * v;
        }
        const float scale = rsqrtf(block_sum(ss, scratch) / (float)head_dim + eps);
        for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) head[i] = T::store(T::load(head[i]) * scale * w[i]);
    }
}

extern "C" __global__ void head_norm_f16(u16* __restrict__ qkv, const float* __restrict__ qw,
                                         const float* __restrict__ kw, u32 rows, u32 row_stride, u32 n_q, u32 n_k,
                                         u32 head_dim, float eps) {
    head_norm_impl<F16>(qkv, qw, kw, rows, row_stride, n_q, n_k, head_dim, eps);
}
extern "C" __global__ void head_norm_bf16(u16* __restrict__ qkv, const float* __restrict__ qw,
                                          const float* __restrict__ kw, u32 rows, u32 row_stride, u32 n_q, u32 n_k,
                                          u32 head_dim, float eps) {
    head_norm_impl<BF16>(qkv, qw, kw, rows, row_stride, n_q, n_k, head_dim, eps);
}

// ---- kv_write: k_cache[slots[r]] = qkv[r][k_offset..][..kv_width], v_cache
// likewise from the kv_width values after the keys. A copy: the type only
// names the kernel. One block per row.
__device__ __forceinline__ void kv_write_impl(const u16* __restrict__ qkv, u16* __restrict__ k_cache,
                                              u16* __restrict__ v_cache, const u32* __restrict__ slots, u32 rows,
                                              u32 row_stride, u32 k_offset, u32 kv_width) {
    const bool vec = kv_width % 8 == 0 && row_stride % 8 == 0 && k_offset % 8 == 0 && ew_aligned(qkv, 16) &&
                     ew_aligned(k_cache, 16) && ew_aligned(v_cache, 16);
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u16* ks = qkv + (u64)r * row_stride + k_offset;
        const u16* vs = ks + kv_width;
        const u64 dst = (u64)slots[r] * kv_width;
        if (vec) {
            const ew_u32x4 *k8 = reinterpret_cast<const ew_u32x4*>(ks), *v8 = reinterpret_cast<const ew_u32x4*>(vs);
            ew_u32x4 *kd = reinterpret_cast<ew_u32x4*>(k_cache + dst), *vd = reinterpret_cast<ew_u32x4*>(v_cache + dst);
            for (u32 i = threadIdx.x; i < kv_width / 8; i += blockDim.x) {
                kd[i] = k8[i];
                vd[i] = v8[i];
            }
        } else {
            for (u32 i = threadIdx.x; i < kv_width; i += blockDim.x) {
                k_cache[dst + i] = ks[i];
                v_cache[dst + i] = vs[i];
            }
        }
    }
}

extern "C" __global__ void kv_write_f16(const u16* __restrict__ qkv, u16* __restrict__ k_cache,
                                        u16* __restrict__ v_cache, const u32* __restrict__ slots, u32 rows,
                                        u32 row_stride, u32 k_offset, u32 kv_width) {
    kv_write_impl(qkv, k_cache, v_cache, slots, rows, row_stride, k_offset, kv_width);
}
extern "C" __global__ void kv_write_bf16(const u16* __restrict__ qkv, u16* __restrict__ k_cache,
                                         u16* __restrict__ v_cache, const u32* __restrict__ slots, u32 rows,
                                         u32 row_stride, u32 k_offset, u32 kv_width) {
    kv_write_impl(qkv, k_cache, v_cache, slots, rows, row_stride, k_offset, kv_width);
}

// ---- silu_mul: out = T(silu(g) * u) for rows [gate | up] of 2*width. One
// element per thread (grid-stride for safety); 32-bit index math whenever
// the tensor allows it (64-bit division is slow on the GPU).
template <class T, class I>
__device__ __forceinline__ void silu_mul_loop(const u16* __restrict__ gate_up, u16* __restrict__ out, I total,
                                              I width) {
    for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (I)gridDim.x * blockDim.x) {
        const I r = idx / width, c = idx - r * width;
        const u16* row = gate_up + 2 * (u64)r * width;
        const float g = T::load(row[c]), u = T::load(row[width + c]);
        out[idx] = T::store(g / (1.0f + expf(-g)) * u);
    }
}
template <class T>
__device__ __forceinline__ void silu_mul_impl(const u16* __restrict__ gate_up, u16* __restrict__ out, u32 rows,
                                              u32 width) {
    const u64 total = (u64)rows * width;
    if (total + (u64)gridDim.x * blockDim.x <= 0xffffffffull)
        silu_mul_loop<T, u32>(gate_up, out, (u32)total, width);
    else
        silu_mul_loop<T, u64>(gate_up, out, total, width);
}

extern "C" __global__ void silu_mul_f16(const u16* __restrict__ gate_up, u16* __restrict__ out, u32 rows, u32 width) {
    silu_mul_impl<F16>(gate_up, out, rows, width);
}
extern "C" __global__ void silu_mul_bf16(const u16* __restrict__ gate_up, u16* __restrict__ out, u32 rows,
                                         u32 width) {
    silu_mul_impl<BF16>(gate_up, out, rows, width);
}

// ---- gather_rows_f32: dst[i] = src[idx[i]], rows of width f32. One block
// per row.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const u32* __restrict__ idx,
                                           float* __restrict__ dst, u32 n, u32 width) {
    const bool vec = width % 4 == 0 && ew_aligned(src, 16) && ew_aligned(dst, 16);
    for (u32 r = blockIdx.x; r < n; r += gridDim.x) {
        const float* s = src + (u64)idx[r] * width;
        float* d = dst + (u64)r * width;
        if (vec) {
            const ew_f32x4* s4 = reinterpret_cast<const ew_f32x4*>(s);
            ew_f32x4* d4 = reinterpret_cast<ew_f32x4*>(d);
            for (u32 i = threadIdx.x; i < width / 4; i += blockDim.x) d4[i] = s4[i];
        } else {
            for (u32 i = threadIdx.x; i < width; i += blockDim.x) d[i] = s[i];
        }
    }
}
