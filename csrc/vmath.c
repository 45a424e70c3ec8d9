/* vmath.c -- the activations over arrays, in place: sigmoid and tanh.
 *
 * float64 uses libm. float32 uses, on CPUs with AVX2+FMA, an 8-wide polynomial exp and
 * tanh (picked at run time); elsewhere libm. The AVX2 path's measured error against the
 * correctly rounded result (tests/test_vmath.py sweeps every 2^-12 step of [-20, 20] and
 * the edges): sigmoid at most 3 ulp, tanh at most 1 ulp. Both saturate exactly: sigmoid(x)
 * is 0 or 1 and tanh(x) is +-1 once the true value rounds there; NaN stays NaN. (exp8 itself
 * flushes results below 2 FLT_MIN to 0, which neither activation can see: there 1 + e = 1.)
 */
#include <math.h>
#include <stdint.h>

#include "rnnfuse.h"

#if RF_HAVE_CLONES
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* e^x, 8 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
 * coefficients), times 2^n built in the exponent bits. Below -87.3 the result is 0; above
 * ln(FLT_MAX) it is +inf (IEEE overflow of the last multiply). NaN stays NaN: the clamps
 * take x as their second operand, which minps/maxps return when either is NaN, and the
 * NaN then flows through every step (no compare-and-blend needed). */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.4f), _mm256_min_ps(_mm256_set1_ps(88.8f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   /* ln2, hi part */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);       /* ln2, lo part */
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as 2 * 2^(n-1): n reaches 128 near the top, where 2^n alone is not a float */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    return _mm256_mul_ps(_mm256_add_ps(p, p), _mm256_castsi256_ps(e));
}

/* sigmoid(x) = 1 / (1 + e^-x) */
AVX2 static inline __m256 sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* tanh: near 0 an odd polynomial (Cephes' tanhf coefficients), as (1-e)/(1+e) with
 * e = e^(-2|x|) elsewhere would lose digits to cancellation; sign restored at the end. */
AVX2 static inline __m256 tanh8(__m256 x) {
    __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), ax, ax);
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 e = exp8(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    __m256 large = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    /* NaN: the compare is false, so the (NaN) exp path is kept */
    __m256 t = _mm256_blendv_ps(large, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
    return _mm256_or_ps(t, _mm256_and_ps(sign, x));  /* tanh(-x) = -tanh(x), -0 included */
}

/* Whole vectors, then the tail through a zero-padded vector (no reads past the end). */
#define RF_MAP8(fn8, a, n)                                                  \
    do {                                                                    \
        ptrdiff_t k = 0;                                                    \
        for (; k + 8 <= (n); k += 8)                                        \
            _mm256_storeu_ps((a) + k, fn8(_mm256_loadu_ps((a) + k)));       \
        if (k < (n)) {                                                      \
            float tail[8] = {0};                                            \
            for (ptrdiff_t t = k; t < (n); t++) tail[t - k] = (a)[t];       \
            _mm256_storeu_ps(tail, fn8(_mm256_loadu_ps(tail)));             \
            for (ptrdiff_t t = k; t < (n); t++) (a)[t] = tail[t - k];       \
        }                                                                   \
    } while (0)

AVX2 static void sigmoid_avx2(float *a, ptrdiff_t n) { RF_MAP8(sigmoid8, a, n); }
AVX2 static void tanh_avx2(float *a, ptrdiff_t n) { RF_MAP8(tanh8, a, n); }

static int have_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif /* RF_HAVE_CLONES */

void rf_sigmoid_f32(float *a, ptrdiff_t n) {
#if RF_HAVE_CLONES
    if (have_avx2()) { sigmoid_avx2(a, n); return; }
#endif
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0f / (1.0f + expf(-a[k]));
}

void rf_tanh_f32(float *a, ptrdiff_t n) {
#if RF_HAVE_CLONES
    if (have_avx2()) { tanh_avx2(a, n); return; }
#endif
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanhf(a[k]);
}

void rf_sigmoid_f64(double *a, ptrdiff_t n) {
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0 / (1.0 + exp(-a[k]));
}

void rf_tanh_f64(double *a, ptrdiff_t n) {
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanh(a[k]);
}
