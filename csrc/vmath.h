/* vmath.h -- sigmoid and tanh of float32 vectors, and the vector operations of the cells'
 * one-pass pointwise code, at two widths: 8 lanes (AVX2+FMA) and 16 (AVX-512F). The
 * width-generic part below (#else of RF_VW) is written once and compiled for each width;
 * every operation acts on each lane alike at either width, so both give the same bits.
 *
 * Error against the correctly rounded result (tests/test_vmath.py sweeps every
 * 2^-12 step of [-20, 20] and the edges): sigmoid at most 3 ulp, tanh at most 1 ulp. Both
 * saturate exactly: sigmoid(x) is 0 or 1 and tanh(x) is +-1 once the true value rounds
 * there; NaN stays NaN. (rf_exp_W itself flushes results below 2 FLT_MIN to 0, which
 * neither activation can see: there 1 + e = 1.)
 *
 * Each function takes n vectors (n a small constant once inlined) and applies every step
 * of its formula to all n before the next step: n independent dependency chains then sit
 * side by side in the instruction stream, where one vector's chain alone leaves the FP
 * units waiting on latency whenever the caller has little other work in flight. The
 * operations on each lane are the same whatever n is (n <= RF_UNITS_MAX).
 *
 * Width-generic code (here, and the cells' files compiled once per width by widths.h)
 * names the width's type and operations through V_T, V_ADD, ... and its functions through
 * V_FN(rf_tanh) (rf_tanh_8, rf_tanh_16), with RF_VW the width. Include after rnnfuse.h;
 * without RF_HAVE_AVX2 only RF_ONE_PASS (0) is defined. */
#ifndef RF_VW
#ifndef RNNFUSE_VMATH_H
#define RNNFUSE_VMATH_H

/* Whether a cell's pointwise work takes its one-pass vector code: float, on the AVX2 path. */
#define RF_ONE_PASS(rt) (RF_HAVE_AVX2 && RF_IS_FLOAT && (rt)->avx2)
#if RF_HAVE_AVX2
#include <immintrin.h>

#define RF_AVX2 __attribute__((target("avx2,fma")))
#define RF_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define RF_INLINE inline __attribute__((always_inline))
/* Four vectors side by side: faster than two, though their registers spill. */
#define RF_UNITS_MAX 4

/* The operations at each width: V8_* on __m256, V16_* on __m512. */
#define V8_T __m256
#define V8_TARGET RF_AVX2
#define V8_SET1 _mm256_set1_ps
#define V8_ZERO _mm256_setzero_ps
#define V8_LOADU _mm256_loadu_ps
#define V8_STOREU _mm256_storeu_ps
#define V8_ADD _mm256_add_ps
#define V8_SUB _mm256_sub_ps
#define V8_MUL _mm256_mul_ps
#define V8_DIV _mm256_div_ps
#define V8_MIN _mm256_min_ps
#define V8_MAX _mm256_max_ps
#define V8_FMADD _mm256_fmadd_ps
#define V8_FNMADD _mm256_fnmadd_ps
#define V8_ROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V8_HALF_POW2(m) /* 2^(m-1) for integral m in [-125, 128], as a float */          \
    _mm256_castsi256_ps(_mm256_slli_epi32(                                              \
        _mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(126)), 23))
#define V8_ABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define V8_COPYSIGN(mag, sgn) /* mag's bits with sgn's sign bit (mag >= +0) */           \
    _mm256_or_ps(mag, _mm256_and_ps(_mm256_set1_ps(-0.0f), sgn))
#define V8_IF_LT(a, b, then, else_) /* then where a < b (ordered), else_ elsewhere */     \
    _mm256_blendv_ps(else_, then, _mm256_cmp_ps(a, b, _CMP_LT_OQ))

#define V16_T __m512
#define V16_TARGET RF_AVX512
#define V16_SET1 _mm512_set1_ps
#define V16_ZERO _mm512_setzero_ps
#define V16_LOADU _mm512_loadu_ps
#define V16_STOREU _mm512_storeu_ps
#define V16_ADD _mm512_add_ps
#define V16_SUB _mm512_sub_ps
#define V16_MUL _mm512_mul_ps
#define V16_DIV _mm512_div_ps
#define V16_MIN _mm512_min_ps
#define V16_MAX _mm512_max_ps
#define V16_FMADD _mm512_fmadd_ps
#define V16_FNMADD _mm512_fnmadd_ps
#define V16_ROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V16_HALF_POW2(m)                                                                 \
    _mm512_castsi512_ps(_mm512_slli_epi32(                                              \
        _mm512_add_epi32(_mm512_cvtps_epi32(m), _mm512_set1_epi32(126)), 23))
#define V16_BITS(op, a, b) /* AVX-512F's bitwise operations are on integers */            \
    _mm512_castsi512_ps(op(_mm512_castps_si512(a), _mm512_castps_si512(b)))
#define V16_ABS(x) V16_BITS(_mm512_andnot_si512, _mm512_set1_ps(-0.0f), x)
#define V16_COPYSIGN(mag, sgn) \
    V16_BITS(_mm512_or_si512, mag, V16_BITS(_mm512_and_si512, _mm512_set1_ps(-0.0f), sgn))
#define V16_IF_LT(a, b, then, else_) \
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), else_, then)

/* The width RF_VW's: V_ADD is V8_ADD or V16_ADD, V_FN(rf_tanh) rf_tanh_8 or rf_tanh_16. */
#define RF_VOP_(w, op) V##w##_##op
#define RF_VOP(w, op) RF_VOP_(w, op)
#define V_T RF_VOP(RF_VW, T)
#define V_TARGET RF_VOP(RF_VW, TARGET)
#define V_SET1 RF_VOP(RF_VW, SET1)
#define V_ZERO RF_VOP(RF_VW, ZERO)
#define V_ADD RF_VOP(RF_VW, ADD)
#define V_SUB RF_VOP(RF_VW, SUB)
#define V_MUL RF_VOP(RF_VW, MUL)
#define V_DIV RF_VOP(RF_VW, DIV)
#define V_MIN RF_VOP(RF_VW, MIN)
#define V_MAX RF_VOP(RF_VW, MAX)
#define V_FMADD RF_VOP(RF_VW, FMADD)
#define V_FNMADD RF_VOP(RF_VW, FNMADD)
#define V_ROUND RF_VOP(RF_VW, ROUND)
#define V_HALF_POW2 RF_VOP(RF_VW, HALF_POW2)
#define V_ABS RF_VOP(RF_VW, ABS)
#define V_COPYSIGN RF_VOP(RF_VW, COPYSIGN)
#define V_IF_LT RF_VOP(RF_VW, IF_LT)
#define RF_VFN_(name, w) name##_##w
#define RF_VFN(name, w) RF_VFN_(name, w)
#define V_FN(name) RF_VFN(name, RF_VW)

#define RF_VW 8
#include "vmath.h"
#undef RF_VW
#define RF_VW 16
#include "vmath.h"
#undef RF_VW

/* Runs UNITS(k, nv, n_last) over a row's H units from k = 0, at width RF_VW:
 * RF_UNITS_MAX vectors at a time, then one, then the last n_last < RF_VW units (see
 * rf_load_W). */
#define RF_OVER_UNITS(H, UNITS)                                             \
    do {                                                                    \
        ptrdiff_t k_ = 0;                                                   \
        for (; k_ + RF_VW * RF_UNITS_MAX <= (H); k_ += RF_VW * RF_UNITS_MAX) \
            UNITS(k_, RF_UNITS_MAX, RF_VW);                                 \
        for (; k_ + RF_VW <= (H); k_ += RF_VW) UNITS(k_, 1, RF_VW);         \
        if (k_ < (H)) UNITS(k_, 1, (int)((H) - k_));                        \
    } while (0)

#endif /* RF_HAVE_AVX2 */
#endif /* RNNFUSE_VMATH_H */

#else /* RF_VW: the width-generic part, once per width */
#define RF_EACH _Pragma("GCC unroll 8") for (int v = 0; v < n; v++)

/* e^x, in place: x = m ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
 * coefficients), times 2^m built in the exponent bits. Below -87.3 the result is 0; above
 * ln(FLT_MAX) it is +inf (IEEE overflow of the last multiply). NaN stays NaN: the clamps
 * take x as their second operand, which minps/maxps return when either is NaN, and the
 * NaN then flows through every step (no compare-and-blend needed). */
V_TARGET static RF_INLINE void V_FN(rf_exp)(V_T *x, int n) {
    V_T m[RF_UNITS_MAX], r[RF_UNITS_MAX], p[RF_UNITS_MAX];
    RF_EACH {
        x[v] = V_MAX(V_SET1(-87.4f), V_MIN(V_SET1(88.8f), x[v]));
        m[v] = V_ROUND(V_MUL(x[v], V_SET1(1.44269504088896341f)));
    }
    RF_EACH r[v] = V_FNMADD(m[v], V_SET1(0.693359375f), x[v]);  /* ln2 hi */
    RF_EACH r[v] = V_FNMADD(m[v], V_SET1(-2.12194440e-4f), r[v]);  /* lo */
    RF_EACH p[v] = V_FMADD(V_SET1(1.9875691500e-4f), r[v], V_SET1(1.3981999507e-3f));
    RF_EACH p[v] = V_FMADD(p[v], r[v], V_SET1(8.3334519073e-3f));
    RF_EACH p[v] = V_FMADD(p[v], r[v], V_SET1(4.1665795894e-2f));
    RF_EACH p[v] = V_FMADD(p[v], r[v], V_SET1(1.6666665459e-1f));
    RF_EACH p[v] = V_FMADD(p[v], r[v], V_SET1(5.0000001201e-1f));
    RF_EACH p[v] = V_FMADD(p[v], V_MUL(r[v], r[v]), V_ADD(r[v], V_SET1(1.0f)));
    /* 2^m as 2 * 2^(m-1): m reaches 128 near the top, where 2^m alone is not a float */
    RF_EACH x[v] = V_MUL(V_ADD(p[v], p[v]), V_HALF_POW2(m[v]));
}

/* sigmoid(x) = 1 / (1 + e^-x), in place */
V_TARGET static RF_INLINE void V_FN(rf_sigmoid)(V_T *x, int n) {
    V_T one = V_SET1(1.0f);
    RF_EACH x[v] = V_SUB(V_ZERO(), x[v]);
    V_FN(rf_exp)(x, n);
    RF_EACH x[v] = V_DIV(one, V_ADD(one, x[v]));
}

/* tanh, in place: near 0 an odd polynomial (Cephes' tanhf coefficients), as (1-e)/(1+e)
 * with e = e^(-2|x|) elsewhere would lose digits to cancellation; sign restored at the end. */
V_TARGET static RF_INLINE void V_FN(rf_tanh)(V_T *x, int n) {
    V_T one = V_SET1(1.0f);
    V_T ax[RF_UNITS_MAX], small[RF_UNITS_MAX], e[RF_UNITS_MAX];
    RF_EACH {
        ax[v] = V_ABS(x[v]);
        V_T z = V_MUL(x[v], x[v]);
        V_T p = V_SET1(-5.70498872745e-3f);
        p = V_FMADD(p, z, V_SET1(2.06390887954e-2f));
        p = V_FMADD(p, z, V_SET1(-5.37397155531e-2f));
        p = V_FMADD(p, z, V_SET1(1.33314422036e-1f));
        p = V_FMADD(p, z, V_SET1(-3.33332819422e-1f));
        small[v] = V_FMADD(V_MUL(p, z), ax[v], ax[v]);
        e[v] = V_MUL(ax[v], V_SET1(-2.0f));
    }
    V_FN(rf_exp)(e, n);
    RF_EACH {
        V_T large = V_DIV(V_SUB(one, e[v]), V_ADD(one, e[v]));
        /* NaN: the compare is false, so the (NaN) exp path is kept */
        V_T t = V_IF_LT(ax[v], V_SET1(0.625f), small[v], large);
        x[v] = V_COPYSIGN(t, x[v]);  /* tanh(-x) = -tanh(x), -0 too */
    }
}

/* nv vectors from a (to a), the last holding only its first n_last lanes (the rest read
 * as zeros, never written): the cells' one-pass code over a row's units. */
#if RF_VW == 8
V_TARGET static RF_INLINE void V_FN(rf_load)(V_T *v, const float *a, int nv, int n_last) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_last),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int u = 0; u < nv; u++)  /* masked moves are slow on AMD: only where needed */
        v[u] = u < nv - 1 || n_last == 8 ? _mm256_loadu_ps(a + 8 * u)
                                         : _mm256_maskload_ps(a + 8 * u, m);
}

V_TARGET static RF_INLINE void V_FN(rf_store)(float *a, const V_T *v, int nv, int n_last) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_last),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int u = 0; u < nv; u++) {
        if (u < nv - 1 || n_last == 8) _mm256_storeu_ps(a + 8 * u, v[u]);
        else _mm256_maskstore_ps(a + 8 * u, m, v[u]);
    }
}
#else
V_TARGET static RF_INLINE void V_FN(rf_load)(V_T *v, const float *a, int nv, int n_last) {
    __mmask16 m = (__mmask16)((1u << n_last) - 1);
    for (int u = 0; u < nv; u++)
        v[u] = u < nv - 1 || n_last == 16 ? _mm512_loadu_ps(a + 16 * u)
                                          : _mm512_maskz_loadu_ps(m, a + 16 * u);
}

V_TARGET static RF_INLINE void V_FN(rf_store)(float *a, const V_T *v, int nv, int n_last) {
    __mmask16 m = (__mmask16)((1u << n_last) - 1);
    for (int u = 0; u < nv; u++) {
        if (u < nv - 1 || n_last == 16) _mm512_storeu_ps(a + 16 * u, v[u]);
        else _mm512_mask_storeu_ps(a + 16 * u, m, v[u]);
    }
}
#endif

#undef RF_EACH
#endif /* RF_VW */
