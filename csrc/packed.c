/* packed.c -- our own matrix product, for the per-step recurrent products and the input
 * projection: C (M,N) (+)= A (M,K) op(B) (K,N), with op(B) packed ahead (once per call, or
 * once per stream) into panels one cache line wide (RF_NR columns: 16 floats, 8 doubles):
 * panel p holds columns RF_NR*p .. RF_NR*p+RF_NR-1, row k at offset RF_NR*k, zero padded
 * past N. On AVX2+FMA CPUs a register tile of up to 6 rows x one panel accumulates in 12
 * ymm registers; on AVX-512F CPUs up to 6 rows x 4 panels in 24 zmm registers; elsewhere a
 * portable tile of 2 rows in the compiler's generic vectors.
 *
 * Why not BLAS: a per-step BLAS call pays its own overhead and re-packs W_hh every step,
 * for the few rows a step has. And a BLAS rounds a row of a product differently depending
 * on M (SciPy's OpenBLAS does, for many shapes with K >= 33), so a stream that
 * projects one step's rows would not match a forward that projects all its steps at once.
 * Here every output is one chain over k in order, whatever M is and whichever tile
 * computes it.
 * The part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#include <string.h>

#include "rnnfuse.h"

#if RF_HAVE_AVX2
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define UNROLL _Pragma("GCC unroll 16")
#endif

#define MR RF_MR

/* Sized with the narrower float panel, so the one count serves both dtypes. */
ptrdiff_t rf_packed_size(ptrdiff_t K, ptrdiff_t N) {
    return ((N + 15) / 16) * 16 * K;
}

#define RF_TEMPLATE_FILE "packed.c"
#include "instantiate.h"

#else /* RF_TEMPLATE: dtype-generic part */

#if RF_HAVE_AVX2

#if RF_IS_FLOAT
#define VEC __m256
#define V_ZERO _mm256_setzero_ps
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_BROADCAST _mm256_broadcast_ss
#define V_FMA _mm256_fmadd_ps
#define V_ADD _mm256_add_ps
#define V_MASKLOAD _mm256_maskload_ps
#define V_MASKSTORE _mm256_maskstore_ps
#define V_LANES(n) _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), \
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#else
#define VEC __m256d
#define V_ZERO _mm256_setzero_pd
#define V_LOAD _mm256_loadu_pd
#define V_STORE _mm256_storeu_pd
#define V_BROADCAST _mm256_broadcast_sd
#define V_FMA _mm256_fmadd_pd
#define V_ADD _mm256_add_pd
#define V_MASKLOAD _mm256_maskload_pd
#define V_MASKSTORE _mm256_maskstore_pd
#define V_LANES(n) _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3))
#endif
#define VL (RF_NR / 2)  /* lanes per vector: a panel row is two vectors */

/* A VL x VL block of W (rows c, row stride ldb) to VL rows of dst (stride ldd):
 * dst[k * ldd + c] = src[c * ldb + k], as vector shuffles. */
AVX2 static inline void RF_FN(transpose_block)(REAL *dst, ptrdiff_t ldd, const REAL *src,
                                               ptrdiff_t ldb) {
#if RF_IS_FLOAT
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ldb);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
#else
    __m256d r[4], t[4];
    for (int i = 0; i < 4; i++) r[i] = _mm256_loadu_pd(src + i * ldb);
    for (int i = 0; i < 4; i += 2) {
        t[i] = _mm256_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_pd(r[i], r[i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        _mm256_storeu_pd(dst + i * ldd, _mm256_permute2f128_pd(t[i], t[i + 2], 0x20));
        _mm256_storeu_pd(dst + (i + 2) * ldd, _mm256_permute2f128_pd(t[i], t[i + 2], 0x31));
    }
#endif
}

/* Full panels of W^T, VL rows of op(W) at a time; returns the rows it packed. */
AVX2 static ptrdiff_t RF_FN(pack_transposed)(REAL *panel, const REAL *W, ptrdiff_t ldb,
                                             ptrdiff_t K) {
    ptrdiff_t k = 0;
    for (; k + VL <= K; k += VL)
        for (ptrdiff_t c = 0; c < RF_NR; c += VL)
            RF_FN(transpose_block)(panel + k * RF_NR + c, RF_NR, W + c * ldb + k, ldb);
    return k;
}

/* rf_transpose's whole VL x VL blocks; returns the rows of src it did. */
AVX2 static ptrdiff_t RF_FN(transpose_blocks)(REAL *dst, ptrdiff_t ldd, const REAL *src,
                                              ptrdiff_t lds, ptrdiff_t rows, ptrdiff_t cols) {
    ptrdiff_t r = 0;
    for (; r + VL <= rows; r += VL) {
        ptrdiff_t c = 0;
        for (; c + VL <= cols; c += VL)
            RF_FN(transpose_block)(dst + c * ldd + r, ldd, src + r * lds + c, lds);
        for (; c < cols; c++)
            for (ptrdiff_t i = r; i < r + VL; i++) dst[c * ldd + i] = src[i * lds + c];
    }
    return r;
}

/* One register tile: mr rows (<= MR) x np adjacent panels, the last holding nc columns,
 * in 2 * mr * np accumulators. Inlined with constant mr and np, so the accumulators stay
 * in registers. */
AVX2 static inline __attribute__((always_inline)) void RF_FN(tile)(
        int mr, int np, ptrdiff_t nc, ptrdiff_t K, const REAL *A, ptrdiff_t lda,
        const REAL *panels, ptrdiff_t panel_stride, ptrdiff_t ldp, int accumulate, REAL *C,
        ptrdiff_t ldc) {
    VEC acc[MR][8];
    if (accumulate)  /* C's lines are read only at the end: fetch them while the sum runs */
        UNROLL for (int i = 0; i < mr; i++)
            UNROLL for (int p = 0; p < np; p++) _mm_prefetch((const char *)(C + i * ldc + p * RF_NR), _MM_HINT_T0);
    UNROLL for (int i = 0; i < mr; i++)
        UNROLL for (int v = 0; v < 2 * np; v++) acc[i][v] = V_ZERO();
    for (ptrdiff_t k = 0; k < K; k++) {
        const REAL *row = panels + k * ldp;
        UNROLL for (int i = 0; i < mr; i++) {
            VEC a = V_BROADCAST(A + i * lda + k);
            UNROLL for (int v = 0; v < 2 * np; v++) {
                VEC b = V_LOAD(row + (v / 2) * panel_stride + (v % 2) * VL);
                acc[i][v] = V_FMA(a, b, acc[i][v]);
            }
        }
    }
    UNROLL for (int i = 0; i < mr; i++) {
        UNROLL for (int v = 0; v < 2 * np; v++) {
            REAL *c = C + i * ldc + (v / 2) * RF_NR + (v % 2) * VL;
            VEC sum = acc[i][v];
            /* only the tile's last panel may be partial: masked, never touching columns >= N */
            if (v / 2 == np - 1 && nc < RF_NR) {
                __m256i m = V_LANES(nc - (v % 2) * VL);
                if (accumulate) sum = V_ADD(sum, V_MASKLOAD(c, m));
                V_MASKSTORE(c, m, sum);
            } else {  /* plain moves: masked ones are slow (microcoded on AMD) */
                if (accumulate) sum = V_ADD(sum, V_LOAD(c));
                V_STORE(c, sum);
            }
        }
    }
}

/* A tile of mr rows x np panels at row m0, column n0 (nc columns in its last panel). */
#define TILE(mr, np, m0, n0, nc)                                                             \
    RF_FN(tile)(mr, np, nc, K, A + (m0) * lda, lda, Bp + ((n0) / RF_NR) * panel_stride,      \
                panel_stride, ldp, accumulate, C + (m0) * ldc + (n0), ldc)

/* A projection's many rows: whole row tiles are the outer loop, so a tile's rows stay in
 * L1 while the panels stream past from L2 or L3. The rows left over from whole tiles: 1-3
 * of them take two panels per tile, for more independent accumulators (4 or 5 rows of two
 * panels would want 16-20 of the 16 registers, and spill). */
AVX2 static void RF_FN(row_block_projection)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                                             const REAL *A, ptrdiff_t lda, const REAL *Bp,
                                             ptrdiff_t panel_stride, ptrdiff_t ldp,
                                             int accumulate, REAL *C, ptrdiff_t ldc) {
    ptrdiff_t full = M / MR * MR, left = M - full, n0 = 0;
    for (ptrdiff_t m0 = 0; m0 < full; m0 += MR)
        for (n0 = 0; n0 < N; n0 += RF_NR) TILE(MR, 1, m0, n0, N - n0 < RF_NR ? N - n0 : RF_NR);
    n0 = 0;
    if (left >= 1 && left <= 3)
        for (; n0 + 2 * RF_NR <= N; n0 += 2 * RF_NR)
            switch (left) {
                case 3: TILE(3, 2, full, n0, RF_NR); break;
                case 2: TILE(2, 2, full, n0, RF_NR); break;
                default: TILE(1, 2, full, n0, RF_NR); break;
            }
    for (; n0 < N; n0 += RF_NR) {
        ptrdiff_t nc = N - n0 < RF_NR ? N - n0 : RF_NR;
        switch (left) {
            case 5: TILE(5, 1, full, n0, nc); break;
            case 4: TILE(4, 1, full, n0, nc); break;
            case 3: TILE(3, 1, full, n0, nc); break;
            case 2: TILE(2, 1, full, n0, nc); break;
            case 1: TILE(1, 1, full, n0, nc); break;
            default: break;
        }
    }
}

/* A step's few rows: panels are the outer loop, so each is read once and reused by every
 * row tile while it sits in L1. The 1-3 rows left over from whole tiles keep enough
 * independent chains by taking more panels per tile: one row four panels (eight
 * accumulators), two or three rows two panels. */
AVX2 static void RF_FN(row_block_step)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                                       ptrdiff_t lda, const REAL *Bp, ptrdiff_t panel_stride,
                                       ptrdiff_t ldp, int accumulate, REAL *C, ptrdiff_t ldc) {
    ptrdiff_t full = M / MR * MR, left = M - full, n0 = 0;
#define FULL_TILES(n0_, nc_) \
    for (ptrdiff_t m0 = 0; m0 < full; m0 += MR) TILE(MR, 1, m0, n0_, nc_)
    if (left == 1)
        for (; n0 + 4 * RF_NR <= N; n0 += 4 * RF_NR) {
            for (ptrdiff_t q = 0; q < 4; q++) FULL_TILES(n0 + q * RF_NR, RF_NR);
            TILE(1, 4, full, n0, RF_NR);
        }
    if (left >= 1 && left <= 3)
        for (; n0 + 2 * RF_NR <= N; n0 += 2 * RF_NR) {
            FULL_TILES(n0, RF_NR);
            FULL_TILES(n0 + RF_NR, RF_NR);
            switch (left) {
                case 3: TILE(3, 2, full, n0, RF_NR); break;
                case 2: TILE(2, 2, full, n0, RF_NR); break;
                default: TILE(1, 2, full, n0, RF_NR); break;
            }
        }
    for (; n0 < N; n0 += RF_NR) {
        ptrdiff_t nc = N - n0 < RF_NR ? N - n0 : RF_NR;
        FULL_TILES(n0, nc);
        switch (left) {
            case 5: TILE(5, 1, full, n0, nc); break;
            case 4: TILE(4, 1, full, n0, nc); break;
            case 3: TILE(3, 1, full, n0, nc); break;
            case 2: TILE(2, 1, full, n0, nc); break;
            case 1: TILE(1, 1, full, n0, nc); break;
            default: break;
        }
    }
#undef FULL_TILES
}
#undef TILE

/* rf_transposed_gemm's product: op(W) = W^T read in place from W (N, K), row-major (row
 * stride ldw), as a torch weight is stored. A tile loads VL rows of W by VL k from their
 * 128-bit halves and transposes them in registers into VL vectors, one per k, each
 * holding VL outputs' factors; its FMAs then run over k in order from zero, as the packed
 * tiles' do, so every output gets their chain and their bits. rows[i]: row i of the
 * VL-row block (the last row repeated past N: those lanes are never stored). */
AVX2 static inline __attribute__((always_inline)) void RF_FN(load_transposed)(
        VEC w[VL], const REAL *const rows[VL], ptrdiff_t k) {
#if RF_IS_FLOAT
    for (int h = 0; h < 2; h++) {  /* k .. k+3, then k+4 .. k+7 */
        __m256 v[4], t[4];
        for (int i = 0; i < 4; i++)  /* [row i | row i+4] */
            v[i] = _mm256_insertf128_ps(
                    _mm256_castps128_ps256(_mm_loadu_ps(rows[i] + k + 4 * h)),
                    _mm_loadu_ps(rows[i + 4] + k + 4 * h), 1);
        t[0] = _mm256_unpacklo_ps(v[0], v[1]);
        t[1] = _mm256_unpackhi_ps(v[0], v[1]);
        t[2] = _mm256_unpacklo_ps(v[2], v[3]);
        t[3] = _mm256_unpackhi_ps(v[2], v[3]);
        w[4 * h] = _mm256_shuffle_ps(t[0], t[2], 0x44);
        w[4 * h + 1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
        w[4 * h + 2] = _mm256_shuffle_ps(t[1], t[3], 0x44);
        w[4 * h + 3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
    }
#else
    for (int h = 0; h < 2; h++) {  /* k, k+1, then k+2, k+3 */
        __m256d v[2];
        for (int i = 0; i < 2; i++)  /* [row i | row i+2] */
            v[i] = _mm256_insertf128_pd(
                    _mm256_castpd128_pd256(_mm_loadu_pd(rows[i] + k + 2 * h)),
                    _mm_loadu_pd(rows[i + 2] + k + 2 * h), 1);
        w[2 * h] = _mm256_unpacklo_pd(v[0], v[1]);
        w[2 * h + 1] = _mm256_unpackhi_pd(v[0], v[1]);
    }
#endif
}

/* One tile of rf_transposed_gemm: mr rows (<= MR) x nb blocks of VL outputs, the last
 * holding nc of them; inlined with constant mr and nb, so the accumulators stay in
 * registers. */
AVX2 static inline __attribute__((always_inline)) void RF_FN(tile_transposed)(
        int mr, int nb, ptrdiff_t nc, ptrdiff_t K, const REAL *A, ptrdiff_t lda,
        const REAL *W, ptrdiff_t ldw, int accumulate, REAL *C, ptrdiff_t ldc) {
    const REAL *rows[4][VL];
    ptrdiff_t last = (nb - 1) * VL + nc - 1;
    UNROLL for (int b = 0; b < nb; b++)
        UNROLL for (int i = 0; i < VL; i++)
            rows[b][i] = W + (b * VL + i < last ? b * VL + i : last) * ldw;
    VEC acc[MR][4];
    UNROLL for (int i = 0; i < mr; i++)
        UNROLL for (int b = 0; b < nb; b++) acc[i][b] = V_ZERO();
    ptrdiff_t k = 0;
    for (; k + VL <= K; k += VL)
        UNROLL for (int b = 0; b < nb; b++) {
            VEC w[VL];
            RF_FN(load_transposed)(w, rows[b], k);
            UNROLL for (int j = 0; j < VL; j++)
                UNROLL for (int i = 0; i < mr; i++)
                    acc[i][b] = V_FMA(V_BROADCAST(A + i * lda + k + j), w[j], acc[i][b]);
        }
    for (; k < K; k++)  /* K's last k % VL: a column of each block gathered */
        UNROLL for (int b = 0; b < nb; b++) {
            REAL col[VL];
            UNROLL for (int i = 0; i < VL; i++) col[i] = rows[b][i][k];
            VEC w = V_LOAD(col);
            UNROLL for (int i = 0; i < mr; i++)
                acc[i][b] = V_FMA(V_BROADCAST(A + i * lda + k), w, acc[i][b]);
        }
    UNROLL for (int i = 0; i < mr; i++)
        UNROLL for (int b = 0; b < nb; b++) {
            REAL *c = C + i * ldc + b * VL;
            VEC sum = acc[i][b];
            if (b == nb - 1 && nc < VL) {  /* never touching columns >= N */
                __m256i m = V_LANES(nc);
                if (accumulate) sum = V_ADD(sum, V_MASKLOAD(c, m));
                V_MASKSTORE(c, m, sum);
            } else {
                if (accumulate) sum = V_ADD(sum, V_LOAD(c));
                V_STORE(c, sum);
            }
        }
}

/* A tile of mr rows x nb blocks at row m0, column n0 (nc outputs in its last block). */
#define TILE_T(mr, nb, m0, n0, nc)                                                         \
    RF_FN(tile_transposed)(mr, nb, nc, K, A + (m0) * lda, lda, W + (n0) * ldw, ldw,         \
                           accumulate, C + (m0) * ldc + (n0), ldc)

/* Blocks of VL outputs n0 .. n1-1 (the last may be partial) for mr rows at m0: nb blocks
 * a tile while they last, for enough independent chains, then one. */
#define BLOCKS_T(mr, nb, m0, n0, n1)                                                      \
    do {                                                                                  \
        ptrdiff_t n_ = (n0);                                                              \
        for (; n_ + (nb) * VL <= (n1); n_ += (nb) * VL) TILE_T(mr, nb, m0, n_, VL);        \
        for (; n_ < (n1); n_ += VL) TILE_T(mr, 1, m0, n_, (n1) - n_ < VL ? (n1) - n_ : VL); \
    } while (0)

/* rf_transposed_gemm on AVX2 (and AVX-512F, whose packed tiles' bits are these): groups
 * of 4 VL-output blocks the outer loop, so a group's rows of W, read by every row tile,
 * stay in L1 or L2; rows in tiles of nearly equal height, MR at most. A tile of one row
 * takes four blocks, of two or three rows two: eight or more independent chains where
 * they fit in the registers beside the VL transposed vectors. */
AVX2 static void RF_FN(transposed_rows)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                                        ptrdiff_t lda, const REAL *W, ptrdiff_t ldw,
                                        int accumulate, REAL *C, ptrdiff_t ldc) {
    ptrdiff_t tiles = (M + MR - 1) / MR;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += 4 * VL) {
        ptrdiff_t n1 = n0 + 4 * VL < N ? n0 + 4 * VL : N;
        for (ptrdiff_t t = 0, m0 = 0; t < tiles; t++) {
            ptrdiff_t rows = (M - m0 + tiles - t - 1) / (tiles - t);
            switch (rows) {
                case 6: BLOCKS_T(6, 1, m0, n0, n1); break;
                case 5: BLOCKS_T(5, 1, m0, n0, n1); break;
                case 4: BLOCKS_T(4, 1, m0, n0, n1); break;
                case 3: BLOCKS_T(3, 2, m0, n0, n1); break;
                case 2: BLOCKS_T(2, 2, m0, n0, n1); break;
                default: BLOCKS_T(1, 4, m0, n0, n1); break;
            }
            m0 += rows;
        }
    }
}
#undef BLOCKS_T
#undef TILE_T
#undef VEC
#undef V_ZERO
#undef V_LOAD
#undef V_STORE
#undef V_BROADCAST
#undef V_FMA
#undef V_ADD
#undef V_MASKLOAD
#undef V_MASKSTORE
#undef V_LANES
#undef VL

/* AVX-512F: a panel row is one zmm register (16 floats, 8 doubles), and 32 registers hold
 * tiles of up to 24 accumulators. Every output is one chain of FMAs over k in order, then
 * C added where accumulating: the AVX2 tiles' chains, so the same bits on either path,
 * whichever tile computes a row. */
#if RF_IS_FLOAT
#define ZVEC __m512
#define ZMASK __mmask16
#define Z_ZERO _mm512_setzero_ps
#define Z_LOAD _mm512_loadu_ps
#define Z_STORE _mm512_storeu_ps
#define Z_SET1 _mm512_set1_ps
#define Z_FMA _mm512_fmadd_ps
#define Z_ADD _mm512_add_ps
#define Z_MASKLOAD _mm512_maskz_loadu_ps
#define Z_MASKSTORE _mm512_mask_storeu_ps
#else
#define ZVEC __m512d
#define ZMASK __mmask8
#define Z_ZERO _mm512_setzero_pd
#define Z_LOAD _mm512_loadu_pd
#define Z_STORE _mm512_storeu_pd
#define Z_SET1 _mm512_set1_pd
#define Z_FMA _mm512_fmadd_pd
#define Z_ADD _mm512_add_pd
#define Z_MASKLOAD _mm512_maskz_loadu_pd
#define Z_MASKSTORE _mm512_mask_storeu_pd
#endif

/* One tile: mr rows (<= MR) x np adjacent panels, the last holding nc columns; inlined
 * with constant mr and np, so the accumulators stay in registers. Meanwhile it fetches
 * ahead_np panels from ahead into L2, a line of each per k. */
AVX512 static inline __attribute__((always_inline)) void RF_FN(tile512)(
        int mr, int np, ptrdiff_t nc, ptrdiff_t K, const REAL *A, ptrdiff_t lda,
        const REAL *panels, ptrdiff_t panel_stride, ptrdiff_t ldp, int accumulate, REAL *C,
        ptrdiff_t ldc, const REAL *ahead, ptrdiff_t ahead_np) {
    ZVEC acc[MR][8], b[8];
    UNROLL for (int i = 0; i < mr; i++)
        UNROLL for (int q = 0; q < np; q++) acc[i][q] = Z_ZERO();
    for (ptrdiff_t k = 0; k < K; k++) {
        for (ptrdiff_t q = 0; q < ahead_np; q++)
            _mm_prefetch((const char *)(ahead + q * panel_stride + k * ldp), _MM_HINT_T1);
        UNROLL for (int q = 0; q < np; q++) b[q] = Z_LOAD(panels + q * panel_stride + k * ldp);
        UNROLL for (int i = 0; i < mr; i++) {
            ZVEC a = Z_SET1(A[i * lda + k]);
            UNROLL for (int q = 0; q < np; q++) acc[i][q] = Z_FMA(a, b[q], acc[i][q]);
        }
    }
    ZMASK last = (ZMASK)((1u << nc) - 1);
    UNROLL for (int i = 0; i < mr; i++)
        UNROLL for (int q = 0; q < np; q++) {
            REAL *c = C + i * ldc + q * RF_NR;
            ZVEC sum = acc[i][q];
            if (q == np - 1 && nc < RF_NR) {  /* never touching columns >= N */
                if (accumulate) sum = Z_ADD(sum, Z_MASKLOAD(last, c));
                Z_MASKSTORE(c, last, sum);
            } else {
                if (accumulate) sum = Z_ADD(sum, Z_LOAD(c));
                Z_STORE(c, sum);
            }
        }
}

/* The panels a step fetches ahead into L2 while its tiles use a group of panels, ah.per
 * of them per tile: at .. end-1. A W_hh larger than L2 would otherwise come from L3 at the
 * start of each group, with its first tiles waiting on it. */
typedef struct { ptrdiff_t at, end, per; } RF_FN(ahead);

/* The next ah.per (or fewer) panels of ah, as a pointer; their count into *n. */
static inline const REAL *RF_FN(take_ahead)(RF_FN(ahead) *ah, const REAL *Bp,
                                            ptrdiff_t panel_stride, ptrdiff_t *n) {
    *n = ah->end - ah->at < ah->per ? ah->end - ah->at : ah->per;
    ah->at += *n;
    return Bp + (ah->at - *n) * panel_stride;
}

/* mr rows at row m0 over panels p0 .. p1-1 of P, in tiles of up to np_max panels (then
 * of one): few rows take many panels, for enough independent chains. Each tile fetches
 * ahead its share of ah. */
#define RANGE512(mr, np_max, m0, p0, p1)                                                     \
    do {                                                                                     \
        ptrdiff_t p_ = (p0), n_;                                                             \
        for (; p_ < (p1); p_ += n_) {                                                        \
            ptrdiff_t pf_n_;                                                                 \
            const REAL *pf_ = RF_FN(take_ahead)(&ah, Bp, panel_stride, &pf_n_);              \
            n_ = p_ + (np_max) <= (p1) ? (np_max) : 1;                                       \
            ptrdiff_t nc_ = p_ + n_ == P ? nc_last : RF_NR;                                  \
            const REAL *A_ = A + (m0) * lda, *B_ = Bp + p_ * panel_stride;                   \
            REAL *C_ = C + (m0) * ldc + p_ * RF_NR;                                          \
            if (n_ == (np_max))                                                              \
                RF_FN(tile512)(mr, np_max, nc_, K, A_, lda, B_, panel_stride, ldp,           \
                               accumulate, C_, ldc, pf_, pf_n_);                             \
            else                                                                             \
                RF_FN(tile512)(mr, 1, nc_, K, A_, lda, B_, panel_stride, ldp, accumulate,    \
                               C_, ldc, pf_, pf_n_);                                         \
        }                                                                                    \
    } while (0)

/* rows (1 .. MR) rows at row m0 over panels p0 .. p1-1: tiles of four panels from three
 * rows up, of eight below. */
#define ROWS512(rows, m0, p0, p1)                                       \
    do {                                                                \
        switch (rows) {                                                 \
            case 6: RANGE512(6, 4, m0, p0, p1); break;                  \
            case 5: RANGE512(5, 4, m0, p0, p1); break;                  \
            case 4: RANGE512(4, 4, m0, p0, p1); break;                  \
            case 3: RANGE512(3, 4, m0, p0, p1); break;                  \
            case 2: RANGE512(2, 8, m0, p0, p1); break;                  \
            case 1: RANGE512(1, 8, m0, p0, p1); break;                  \
            default: break;                                             \
        }                                                               \
    } while (0)

/* row_block_projection's and row_block_step's work on AVX-512F. rows_outer (a projection's
 * many rows): a tile's rows stay in L1 while the panels stream past. Otherwise (a step's
 * few rows) panels are the outer loop, eight at a time, each group reused by every row
 * tile from L2 and the next group fetched ahead meanwhile (after the last, the first: the
 * next step's). A tile of one to three rows reads a panel line per two to six FMAs, more
 * than L2 delivers, so the rows go in tiles of nearly equal height where each can have
 * four or more (20 = 5+5+5+5, not 6+6+6+2); otherwise MR at a time. Where one tile takes
 * all the rows, each group is read once: the hardware prefetchers stream it alone. */
AVX512 static void RF_FN(row_block512)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                                       ptrdiff_t lda, const REAL *Bp, ptrdiff_t panel_stride,
                                       ptrdiff_t ldp, int accumulate, REAL *C, ptrdiff_t ldc,
                                       int rows_outer) {
    ptrdiff_t P = (N + RF_NR - 1) / RF_NR, nc_last = N - (P - 1) * RF_NR;
    RF_FN(ahead) ah = {0, 0, 0};
    if (rows_outer) {
        ptrdiff_t full = M / MR * MR;
        for (ptrdiff_t m0 = 0; m0 < full; m0 += MR) RANGE512(MR, 4, m0, 0, P);
        if (full < M) ROWS512(M - full, full, 0, P);
        return;
    }
    ptrdiff_t tiles = (M + MR - 1) / MR, runs = 2 * tiles;  /* tiles of 4 panels a group */
    int even = M >= 4 * tiles;
    for (ptrdiff_t p0 = 0; p0 < P; p0 += 8) {
        ptrdiff_t p1 = p0 + 8 < P ? p0 + 8 : P;
        if (tiles > 1) {
            ah.at = p1 < P ? p1 : 0;
            ah.end = ah.at + 8 < P ? ah.at + 8 : P;
            ah.per = (ah.end - ah.at + runs - 1) / runs;
        }
        for (ptrdiff_t t = 0, m0 = 0; t < tiles; t++) {
            ptrdiff_t rows = even ? (M - m0 + tiles - t - 1) / (tiles - t)
                                  : M - m0 < MR ? M - m0 : MR;
            ROWS512(rows, m0, p0, p1);
            m0 += rows;
        }
    }
}
#undef RANGE512
#undef ROWS512
#undef ZVEC
#undef ZMASK
#undef Z_ZERO
#undef Z_LOAD
#undef Z_STORE
#undef Z_SET1
#undef Z_FMA
#undef Z_ADD
#undef Z_MASKLOAD
#undef Z_MASKSTORE
#endif /* RF_HAVE_AVX2 */

void RF_FN(rf_pack)(REAL *Bp, const REAL *B, ptrdiff_t ldb, int trans, ptrdiff_t K,
                    ptrdiff_t N, int avx2) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += RF_NR) {
        REAL *panel = Bp + n0 * K;
        ptrdiff_t k = 0;
        if (!trans && n0 + RF_NR <= N)  /* whole panel rows are slices of B's rows */
            for (; k < K; k++) memcpy(panel + k * RF_NR, B + k * ldb + n0, sizeof(REAL) * RF_NR);
#if RF_HAVE_AVX2
        if (trans && n0 + RF_NR <= N && avx2)
            k = RF_FN(pack_transposed)(panel, B + n0 * ldb, ldb, K);
#else
        (void)avx2;
#endif
        for (; k < K; k++)
            for (ptrdiff_t c = 0; c < RF_NR; c++) {
                ptrdiff_t n = n0 + c;
                panel[k * RF_NR + c] = n >= N ? 0 : trans ? B[n * ldb + k] : B[k * ldb + n];
            }
    }
}

void RF_FN(rf_transpose)(REAL *dst, ptrdiff_t ldd, const REAL *src, ptrdiff_t lds,
                         ptrdiff_t rows, ptrdiff_t cols, int avx2) {
    ptrdiff_t r = 0;
#if RF_HAVE_AVX2
    if (avx2) r = RF_FN(transpose_blocks)(dst, ldd, src, lds, rows, cols);
#else
    (void)avx2;
#endif
    for (; r < rows; r++)
        for (ptrdiff_t c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
}

/* The portable product: tiles of two rows by one panel, in the compiler's generic vectors
 * (four make a panel row: SSE2, NEON, ...), each output one chain over k in order. An odd
 * last row runs through the same tile as both of its rows, so every row is computed by the
 * same code whatever M is. */
#if defined(__GNUC__)
typedef REAL RF_FN(vec) __attribute__((vector_size(RF_PANEL_BYTES / 4)));

static inline void RF_FN(tile_portable)(ptrdiff_t K, const REAL *a0, const REAL *a1,
                                        const REAL *panel, ptrdiff_t ldp,
                                        REAL out[2][RF_NR]) {
    typedef RF_FN(vec) V;
    V acc0[4] = {0}, acc1[4] = {0}, b[4];
    for (ptrdiff_t k = 0; k < K; k++) {
        memcpy(b, panel + k * ldp, sizeof b);
        for (int v = 0; v < 4; v++) {
            acc0[v] += a0[k] * b[v];
            acc1[v] += a1[k] * b[v];
        }
    }
    memcpy(out[0], acc0, sizeof acc0);
    memcpy(out[1], acc1, sizeof acc1);
}
#else
static inline void RF_FN(tile_portable)(ptrdiff_t K, const REAL *a0, const REAL *a1,
                                        const REAL *panel, ptrdiff_t ldp,
                                        REAL out[2][RF_NR]) {
    for (ptrdiff_t c = 0; c < RF_NR; c++) out[0][c] = out[1][c] = 0;
    for (ptrdiff_t k = 0; k < K; k++)
        for (ptrdiff_t c = 0; c < RF_NR; c++) {
            out[0][c] += a0[k] * panel[k * ldp + c];
            out[1][c] += a1[k] * panel[k * ldp + c];
        }
}
#endif

static void RF_FN(row_block_portable)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                                      ptrdiff_t lda, const REAL *Bp, ptrdiff_t panel_stride,
                                      ptrdiff_t ldp, int accumulate, REAL *C, ptrdiff_t ldc) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += RF_NR) {
        const REAL *panel = Bp + (n0 / RF_NR) * panel_stride;
        ptrdiff_t nc = N - n0 < RF_NR ? N - n0 : RF_NR;
        for (ptrdiff_t m = 0; m < M; m += 2) {
            ptrdiff_t rows = M - m < 2 ? 1 : 2;
            REAL sum[2][RF_NR];
            RF_FN(tile_portable)(K, A + m * lda, A + (m + rows - 1) * lda, panel, ldp, sum);
            for (ptrdiff_t i = 0; i < rows; i++) {
                REAL *out = C + (m + i) * ldc + n0;
                for (ptrdiff_t c = 0; c < nc; c++)
                    out[c] = accumulate ? out[c] + sum[i][c] : sum[i][c];
            }
        }
    }
}

/* A projection's panels in blocks of about this many bytes (half the L2 of current server
 * cores), each block kept in L2 while every row tile passes over it: a whole W_ih larger
 * than L2 would otherwise stream from L3 or memory once per tile. */
#define RF_PROJECTION_PANEL_BYTES (512 * 1024)

/* One block of rows of rf_packed_gemm, on the code path simd. ldp: a panel's row stride
 * (RF_NR packed; B's row stride where B is read in place). */
static void RF_FN(row_block_on)(int simd, int step, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                                const REAL *A, ptrdiff_t lda, const REAL *Bp,
                                ptrdiff_t panel_stride, ptrdiff_t ldp, int accumulate,
                                REAL *C, ptrdiff_t ldc) {
#if RF_HAVE_AVX2
    if (simd == RF_SIMD_AVX512)
        RF_FN(row_block512)(M, N, K, A, lda, Bp, panel_stride, ldp, accumulate, C, ldc, !step);
    else if (simd && step)
        RF_FN(row_block_step)(M, N, K, A, lda, Bp, panel_stride, ldp, accumulate, C, ldc);
    else if (simd)
        RF_FN(row_block_projection)(M, N, K, A, lda, Bp, panel_stride, ldp, accumulate, C,
                                    ldc);
    else
#else
    (void)simd; (void)step;
#endif
        RF_FN(row_block_portable)(M, N, K, A, lda, Bp, panel_stride, ldp, accumulate, C, ldc);
}

/* rf_packed_gemm and rf_inplace_gemm: B's panels panel_stride apart, their rows ldp apart. */
static void RF_FN(panel_gemm)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                              ptrdiff_t lda, const REAL *Bp, ptrdiff_t panel_stride,
                              ptrdiff_t ldp, int accumulate, REAL *C, ptrdiff_t ldc, int step,
                              int simd) {
    /* blocks of whole tiles, about 192 KiB of A each: where panels are the outer loop (a
     * step of many rows; the portable tile) A then streams from L2 once per panel rather
     * than from memory. */
    ptrdiff_t block = K > 0 ? (192 * 1024 / (K * (ptrdiff_t)sizeof(REAL)) / MR) * MR : M;
    if (block < MR) block = MR;
    ptrdiff_t panels = K > 0 && !step ? RF_PROJECTION_PANEL_BYTES / (K * RF_PANEL_BYTES) : 0;
    ptrdiff_t cols = panels > 1 ? panels * RF_NR : N;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += cols)
        for (ptrdiff_t m0 = 0; m0 < M; m0 += block)
            RF_FN(row_block_on)(simd, step, M - m0 < block ? M - m0 : block,
                                N - n0 < cols ? N - n0 : cols, K, A + m0 * lda, lda,
                                Bp + n0 / RF_NR * panel_stride, panel_stride, ldp, accumulate,
                                C + m0 * ldc + n0, ldc);
}

void RF_FN(rf_packed_gemm)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A, ptrdiff_t lda,
                           const REAL *Bp, ptrdiff_t panel_stride, int accumulate, REAL *C,
                           ptrdiff_t ldc, int step, int simd) {
    RF_FN(panel_gemm)(M, N, K, A, lda, Bp, panel_stride, RF_NR, accumulate, C, ldc, step, simd);
}

/* A row-major B's columns RF_NR*p .. RF_NR*p+RF_NR-1 are panel p with rows ldb apart, so
 * whole panels need no packing: the same tiles, the same chains. */
void RF_FN(rf_inplace_gemm)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                            ptrdiff_t lda, const REAL *B, ptrdiff_t ldb, int accumulate,
                            REAL *C, ptrdiff_t ldc, int simd) {
    RF_FN(panel_gemm)(M, N, K, A, lda, B, RF_NR, ldb, accumulate, C, ldc, 0, simd);
}

/* rf_transposed_gemm's portable product: the portable tile's chains (each output from
 * zero, a product then a sum per k, in order), four outputs at a time. */
static void RF_FN(transposed_portable)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                                       ptrdiff_t lda, const REAL *W, ptrdiff_t ldw,
                                       int accumulate, REAL *C, ptrdiff_t ldc) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += 4) {
        ptrdiff_t nc = N - n0 < 4 ? N - n0 : 4;
        const REAL *w[4];
        for (ptrdiff_t c = 0; c < 4; c++) w[c] = W + (n0 + (c < nc ? c : nc - 1)) * ldw;
        for (ptrdiff_t m = 0; m < M; m++) {
            const REAL *a = A + m * lda;
            REAL sum[4] = {0, 0, 0, 0};
            for (ptrdiff_t k = 0; k < K; k++)
                for (ptrdiff_t c = 0; c < 4; c++) sum[c] += a[k] * w[c][k];
            REAL *out = C + m * ldc + n0;
            for (ptrdiff_t c = 0; c < nc; c++)
                out[c] = accumulate ? out[c] + sum[c] : sum[c];
        }
    }
}

/* Up to MR rows, the register transposes: every block of W is read once, by the one row
 * tile. More rows share each block among more tiles: then a panel at a time is packed into
 * a buffer on the stack, which stays in L1, and the packed tiles run over it (for K up to
 * RF_PANEL_K_MAX; beyond, the register path). */
#define RF_PANEL_K_MAX 512
void RF_FN(rf_transposed_gemm)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                               ptrdiff_t lda, const REAL *W, ptrdiff_t ldw, int accumulate,
                               REAL *C, ptrdiff_t ldc, int simd) {
    if (M > MR && K <= RF_PANEL_K_MAX) {
        _Alignas(RF_PANEL_BYTES) REAL panel[RF_NR * RF_PANEL_K_MAX];
        for (ptrdiff_t n0 = 0; n0 < N; n0 += RF_NR) {
            ptrdiff_t nc = N - n0 < RF_NR ? N - n0 : RF_NR;
            RF_FN(rf_pack)(panel, W + n0 * ldw, ldw, 1, K, nc, simd != RF_SIMD_PORTABLE);
            RF_FN(row_block_on)(simd, 1, M, nc, K, A, lda, panel, RF_NR * K, RF_NR, accumulate,
                                C + n0, ldc);
        }
        return;
    }
#if RF_HAVE_AVX2
    if (simd) {
        RF_FN(transposed_rows)(M, N, K, A, lda, W, ldw, accumulate, C, ldc);
        return;
    }
#else
    (void)simd;
#endif
    RF_FN(transposed_portable)(M, N, K, A, lda, W, ldw, accumulate, C, ldc);
}
#undef RF_PANEL_K_MAX

#endif /* RF_TEMPLATE */
