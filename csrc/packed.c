/* packed.c -- the per-step recurrent products, float32, on AVX2+FMA: C (M,N) (+)= A (M,K)
 * op(B) (K,N) with op(B) packed once per call into panels of 16 columns.
 *
 * A per-step BLAS call pays its own overhead and re-packs W_hh every step, and the M of a
 * step (the rows still running) is small. Here W_hh is packed once per call, K-major in
 * panels of 16 columns (panel p holds columns 16p .. 16p+15, row k at offset 16k, zero
 * padded past N), and a register tile of up to 6 rows x 16 columns accumulates in 12 ymm
 * registers. Panels are the outer loop, so each is read once per step and reused by every
 * row block while it sits in L1.
 */
#include <string.h>

#include "rnnfuse.h"

#define NR RF_PANEL  /* panel width: two ymm vectors */
#define MR 6   /* rows per register tile */

ptrdiff_t rf_packed_size(ptrdiff_t K, ptrdiff_t N) {
    return ((N + NR - 1) / NR) * NR * K;
}

void rf_pack_f32(float *Bp, const float *B, ptrdiff_t ldb, int trans, ptrdiff_t K,
                 ptrdiff_t N) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += NR) {
        float *panel = Bp + n0 * K;
        for (ptrdiff_t k = 0; k < K; k++)
            for (ptrdiff_t c = 0; c < NR; c++) {
                ptrdiff_t n = n0 + c;
                panel[k * NR + c] = n >= N ? 0.0f : trans ? B[n * ldb + k] : B[k * ldb + n];
            }
    }
}

#if RF_HAVE_CLONES
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* Lane c of the mask is on for c < n. */
AVX2 static inline __m256i lanes(ptrdiff_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* One register tile: mr rows (<= MR) x np adjacent panels, the last holding nc columns.
 * A tile keeps 2 * mr * np accumulators, and ks of them per output vector split the sum
 * over k, so that even one row has enough independent FMA chains to hide their latency.
 * Inlined with constant mr, np, ks, so the accumulators stay in registers. */
#define UNROLL _Pragma("GCC unroll 16")
AVX2 static inline __attribute__((always_inline)) void tile(
        int mr, int np, int ks, ptrdiff_t nc, ptrdiff_t K, const float *A, ptrdiff_t lda,
        const float *panels, ptrdiff_t panel_stride, int accumulate, float *C, ptrdiff_t ldc) {
    __m256 acc[4][MR][8];
    if (accumulate)  /* C's lines are read only at the end: fetch them while the sum runs */
        UNROLL for (int i = 0; i < mr; i++)
            UNROLL for (int p = 0; p < np; p++) _mm_prefetch((const char *)(C + i * ldc + p * NR), _MM_HINT_T0);
    UNROLL for (int s = 0; s < ks; s++)
        UNROLL for (int i = 0; i < mr; i++)
            UNROLL for (int v = 0; v < 2 * np; v++) acc[s][i][v] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + ks <= K; k += ks) {
        UNROLL for (int s = 0; s < ks; s++) {
            const float *row = panels + (k + s) * NR;
            UNROLL for (int i = 0; i < mr; i++) {
                __m256 a = _mm256_broadcast_ss(A + i * lda + k + s);
                UNROLL for (int v = 0; v < 2 * np; v++) {
                    __m256 b = _mm256_loadu_ps(row + (v / 2) * panel_stride + (v % 2) * 8);
                    acc[s][i][v] = _mm256_fmadd_ps(a, b, acc[s][i][v]);
                }
            }
        }
    }
    for (; k < K; k++) {
        const float *row = panels + k * NR;
        UNROLL for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_broadcast_ss(A + i * lda + k);
            UNROLL for (int v = 0; v < 2 * np; v++) {
                __m256 b = _mm256_loadu_ps(row + (v / 2) * panel_stride + (v % 2) * 8);
                acc[0][i][v] = _mm256_fmadd_ps(a, b, acc[0][i][v]);
            }
        }
    }
    UNROLL for (int s = 1; s < ks; s++)
        UNROLL for (int i = 0; i < mr; i++)
            UNROLL for (int v = 0; v < 2 * np; v++)
                acc[0][i][v] = _mm256_add_ps(acc[0][i][v], acc[s][i][v]);
    __m256i full = _mm256_set1_epi32(-1);
    UNROLL for (int i = 0; i < mr; i++) {
        UNROLL for (int v = 0; v < 2 * np; v++) {
            float *c = C + i * ldc + (v / 2) * NR + (v % 2) * 8;
            /* only the tile's last panel may be partial: masked, never touching columns >= N */
            __m256i m = (v / 2 == np - 1 && nc < NR) ? lanes(nc - (v % 2) * 8) : full;
            __m256 sum = acc[0][i][v];
            if (accumulate) sum = _mm256_add_ps(sum, _mm256_maskload_ps(c, m));
            _mm256_maskstore_ps(c, m, sum);
        }
    }
}

/* Rows m0 .. M-1 in tiles of MR, then the remainder, for one group of np panels. */
#define ROWS(np, ks_small)                                                                  \
    do {                                                                                    \
        ptrdiff_t m0 = 0;                                                                   \
        for (; m0 + MR <= M; m0 += MR)                                                      \
            tile(MR, np, 1, nc, K, A + m0 * lda, lda, panel, panel_stride, accumulate,      \
                 C + m0 * ldc + n0, ldc);                                                   \
        const float *a = A + m0 * lda;                                                      \
        float *c = C + m0 * ldc + n0;                                                       \
        switch (M - m0) {                                                                   \
            case 5: tile(5, np, 1, nc, K, a, lda, panel, panel_stride, accumulate, c, ldc); break; \
            case 4: tile(4, np, 1, nc, K, a, lda, panel, panel_stride, accumulate, c, ldc); break; \
            case 3: tile(3, np, ks_small, nc, K, a, lda, panel, panel_stride, accumulate, c, ldc); break; \
            case 2: tile(2, np, ks_small, nc, K, a, lda, panel, panel_stride, accumulate, c, ldc); break; \
            case 1: tile(1, np, 2 * ks_small, nc, K, a, lda, panel, panel_stride, accumulate, c, ldc); break; \
            default: break;                                                                 \
        }                                                                                   \
    } while (0)

AVX2 static void packed_gemm_avx2(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A,
                                  ptrdiff_t lda, const float *Bp, ptrdiff_t panel_stride,
                                  int accumulate, float *C, ptrdiff_t ldc) {
    ptrdiff_t n0 = 0;
    if (M < MR) {  /* few rows: two panels per tile for more independent accumulators */
        for (; n0 + 2 * NR <= N; n0 += 2 * NR) {
            const float *panel = Bp + (n0 / NR) * panel_stride;
            ptrdiff_t nc = NR;
            ROWS(2, 1);
        }
    }
    for (; n0 < N; n0 += NR) {
        const float *panel = Bp + (n0 / NR) * panel_stride;
        ptrdiff_t nc = N - n0 < NR ? N - n0 : NR;
        ROWS(1, 2);
    }
}
#endif /* RF_HAVE_CLONES */

int rf_packed_available(void) {
#if RF_HAVE_CLONES
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* The same product in plain C, for CPUs without AVX2 (callers prefer BLAS there). */
static void packed_gemm_scalar(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A,
                               ptrdiff_t lda, const float *Bp, ptrdiff_t panel_stride,
                               int accumulate, float *C, ptrdiff_t ldc) {
    for (ptrdiff_t n = 0; n < N; n++) {
        const float *col = Bp + (n / NR) * panel_stride + n % NR;
        for (ptrdiff_t m = 0; m < M; m++) {
            float sum = 0;
            for (ptrdiff_t k = 0; k < K; k++) sum += A[m * lda + k] * col[k * NR];
            C[m * ldc + n] = accumulate ? C[m * ldc + n] + sum : sum;
        }
    }
}

void rf_packed_gemm_f32(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A, ptrdiff_t lda,
                        const float *Bp, ptrdiff_t panel_stride, int accumulate, float *C,
                        ptrdiff_t ldc) {
#if RF_HAVE_CLONES
    if (rf_packed_available()) {
        packed_gemm_avx2(M, N, K, A, lda, Bp, panel_stride, accumulate, C, ldc);
        return;
    }
#endif
    packed_gemm_scalar(M, N, K, A, lda, Bp, panel_stride, accumulate, C, ldc);
}
