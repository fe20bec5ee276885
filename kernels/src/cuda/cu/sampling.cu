// Sampling helpers over f32 logits: one block per row.
//
// Order of elements: (v, i) comes before (w, j) when v > w, or v == w and
// i < j (larger value first, lower index first among ties). Inputs are
// assumed NaN-free; -inf is allowed.

#define SMP_FULL 0xffffffffu
#define SMP_NONE 0xffffffffu
#define TOPK_CAND 1024

__device__ __forceinline__ bool smp_before(float v, u32 i, float w, u32 j) { return v > w || (v == w && i < j); }

// The first (by the order above) of the warp's pairs, in every lane. All 32
// lanes must call it.
__device__ __forceinline__ void smp_warp_best(float& v, u32& i) {
    for (int m = 16; m > 0; m >>= 1) {
        const float ov = __shfl_xor_sync(SMP_FULL, v, m);
        const u32 oi = __shfl_xor_sync(SMP_FULL, i, m);
        if (smp_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// The first of the block's pairs, in every thread. `sv`, `si`: 32 entries of
// shared memory. All threads must call it.
__device__ __forceinline__ void smp_block_best(float& v, u32& i, float* sv, u32* si) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    smp_warp_best(v, i);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    v = lane < warps ? sv[lane] : -PARALLM_INFINITY;
    i = lane < warps ? si[lane] : SMP_NONE;
    smp_warp_best(v, i);
}

// Exclusive prefix sum of `c` over the block's threads in order; `*total`
// gets the sum of all. `scratch`: 32 entries of shared memory. All threads
// must call it.
__device__ __forceinline__ u32 smp_block_exclusive_scan(u32 c, u32* scratch, u32* total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 inc = c;
    for (u32 d = 1; d < 32; d <<= 1) {
        const u32 o = __shfl_sync(SMP_FULL, inc, lane >= d ? lane - d : lane);
        if (lane >= d) inc += o;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    u32 before = 0, all = 0;
    for (u32 w = 0; w < warps; ++w) {
        const u32 s = scratch[w];
        if (w < warp) before += s;
        all += s;
    }
    *total = all;
    return before + inc - c;
}

// idx[r] = the index of the largest value of row r (the lowest among ties).
// 1024 threads per row.
extern "C" __global__ void argmax_f32(const float* __restrict__ x, u32 rows, u32 n, u32* __restrict__ idx) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const float* row = x + (u64)blockIdx.x * n;
    float bv = -PARALLM_INFINITY;
    u32 bi = SMP_NONE;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = row[i];
        if (smp_before(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    smp_block_best(bv, bi, sv, si);
    if (threadIdx.x == 0) idx[blockIdx.x] = bi;
}

// Row r of x replaced in place by softmax(x · inv_temperature): the max is
// subtracted, exponentials (expf, full precision) summed in f32, each divided
// by the sum. Rows need one finite value. 1024 threads per row. The scaled
// logit is rounded once (__fmul_rn) before the max is subtracted: a fused
// multiply-add, which the compiler would otherwise form, skips that rounding,
// and on an H200 that moved small probabilities by 2e-6 of their value.
extern "C" __global__ void softmax_f32(float* __restrict__ x, u32 rows, u32 n, float inv_temperature) {
    __shared__ float scratch[32];
    float* row = x + (u64)blockIdx.x * n;
    float mx = -PARALLM_INFINITY;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, __fmul_rn(row[i], inv_temperature));
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) sum += expf(__fmul_rn(row[i], inv_temperature) - mx);
    sum = block_sum(sum, scratch);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x)
        row[i] = expf(__fmul_rn(row[i], inv_temperature) - mx) / sum;
}

// The k largest values of row r and their indices, in order (see the top),
// into idx/val[r·k ..]. 256 threads per row.
//
// 1. Each thread's maximum over its (strided) elements; the threshold t is
//    the k-th largest of these 256 maxima, so at least k elements are ≥ t
//    and every element of the top k is ≥ t.
// 2. The elements ≥ t are counted; if at most TOPK_CAND, they are gathered
//    into shared memory and each finds its rank among them by counting the
//    candidates before it (ranks < k are written). On random data the
//    candidates are k plus a few; three passes over the row in all.
// 3. Otherwise (many ties at the threshold) k rounds of a block-wide search,
//    each for the first element after the previous pick: slow but exact.
extern "C" __global__ void topk_f32(const float* __restrict__ x, u32 rows, u32 n, u32 k, u32* __restrict__ idx,
                                    float* __restrict__ val) {
    __shared__ float s_max[256];
    __shared__ float cv[TOPK_CAND];
    __shared__ u32 ci[TOPK_CAND];
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ float s_thr;
    const u32 t = threadIdx.x, nt = blockDim.x;
    const float* row = x + (u64)blockIdx.x * n;
    u32* oi = idx + (u64)blockIdx.x * k;
    float* ov = val + (u64)blockIdx.x * k;

    float mx = -PARALLM_INFINITY;
    for (u32 i = t; i < n; i += nt) mx = fmaxf(mx, row[i]);
    s_max[t] = mx;
    __syncthreads();
    u32 rank = 0;
    for (u32 u = 0; u < nt; ++u) {
        const float o = s_max[u];
        rank += (o > mx || (o == mx && u < t)) ? 1u : 0u;
    }
    if (rank == k - 1) s_thr = mx;
    __syncthreads();
    const float thr = s_thr;

    u32 c = 0;
    for (u32 i = t; i < n; i += nt) c += row[i] >= thr ? 1u : 0u;
    u32 total;
    u32 off = smp_block_exclusive_scan(c, si, &total);

    if (total <= TOPK_CAND) {  // block-uniform
        for (u32 i = t; i < n; i += nt) {
            const float v = row[i];
            if (v >= thr) {
                cv[off] = v;
                ci[off] = i;
                ++off;
            }
        }
        __syncthreads();
        for (u32 a = t; a < total; a += nt) {
            const float v = cv[a];
            const u32 i = ci[a];
            u32 rk = 0;
            for (u32 b = 0; b < total; ++b) rk += smp_before(cv[b], ci[b], v, i) ? 1u : 0u;
            if (rk < k) {
                oi[rk] = i;
                ov[rk] = v;
            }
        }
    } else {
        float pv = PARALLM_INFINITY;
        u32 pi = 0;
        for (u32 j = 0; j < k; ++j) {
            float bv = -PARALLM_INFINITY;
            u32 bi = SMP_NONE;
            for (u32 i = t; i < n; i += nt) {
                const float v = row[i];
                if (v >= thr && (j == 0 || smp_before(pv, pi, v, i)) && smp_before(v, i, bv, bi)) {
                    bv = v;
                    bi = i;
                }
            }
            smp_block_best(bv, bi, sv, si);
            if (t == 0) {
                oi[j] = bi;
                ov[j] = bv;
            }
            pv = bv;
            pi = bi;
        }
    }
}
