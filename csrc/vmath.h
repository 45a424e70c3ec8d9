/* vmath.h -- sigmoid and tanh of float32 vectors (AVX2+FMA), for vmath.c's array
 * functions and for the cells' one-pass pointwise code, which gets the same bits.
 *
 * Error against the correctly rounded result (tests/test_vmath.py sweeps every
 * 2^-12 step of [-20, 20] and the edges): sigmoid at most 3 ulp, tanh at most 1 ulp. Both
 * saturate exactly: sigmoid(x) is 0 or 1 and tanh(x) is +-1 once the true value rounds
 * there; NaN stays NaN. (rf_exp8n itself flushes results below 2 FLT_MIN to 0, which
 * neither activation can see: there 1 + e = 1.)
 *
 * Each function takes n vectors (n a small constant once inlined) and applies every step
 * of its formula to all n before the next step: n independent dependency chains then sit
 * side by side in the instruction stream, where one vector's chain alone leaves the FP
 * units waiting on latency whenever the caller has little other work in flight. The
 * operations on each lane are the same whatever n is (n <= RF_UNITS_MAX). Include after
 * rnnfuse.h; without RF_HAVE_AVX2 only RF_ONE_PASS (0) is defined. */
#ifndef RNNFUSE_VMATH_H
#define RNNFUSE_VMATH_H

/* Whether a cell's pointwise work takes its one-pass AVX2 code: float, on the AVX2 path. */
#define RF_ONE_PASS(rt) (RF_HAVE_AVX2 && RF_IS_FLOAT && (rt)->avx2)
#if RF_HAVE_AVX2
#include <immintrin.h>

#define RF_AVX2 __attribute__((target("avx2,fma")))
#define RF_INLINE inline __attribute__((always_inline))
#define RF_EACH _Pragma("GCC unroll 8") for (int v = 0; v < n; v++)
/* Four vectors side by side: faster than two, though their registers spill. */
#define RF_UNITS_MAX 4

/* e^x, in place: x = m ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
 * coefficients), times 2^m built in the exponent bits. Below -87.3 the result is 0; above
 * ln(FLT_MAX) it is +inf (IEEE overflow of the last multiply). NaN stays NaN: the clamps
 * take x as their second operand, which minps/maxps return when either is NaN, and the
 * NaN then flows through every step (no compare-and-blend needed). */
RF_AVX2 static RF_INLINE void rf_exp8n(__m256 *x, int n) {
    __m256 m[RF_UNITS_MAX], r[RF_UNITS_MAX], p[RF_UNITS_MAX];
    RF_EACH {
        x[v] = _mm256_max_ps(_mm256_set1_ps(-87.4f), _mm256_min_ps(_mm256_set1_ps(88.8f), x[v]));
        m[v] = _mm256_round_ps(_mm256_mul_ps(x[v], _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    RF_EACH r[v] = _mm256_fnmadd_ps(m[v], _mm256_set1_ps(0.693359375f), x[v]);  /* ln2 hi */
    RF_EACH r[v] = _mm256_fnmadd_ps(m[v], _mm256_set1_ps(-2.12194440e-4f), r[v]);  /* lo */
    RF_EACH p[v] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r[v],
                                   _mm256_set1_ps(1.3981999507e-3f));
    RF_EACH p[v] = _mm256_fmadd_ps(p[v], r[v], _mm256_set1_ps(8.3334519073e-3f));
    RF_EACH p[v] = _mm256_fmadd_ps(p[v], r[v], _mm256_set1_ps(4.1665795894e-2f));
    RF_EACH p[v] = _mm256_fmadd_ps(p[v], r[v], _mm256_set1_ps(1.6666665459e-1f));
    RF_EACH p[v] = _mm256_fmadd_ps(p[v], r[v], _mm256_set1_ps(5.0000001201e-1f));
    RF_EACH p[v] = _mm256_fmadd_ps(p[v], _mm256_mul_ps(r[v], r[v]),
                                   _mm256_add_ps(r[v], _mm256_set1_ps(1.0f)));
    /* 2^m as 2 * 2^(m-1): m reaches 128 near the top, where 2^m alone is not a float */
    RF_EACH {
        __m256i e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(m[v]), _mm256_set1_epi32(126)), 23);
        x[v] = _mm256_mul_ps(_mm256_add_ps(p[v], p[v]), _mm256_castsi256_ps(e));
    }
}

/* sigmoid(x) = 1 / (1 + e^-x), in place */
RF_AVX2 static RF_INLINE void rf_sigmoid8n(__m256 *x, int n) {
    __m256 one = _mm256_set1_ps(1.0f);
    RF_EACH x[v] = _mm256_sub_ps(_mm256_setzero_ps(), x[v]);
    rf_exp8n(x, n);
    RF_EACH x[v] = _mm256_div_ps(one, _mm256_add_ps(one, x[v]));
}

/* tanh, in place: near 0 an odd polynomial (Cephes' tanhf coefficients), as (1-e)/(1+e)
 * with e = e^(-2|x|) elsewhere would lose digits to cancellation; sign restored at the end. */
RF_AVX2 static RF_INLINE void rf_tanh8n(__m256 *x, int n) {
    __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 ax[RF_UNITS_MAX], small[RF_UNITS_MAX], e[RF_UNITS_MAX];
    RF_EACH {
        ax[v] = _mm256_andnot_ps(sign, x[v]);
        __m256 z = _mm256_mul_ps(x[v], x[v]);
        __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
        small[v] = _mm256_fmadd_ps(_mm256_mul_ps(p, z), ax[v], ax[v]);
        e[v] = _mm256_mul_ps(ax[v], _mm256_set1_ps(-2.0f));
    }
    rf_exp8n(e, n);
    RF_EACH {
        __m256 large = _mm256_div_ps(_mm256_sub_ps(one, e[v]), _mm256_add_ps(one, e[v]));
        /* NaN: the compare is false, so the (NaN) exp path is kept */
        __m256 t = _mm256_blendv_ps(large, small[v],
                                    _mm256_cmp_ps(ax[v], _mm256_set1_ps(0.625f), _CMP_LT_OQ));
        x[v] = _mm256_or_ps(t, _mm256_and_ps(sign, x[v]));  /* tanh(-x) = -tanh(x), -0 too */
    }
}

/* nv vectors of 8 floats from a (to a), the last holding only its first n_last lanes (the
 * rest read as zeros, never written): the cells' one-pass code over a row's units. */
RF_AVX2 static RF_INLINE void rf_load8n(__m256 *v, const float *a, int nv, int n_last) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_last),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int u = 0; u < nv; u++)  /* masked moves are slow on AMD: only where needed */
        v[u] = u < nv - 1 || n_last == 8 ? _mm256_loadu_ps(a + 8 * u)
                                         : _mm256_maskload_ps(a + 8 * u, m);
}

RF_AVX2 static RF_INLINE void rf_store8n(float *a, const __m256 *v, int nv, int n_last) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_last),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int u = 0; u < nv; u++) {
        if (u < nv - 1 || n_last == 8) _mm256_storeu_ps(a + 8 * u, v[u]);
        else _mm256_maskstore_ps(a + 8 * u, m, v[u]);
    }
}

/* Runs UNITS(k, nv, n_last) over a row's H units from k = 0: RF_UNITS_MAX vectors at a
 * time, then one, then the last n_last < 8 units (see rf_load8n). */
#define RF_OVER_UNITS(H, UNITS)                                             \
    do {                                                                    \
        ptrdiff_t k_ = 0;                                                   \
        for (; k_ + 8 * RF_UNITS_MAX <= (H); k_ += 8 * RF_UNITS_MAX)        \
            UNITS(k_, RF_UNITS_MAX, 8);                                     \
        for (; k_ + 8 <= (H); k_ += 8) UNITS(k_, 1, 8);                     \
        if (k_ < (H)) UNITS(k_, 1, (int)((H) - k_));                        \
    } while (0)

#undef RF_EACH
#endif /* RF_HAVE_AVX2 */
#endif /* RNNFUSE_VMATH_H */
