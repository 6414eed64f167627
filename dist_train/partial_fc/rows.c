/* SGD with momentum on the rows of a Partial FC shard, in one pass over each row.
 *
 * Built and loaded by dist_train/partial_fc/native.py (plain C, no Python or torch headers:
 * one compiler call of well under a second). Each updated row is read once and written once:
 * weight row w, momentum row m (storage fp32 or bf16, maths fp32) and gradient row g (fp32):
 *
 *     g' = g + wd * w;  m = mu * m + g';  w = w - lr * (nesterov ? g' + mu * m : m)
 *
 * which is dist_train.optim.update_rows("sgd") with the gather, the update and the scatter of
 * the torch path fused, so that the sampled rows' state streams through memory once.
 * bf16 storage is rounded stochastically (unbiased: round up with probability equal to the
 * dropped fraction) or to nearest-even; the random bits come from a counter-based hash of
 * (seed, row, column), so the result does not depend on how rows are split across threads.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
/* one build runs on any x86-64; the loader picks the AVX2 + FMA version where the CPU has
 * them (the default version calls libm's fmaf: correct, slower) */
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1 };

typedef struct {
    float lr, mu, wd;
    int nesterov, stochastic;
    uint32_t seed;
} sgd_args;

static inline uint32_t mix32(uint32_t x) {
    /* a 32-bit finaliser with low bias (two multiply-xorshift rounds) */
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f, uint32_t noise, int stochastic) {
    /* Branch-free (vectorised): add 16 random bits (stochastic) or half an ulp with ties to
     * even, keep the top 16 bits. ±inf stays ±inf (the added bits never reach the exponent),
     * the largest finite values may round up to inf as any rounding does, and a NaN stays a
     * NaN when its payload has a bit in the top 7 mantissa bits, as the NaNs that arithmetic
     * produces do (the quiet bit). */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sel = (uint32_t)0 - (uint32_t)(stochastic != 0); /* all ones or zero */
    const uint32_t add = (sel & noise & 0xffffU) | (~sel & (0x7fffU + ((u >> 16) & 1U)));
    return (uint16_t)((u + add) >> 16);
}

#define LOAD_F32(p, j) ((p)[j])
#define STORE_F32(p, j, v, noise) ((p)[j] = (v))
#define LOAD_BF16(p, j) bf16_load((p)[j])
#define STORE_BF16(p, j, v, noise) ((p)[j] = bf16_store((v), (noise), stochastic))

/* One row: w, m in their storage types, g fp32, `pos` the row's index in the shard (the
 * hash counter). Branch-free, Nesterov's loop apart, so that the compiler vectorises both. */
#define ROW_LOOP(LOADW, STOREW, LOADM, STOREM, STEP)                                            \
    for (int64_t j = 0; j < d; ++j) {                                                           \
        const uint32_t noise = mix32(key + 0x9e3779b9U * (uint32_t)j);                         \
        const float wj = LOADW(w, j);                                                           \
        const float gj = fmaf(wd, wj, g[j]);                                                    \
        const float mj = mu * LOADM(m, j) + gj;                                                 \
        STOREM(m, j, mj, noise >> 16);                                                          \
        STOREW(w, j, fmaf(-lr, (STEP), wj), noise);                                             \
    }

#define DEFINE_ROW(NAME, WT, LOADW, STOREW, MT, LOADM, STOREM)                                  \
    CLONES static void NAME(WT *restrict w, MT *restrict m, const float *restrict g, int64_t d, \
                            uint64_t pos, const sgd_args *a) {                                 \
        const float lr = a->lr, mu = a->mu, wd = a->wd;                                         \
        const int stochastic = a->stochastic;                                                   \
        const uint32_t key = mix32(a->seed ^ mix32((uint32_t)pos ^ mix32((uint32_t)(pos >> 32)))); \
        if (a->nesterov) {                                                                      \
            ROW_LOOP(LOADW, STOREW, LOADM, STOREM, fmaf(mu, mj, gj))                                \
        } else {                                                                                \
            ROW_LOOP(LOADW, STOREW, LOADM, STOREM, mj)                                          \
        }                                                                                       \
    }

DEFINE_ROW(row_f32_f32, float, LOAD_F32, STORE_F32, float, LOAD_F32, STORE_F32)
DEFINE_ROW(row_f32_bf16, float, LOAD_F32, STORE_F32, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_ROW(row_bf16_f32, uint16_t, LOAD_BF16, STORE_BF16, float, LOAD_F32, STORE_F32)
DEFINE_ROW(row_bf16_bf16, uint16_t, LOAD_BF16, STORE_BF16, uint16_t, LOAD_BF16, STORE_BF16)

static void row(int wkind, void *w, int mkind, void *m, int64_t r, const float *g, int64_t d,
                const sgd_args *a) {
    const int64_t off = r * d;
    if (wkind == KIND_F32 && mkind == KIND_F32)
        row_f32_f32((float *)w + off, (float *)m + off, g, d, (uint64_t)r, a);
    else if (wkind == KIND_F32)
        row_f32_bf16((float *)w + off, (uint16_t *)m + off, g, d, (uint64_t)r, a);
    else if (mkind == KIND_F32)
        row_bf16_f32((uint16_t *)w + off, (float *)m + off, g, d, (uint64_t)r, a);
    else
        row_bf16_bf16((uint16_t *)w + off, (uint16_t *)m + off, g, d, (uint64_t)r, a);
}

/* Sparse step: rows index[k] (index NULL: row k) for k in [k0, k1), gradient row k of grad
 * ([K, d] fp32, contiguous). Rows must be unique. Returns 0, or -1 on a bad storage kind. */
int sgd_rows(int wkind, void *w, int mkind, void *m, const int64_t *index, int64_t k0,
             int64_t k1, const float *grad, int64_t d, float lr, float mu, float wd, int nesterov,
             int stochastic, const int64_t *seed) {
    if ((wkind != KIND_F32 && wkind != KIND_BF16) || (mkind != KIND_F32 && mkind != KIND_BF16))
        return -1;
    const sgd_args a = {lr, mu, wd, nesterov, stochastic, (uint32_t)*seed};
    for (int64_t k = k0; k < k1; ++k)
        row(wkind, w, mkind, m, index ? index[k] : k, grad + k * d, d, &a);
    return 0;
}

/* Dense step: every row r in [r0, r1); the rows index[k] (sorted, unique; k in [0, n)) have
 * gradient row k of grad, the others a zero gradient (momentum and weight decay still act). */
int sgd_dense(int wkind, void *w, int mkind, void *m, const int64_t *index, int64_t n,
              const float *grad, int64_t r0, int64_t r1, int64_t d, float lr, float mu, float wd,
              int nesterov, int stochastic, const int64_t *seed) {
    if ((wkind != KIND_F32 && wkind != KIND_BF16) || (mkind != KIND_F32 && mkind != KIND_BF16))
        return -1;
    const sgd_args a = {lr, mu, wd, nesterov, stochastic, (uint32_t)*seed};
    int64_t lo = 0, hi = n; /* first k with index[k] >= r0 */
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (index[mid] < r0)
            lo = mid + 1;
        else
            hi = mid;
    }
    float *zero = calloc((size_t)d, sizeof(float));
    if (!zero)
        return -2;
    int64_t k = lo;
    for (int64_t r = r0; r < r1; ++r) {
        const float *g = zero;
        if (k < n && index[k] == r)
            g = grad + (k++) * d;
        row(wkind, w, mkind, m, r, g, d, &a);
    }
    free(zero);
    return 0;
}
