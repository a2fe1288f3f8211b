/* Fused CPU kernels of int4_qat.formats: fake quant and quantize+pack in one pass per group.
 *
 * The oracle is the eager torch code of int4.py / mxfp4.py / nvfp4.py; these kernels evaluate
 * the SAME IEEE-754 float32 operations in the SAME order, element by element, so their results
 * are bit-identical (tests/test_formats_fused.py fuzzes that with atol=0). What makes that true:
 *
 *  - Every float op is a single correctly rounded IEEE binary32 operation: `/` is a true division
 *    (never a reciprocal multiply), `rintf` rounds half to even in the default rounding mode, and
 *    the build flags (fused.py _CFLAGS) forbid everything that would change a result:
 *    -ffp-contract=off (no FMA contraction of a*b+c), no -ffast-math / -funsafe-math-optimizations
 *    / -freciprocal-math / -ffinite-math-only, -fno-signed-zeros not given (-0.0 is kept).
 *    -fno-math-errno and -fno-trapping-math only let loops vectorise (rintf never sets errno;
 *    no FP exception is trapped, so selects may be evaluated eagerly): no result changes.
 *  - float <- bf16 / fp16 conversions are exact; float -> bf16 is round-to-nearest-even done on
 *    the bits (as torch does), float -> fp16 is the C cast of _Float16 (IEEE RNE, subnormals and
 *    overflow to inf included), as torch's .to(float16).
 *  - amax is a max over |w| done on the integer bit patterns of |w| (for non-negative IEEE
 *    floats integer order is float order; NaN sorts above Inf, so a non-finite value always
 *    shows up in amax and sets the non-finite flag). -0.0 and +0.0 both give amax 0.
 *  - Vectorisation (auto, by the compiler, per ISA variant) changes no result: each lane does the
 *    same IEEE op as the scalar code; reductions are integer max (associative, exact).
 *
 * Non-finite inputs: the flag is set and the group's outputs are NaN (fake quant) or
 * unspecified (pack); the caller raises or defers (int4_qat/formats/finite.py).
 *
 * Layouts follow the oracle (and through it compressed-tensors): INT4 int32 words of 8 uint4b8
 * nibbles, lowest first (compressors/pack_quantized/helpers.py pack_to_int32); FP4 bytes of two
 * E2M1 codes, even element in the low nibble (compressors/nvfp4/helpers.py pack_fp4_to_uint8).
 * Little-endian only (fused.py falls back to the oracle elsewhere).
 *
 * Compiled several times (fused.py), once per ISA level, with KSUF naming the variant.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#ifndef KSUF
#define KSUF generic
#endif
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define API(name) CAT(name, KSUF)
#define INLINE static inline __attribute__((always_inline))

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2 };

/* ------------------------------------------------------------------ conversions, bits */
INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float -> bf16 bits, round to nearest even (torch c10::round_to_nearest_even; NaN -> 0x7FC0) */
INLINE uint16_t f2bf(float f) {   /* branch-free (a select), so loops using it vectorise */
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}
INLINE float bf_round(float f) { return u2f((uint32_t)f2bf(f) << 16); }

INLINE float load(const void *p, int64_t i, int dt) {
    if (dt == DT_BF16) return u2f((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dt == DT_F16) return (float)((const _Float16 *)p)[i];
    return ((const float *)p)[i];
}
/* |w| bits as uint32, order-preserving within a dtype (NaN > Inf > finite) */
INLINE uint32_t abs_bits(const void *p, int64_t i, int dt) {
    if (dt == DT_F32) return ((const uint32_t *)p)[i] & 0x7FFFFFFFu;
    return (uint32_t)(((const uint16_t *)p)[i] & 0x7FFFu);
}
INLINE int abs_bits_finite(uint32_t m, int dt) {
    return dt == DT_F32 ? m < 0x7F800000u : (dt == DT_BF16 ? m < 0x7F80u : m < 0x7C00u);
}
INLINE float abs_bits_value(uint32_t m, int dt) {
    if (dt == DT_BF16) return u2f(m << 16);
    if (dt == DT_F16) { uint16_t h = (uint16_t)m; _Float16 v; memcpy(&v, &h, 2); return (float)v; }
    return u2f(m);
}
/* store float v (already the served value, bf16-exact or exact) as dtype dt */
INLINE void store(void *p, int64_t i, float v, int dt) {
    if (dt == DT_BF16) ((uint16_t *)p)[i] = f2bf(v);
    else if (dt == DT_F16) ((_Float16 *)p)[i] = (_Float16)v;
    else ((float *)p)[i] = v;
}
INLINE void store_nan(void *p, int64_t i, int dt) { store(p, i, u2f(0x7FC00000u), dt); }

INLINE uint32_t group_absmax(const void *w, int64_t base, int G, int dt) {
    uint32_t m = 0;
    for (int i = 0; i < G; ++i) { uint32_t a = abs_bits(w, base + i, dt); m = a > m ? a : m; }
    return m;
}

/* ------------------------------------------------------------------ threads */
typedef void (*range_fn)(const void *args, int64_t lo, int64_t hi, uint32_t *bad);
typedef struct { range_fn fn; const void *args; int64_t lo, hi; uint32_t bad; } chunk_t;

static void *chunk_main(void *p) {
    chunk_t *c = (chunk_t *)p;
    c->fn(c->args, c->lo, c->hi, &c->bad);
    return NULL;
}

/* Runs fn over [0, n) in up to `threads` contiguous chunks; returns the OR of the bad flags. */
static uint32_t parallel_for(int threads, int64_t n, range_fn fn, const void *args) {
    enum { MAXT = 64 };
    if (threads > MAXT) threads = MAXT;
    if (threads > n) threads = (int)n;
    if (threads <= 1) { uint32_t bad = 0; if (n > 0) fn(args, 0, n, &bad); return bad; }
    chunk_t c[MAXT];
    pthread_t th[MAXT];
    int started[MAXT];
    for (int t = 0; t < threads; ++t) {
        c[t].fn = fn; c[t].args = args; c[t].bad = 0;
        c[t].lo = n * t / threads; c[t].hi = n * (t + 1) / threads;
    }
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&th[t], NULL, chunk_main, &c[t]) == 0;
    chunk_main(&c[0]);
    uint32_t bad = c[0].bad;
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(th[t], NULL); else chunk_main(&c[t]);
        bad |= c[t].bad;
    }
    return bad;
}

/* two 4-bit codes (< 16, held in uint32 so the code loops vectorise at full width) per byte,
 * element 2i in the low nibble. Read as little-endian 64-bit pairs v = c[2i] | c[2i+1] << 32
 * (contiguous loads): the low byte of v | v >> 28 is c[2i] | c[2i+1] << 4. */
INLINE void pack_pairs(uint8_t *restrict out, const uint32_t *restrict c, int n) {
    for (int i = 0; i < n / 2; ++i) {
        uint64_t v;
        memcpy(&v, c + 2 * i, 8);
        out[i] = (uint8_t)(v | (v >> 28));
    }
}

/* ================================================================== INT4 (int4.py) */
typedef struct {
    const void *w; void *out; void *packed; uint16_t *scale;
    int dt, G, K, served_exact, floor_on, zero_on;
    float divisor, floor, zero_scale, smax, qmin, qmax;
} int4_args;

/* int4.py _scales_and_codes: s = bf16(max(amax / divisor, floor)); 0 -> zero_scale; min(s, S_MAX) */
INLINE float int4_scale(const int4_args *a, float amax) {
    float s = amax / a->divisor;
    if (a->floor_on && s < a->floor) s = a->floor;
    s = bf_round(s);
    if (a->zero_on && s == 0.0f) s = a->zero_scale;
    return s > a->smax ? a->smax : s;
}

/* q = clamp(round_half_even(w / s), qmin, qmax) + 0.0 (no negative zero code) */
INLINE float int4_code(const int4_args *a, float x, float s) {
    float q = rintf(x / s);
    q = q < a->qmin ? a->qmin : q;
    q = q > a->qmax ? a->qmax : q;
    return q + 0.0f;
}

/* Groups are done in tiles of TILE: amaxes, then all the tile's scales (independent division
 * chains that overlap or vectorise), then the elements. */
enum { TILE = 64 };
INLINE int int4_tile_scales(const int4_args *a, int64_t g, int ng, int G, float *s, int dt) {
    uint32_t m[TILE];
    int bad = 0;
    for (int j = 0; j < ng; ++j) { m[j] = group_absmax(a->w, (g + j) * G, G, dt); bad |= !abs_bits_finite(m[j], dt); }
    for (int j = 0; j < ng; ++j) s[j] = int4_scale(a, abs_bits_value(m[j], dt));
    return bad;
}

INLINE void nan_bad_groups(const void *w, void *out, int64_t g, int ng, int G, int dt) {
    for (int j = 0; j < ng; ++j)
        if (!abs_bits_finite(group_absmax(w, (g + j) * G, G, dt), dt))
            for (int i = 0; i < G; ++i) store_nan(out, (g + j) * G + i, dt);
}

INLINE void int4_fq_range(const int4_args *a, int64_t g0, int64_t g1, uint32_t *bad, int dt, int G) {
    float st[TILE];
    for (int64_t g = g0; g < g1; g += TILE) {
        int ng = g1 - g < TILE ? (int)(g1 - g) : TILE;
        int tile_bad = int4_tile_scales(a, g, ng, G, st, dt);
        for (int j = 0; j < ng; ++j) {
            int64_t base = (g + j) * G;
            float s = st[j];
            if (a->served_exact || dt == DT_BF16) {  /* one rounding of the exact q * s to dt */
                for (int i = 0; i < G; ++i) store(a->out, base + i, int4_code(a, load(a->w, base + i, dt), s) * s, dt);
            } else {                                  /* bf16(q * s), then to dt (exact for f32, RNE for f16) */
                for (int i = 0; i < G; ++i)
                    store(a->out, base + i, bf_round(int4_code(a, load(a->w, base + i, dt), s) * s), dt);
            }
        }
        if (tile_bad) { *bad = 1; nan_bad_groups(a->w, a->out, g, ng, G, dt); }
    }
}

/* Constant group sizes let the compiler unroll and vectorise the inner loops fully. */
#define SWITCH_G(RUN, dt, G)                                                \
    switch (G) {                                                            \
    case 16: RUN(dt, 16); break; case 32: RUN(dt, 32); break;               \
    case 64: RUN(dt, 64); break; case 128: RUN(dt, 128); break;             \
    default: RUN(dt, G); break;                                             \
    }
#define SWITCH_DT_G(RUN, a)                                                 \
    do {                                                                    \
        if ((a)->dt == DT_BF16) { SWITCH_G(RUN, DT_BF16, (a)->G) }          \
        else if ((a)->dt == DT_F16) { SWITCH_G(RUN, DT_F16, (a)->G) }       \
        else { SWITCH_G(RUN, DT_F32, (a)->G) }                              \
    } while (0)
/* A chunk function (the pool's unit of work) that calls RANGE with the dtype as a constant, so each
 * dtype gets its own inlined, vectorised copy of the loop. */
#define DT_CHUNK(NAME, ARGS, RANGE)                                          \
    static void NAME(const void *pa, int64_t lo, int64_t hi, uint32_t *bad) { \
        const ARGS *a = (const ARGS *)pa;                                   \
        if (a->dt == DT_BF16) RANGE(a, lo, hi, bad, DT_BF16);               \
        else if (a->dt == DT_F16) RANGE(a, lo, hi, bad, DT_F16);            \
        else RANGE(a, lo, hi, bad, DT_F32);                                 \
    }

static void int4_fq_chunk(const void *pa, int64_t lo, int64_t hi, uint32_t *bad) {
    const int4_args *a = (const int4_args *)pa;
#define RUN(dt, GG) int4_fq_range(a, lo, hi, bad, dt, GG)
    SWITCH_DT_G(RUN, a);
#undef RUN
}

/* rows of K elements: codes packed 8 per int32 word (as uint4b8), bf16 scales per group */
INLINE void int4_pack_range(const int4_args *a, int64_t r0, int64_t r1, uint32_t *bad, int dt, int G) {
    const int K = a->K, ng = K / G;
    uint8_t *pk = (uint8_t *)a->packed;
    float st[TILE];
    for (int64_t g = r0 * ng; g < r1 * ng; g += TILE) {   /* groups of whole rows, row-major */
        int nt = r1 * ng - g < TILE ? (int)(r1 * ng - g) : TILE;
        if (int4_tile_scales(a, g, nt, G, st, dt)) *bad = 1;
        for (int j = 0; j < nt; ++j) {
            int64_t base = (g + j) * G;
            float s = st[j];
            uint32_t c[G];                      /* uint4b8 nibbles q + 8 */
            a->scale[g + j] = f2bf(s);
            for (int i = 0; i < G; ++i) c[i] = (uint32_t)((int)int4_code(a, load(a->w, base + i, dt), s) + 8);
            pack_pairs(pk + (base >> 1), c, G);  /* G even (fused.py): whole bytes per group */
        }
    }
}

static void int4_pack_chunk(const void *pa, int64_t lo, int64_t hi, uint32_t *bad) {
    const int4_args *a = (const int4_args *)pa;
#define RUN(dt, GG) int4_pack_range(a, lo, hi, bad, dt, GG)
    SWITCH_DT_G(RUN, a);
#undef RUN
}

/* rule: 0 = amax/7 (floor 1e-5), 1 = amax/7.5 (zero scale -> bf16 eps) */
static void int4_fill(int4_args *a, int dt, int G, float divisor, int rule, float floor, float zero_scale,
                      float smax, float qmin, float qmax) {
    a->dt = dt; a->G = G; a->divisor = divisor; a->floor = floor; a->zero_scale = zero_scale;
    a->floor_on = rule == 0; a->zero_on = rule == 1; a->smax = smax; a->qmin = qmin; a->qmax = qmax;
}

int API(int4_fake_quant)(const void *w, void *out, int dt, int64_t numel, int G, float divisor, int rule,
                         float floor, float zero_scale, float smax, float qmin, float qmax,
                         int served_exact, int threads) {
    int4_args a; memset(&a, 0, sizeof a);
    int4_fill(&a, dt, G, divisor, rule, floor, zero_scale, smax, qmin, qmax);
    a.w = w; a.out = out; a.served_exact = served_exact;
    return (int)parallel_for(threads, numel / G, int4_fq_chunk, &a);
}

int API(int4_quant_pack)(const void *w, void *packed, uint16_t *scale, int dt, int64_t rows, int K, int G,
                         float divisor, int rule, float floor, float zero_scale, float smax, float qmin,
                         float qmax, int threads) {
    int4_args a; memset(&a, 0, sizeof a);
    int4_fill(&a, dt, G, divisor, rule, floor, zero_scale, smax, qmin, qmax);
    a.w = w; a.packed = packed; a.scale = scale; a.K = K;
    return (int)parallel_for(threads, rows, int4_pack_chunk, &a);
}

/* ================================================================== E2M1 (_common.py) */
/* _common._e2m1_round: a = min(|x + 0|, cap); step = pow2_floor(max(a / 2, 0.5)); k = rint(a / step).
 * Returns k and step; the value is k * step with the sign of (x + 0) (i.e. negative iff x < 0). */
INLINE float e2m1_k(float x, float cap, float *step_out) {
    float a = fabsf(x + 0.0f);
    a = a > cap ? cap : a;
    float h = a * 0.5f;
    h = h < 0.5f ? 0.5f : h;
    uint32_t sb = f2u(h) & 0x7F800000u;            /* step = 2^k, k in {-1, 0, 1} */
    *step_out = u2f(sb);
    /* a / step == a * (1 / step) exactly: 1 / 2^k is exact and scaling a (<= 6, or subnormal
     * times 2) by it is exact; bits of 2^-k are 0x7F000000 - bits of 2^k. */
    return rintf(a * u2f(0x7F000000u - sb));
}
INLINE float e2m1_value(float x, float cap) {
    float step, k = e2m1_k(x, cap, &step);
    return copysignf(k * step, x + 0.0f);
}
INLINE uint32_t e2m1_code(float x, float cap) {
    float step, k = e2m1_k(x, cap, &step);
    uint32_t binade2 = (f2u(step) >> 22) - 252u;   /* step 0.5 / 1 / 2 -> 0 / 2 / 4 */
    return ((uint32_t)k + binade2) | ((f2u(x + 0.0f) >> 31) << 3);
}

/* ================================================================== MXFP4 (mxfp4.py) */
typedef struct { const void *w; void *out; uint8_t *packed; uint8_t *scale; int dt; } mx_args;

/* mxfp4._block_exponents: e = ceil(log2(amax / 6)) exactly, from frexp; amax 0 -> -127.
 * For a normal amax = 1.M * 2^(E-127), frexp gives p = E - 126 and m = 1.M / 2, and m > 0.75
 * iff the mantissa field exceeds 0x400000: read off the bits (frexpf is a libm call). */
INLINE int mx_exponent(float amax) {
    if (amax == 0.0f) return -127;
    uint32_t u = f2u(amax), E = u >> 23;
    int e;
    if (E == 0) { int p; float m = frexpf(amax, &p); e = p - 3 + (m > 0.75f); }   /* subnormal */
    else e = (int)E - 129 + ((u & 0x7FFFFFu) > 0x400000u);
    return e < -127 ? -127 : (e > 127 ? 127 : e);
}
/* 2^e, exact, for e in [-127, 127] (2^-127 is a float32 subnormal) */
INLINE float pow2i(int e) { return e >= -126 ? u2f((uint32_t)(e + 127) << 23) : u2f(0x00400000u); }
INLINE float mx_cap(int e) { return e >= 127 ? 1.5f : (e >= 126 ? 3.0f : 6.0f); }

INLINE void mx_fq_range(const mx_args *a, int64_t g0, int64_t g1, uint32_t *bad, int dt) {
    enum { G = 32 };
    for (int64_t g = g0; g < g1; ++g) {
        int64_t base = g * G;
        uint32_t m = group_absmax(a->w, base, G, dt);
        if (!abs_bits_finite(m, dt)) { *bad = 1; for (int i = 0; i < G; ++i) store_nan(a->out, base + i, dt); continue; }
        int e = mx_exponent(abs_bits_value(m, dt));
        /* w / 2^e == w * 2^-e exactly: both are the correctly rounded w * 2^-e, and 2^-e is
         * exact (a normal float for every reachable e <= 126) */
        float p2 = pow2i(e), inv = pow2i(-e), cap = mx_cap(e);
        /* The oracle's bf16(value * 2^e), then to dt. value * 2^e is exact in float32 AND in bf16
         * (<= 2 significant bits, |e| <= 127: mxfp4.py docstring), so its low 16 bits are zero:
         * the bf16 rounding is the identity and the bf16 bits are the top half. */
        if (dt == DT_BF16) {
            uint16_t *o = (uint16_t *)a->out + base;
            for (int i = 0; i < G; ++i)
                o[i] = (uint16_t)(f2u(e2m1_value(load(a->w, base + i, dt) * inv, cap) * p2) >> 16);
        } else {
            for (int i = 0; i < G; ++i) store(a->out, base + i, e2m1_value(load(a->w, base + i, dt) * inv, cap) * p2, dt);
        }
    }
}
DT_CHUNK(mx_fq_chunk, mx_args, mx_fq_range)
INLINE void mx_pack_range(const mx_args *a, int64_t g0, int64_t g1, uint32_t *bad, int dt) {
    enum { G = 32 };
    for (int64_t g = g0; g < g1; ++g) {
        int64_t base = g * G;
        uint32_t m = group_absmax(a->w, base, G, dt);
        if (!abs_bits_finite(m, dt)) *bad = 1;
        int e = mx_exponent(abs_bits_value(m, dt));
        float inv = pow2i(-e), cap = mx_cap(e);   /* w / 2^e == w * 2^-e exactly (see above) */
        a->scale[g] = (uint8_t)(e + 127);
        uint32_t c[G];
        for (int i = 0; i < G; ++i) c[i] = e2m1_code(load(a->w, base + i, dt) * inv, cap);
        pack_pairs(a->packed + (base >> 1), c, G);
    }
}
DT_CHUNK(mx_pack_chunk, mx_args, mx_pack_range)

int API(mxfp4_fake_quant)(const void *w, void *out, int dt, int64_t numel, int threads) {
    mx_args a = {w, out, NULL, NULL, dt};
    return (int)parallel_for(threads, numel / 32, mx_fq_chunk, &a);
}
int API(mxfp4_quant_pack)(const void *w, uint8_t *packed, uint8_t *scale, int dt, int64_t numel, int threads) {
    mx_args a = {w, NULL, packed, scale, dt};
    return (int)parallel_for(threads, numel / 32, mx_pack_chunk, &a);
}

/* ================================================================== NVFP4 (nvfp4.py) */
/* max |w| of each of `nmat` matrices of `matsize` elements, as float32 (NaN/Inf propagate) */
typedef struct { const void *w; float *amax; int64_t matsize; int dt; } amax_args;
INLINE void amax_range(const amax_args *a, int64_t m0, int64_t m1, int dt) {
    for (int64_t mi = m0; mi < m1; ++mi) {
        uint32_t m = 0;
        const int64_t base = mi * a->matsize;
        for (int64_t i = 0; i < a->matsize; ++i) { uint32_t v = abs_bits(a->w, base + i, dt); m = v > m ? v : m; }
        a->amax[mi] = abs_bits_value(m, dt);   /* Inf, NaN as they are (torch's amax) */
    }
}
static void amax_chunk(const void *pa, int64_t lo, int64_t hi, uint32_t *bad) {
    const amax_args *a = (const amax_args *)pa;
    (void)bad;
    if (a->dt == DT_BF16) amax_range(a, lo, hi, DT_BF16);
    else if (a->dt == DT_F16) amax_range(a, lo, hi, DT_F16);
    else amax_range(a, lo, hi, DT_F32);
}
void API(matrix_amax)(const void *w, float *amax, int dt, int64_t nmat, int64_t matsize, int threads) {
    amax_args a = {w, amax, matsize, dt};
    parallel_for(threads, nmat, amax_chunk, &a);
}

typedef struct {
    const void *w; void *out; uint8_t *packed; uint8_t *scale; const float *g; int64_t blocks_per_mat; int dt;
} nv_args;

/* float32 s in [0, 448] -> nearest-even float8_e4m3fn value (c10 fp8e4m3fn_from_fp32_value):
 * round s to a multiple of its e4m3 quantum, 2^-9 below 2^-6 (subnormals), else 2^(E-3) for
 * s in [2^E, 2^(E+1)); scaling by a power of two is exact, rintf rounds half to even. */
INLINE float e4m3_round(float s) {    /* branch-free, so a loop over blocks vectorises */
    float sub = rintf(s * 512.0f) / 512.0f;
    float quantum = u2f(((f2u(s) >> 23) - 3u) << 23);         /* garbage below 2^-6: unused */
    float nrm = rintf(s / quantum) * quantum;
    return s < 0.015625f ? sub : nrm;
}
INLINE uint8_t e4m3_bits(float v) {                              /* v an e4m3 value >= 0 */
    if (v < 0.015625f) return (uint8_t)(v * 512.0f);
    uint32_t u = f2u(v);
    return (uint8_t)((((u >> 23) - 120u) << 3) | ((u >> 20) & 7u));
}
/* nvfp4._block_scales: e4m3(clamp(fl(amax / 6) * g, -448, 448)); 0 -> 0.125 */
INLINE float nv_scale(float amax, float g) {
    float s = (amax / 6.0f) * g;
    s = s > 448.0f ? 448.0f : s;
    s = e4m3_round(s);
    return s == 0.0f ? 0.125f : s;
}

/* Blocks are done in tiles of NV_TILE: block amaxes, then all their scales (independent, so the
 * division chains of different blocks overlap or vectorise), then the elements. */
enum { NV_TILE = 64 };
INLINE int nv_tile_scales(const nv_args *a, int64_t b, int nb, int64_t *mat, int64_t *mat_end,
                          float *s_out, float *s_eff, int dt) {
    enum { G = 16 };
    uint32_t m[NV_TILE];
    float g[NV_TILE];
    int bad = 0;
    for (int j = 0; j < nb; ++j) {
        if (b + j == *mat_end) { ++*mat; *mat_end += a->blocks_per_mat; }
        g[j] = a->g[*mat];
        m[j] = group_absmax(a->w, (b + j) * G, G, dt);
        bad |= !abs_bits_finite(m[j], dt);
    }
    for (int j = 0; j < nb; ++j) {
        float s = nv_scale(abs_bits_value(m[j], dt), g[j]);
        s_out[j] = s;
        s_eff[j] = s / g[j];
    }
    return bad;
}

INLINE void nv_fq_range(const nv_args *a, int64_t b0, int64_t b1, uint32_t *bad, int dt) {
    enum { G = 16 };
    int64_t mat = b0 / a->blocks_per_mat, mat_end = (mat + 1) * a->blocks_per_mat;
    float s[NV_TILE], s_eff[NV_TILE];
    for (int64_t b = b0; b < b1; b += NV_TILE) {
        int nb = b1 - b < NV_TILE ? (int)(b1 - b) : NV_TILE;
        int tile_bad = nv_tile_scales(a, b, nb, &mat, &mat_end, s, s_eff, dt);
        for (int j = 0; j < nb; ++j) {
            int64_t base = (b + j) * G;
            float se = s_eff[j];
            for (int i = 0; i < G; ++i) {   /* bf16(fp32(value * s_eff)), then to dt */
                float v = e2m1_value(load(a->w, base + i, dt) / se, 6.0f) * se;
                store(a->out, base + i, dt == DT_BF16 ? v : bf_round(v), dt);   /* bf16: store rounds */
            }
        }
        if (tile_bad) {                     /* NaN out the non-finite blocks (rare) */
            *bad = 1;
            for (int j = 0; j < nb; ++j)
                if (!abs_bits_finite(group_absmax(a->w, (b + j) * G, G, dt), dt))
                    for (int i = 0; i < G; ++i) store_nan(a->out, (b + j) * G + i, dt);
        }
    }
}
DT_CHUNK(nv_fq_chunk, nv_args, nv_fq_range)
INLINE void nv_pack_range(const nv_args *a, int64_t b0, int64_t b1, uint32_t *bad, int dt) {
    enum { G = 16 };
    int64_t mat = b0 / a->blocks_per_mat, mat_end = (mat + 1) * a->blocks_per_mat;
    float s[NV_TILE], s_eff[NV_TILE];
    for (int64_t b = b0; b < b1; b += NV_TILE) {
        int nb = b1 - b < NV_TILE ? (int)(b1 - b) : NV_TILE;
        if (nv_tile_scales(a, b, nb, &mat, &mat_end, s, s_eff, dt)) *bad = 1;
        for (int j = 0; j < nb; ++j) {
            int64_t base = (b + j) * G;
            float se = s_eff[j];
            uint32_t c[G];
            a->scale[b + j] = e4m3_bits(s[j]);
            for (int i = 0; i < G; ++i) c[i] = e2m1_code(load(a->w, base + i, dt) / se, 6.0f);
            pack_pairs(a->packed + (base >> 1), c, G);
        }
    }
}
DT_CHUNK(nv_pack_chunk, nv_args, nv_pack_range)

/* g: float32 global scale per matrix (nvfp4._global_scale, computed by the caller) */
/* nvfp4.global_scale without global_amax, in place on each matrix's amax:
 * g = fl(fl(1 / clamp(amax, FLT_MIN, BF16_MAX)) * 2688), non-finite -> 1 (NaN passes the clamp). */
static void nv_global_scales(float *g, int64_t nmat) {
    for (int64_t i = 0; i < nmat; ++i) {
        float a = g[i];
        a = a < 1.17549435e-38f ? 1.17549435e-38f : a;                 /* FLT_MIN */
        a = a > 3.38953139e38f ? 3.38953139e38f : a;                   /* bf16 max, exact */
        float v = (1.0f / a) * 2688.0f;
        g[i] = (f2u(v) & 0x7F800000u) == 0x7F800000u ? 1.0f : v;
    }
}

/* own_g: g[] holds nothing yet: compute every matrix's amax and global scale here first (the
 * caller passed no global_amax); otherwise g[] holds the global scales. */
int API(nvfp4_fake_quant)(const void *w, void *out, float *g, int dt, int64_t numel, int64_t matsize,
                          int own_g, int threads) {
    if (own_g) { API(matrix_amax)(w, g, dt, numel / matsize, matsize, threads); nv_global_scales(g, numel / matsize); }
    nv_args a = {w, out, NULL, NULL, g, matsize / 16, dt};
    return (int)parallel_for(threads, numel / 16, nv_fq_chunk, &a);
}
int API(nvfp4_quant_pack)(const void *w, uint8_t *packed, uint8_t *scale, float *g, int dt, int64_t numel,
                          int64_t matsize, int own_g, int threads) {
    if (own_g) { API(matrix_amax)(w, g, dt, numel / matsize, matsize, threads); nv_global_scales(g, numel / matsize); }
    nv_args a = {w, NULL, packed, scale, g, matsize / 16, dt};
    return (int)parallel_for(threads, numel / 16, nv_pack_chunk, &a);
}

/* 1 if this CPU can run the variant (fused.py picks the best one the CPU supports) */
int API(variant_supported)(void) {
#if defined(__x86_64__) && defined(KISA_AVX512)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(__x86_64__) && defined(KISA_AVX2)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 1;
#endif
}
