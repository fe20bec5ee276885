/*
 * Writes tests/golden/weighted.json on stdout: the bytes llama.cpp's
 * importance-weighted quantizers (`quantize_<type>(src, dst, nrow,
 * n_per_row, quant_weights)` in ggml/src/ggml-quants.c, with a non-null
 * `quant_weights`, i.e. the path llama-quantize takes with --imatrix) write
 * for deterministic inputs, for each of the 9 types that take weights.
 * src/weighted.rs regenerates the same inputs with the same generator and
 * checks its bytes against these. Built and run by weighted_golden.sh.
 *
 * Generator (mirrored exactly by the Rust test; all arithmetic in f32, no
 * fused multiply-add):
 *   next()     SplitMix64 on a 64-bit state starting at the case's seed.
 *   uniform()  (float)(next() >> 40) * 2^-24, uniform in [0, 1), exact.
 *   x value    s = ((u1 + u2) + u3) + u4 (four uniform() calls, summed left
 *              to right); g = (s - 2) * 1.7320508 (Irwin-Hall, about
 *              N(0, 1)); v = x_scale * g; then one next(): if it is
 *              divisible by outlier_every, v = v * 10. Values are drawn row
 *              by row, column by column.
 *   weights    drawn after all values, one per column. "random": r = next();
 *              r % 64 == 0 gives 0; otherwise the float with exponent
 *              e = (r >> 8) % 26 - 20 and mantissa bits (r >> 32) & 0x7FFFFF,
 *              i.e. (1 + m) * 2^e, between 2^-20 and 2^6. "ones": all 1.
 *   zeroing    then the weights of columns zero_weight_from ..
 *              zero_weight_to (exclusive) are set to 0 (an importance
 *              matrix's never-used columns); the rows in zero_rows are set to
 *              0, and in row zero_tail_row the columns from zero_tail_from
 *              on; with pattern_2_4, every value whose index i (row-major)
 *              has i % 4 >= 2 is set to 0 (a 2:4-pruned matrix).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

/* The exported quantizers of ggml-quants.c (declared in ggml-quants.h,
 * which pulls in the internal headers; the prototypes are all we need). */
typedef size_t (*quantize_fn)(const float *src, void *dst, int64_t nrow, int64_t n_per_row,
                              const float *quant_weights);
size_t quantize_q4_0(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q4_1(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q5_0(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q5_1(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q2_K(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q3_K(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q4_K(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q5_K(const float *, void *, int64_t, int64_t, const float *);
size_t quantize_q6_K(const float *, void *, int64_t, int64_t, const float *);

/* Block size (values) and block bytes of each type, as in ggml-common.h. */
struct qtype {
    const char *name; /* candle's GgmlDType variant name */
    enum ggml_type type;
    quantize_fn quantize;
    int64_t block_values;
    size_t block_bytes;
};

static const struct qtype TYPES[] = {
    {"Q4_0", GGML_TYPE_Q4_0, quantize_q4_0, 32, 18},
    {"Q4_1", GGML_TYPE_Q4_1, quantize_q4_1, 32, 20},
    {"Q5_0", GGML_TYPE_Q5_0, quantize_q5_0, 32, 22},
    {"Q5_1", GGML_TYPE_Q5_1, quantize_q5_1, 32, 24},
    {"Q2K", GGML_TYPE_Q2_K, quantize_q2_K, 256, 84},
    {"Q3K", GGML_TYPE_Q3_K, quantize_q3_K, 256, 110},
    {"Q4K", GGML_TYPE_Q4_K, quantize_q4_K, 256, 144},
    {"Q5K", GGML_TYPE_Q5_K, quantize_q5_K, 256, 176},
    {"Q6K", GGML_TYPE_Q6_K, quantize_q6_K, 256, 210},
};
#define N_TYPES (sizeof(TYPES) / sizeof(TYPES[0]))

#ifdef WG_STUBS
/* When ggml-quants.c is compiled from source without the rest of
 * ggml-base, these are the only ggml symbols it needs for the types above. */
size_t ggml_type_size(enum ggml_type type) {
    for (size_t i = 0; i < N_TYPES; ++i) {
        if (TYPES[i].type == type) return TYPES[i].block_bytes;
    }
    fprintf(stderr, "weighted_golden: ggml_type_size(%d) is not stubbed\n", (int)type);
    abort();
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    for (size_t i = 0; i < N_TYPES; ++i) {
        if (TYPES[i].type == type) return TYPES[i].block_bytes * (size_t)(ne / TYPES[i].block_values);
    }
    fprintf(stderr, "weighted_golden: ggml_row_size(%d) is not stubbed\n", (int)type);
    abort();
}

const char *ggml_type_name(enum ggml_type type) {
    (void)type;
    return "?";
}

void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "weighted_golden: ggml_abort at %s:%d (%s)\n", file, line, fmt);
    abort();
}
#endif

struct rng {
    uint64_t state;
};

static uint64_t rng_next(struct rng *r) {
    r->state += UINT64_C(0x9E3779B97F4A7C15);
    uint64_t z = r->state;
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static float rng_uniform(struct rng *r) {
    return (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

struct gcase {
    const char *name;
    uint64_t seed;
    int64_t rows;
    int64_t cols;
    float x_scale;
    uint64_t outlier_every;
    const char *weights; /* "random" or "ones" */
    int64_t zero_rows[2];
    int n_zero_rows;
    int64_t zero_tail_row; /* -1: none */
    int64_t zero_tail_from;
    int64_t zero_weight_from; /* weights of these columns are 0 */
    int64_t zero_weight_to;
    int pattern_2_4;
    int full_hex; /* 1: the full bytes in hex; 0: length and FNV-1a only */
};

static const struct gcase CASES[] = {
    {"random", 1, 4, 512, 0.02f, 32, "random", {0, 0}, 0, -1, 0, 0, 0, 0, 1},
    {"equal_weights", 2, 4, 512, 0.02f, 32, "ones", {0, 0}, 0, -1, 0, 0, 0, 0, 1},
    {"zero_row", 3, 4, 512, 0.02f, 32, "random", {1, 0}, 1, 2, 256, 0, 0, 0, 1},
    {"tiny", 4, 4, 512, 1e-5f, 32, "random", {0, 0}, 0, -1, 0, 0, 0, 0, 1},
    {"zero_weights", 6, 4, 512, 0.02f, 32, "random", {0, 0}, 0, -1, 0, 40, 300, 0, 1},
    {"pruned_2_4", 7, 4, 512, 0.02f, 32, "random", {0, 0}, 0, -1, 0, 0, 0, 1, 1},
    {"large", 5, 32, 4096, 0.02f, 32, "random", {7, 0}, 1, 9, 1024, 0, 0, 0, 0},
    {"big_values", 8, 8, 1024, 30.0f, 16, "random", {0, 0}, 0, -1, 0, 0, 0, 0, 0},
};
#define N_CASES (sizeof(CASES) / sizeof(CASES[0]))

static void generate(const struct gcase *c, float *x, float *w) {
    struct rng r = {c->seed};
    for (int64_t i = 0; i < c->rows * c->cols; ++i) {
        float s = rng_uniform(&r);
        s = s + rng_uniform(&r);
        s = s + rng_uniform(&r);
        s = s + rng_uniform(&r);
        const float g = (s - 2.0f) * 1.7320508f;
        float v = c->x_scale * g;
        if (rng_next(&r) % c->outlier_every == 0) v = v * 10.0f;
        x[i] = v;
    }
    for (int64_t j = 0; j < c->cols; ++j) {
        if (strcmp(c->weights, "ones") == 0) {
            w[j] = 1.0f;
            continue;
        }
        const uint64_t bits = rng_next(&r);
        if (bits % 64 == 0) {
            w[j] = 0.0f;
            continue;
        }
        const int32_t e = (int32_t)((bits >> 8) % 26) - 20;
        const uint32_t mantissa = (uint32_t)((bits >> 32) & 0x7FFFFF);
        const uint32_t fbits = ((uint32_t)(127 + e) << 23) | mantissa;
        memcpy(&w[j], &fbits, sizeof(float));
    }
    for (int64_t j = c->zero_weight_from; j < c->zero_weight_to; ++j) w[j] = 0.0f;
    for (int k = 0; k < c->n_zero_rows; ++k) {
        memset(x + c->zero_rows[k] * c->cols, 0, (size_t)c->cols * sizeof(float));
    }
    if (c->zero_tail_row >= 0) {
        for (int64_t j = c->zero_tail_from; j < c->cols; ++j) x[c->zero_tail_row * c->cols + j] = 0.0f;
    }
    if (c->pattern_2_4) {
        for (int64_t i = 0; i < c->rows * c->cols; ++i) {
            if (i % 4 >= 2) x[i] = 0.0f;
        }
    }
}

static uint64_t fnv1a64(const uint8_t *bytes, size_t n) {
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < n; ++i) {
        h ^= bytes[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

int main(int argc, char **argv) {
    const char *source = argc > 1 ? argv[1] : "llama.cpp";
    printf("{\n");
    printf("  \"source\": \"%s\",\n", source);
    printf("  \"generator\": \"SplitMix64; x = x_scale * (u1+u2+u3+u4-2) * 1.7320508, times 10 when "
           "next() %% outlier_every == 0; weights random: 0 when r %% 64 == 0, else (1+m)*2^((r>>8)%%26-20) "
           "with m = (r>>32)&0x7FFFFF; see tests/support/weighted_golden.c\",\n");
    printf("  \"cases\": [\n");
    for (size_t ci = 0; ci < N_CASES; ++ci) {
        const struct gcase *c = &CASES[ci];
        float *x = malloc((size_t)(c->rows * c->cols) * sizeof(float));
        float *w = malloc((size_t)c->cols * sizeof(float));
        if (!x || !w) return 1;
        generate(c, x, w);
        printf("    {\n      \"name\": \"%s\", \"seed\": %" PRIu64 ", \"rows\": %" PRId64 ", \"cols\": %" PRId64
               ", \"x_scale\": %.9g, \"outlier_every\": %" PRIu64 ", \"weights\": \"%s\",\n",
               c->name, c->seed, c->rows, c->cols, (double)c->x_scale, c->outlier_every, c->weights);
        printf("      \"zero_rows\": [");
        for (int k = 0; k < c->n_zero_rows; ++k) printf("%s%" PRId64, k ? ", " : "", c->zero_rows[k]);
        printf("], \"zero_tail_row\": %" PRId64 ", \"zero_tail_from\": %" PRId64 ", \"zero_weight_from\": %" PRId64
               ", \"zero_weight_to\": %" PRId64 ", \"pattern_2_4\": %s,\n",
               c->zero_tail_row, c->zero_tail_from, c->zero_weight_from, c->zero_weight_to,
               c->pattern_2_4 ? "true" : "false");
        printf("      \"outputs\": {\n");
        for (size_t ti = 0; ti < N_TYPES; ++ti) {
            const struct qtype *t = &TYPES[ti];
            const size_t n = (size_t)(c->rows * (c->cols / t->block_values)) * t->block_bytes;
            uint8_t *dst = calloc(n, 1);
            if (!dst) return 1;
            const size_t written = t->quantize(x, dst, c->rows, c->cols, w);
            if (written != n) {
                fprintf(stderr, "weighted_golden: %s wrote %zu bytes, expected %zu\n", t->name, written, n);
                return 1;
            }
            printf("        \"%s\": {\"len\": %zu, \"fnv1a64\": \"%016" PRIx64 "\"", t->name, n, fnv1a64(dst, n));
            if (c->full_hex) {
                printf(", \"hex\": \"");
                for (size_t i = 0; i < n; ++i) printf("%02x", dst[i]);
                printf("\"");
            }
            printf("}%s\n", ti + 1 < N_TYPES ? "," : "");
            free(dst);
        }
        printf("      }\n    }%s\n", ci + 1 < N_CASES ? "," : "");
        free(x);
        free(w);
    }
    printf("  ]\n}\n");
    return 0;
}
