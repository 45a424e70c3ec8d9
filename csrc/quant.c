/* quant.c -- int8 weights for inference (float32 calls only).
 *
 * A quantized forward's weights are packed once by rf_q8_pack_weights into a buffer that
 * the forward takes as its `packed`: a header that tags it, then W_hh^T, the GRU's n block
 * apart (without linear_before_reset) or the projected LSTM's W_hr^T, and W_ih^T, each as
 * per-column scales followed by int8 panels. rf_prepare_q8_f32 recognises the tag and
 * hands the cells rf_weights with scales, and rf_step_gemm_f32 / rf_project_f32 then run
 * rf_q8_gemm:
 *
 *   quantize each row of A (symmetric, per row, 7 bits: rf_q8_quantize), multiply in int32
 *   (exact: the same integer whatever the order), then C (+)= (float)acc * (sa * sw).
 *
 * Every row is computed alone and its integer sums are exact, so the numbers of a row are
 * the same whatever the other rows of the call and the thread count (batch invariance),
 * and the same on the portable and the AVX2 paths. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "rnnfuse.h"

#if RF_HAVE_AVX2
#include <immintrin.h>
#endif

/* A panel: RF_Q8_NR columns of op(W); within it, groups of RF_Q8_KG consecutive k, each
 * group RF_Q8_NR * RF_Q8_KG bytes (column-major inside the group: 4 k of column 0, ...),
 * one 512-bit load or two 256-bit ones. K is padded with zeros to whole pairs of groups
 * (the 256-bit kernels take two at a time), N to whole panels. */
#define RF_Q8_NR 16
#define RF_Q8_HALF 8  /* columns of a 256-bit register */
#define RF_Q8_KG 4
#define RF_Q8_ALIGN 64
/* Rows of A quantized at once (into a buffer of RF_Q8_ROWS rows of K, the calling thread's
 * part of W->scratch); the 256-bit kernels take them RF_Q8_ROWS_256 at a time. */
#define RF_Q8_ROWS 8
#define RF_Q8_ROWS_256 4
/* The largest |q| of weights and of activations: 7 bits each, so that on the AVX2 path
 * (product_avx2) a + 64 is a u8 of at most 127 and the sum of two vpmaddubsw results,
 * four products within 4*127*63 < 2^15, never saturates. Every path quantizes so. */
#define RF_Q8_WMAX 63
#define RF_Q8_AMAX 63
/* a + RF_Q8_OFFSET, in [1, 127]: the unsigned operand of vpmaddubsw and vpdpbusd. */
#define RF_Q8_OFFSET_SHIFT 6
#define RF_Q8_OFFSET (1 << RF_Q8_OFFSET_SHIFT)
_Static_assert(RF_Q8_AMAX < RF_Q8_OFFSET
               && 4 * (RF_Q8_OFFSET + RF_Q8_AMAX) * RF_Q8_WMAX < 32768,
               "a + RF_Q8_OFFSET must be unsigned, and four of its products fit int16");

static const char q8_tag[RF_TAG_NAME] = "rnnfuse int8 weights 2";

static ptrdiff_t round_up(ptrdiff_t n, ptrdiff_t m) { return (n + m - 1) / m * m; }
static ptrdiff_t k_padded(ptrdiff_t K) { return round_up(K, 2 * RF_Q8_KG); }
static ptrdiff_t n_padded(ptrdiff_t N) { return round_up(N, RF_Q8_NR); }

/* Bytes of one packed op(W), K rows and N columns: its scales (float), its column sums
 * (int32), then its panels. */
static ptrdiff_t scales_bytes(ptrdiff_t N) {
    return round_up(n_padded(N) * (ptrdiff_t)sizeof(float), RF_Q8_ALIGN);
}
static ptrdiff_t weight_bytes(ptrdiff_t K, ptrdiff_t N) {
    return 2 * scales_bytes(N) + round_up(n_padded(N) * k_padded(K), RF_Q8_ALIGN);
}

/* The weights of a forward, in the order of rf_weight W[3] and of the buffer: each op(W)
 * K rows by N columns, made from a row-major W of N rows of K (K = 0: absent). W[0] =
 * W_hh^T (the GRU without linear_before_reset: its r z rows), W[1] its n block, or with
 * P > 0 the projection's W_hr^T, W[2] = W_ih^T. */
typedef struct { ptrdiff_t K[3], N[3]; } q8_shapes;

static q8_shapes shapes_of(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P) {
    int split = rf_split_n(G, lbr);
    q8_shapes s = {{P ? P : H, P ? H : split ? H : 0, I},
                   {split ? 2 * H : G * H, P ? P : H, G * H}};
    return s;
}

ptrdiff_t rf_q8_pack_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P) {
    q8_shapes s = shapes_of(G, H, I, lbr, P);
    ptrdiff_t size = RF_Q8_ALIGN;
    for (int k = 0; k < 3; k++)
        if (s.K[k]) size += weight_bytes(s.K[k], s.N[k]);
    return size;
}

/* Folds |a[k]| for k0 <= k < K into *amax; 0 where one of them is inf or NaN. */
static int fold_max(float *amax, const float *a, ptrdiff_t k0, ptrdiff_t K) {
    int finite = 1;
    for (ptrdiff_t k = k0; k < K; k++) {
        float m = fabsf(a[k]);
        finite &= m <= FLT_MAX;
        *amax = m > *amax ? m : *amax;
    }
    return finite;
}

/* round-half-even(a * inv), clamped to [-qmax, qmax] (RF_Q8_WMAX or RF_Q8_AMAX). */
static int8_t round_one(float a, float inv, float qmax) {
    float v = nearbyintf(a * inv);
    return (int8_t)(v > qmax ? qmax : v < -qmax ? -qmax : v);
}

/* Whether a row's q are all zeros: a zero row, a row so small that qmax / max|a|
 * overflows (its products are below float's range anyway) and a non-finite row. */
static int zero_row(float amax, int finite, float qmax) {
    return !(finite && amax >= qmax / FLT_MAX);
}

/* A row's scale once its max is known: max|a| / qmax, or for a zero_row 0 (finite) or
 * NaN (which carries NaN into its outputs). */
static float row_scale(float amax, int finite, float qmax) {
    return !zero_row(amax, finite, qmax) ? amax / qmax : finite ? 0.0f : NAN;
}

/* For an activations' zero_row: its q (zeros) and scale. */
static int degenerate(int8_t *q, ptrdiff_t K, float amax, int finite, float *scale) {
    if (!zero_row(amax, finite, RF_Q8_AMAX)) return 0;
    if (K > 0) memset(q, 0, (size_t)K);
    *scale = row_scale(amax, finite, RF_Q8_AMAX);
    return 1;
}

/* An activations' row: q = round_one(a, RF_Q8_AMAX / max|a|), and its scale. */
static float quantize_base(int8_t *q, const float *a, ptrdiff_t K) {
    float amax = 0, scale;
    int finite = fold_max(&amax, a, 0, K);
    if (degenerate(q, K, amax, finite, &scale)) return scale;
    for (ptrdiff_t k = 0; k < K; k++) q[k] = round_one(a[k], RF_Q8_AMAX / amax, RF_Q8_AMAX);
    return amax / RF_Q8_AMAX;
}

#if RF_HAVE_AVX2
/* The same with AVX2, 8 (then 32) at a time: max is exact, and each q is the same
 * product, rounding (vroundps to nearest even) and clamp as round_one's. */
__attribute__((target("avx2"))) static float quantize_avx2(int8_t *restrict q,
                                                           const float *restrict a,
                                                           ptrdiff_t K) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 huge = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 m = _mm256_and_ps(_mm256_loadu_ps(a + k), abs_mask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(m, huge, _CMP_NLE_UQ));  /* inf, NaN */
        vmax = _mm256_max_ps(vmax, m);
    }
    float lanes[8], amax = 0, scale;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    int finite = fold_max(&amax, a, k, K) && !_mm256_movemask_ps(bad);
    if (degenerate(q, K, amax, finite, &scale)) return scale;
    float inv = RF_Q8_AMAX / amax;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(RF_Q8_AMAX);
    const __m256 lo = _mm256_set1_ps(-RF_Q8_AMAX);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#define Q8_ROUND(v) _mm256_cvtps_epi32(_mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_round_ps( \
        _mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))))
    for (k = 0; k + 32 <= K; k += 32) {
        __m256i i0 = Q8_ROUND(_mm256_loadu_ps(a + k)), i1 = Q8_ROUND(_mm256_loadu_ps(a + k + 8));
        __m256i i2 = Q8_ROUND(_mm256_loadu_ps(a + k + 16));
        __m256i i3 = Q8_ROUND(_mm256_loadu_ps(a + k + 24));
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(b, order));
    }
#undef Q8_ROUND
    for (; k < K; k++) q[k] = round_one(a[k], inv, RF_Q8_AMAX);
    return amax / RF_Q8_AMAX;
}
#endif

#if RF_HAVE_AVX2
/* Lanes 0 .. n-1 of 16 (all for n >= 16). */
static __mmask16 tail_mask(ptrdiff_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

/* The same with AVX-512F, 16 at a time, the tail masked: the same max, and each q the same
 * product, rounding and clamp. */
__attribute__((target("avx2,avx512f"))) static float quantize_avx512(int8_t *restrict q,
                                                                     const float *restrict a,
                                                                     ptrdiff_t K) {
    const __m512 huge = _mm512_set1_ps(FLT_MAX);
    __m512 max0 = _mm512_setzero_ps(), max1 = max0;
    __mmask16 bad = 0;  /* inf, NaN */
    ptrdiff_t k = 0;
    for (; k + 32 <= K; k += 32) {  /* two chains of max */
        __m512 m0 = _mm512_abs_ps(_mm512_loadu_ps(a + k));
        __m512 m1 = _mm512_abs_ps(_mm512_loadu_ps(a + k + 16));
        bad |= _mm512_cmp_ps_mask(m0, huge, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(m1, huge, _CMP_NLE_UQ);
        max0 = _mm512_max_ps(max0, m0);
        max1 = _mm512_max_ps(max1, m1);
    }
    for (; k < K; k += 16) {
        __m512 m = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), a + k));
        bad |= _mm512_cmp_ps_mask(m, huge, _CMP_NLE_UQ);
        max0 = _mm512_max_ps(max0, m);
    }
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(max0, max1)), scale;
    if (degenerate(q, K, amax, !bad, &scale)) return scale;
    const __m512 inv = _mm512_set1_ps(RF_Q8_AMAX / amax);
    const __m512 hi = _mm512_set1_ps(RF_Q8_AMAX), lo = _mm512_set1_ps(-RF_Q8_AMAX);
    for (k = 0; k < K; k += 16) {
        __mmask16 live = tail_mask(K - k);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, a + k), inv);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_max_ps(lo, _mm512_min_ps(hi, v));
        _mm512_mask_cvtepi32_storeu_epi8(q + k, live, _mm512_cvtps_epi32(v));
    }
    return amax / RF_Q8_AMAX;
}
#endif

float rf_q8_quantize(int8_t *q, const float *a, ptrdiff_t K, int path) {
#if RF_HAVE_AVX2
    if (path == 3) return quantize_avx512(q, a, K);
    if (path > 0) return quantize_avx2(q, a, K);
#endif
    (void)path;
    return quantize_base(q, a, K);
}

#if RF_HAVE_AVX2
static int avx512_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#endif

int rf_q8_cpu_vnni(void) {
#if RF_HAVE_AVX2
    __builtin_cpu_init();
    return rf_cpu_avx2() && (avx512_vnni() || __builtin_cpu_supports("avxvnni"));
#else
    return 0;
#endif
}

/* Where (k, n) of op(W) lies in its panels. */
static ptrdiff_t panel_at(ptrdiff_t k, ptrdiff_t n, ptrdiff_t panel_stride) {
    return n / RF_Q8_NR * panel_stride + k / RF_Q8_KG * RF_Q8_NR * RF_Q8_KG
           + n % RF_Q8_NR * RF_Q8_KG + k % RF_Q8_KG;
}

/* Packs op(W) = W^T, W (N rows of K, row stride ldw), into dst (weight_bytes(K, N)):
 * each row of W (a column of op(W), an output) quantized with its own scale, as
 * rf_q8_quantize does but to RF_Q8_WMAX, straight into its panel. */
static void pack_weight(uint8_t *dst, const float *w, ptrdiff_t ldw, ptrdiff_t K,
                        ptrdiff_t N) {
    float *scales = (float *)dst;
    int32_t *sums = (int32_t *)(dst + scales_bytes(N));
    int8_t *panels = (int8_t *)(dst + 2 * scales_bytes(N));
    ptrdiff_t panel_stride = RF_Q8_NR * k_padded(K);
    memset(dst, 0, (size_t)weight_bytes(K, N));
    for (ptrdiff_t n = 0; n < N; n++) {
        const float *row = w + n * ldw;
        float amax = 0;
        int finite = fold_max(&amax, row, 0, K);
        scales[n] = row_scale(amax, finite, RF_Q8_WMAX);
        if (zero_row(amax, finite, RF_Q8_WMAX)) continue;  /* q: the zeros already there */
        for (ptrdiff_t k = 0; k < K; k++) {
            int8_t q = round_one(row[k], RF_Q8_WMAX / amax, RF_Q8_WMAX);
            sums[n] += q;
            panels[panel_at(k, n, panel_stride)] = q;
        }
    }
}

static void use_weight(rf_weight *W, const uint8_t *src, ptrdiff_t K, ptrdiff_t N) {
    W->scratch = NULL;
    W->scales = (const float *)src;
    W->sums = (const int32_t *)(src + scales_bytes(N));
    W->packed = src + 2 * scales_bytes(N);
    W->panel_stride = RF_Q8_NR * k_padded(K);
}

/* The weights of a forward (shapes_of) laid out after the header of buf; pack_to: pack
 * them there first from src, each row-major with rows of K. scratch (or NULL): each
 * weight's part of it, rf_q8_scratch_size(K) bytes, one after another: the threads of a
 * call that run different products at once (a projected LSTM's W_hh and W_hr) then never
 * share their rows' buffers. */
static void weights_of(rf_weight W[3], const uint8_t *buf, q8_shapes s, uint8_t *pack_to,
                       const float *const src[3], uint8_t *scratch) {
    const uint8_t *at = buf + RF_Q8_ALIGN;
    for (int k = 0; k < 3; k++) {
        if (!s.K[k]) continue;
        if (pack_to) pack_weight(pack_to + (at - buf), src[k], s.K[k], s.K[k], s.N[k]);
        use_weight(&W[k], at, s.K[k], s.N[k]);
        at += weight_bytes(s.K[k], s.N[k]);
        if (scratch) {
            W[k].scratch = scratch;
            scratch += rf_q8_scratch_size(s.K[k]);
        }
    }
}

ptrdiff_t rf_q8_scratch_total(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P) {
    q8_shapes s = shapes_of(G, H, I, lbr, P);
    ptrdiff_t size = 0;
    for (int k = 0; k < 3; k++)
        if (s.K[k]) size += rf_q8_scratch_size(s.K[k]);
    return size;
}

void rf_q8_pack_weights(void *dst, const float *w_ih, const float *w_hh, const float *w_hr,
                        ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P) {
    const float *src[3] = {w_hh, rf_split_n(G, lbr) ? w_hh + 2 * H * H : w_hr, w_ih};
    rf_weight W[3];
    rf_tag_write(dst, q8_tag, G, H, I, lbr, P);
    weights_of(W, dst, shapes_of(G, H, I, lbr, P), dst, src, NULL);
}

int rf_q8_prepared(rf_weight W[3], const void *prepacked, ptrdiff_t G, ptrdiff_t H,
                   ptrdiff_t I, int lbr, ptrdiff_t P, void *scratch) {
    const float *none[3] = {NULL, NULL, NULL};
    if (!rf_tag_matches(prepacked, q8_tag, G, H, I, lbr, P)) return 0;
    weights_of(W, prepacked, shapes_of(G, H, I, lbr, P), NULL, none, scratch);
    return 1;
}

/* ---- the product: acc[r][n] = sum_k qa[r][k] qw[k][n], exact in int32 ---- */

/* Where a tile's quantized rows keep the four a's of row r from k = g (g a multiple of
 * RF_Q8_KG): the rows interleaved by groups of k, so that one pointer, moving on by
 * RF_Q8_ROWS * RF_Q8_KG bytes per group, reaches every row of a tile. */
#define QA_AT(qa, r, g) ((qa) + (g) * RF_Q8_ROWS + (r) * RF_Q8_KG)

/* A tile's rows: quantized rows qa (QA_AT) and their scales, and where their products
 * go. */
typedef struct {
    const int8_t *qa;
    const float *sa;
    ptrdiff_t Kp, N, ldc;
    float *C;
    int accumulate;
} q8_rows;

/* Writes one output row's columns from their int32 sums: c (+)= acc * (sa * sw). */
static void rescale(const int32_t *acc, float sa, const float *sw, ptrdiff_t cols,
                    int accumulate, float *c) {
    for (ptrdiff_t n = 0; n < cols; n++) {
        float v = (float)acc[n] * (sa * sw[n]);
        c[n] = accumulate ? c[n] + v : v;
    }
}

/* rows (at most RF_Q8_ROWS) of the product, every panel of W. */
static void product_portable(const q8_rows *t, ptrdiff_t rows, const rf_weight *W) {
    for (ptrdiff_t n0 = 0; n0 < t->N; n0 += RF_Q8_NR) {
        const int8_t *panel = (const int8_t *)W->packed + n0 / RF_Q8_NR * W->panel_stride;
        ptrdiff_t cols = t->N - n0 < RF_Q8_NR ? t->N - n0 : RF_Q8_NR;
        for (ptrdiff_t r = 0; r < rows; r++) {
            int32_t sum[RF_Q8_NR] = {0};
            for (ptrdiff_t g = 0; g < t->Kp; g += RF_Q8_KG) {
                const int8_t *w = panel + g * RF_Q8_NR, *a = QA_AT(t->qa, r, g);
                for (int n = 0; n < RF_Q8_NR; n++)
                    for (int k = 0; k < RF_Q8_KG; k++)
                        sum[n] += (int32_t)a[k] * w[n * RF_Q8_KG + k];
            }
            rescale(sum, t->sa[r], W->scales + n0, cols, t->accumulate,
                    t->C + r * t->ldc + n0);
        }
    }
}

#if RF_HAVE_AVX2
/* The same with 256-bit SIMD, one body for every instruction set (PRODUCT_KERNEL): tiles
 * of up to 4 rows x one panel (two registers of 8 columns), two groups of k at a time,
 * the sums in registers: named variables s<r><h> (row r, half h), not an array, and rows
 * a constant where it is inlined, so that the compiler keeps them there; a single row
 * keeps two chains per register (alternate pairs of groups, in row 1's sums) to hide the
 * multiply-add's latency. PANEL_STEP and PANEL_END give the instructions (the integer
 * sums are exact in any order); the rescale rounds as rescale() does. */
#define SUMS256(r) __m256i s##r##0 = _mm256_setzero_si256(), s##r##1 = s##r##0
#define STEP256(r)                                                                      \
    if (rows > r) {                                                                     \
        __m256i a_ = BROADCAST_A(r, g), b_ = BROADCAST_A(r, g + RF_Q8_KG);              \
        PANEL_STEP(s##r##0, a_, w0, b_, v0);                                            \
        PANEL_STEP(s##r##1, a_, w1, b_, v1);                                            \
    }
#define STORE256(name, r)                                                               \
    if (rows > r) {                                                                     \
        name##_store(t, W, r0 + r, n0, PANEL_END(s##r##0, W->sums + n0));               \
        if (n0 + RF_Q8_HALF < t->N)                                                     \
            name##_store(t, W, r0 + r, n0 + RF_Q8_HALF,                                 \
                         PANEL_END(s##r##1, W->sums + n0 + RF_Q8_HALF));                \
    }
#define PRODUCT_KERNEL(name, isa)                                                       \
    /* Row r's 8 columns from n: C (+)= acc * (sa * sw). */                             \
    __attribute__((target(isa), always_inline)) static inline void name##_store(       \
        const q8_rows *t, const rf_weight *W, ptrdiff_t r, ptrdiff_t n, __m256i acc) {  \
        ptrdiff_t cols = t->N - n < RF_Q8_HALF ? t->N - n : RF_Q8_HALF;                 \
        float *c = t->C + r * t->ldc + n;                                               \
        if (cols < RF_Q8_HALF) {                                                        \
            int32_t part[RF_Q8_HALF];                                                   \
            _mm256_storeu_si256((__m256i *)part, acc);                                  \
            rescale(part, t->sa[r], W->scales + n, cols, t->accumulate, c);             \
            return;                                                                     \
        }                                                                               \
        __m256 scale = _mm256_mul_ps(_mm256_set1_ps(t->sa[r]),                          \
                                     _mm256_loadu_ps(W->scales + n));                   \
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);                       \
        if (t->accumulate) v = _mm256_add_ps(_mm256_loadu_ps(c), v);                    \
        _mm256_storeu_ps(c, v);                                                         \
    }                                                                                   \
    __attribute__((target(isa), always_inline)) static inline void name##_rows(        \
        const q8_rows *t, ptrdiff_t r0, const ptrdiff_t rows, const rf_weight *W) {     \
        ptrdiff_t Kp = t->Kp;                                                           \
        const int8_t *qa = QA_AT(t->qa, r0, 0);                                         \
        for (ptrdiff_t n0 = 0; n0 < t->N; n0 += RF_Q8_NR) {                              \
            const int8_t *p0 = (const int8_t *)W->packed + n0 / RF_Q8_NR * W->panel_stride; \
            const int8_t *p1 = p0 + RF_Q8_HALF * RF_Q8_KG;                              \
            SUMS256(0); SUMS256(1); SUMS256(2); SUMS256(3);                             \
            ptrdiff_t g = 0;                                                            \
            if (rows == 1) {                                                            \
                for (; g + 4 * RF_Q8_KG <= Kp; g += 4 * RF_Q8_KG) {                     \
                    __m256i a0 = BROADCAST_A(0, g), a1 = BROADCAST_A(0, g + RF_Q8_KG);  \
                    __m256i a2 = BROADCAST_A(0, g + 2 * RF_Q8_KG);                      \
                    __m256i a3 = BROADCAST_A(0, g + 3 * RF_Q8_KG);                      \
                    PANEL_STEP(s00, a0, PANEL_W(p0, g), a1, PANEL_W(p0, g + RF_Q8_KG)); \
                    PANEL_STEP(s01, a0, PANEL_W(p1, g), a1, PANEL_W(p1, g + RF_Q8_KG)); \
                    PANEL_STEP(s10, a2, PANEL_W(p0, g + 2 * RF_Q8_KG),                  \
                               a3, PANEL_W(p0, g + 3 * RF_Q8_KG));                      \
                    PANEL_STEP(s11, a2, PANEL_W(p1, g + 2 * RF_Q8_KG),                  \
                               a3, PANEL_W(p1, g + 3 * RF_Q8_KG));                      \
                }                                                                       \
                s00 = _mm256_add_epi32(s00, s10);                                       \
                s01 = _mm256_add_epi32(s01, s11);                                       \
            }                                                                           \
            for (; g < Kp; g += 2 * RF_Q8_KG) {                                         \
                __m256i w0 = PANEL_W(p0, g), w1 = PANEL_W(p1, g);                       \
                __m256i v0 = PANEL_W(p0, g + RF_Q8_KG), v1 = PANEL_W(p1, g + RF_Q8_KG); \
                STEP256(0) STEP256(1) STEP256(2) STEP256(3)                             \
            }                                                                           \
            STORE256(name, 0) STORE256(name, 1) STORE256(name, 2) STORE256(name, 3)     \
        }                                                                               \
    }                                                                                   \
    __attribute__((target(isa))) static void name(const q8_rows *t, ptrdiff_t rows,     \
                                                  const rf_weight *W) {                 \
        for (ptrdiff_t r0 = 0; r0 < rows; r0 += RF_Q8_ROWS_256) {                        \
            switch (rows - r0) {                                                        \
            case 1: name##_rows(t, r0, 1, W); break;                                    \
            case 2: name##_rows(t, r0, 2, W); break;                                    \
            case 3: name##_rows(t, r0, 3, W); break;                                    \
            default: name##_rows(t, r0, 4, W); break;                                   \
            }                                                                           \
        }                                                                               \
    }

/* Four a's of row r, from k = g, in every 32-bit lane. */
#define BROADCAST_A(r, g)                                                               \
    ({ int32_t four_; memcpy(&four_, QA_AT(qa, r, g), sizeof four_);                    \
       _mm256_set1_epi32(four_); })
#define PANEL_W(panel, g) _mm256_loadu_si256((const __m256i *)((panel) + (g) * RF_Q8_NR))

/* Every kernel takes a's rows offset to unsigned, a + RF_Q8_OFFSET (rf_q8_gemm), so each
 * sum holds RF_Q8_OFFSET * (its column's sum) too, taken off at the end. */
#define PANEL_END(s, sums)                                                              \
    _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sums)),  \
                                          RF_Q8_OFFSET_SHIFT))

/* s += a . w + b . v (two groups of k). AVX2: vpmaddubsw multiplies a + 64 (u8, <= 127)
 * by w (s8, |w| <= 63) into pairs of products, the pairs of both groups are added in int16
 * (four products, within 4*127*63 < 2^15: no saturation), and vpmaddwd widens them into
 * int32: three multiplies per 64 products. */
#define PANEL_STEP(s, a, w, b, v)                                                       \
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a, w), \
                                                               _mm256_maddubs_epi16(b, v)), \
                                              _mm256_set1_epi16(1)))
PRODUCT_KERNEL(product_avx2, "avx2")
#undef PANEL_STEP

/* VNNI: vpdpbusd sums four u8 x s8 products into int32 without saturation. */
#define PANEL_STEP(s, a, w, b, v) \
    s = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(s, a, w), b, v)
PRODUCT_KERNEL(product_avxvnni, "avx2,avxvnni")
#undef PANEL_STEP
#undef PANEL_END
#undef BROADCAST_A
#undef PANEL_W
#undef SUMS256
#undef STEP256
#undef STORE256

/* AVX-512 VNNI: 512-bit registers, a whole panel each; tiles of up to 8 rows x two panels,
 * so that each broadcast of a serves two multiply-adds. The sums are named variables, not
 * an array, so that the compiler keeps all of them in registers. */
#define AVX512_ISA "avx2,avx512f,avx512bw,avx512vl,avx512vnni"

/* s += a (u8) . w (s8), four products to each int32 lane. */
#define DPBUSD512(s, a, w) (s = _mm512_dpbusd_epi32(s, a, w))

/* One row's 16 columns from n (cols of them real): C (+)= (acc - RF_Q8_OFFSET sums) *
 * (sa * sw). */
__attribute__((target(AVX512_ISA), always_inline)) static inline void
avx512_store(const q8_rows *t, const rf_weight *W, ptrdiff_t r, ptrdiff_t n, __m512i sum) {
    ptrdiff_t cols = t->N - n < RF_Q8_NR ? t->N - n : RF_Q8_NR;
    __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(W->sums + n)),
                                       RF_Q8_OFFSET_SHIFT);
    __m512i acc = _mm512_sub_epi32(sum, offset);
    float *c = t->C + r * t->ldc + n;
    if (cols < RF_Q8_NR) {
        int32_t part[RF_Q8_NR];
        _mm512_storeu_si512((void *)part, acc);
        rescale(part, t->sa[r], W->scales + n, cols, t->accumulate, c);
        return;
    }
    __m512 scale = _mm512_mul_ps(_mm512_set1_ps(t->sa[r]), _mm512_loadu_ps(W->scales + n));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
    if (t->accumulate) v = _mm512_add_ps(_mm512_loadu_ps(c), v);
    _mm512_storeu_ps(c, v);
}

/* Row r of a tile: s<r>0 and s<r>1, its sums over the two panels, in registers. */
#define A512(r, g) ({ int32_t four_; memcpy(&four_, QA_AT(qa, r, g), sizeof four_); \
                      _mm512_set1_epi32(four_); })
#define W512(panel, g) _mm512_loadu_si512((const void *)((panel) + (g) * RF_Q8_NR))
#define ROW_SUMS(r) __m512i s##r##0 = _mm512_setzero_si512(), s##r##1 = s##r##0
#define ROW_STEP(r)                                                                     \
    if (rows > r) {                                                                     \
        __m512i a_ = A512(r, g);                                                        \
        DPBUSD512(s##r##0, a_, w0);                                                     \
        DPBUSD512(s##r##1, a_, w1);                                                     \
    }
#define ROW_STORE(r)                                                                    \
    if (rows > r) {                                                                     \
        avx512_store(t, W, r, n0, s##r##0);                                             \
        if (two) avx512_store(t, W, r, n0 + RF_Q8_NR, s##r##1);                         \
    }

__attribute__((target(AVX512_ISA), always_inline)) static inline void
avx512_rows(const q8_rows *t, const ptrdiff_t rows, const rf_weight *W) {
    ptrdiff_t Kp = t->Kp;
    const int8_t *qa = t->qa;
    for (ptrdiff_t n0 = 0; n0 < t->N; n0 += 2 * RF_Q8_NR) {
        const int8_t *p0 = (const int8_t *)W->packed + n0 / RF_Q8_NR * W->panel_stride;
        int two = n0 + RF_Q8_NR < t->N;  /* (panels exist up to whole panels of N) */
        const int8_t *p1 = two ? p0 + W->panel_stride : p0;
        ROW_SUMS(0); ROW_SUMS(1); ROW_SUMS(2); ROW_SUMS(3);
        ROW_SUMS(4); ROW_SUMS(5); ROW_SUMS(6); ROW_SUMS(7);
        ptrdiff_t g = 0;
        if (rows == 1) {  /* a second chain per panel (s1*: odd groups of k) */
            for (; g + 2 * RF_Q8_KG <= Kp; g += 2 * RF_Q8_KG) {
                __m512i a0 = A512(0, g), a1 = A512(0, g + RF_Q8_KG);
                DPBUSD512(s00, a0, W512(p0, g));
                DPBUSD512(s01, a0, W512(p1, g));
                DPBUSD512(s10, a1, W512(p0, g + RF_Q8_KG));
                DPBUSD512(s11, a1, W512(p1, g + RF_Q8_KG));
            }
            s00 = _mm512_add_epi32(s00, s10);
            s01 = _mm512_add_epi32(s01, s11);
        }
        for (; g < Kp; g += RF_Q8_KG) {
            __m512i w0 = W512(p0, g), w1 = W512(p1, g);
            ROW_STEP(0) ROW_STEP(1) ROW_STEP(2) ROW_STEP(3)
            ROW_STEP(4) ROW_STEP(5) ROW_STEP(6) ROW_STEP(7)
        }
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3)
        ROW_STORE(4) ROW_STORE(5) ROW_STORE(6) ROW_STORE(7)
    }
}
#undef A512
#undef W512
#undef ROW_SUMS
#undef ROW_STEP
#undef ROW_STORE

__attribute__((target(AVX512_ISA))) static void product_avx512vnni(const q8_rows *t,
                                                                   ptrdiff_t rows,
                                                                   const rf_weight *W) {
    switch (rows) {
    case 1: avx512_rows(t, 1, W); break;
    case 2: avx512_rows(t, 2, W); break;
    case 3: avx512_rows(t, 3, W); break;
    case 4: avx512_rows(t, 4, W); break;
    case 5: avx512_rows(t, 5, W); break;
    case 6: avx512_rows(t, 6, W); break;
    case 7: avx512_rows(t, 7, W); break;
    default: avx512_rows(t, 8, W); break;
    }
}
#endif

typedef void (*product_fn)(const q8_rows *t, ptrdiff_t rows, const rf_weight *W);

/* The product kernel of a code path (rf_q8_path), and whether it takes a + RF_Q8_OFFSET
 * (all but the portable one). */
static product_fn product_kernel(int path, int *offset) {
    *offset = 1;
#if RF_HAVE_AVX2
    if (path == 3 && avx512_vnni()) return product_avx512vnni;
    if (path >= 2 && __builtin_cpu_supports("avxvnni")) return product_avxvnni;
    if (path) return product_avx2;
#endif
    *offset = 0;
    return product_portable;
}

/* rf_q8_gemm without scratch: each row's q made again for every panel, the same integers
 * (portable, slow). */
static void gemm_unbuffered(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A,
                            ptrdiff_t lda, const rf_weight *W, int accumulate, float *C,
                            ptrdiff_t ldc) {
    const int8_t *panels = (const int8_t *)W->packed;
    for (ptrdiff_t r = 0; r < M; r++) {
        const float *a = A + r * lda;
        float amax = 0;
        int finite = fold_max(&amax, a, 0, K), zero = zero_row(amax, finite, RF_Q8_AMAX);
        for (ptrdiff_t n0 = 0; n0 < N; n0 += RF_Q8_NR) {
            ptrdiff_t cols = N - n0 < RF_Q8_NR ? N - n0 : RF_Q8_NR;
            int32_t sum[RF_Q8_NR] = {0};
            for (ptrdiff_t k = 0; k < K && !zero; k++) {
                int32_t q = round_one(a[k], RF_Q8_AMAX / amax, RF_Q8_AMAX);
                for (ptrdiff_t n = 0; n < cols; n++)
                    sum[n] += q * panels[panel_at(k, n0 + n, W->panel_stride)];
            }
            rescale(sum, row_scale(amax, finite, RF_Q8_AMAX), W->scales + n0, cols,
                    accumulate, C + r * ldc + n0);
        }
    }
}

/* Bytes of one thread's scratch: RF_Q8_ROWS rows interleaved (QA_AT) and one row as
 * rf_q8_quantize writes it, to whole cache lines. */
static ptrdiff_t thread_scratch(ptrdiff_t K) {
    return round_up((RF_Q8_ROWS + 1) * k_padded(K), RF_Q8_ALIGN);
}

ptrdiff_t rf_q8_scratch_size(ptrdiff_t K) { return RF_MAX_THREADS * thread_scratch(K); }

void rf_q8_gemm(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A, ptrdiff_t lda,
                const rf_weight *W, int accumulate, float *C, ptrdiff_t ldc, int path) {
    if (path < 0 || !W->scratch) {
        gemm_unbuffered(M, N, K, A, lda, W, accumulate, C, ldc);
        return;
    }
    ptrdiff_t Kp = k_padded(K);
    int8_t *qa = (int8_t *)W->scratch + rf_thread_slot() * thread_scratch(K);
    int8_t *row = qa + RF_Q8_ROWS * Kp;
    float sa[RF_Q8_ROWS];
    int offset;
    product_fn product = product_kernel(path, &offset);
    for (ptrdiff_t r0 = 0; r0 < M; r0 += RF_Q8_ROWS) {
        ptrdiff_t rows = M - r0 < RF_Q8_ROWS ? M - r0 : RF_Q8_ROWS;
        for (ptrdiff_t r = 0; r < rows; r++) {  /* each row quantized, then interleaved */
            sa[r] = rf_q8_quantize(row, A + (r0 + r) * lda, K, path);
            memset(row + K, 0, (size_t)(Kp - K));
            for (ptrdiff_t g = 0; g < Kp; g += RF_Q8_KG) {
                uint32_t four;
                memcpy(&four, row + g, sizeof four);
                if (offset)  /* + RF_Q8_OFFSET to each byte, without carries between them */
                    four = ((four & 0x7f7f7f7fu) + 0x01010101u * RF_Q8_OFFSET)
                           ^ (four & 0x80808080u);
                memcpy(QA_AT(qa, r, g), &four, sizeof four);
            }
        }
        q8_rows tile = {qa, sa, Kp, N, ldc, C + r0 * ldc, accumulate};
        product(&tile, rows, W);
    }
}
