/* vmath.c -- the activations over arrays, in place: sigmoid and tanh.
 *
 * float64 uses libm. float32 uses, on the vector code paths (simd, an RF_SIMD_* level),
 * the vector sigmoid and tanh of vmath.h at that path's width (their error bound is
 * documented there; both widths give the same bits); on the portable path libm. */
#include <math.h>
#include <stdint.h>

#include "rnnfuse.h"
#include "vmath.h"

#if RF_HAVE_AVX2
/* Whole vectors of W lanes, then the tail through a zero-padded vector (no reads past the
 * end). One vector at a time: the iterations are independent, and the core overlaps them
 * itself. */
#define RF_MAP(W, fn, a, n)                                                 \
    do {                                                                    \
        ptrdiff_t k = 0;                                                    \
        RF_VOP(W, T) x;                                                     \
        for (; k + W <= (n); k += W) {                                      \
            x = RF_VOP(W, LOADU)((a) + k);                                  \
            fn(&x, 1);                                                      \
            RF_VOP(W, STOREU)((a) + k, x);                                  \
        }                                                                   \
        if (k < (n)) {                                                      \
            float tail[W] = {0};                                            \
            for (ptrdiff_t t = k; t < (n); t++) tail[t - k] = (a)[t];       \
            x = RF_VOP(W, LOADU)(tail);                                     \
            fn(&x, 1);                                                      \
            RF_VOP(W, STOREU)(tail, x);                                     \
            for (ptrdiff_t t = k; t < (n); t++) (a)[t] = tail[t - k];       \
        }                                                                   \
    } while (0)

RF_AVX2 static void sigmoid_8(float *a, ptrdiff_t n) { RF_MAP(8, rf_sigmoid_8, a, n); }
RF_AVX2 static void tanh_8(float *a, ptrdiff_t n) { RF_MAP(8, rf_tanh_8, a, n); }
RF_AVX512 static void sigmoid_16(float *a, ptrdiff_t n) { RF_MAP(16, rf_sigmoid_16, a, n); }
RF_AVX512 static void tanh_16(float *a, ptrdiff_t n) { RF_MAP(16, rf_tanh_16, a, n); }
#endif /* RF_HAVE_AVX2 */

void rf_sigmoid_f32(float *a, ptrdiff_t n, int simd) {
#if RF_HAVE_AVX2
    if (simd == RF_SIMD_AVX512) { sigmoid_16(a, n); return; }
    if (simd) { sigmoid_8(a, n); return; }
#endif
    (void)simd;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0f / (1.0f + expf(-a[k]));
}

void rf_tanh_f32(float *a, ptrdiff_t n, int simd) {
#if RF_HAVE_AVX2
    if (simd == RF_SIMD_AVX512) { tanh_16(a, n); return; }
    if (simd) { tanh_8(a, n); return; }
#endif
    (void)simd;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanhf(a[k]);
}

/* float64: libm on both paths. */
void rf_sigmoid_f64(double *a, ptrdiff_t n, int simd) {
    (void)simd;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = 1.0 / (1.0 + exp(-a[k]));
}

void rf_tanh_f64(double *a, ptrdiff_t n, int simd) {
    (void)simd;
    for (ptrdiff_t k = 0; k < n; k++) a[k] = tanh(a[k]);
}
