/* vmath.c -- the activations over arrays, in place: sigmoid and tanh.
 *
 * float64 uses libm. float32 uses, on the AVX2+FMA code path (avx2, the call's
 * rf_runtime), the vector sigmoid and tanh of vmath.h (their error bound is documented
 * there); on the portable path libm. */
#include <math.h>
#include <stdint.h>

#include "rnnfuse.h"
#include "vmath.h"

#if RF_HAVE_AVX2
/* Whole vectors, then the tail through a zero-padded vector (no reads past the end). One
 * vector at a time: the iterations are independent, and the core overlaps them itself. */
#define RF_MAP8(fn8n, a, n)                                                 \
    do {                                                                    \
        ptrdiff_t k = 0;                                                    \
        __m256 x;                                                           \
        for (; k + 8 <= (n); k += 8) {                                      \
            x = _mm256_loadu_ps((a) + k);                                   \
            fn8n(&x, 1);                                                    \
            _mm256_storeu_ps((a) + k, x);                                   \
        }                                                                   \
        if (k < (n)) {                                                      \
            float tail[8] = {0};                                            \
            for (ptrdiff_t t = k; t < (n); t++) tail[t - k] = (a)[t];       \
            x = _mm256_loadu_ps(tail);                                      \
            fn8n(&x, 1);                                                    \
            _mm256_storeu_ps(tail, x);                                      \
            for (ptrdiff_t t = k; t < (n); t++) (a)[t] = tail[t - k];       \
        }                                                                   \
    } while (0)

RF_AVX2 static void sigmoid_avx2(float *a, ptrdiff_t n) { RF_MAP8(rf_sigmoid8n, a, n); }
RF_AVX2 static void tanh_avx2(float *a, ptrdiff_t n) { RF_MAP8(rf_tanh8n, a, n); }
#endif /* RF_HAVE_AVX2 */

void rf_sigmoid_f32(float *a, ptrdiff_t n, int avx2) {
#if RF_HAVE_AVX2
    if (avx2) { sigmoid_avx2(a, n); return; }
#endif
    (void)avx2;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0f / (1.0f + expf(-a[k]));
}

void rf_tanh_f32(float *a, ptrdiff_t n, int avx2) {
#if RF_HAVE_AVX2
    if (avx2) { tanh_avx2(a, n); return; }
#endif
    (void)avx2;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanhf(a[k]);
}

/* float64: libm on both paths. */
void rf_sigmoid_f64(double *a, ptrdiff_t n, int avx2) {
    (void)avx2;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0 / (1.0 + exp(-a[k]));
}

void rf_tanh_f64(double *a, ptrdiff_t n, int avx2) {
    (void)avx2;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanh(a[k]);
}
