/* common.c -- what every cell shares: the batch plan, row-major GEMM through the BLAS
 * table, gathering x into packed order and scattering back, and the input-side products.
 * The dtype-generic part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#define _POSIX_C_SOURCE 200112L  /* posix_memalign under -std=c11 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <malloc.h>
#endif

#include "rnnfuse.h"

/* posix_memalign (or the Windows call) rather than C11's aligned_alloc, which some C
 * libraries still lack. */
void *rf_aligned_alloc(size_t align, size_t size) {
    if (size > SIZE_MAX - align) return NULL;
    size = (size + align - 1) / align * align;
#ifdef _WIN32
    return _aligned_malloc(size, align);
#else
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
#endif
}

void rf_aligned_free(void *p) {
#ifdef _WIN32
    _aligned_free(p);
#else
    free(p);
#endif
}

ptrdiff_t rf_plan_build(ptrdiff_t T, ptrdiff_t B, const int64_t *lengths,
                        int64_t *order, int64_t *batch_sizes, int64_t *offsets,
                        int64_t *count) {
    /* count[len] = number of rows of that length */
    memset(count, 0, (size_t)(T + 1) * sizeof *count);
    for (ptrdiff_t b = 0; b < B; b++) count[lengths[b]]++;
    /* batch_sizes[s] = number of rows longer than s */
    int64_t running = 0;
    for (ptrdiff_t s = T - 1; s >= 0; s--) {
        running += count[s + 1];
        batch_sizes[s] = running;
    }
    offsets[0] = 0;
    for (ptrdiff_t s = 0; s < T; s++) offsets[s + 1] = offsets[s] + batch_sizes[s];
    ptrdiff_t steps = 0;
    while (steps < T && batch_sizes[steps] > 0) steps++;
    /* Counting sort by decreasing length, stable: count[len] becomes the next sorted
     * position for a row of length len. */
    int64_t start = 0;
    for (ptrdiff_t len = T; len >= 0; len--) {
        int64_t n = count[len];
        count[len] = start;
        start += n;
    }
    for (ptrdiff_t b = 0; b < B; b++) order[count[lengths[b]]++] = b;
    return steps;
}

int rf_choose_kernel(const char *request) {
    if (!request || !*request)
        return rf_cpu_avx512() ? RF_SIMD_AVX512 : rf_cpu_avx2() ? RF_SIMD_AVX2 : RF_SIMD_PORTABLE;
    if (!strcmp(request, "portable")) return RF_SIMD_PORTABLE;
    if (!strcmp(request, "avx2")) return rf_cpu_avx2() ? RF_SIMD_AVX2 : -1;
    if (!strcmp(request, "avx512")) return rf_cpu_avx512() ? RF_SIMD_AVX512 : -1;
    return -1;
}

const char *rf_simd_path(void) {
    switch (rf_choose_kernel(NULL)) {  /* (a table of pointers would be writable data) */
        case RF_SIMD_AVX512: return "AVX2+FMA, AVX-512F";
        case RF_SIMD_AVX2: return "AVX2+FMA";
        default: return "baseline";
    }
}

ptrdiff_t rf_gemm_floor_size(ptrdiff_t T, ptrdiff_t B, ptrdiff_t I, ptrdiff_t H, ptrdiff_t G) {
    return T * B * I + G * H * I + G * H * H + T * B * G * H + T * B * H + B * H;
}

/* Weights packed into a workspace start on its first cache line (rf_prepare_weight): a
 * panel row is one line, and loads that straddle two lines are slower. The workspace
 * leaves room for the shift, at most a line less one element: 16 elements cover it for
 * either dtype. */
#define RF_LINE_SLACK 16

/* pack_weights' arrays start with their tag (rf_tag_write) in RF_PACK_TAG elements (so
 * the weights after it start on a line too), which rf_weights_packed_for reads: weights
 * packed for other sizes or another GRU layout are refused, not misread. */
static const char pack_tag[RF_TAG_NAME] = "rnnfuse weights 1";

typedef struct {
    char name[RF_TAG_NAME];
    int64_t G, H, I, split, P;
} rf_tag;
_Static_assert(sizeof(rf_tag) <= RF_TAG_BYTES, "a tag fits its bytes");

void rf_tag_write(void *dst, const char *name, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I,
                  int lbr, ptrdiff_t P) {
    rf_tag tag;
    memset(dst, 0, RF_TAG_BYTES);
    memset(&tag, 0, sizeof tag);
    memcpy(tag.name, name, RF_TAG_NAME);
    tag.G = G, tag.H = H, tag.I = I, tag.split = rf_split_n(G, lbr), tag.P = P;
    memcpy(dst, &tag, sizeof tag);
}

int rf_tag_matches(const void *src, const char *name, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I,
                   int lbr, ptrdiff_t P) {
    rf_tag tag;
    memcpy(&tag, src, sizeof tag);
    return !memcmp(tag.name, name, RF_TAG_NAME) && tag.G == G && tag.H == H && tag.I == I
           && tag.split == rf_split_n(G, lbr) && tag.P == P;
}

ptrdiff_t rf_backward_scratch(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, ptrdiff_t G) {
    (void)I;
    /* carried dh and dc (B,H each) | W_hh packed for dh W_hh (G*H rows, H columns) */
    return 2 * p->B * H + rf_pack_buffer_size(G * H, H);
}

ptrdiff_t rf_pack_buffer_size(ptrdiff_t K, ptrdiff_t N) {
    return rf_packed_size(K, N) + RF_LINE_SLACK;
}

/* Where rf_prepare_weights puts each packed weight. */
static ptrdiff_t recurrent_pack_size(ptrdiff_t G, ptrdiff_t H) {
    /* the GRU without linear_before_reset packs its n block apart, after the rest */
    return rf_packed_size(H, G * H) + (G == 3 ? rf_packed_size(H, H) : 0);
}

/* Elements (floats: more than enough for double calls, which have no int8) of a
 * workspace's room for packing weights that int8 weights, which come packed, take as
 * their products' scratch instead (rf_prepare_q8): rf_q8_scratch_total bytes from its
 * first cache line, for either GRU layout (the one without linear_before_reset has the
 * more weights). */
ptrdiff_t rf_q8_scratch_room(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, ptrdiff_t P) {
    return (rf_q8_scratch_total(G, H, I, 0, P) + 3) / 4 + RF_LINE_SLACK;
}

ptrdiff_t rf_weights_pack_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I) {
    ptrdiff_t packed = recurrent_pack_size(G, H) + rf_packed_size(I, G * H) + RF_LINE_SLACK;
    ptrdiff_t scratch = rf_q8_scratch_room(G, H, I, 0);
    return packed > scratch ? packed : scratch;
}

ptrdiff_t rf_weights_packed_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I) {
    return RF_PACK_TAG + recurrent_pack_size(G, H) + rf_packed_size(I, G * H);
}

int rf_weights_packed_for(const void *packed, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I,
                          int lbr) {
    return rf_tag_matches(packed, pack_tag, G, H, I, lbr, 0);
}

/* The least flops a part must have to pay for handing it to another thread: about as
 * long as a sleeping pool worker takes to wake; a larger bound kept mid-sized
 * projections on one thread, where two were faster. */
#define RF_FLOPS_PER_THREAD (1 << 23)

/* The flops of ~0.1 s on one core: about as long as OpenBLAS's idle threads spin after a
 * call (2^28 cycles by default). A thread of ours started within that time shares its
 * core with a spinning one, so a shorter loop right after BLAS products stays on one. */
#define RF_SPIN_FLOPS 8e9

/* How many threads a job of this many flops, in this many register tiles of rows, is
 * worth: at most the BLAS's thread count and one tile each; after_blas (see rnnfuse.h),
 * one unless it outlasts the BLAS threads' spin. */
static int parts_worth(const rf_runtime *rt, double flops, ptrdiff_t tiles, int after_blas) {
    if (after_blas && flops < RF_SPIN_FLOPS) return 1;
    int parts = rf_threads(rt);
    double worth = flops / RF_FLOPS_PER_THREAD;
    if (parts > tiles) parts = tiles < 1 ? 1 : (int)tiles;
    if (worth < parts) parts = worth < 1 ? 1 : (int)worth;
    return parts;
}

int rf_step_parts(const rf_plan *p, ptrdiff_t step0, ptrdiff_t step1, double flops_per_row,
                  int after_blas, const rf_runtime *rt) {
    if (step0 >= step1) return 1;
    double flops = (double)(p->offsets[step1] - p->offsets[step0]) * flops_per_row;
    return parts_worth(rt, flops, (p->batch_sizes[step0] + RF_MR - 1) / RF_MR, after_blas);
}

/* The first sorted row of part `part`: a whole-tile boundary, the one nearest to where the
 * parts before it hold their share of the real steps (rows are sorted longest first). */
static ptrdiff_t part_start(const rf_plan *p, int part, int parts) {
    if (part >= parts) return p->B;
    double target = (double)p->rows * part / parts, done = 0;
    ptrdiff_t j = 0;
    while (j < p->B) {
        ptrdiff_t end = j + RF_MR < p->B ? j + RF_MR : p->B;
        double tile = 0;
        for (ptrdiff_t i = j; i < end; i++) tile += (double)p->lengths[p->order[i]];
        if (done + tile / 2 >= target) break;
        done += tile;
        j = end;
    }
    return j;
}

void rf_part_rows(const rf_plan *p, int part, int parts, ptrdiff_t *j0, ptrdiff_t *j1) {
    *j0 = part_start(p, part, parts);
    *j1 = part_start(p, part + 1, parts);
}

#define RF_TEMPLATE_FILE "common.c"
#include "instantiate.h"

#elif defined(RF_PASS) /* the pointwise passes, once per code path (passes.h) */

RF_PASS_TARGET static void RF_PASS(column_sums)(REAL *out, const REAL *A, ptrdiff_t rows,
                                                ptrdiff_t cols, ptrdiff_t lda) {
    for (ptrdiff_t c = 0; c < cols; c++) out[c] = 0;
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = 0; c < cols; c++) out[c] += A[r * lda + c];
}

#else /* RF_TEMPLATE: dtype-generic part */

#define RF_PASSES_FILE "common.c"
#include "passes.h"

/* Largest extent handed to the 32-bit BLAS in one call; bigger M and K are split. */
#define RF_BLAS_MAX ((ptrdiff_t)1 << 30)

/* Row-major C (M,N) = alpha op(A) (M,K) op(B) (K,N) + beta C. Row-major is column-major
 * transposed, so this is the Fortran call with the operands swapped: C^T = op(B)^T op(A)^T.
 * N and the leading dimensions are below 2^31 (checked in Python). */
void RF_FN(rf_gemm)(const rf_runtime *rt, int trans_a, int trans_b,
                    ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, REAL alpha,
                    const REAL *A, ptrdiff_t lda, const REAL *B, ptrdiff_t ldb,
                    REAL beta, REAL *C, ptrdiff_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  /* empty sum: C = beta C (BLAS would also, but avoid its K=0 lda rules) */
        for (ptrdiff_t i = 0; i < M; i++)
            for (ptrdiff_t j = 0; j < N; j++)
                C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
        return;
    }
    char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    int n = (int)N, ilda = (int)lda, ildb = (int)ldb, ildc = (int)ldc;
    for (ptrdiff_t i0 = 0; i0 < M; i0 += RF_BLAS_MAX) {
        int m = (int)(M - i0 < RF_BLAS_MAX ? M - i0 : RF_BLAS_MAX);
        const REAL *a_rows = trans_a ? A + i0 : A + i0 * lda;
        REAL beta_k = beta;
        for (ptrdiff_t k0 = 0; k0 < K; k0 += RF_BLAS_MAX) {
            int k = (int)(K - k0 < RF_BLAS_MAX ? K - k0 : RF_BLAS_MAX);
            const REAL *a = trans_a ? a_rows + k0 * lda : a_rows + k0;
            const REAL *b = trans_b ? B + k0 : B + k0 * ldb;
            rt->RF_BLAS_GEMM(&tb, &ta, &n, &m, &k, &alpha, (REAL *)b, &ildb,
                               (REAL *)a, &ilda, &beta_k, C + i0 * ldc, &ildc);
            beta_k = 1;
        }
    }
}

/* A backward's input- and weight-side gradient products (dW_hh, dW_ih, dx) run on our
 * product, blocked as a BLAS is: K (every step's rows, for the weight gradients) in blocks
 * of RF_GRAD_KC, N in blocks of RF_GRAD_PANELS panels, so that a block of packed B (256 KiB
 * of floats) stays in L2 while 6-row tiles of A pass over it. The BLAS copies both operands
 * on every call, a large share of these products' time; where N is wider than
 * RF_GRAD_N_MAX those copies count for less and the BLAS is the faster. Products over
 * RF_OWN_GRAD_GEMM_MAX multiply-adds on the portable tile go to the BLAS too. */
#define RF_GRAD_KC ((ptrdiff_t)(2048 / sizeof(REAL)))
#define RF_GRAD_PANELS 8
#define RF_GRAD_N_MAX 256
#define RF_OWN_GRAD_GEMM_MAX (1 << 18)

/* One thread's rows of a gradient product: whole tiles of C's rows, so every output is the
 * same sum in the same order (blocks of K in turn, one chain over k within each) at any
 * thread count. a_buf: op(A)'s rows transposed a block at a time (trans_a); b_buf: one
 * block of packed B per part. */
typedef struct {
    int trans_a, avx2, simd;
    ptrdiff_t M, N, K, lda, ldb, ldc;
    const REAL *A, *B;
    REAL *C, *a_buf, *b_buf;
    ptrdiff_t kc, b_part;  /* a_buf's row stride; b_buf's elements per part */
} RF_FN(grad_product);

static void RF_FN(grad_part)(void *arg, int part, int parts) {
    const RF_FN(grad_product) *q = arg;
    ptrdiff_t tiles = (q->M + RF_MR - 1) / RF_MR, KC = RF_GRAD_KC;
    ptrdiff_t NC = RF_GRAD_PANELS * RF_NR;
    ptrdiff_t r0 = tiles * part / parts * RF_MR, r1 = tiles * (part + 1) / parts * RF_MR;
    if (r1 > q->M) r1 = q->M;
    if (r0 >= r1) return;
    REAL *At = q->a_buf + r0 * q->kc, *Bp = q->b_buf + part * q->b_part;
    for (ptrdiff_t k0 = 0; k0 < q->K; k0 += KC) {
        ptrdiff_t kc = q->K - k0 < KC ? q->K - k0 : KC;
        const REAL *a = q->A + r0 * q->lda + k0;
        ptrdiff_t lda = q->lda;
        if (q->trans_a) {  /* A is (K, M): its columns r0 .. r1-1 become At's rows */
            RF_FN(rf_transpose)(At, kc, q->A + k0 * q->lda + r0, q->lda, kc, r1 - r0, q->avx2);
            a = At;
            lda = kc;
        }
        for (ptrdiff_t n0 = 0; n0 < q->N; n0 += NC) {
            ptrdiff_t nc = q->N - n0 < NC ? q->N - n0 : NC;
            const REAL *b = q->B + k0 * q->ldb + n0;
            REAL *c = q->C + r0 * q->ldc + n0;
            ptrdiff_t inplace = q->M <= RF_FEW_ROWS ? nc / RF_NR * RF_NR : 0;
            if (inplace)
                RF_FN(rf_inplace_gemm)(r1 - r0, inplace, kc, a, lda, b, q->ldb, k0 > 0, c,
                                       q->ldc, q->simd);
            if (inplace == nc) continue;
            RF_FN(rf_pack)(Bp, b + inplace, q->ldb, 0, kc, nc - inplace, q->avx2);
            RF_FN(rf_packed_gemm)(r1 - r0, nc - inplace, kc, a, lda, Bp, RF_NR * kc, k0 > 0,
                                  c + inplace, q->ldc, 0, q->simd);
        }
    }
}

/* Row-major C (M,N) = op(A) (M,K) B (K,N), for a backward's gradients (see RF_GRAD_KC). */
void RF_FN(rf_grad_gemm)(const rf_runtime *rt, int trans_a, ptrdiff_t M, ptrdiff_t N,
                         ptrdiff_t K, const REAL *A, ptrdiff_t lda, const REAL *B,
                         ptrdiff_t ldb, REAL *C, ptrdiff_t ldc) {
    int small = (double)M * N * K <= RF_OWN_GRAD_GEMM_MAX;
    int ours = small || (N <= RF_GRAD_N_MAX && rt->avx2);
    /* buffers no larger than the blocks; packed B starts on a cache line */
    ptrdiff_t tiles = (M + RF_MR - 1) / RF_MR, a_size = 0, b_size = 0;
    ptrdiff_t kc = K < RF_GRAD_KC ? K : RF_GRAD_KC, nc = RF_GRAD_PANELS * RF_NR;
    int parts = 1;
    REAL *buf = NULL;
    if (M > 0 && N > 0 && K > 0 && ours) {
        parts = parts_worth(rt, 2.0 * (double)M * (double)N * (double)K, tiles, 0);
        a_size = trans_a ? (tiles * RF_MR * kc + RF_NR - 1) / RF_NR * RF_NR : 0;
        b_size = parts * rf_packed_size(kc, N < nc ? N : nc);
        size_t bytes = (size_t)(a_size + b_size) * sizeof(REAL);
        buf = rf_aligned_alloc(RF_PANEL_BYTES, bytes);
    }
    if (!buf) {  /* the BLAS's turn (also when there is no memory for our blocks) */
        RF_FN(rf_gemm)(rt, trans_a, 0, M, N, K, 1, A, lda, B, ldb, 0, C, ldc);
        return;
    }
    RF_FN(grad_product) job = {trans_a, rt->avx2, rf_simd(rt), M, N, K, lda, ldb, ldc, A, B, C,
                               buf, buf + a_size, kc, b_size / parts};
    rf_run_parts(RF_FN(grad_part), &job, parts);
    rf_aligned_free(buf);
}

/* packed[row] = seq[t, order[j]] for the rows of steps step0 .. step1-1 (rows counted from
 * step0's first row); F features per row. */
void RF_FN(rf_gather)(REAL *packed, const REAL *seq, const rf_plan *p,
                      ptrdiff_t step0, ptrdiff_t step1, ptrdiff_t F) {
    for (ptrdiff_t s = step0; s < step1; s++) {
        REAL *dst = packed + (p->offsets[s] - p->offsets[step0]) * F;
        for (ptrdiff_t j = 0; j < p->batch_sizes[s]; j++) {
            const REAL *src = seq + (rf_time(p, j, s) * p->B + p->order[j]) * F;
            memcpy(dst + j * F, src, (size_t)F * sizeof(REAL));
        }
    }
}

/* seq[t, order[j]] = packed[row] for every packed row; padding in seq is left as it is. */
void RF_FN(rf_scatter)(REAL *seq, const REAL *packed, const rf_plan *p, ptrdiff_t F) {
    for (ptrdiff_t s = 0; s < p->steps; s++) {
        const REAL *src = packed + p->offsets[s] * F;
        for (ptrdiff_t j = 0; j < p->batch_sizes[s]; j++) {
            REAL *dst = seq + (rf_time(p, j, s) * p->B + p->order[j]) * F;
            memcpy(dst, src + j * F, (size_t)F * sizeof(REAL));
        }
    }
}

/* dst[j] = src[order[j]] for every sorted row j (zeros when src is NULL). */
void RF_FN(rf_sort_rows)(REAL *dst, const REAL *src, const rf_plan *p, ptrdiff_t F) {
    for (ptrdiff_t j = 0; j < p->B; j++) {
        if (src) memcpy(dst + j * F, src + p->order[j] * F, (size_t)F * sizeof(REAL));
        else memset(dst + j * F, 0, (size_t)F * sizeof(REAL));
    }
}

/* dst[order[j]] = src[j]: sorted rows back to batch order (nothing where dst is NULL, a
 * gradient not wanted). */
void RF_FN(rf_unsort_rows)(REAL *dst, const REAL *src, const rf_plan *p, ptrdiff_t F) {
    if (!dst) return;
    for (ptrdiff_t j = 0; j < p->B; j++)
        memcpy(dst + p->order[j] * F, src + j * F, (size_t)F * sizeof(REAL));
}

/* The state entering step 0, in sorted order, from init (zeros when NULL). Rows of length
 * 0 never run: their final state is their initial one, written to final directly. */
void RF_FN(rf_initial_state)(REAL *state, REAL *final, const REAL *init, const rf_plan *p,
                             ptrdiff_t H) {
    ptrdiff_t running = p->steps > 0 ? p->batch_sizes[0] : 0;
    for (ptrdiff_t j = 0; j < p->B; j++) {
        ptrdiff_t b = p->order[j];
        REAL *dst = j < running ? state + j * H : final + b * H;
        if (init) memcpy(dst, init + b * H, (size_t)H * sizeof(REAL));
        else memset(dst, 0, (size_t)H * sizeof(REAL));
    }
}

/* out[c] = sum over rows of A[r, c]. */
void RF_FN(rf_column_sums)(REAL *out, const REAL *A, ptrdiff_t rows, ptrdiff_t cols,
                           ptrdiff_t lda, int avx2) {
    RF_PICK(column_sums, avx2)(out, A, rows, cols, lda);
}

/* The first cache line of buf (RF_LINE_SLACK). */
static inline REAL *RF_FN(line_start)(const REAL *buf) {
    uintptr_t at = (uintptr_t)buf;
    return (REAL *)(at + (RF_PANEL_BYTES - at % RF_PANEL_BYTES) % RF_PANEL_BYTES);
}

static void RF_FN(use_packed)(rf_weight *W, const REAL *packed, ptrdiff_t K) {
    W->packed = packed;
    W->in_place = NULL;
    W->ldw = 0;
    W->panel_stride = RF_NR * K;
    W->scales = NULL;
    W->sums = NULL;
    W->scratch = NULL;
}

/* Prepares op(W) (K rows, N columns, op(W) = W^T when trans) for our products: taken from
 * prepacked (or NULL), else packed into pack_buffer (rf_pack_buffer_size(K, N) elements)
 * from its first cache line. */
void RF_FN(rf_prepare_weight)(rf_weight *W, const REAL *w, ptrdiff_t ldw, int trans,
                              ptrdiff_t K, ptrdiff_t N, REAL *pack_buffer,
                              const REAL *prepacked, int avx2) {
    if (!prepacked) {
        REAL *at = RF_FN(line_start)(pack_buffer);
        RF_FN(rf_pack)(at, w, ldw, trans, K, N, avx2);
        prepacked = at;
    }
    RF_FN(use_packed)(W, prepacked, K);
}

/* A forward's weights laid out from `at`: W[0] = op(W_hh) = W_hh^T (H rows, G*H columns)
 * for the per-step products, except for the GRU without linear_before_reset, whose n block
 * multiplies r h apart: there W[0] holds the r z columns and W[1] the n block; W[2] =
 * W_ih^T (I rows, G*H columns) for the input projection. pack: pack them there first. */
static void RF_FN(weights_at)(rf_weight W[3], const REAL *w_ih, const REAL *w_hh,
                              ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, REAL *at,
                              int pack, int avx2) {
    int split = rf_split_n(G, lbr);
    ptrdiff_t N0 = split ? 2 * H : G * H, second = rf_packed_size(H, G * H);
    ptrdiff_t input = recurrent_pack_size(G, H);
    if (pack) {
        RF_FN(rf_pack)(at, w_hh, H, 1, H, N0, avx2);
        if (split) RF_FN(rf_pack)(at + second, w_hh + 2 * H * H, H, 1, H, H, avx2);
        RF_FN(rf_pack)(at + input, w_ih, I, 1, I, G * H, avx2);
    }
    RF_FN(use_packed)(&W[0], at, H);
    if (split) RF_FN(use_packed)(&W[1], at + second, H);
    RF_FN(use_packed)(&W[2], at + input, I);
}

/* W = op(w)'s first K rows, w (N, K) read in place with rows ldw apart. */
static void RF_FN(use_in_place)(rf_weight *W, const REAL *w, ptrdiff_t ldw) {
    RF_FN(use_packed)(W, NULL, 0);
    W->in_place = w;
    W->ldw = ldw;
}

/* A forward's weights (weights_at's): taken from prepacked (rf_pack_weights' buffer, or
 * NULL); else for a single step of few rows (p) read in place, as W (G*H, K) lies; else
 * packed into pack_buffer (rf_weights_pack_size elements) from its first cache line. */
void RF_FN(rf_prepare_weights)(rf_weight W[3], const REAL *w_ih, const REAL *w_hh,
                               ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr,
                               REAL *pack_buffer, const REAL *prepacked, const rf_plan *p,
                               int avx2) {
    if (RF_FN(rf_prepare_q8)(W, prepacked, G, H, I, lbr, 0, pack_buffer)) return;
    if (!prepacked && rf_weights_in_place(p)) {
        RF_FN(use_in_place)(&W[0], w_hh, H);
        if (rf_split_n(G, lbr)) RF_FN(use_in_place)(&W[1], w_hh + 2 * H * H, H);
        RF_FN(use_in_place)(&W[2], w_ih, I);
        return;
    }
    if (prepacked)
        RF_FN(weights_at)(W, NULL, NULL, G, H, I, lbr, (REAL *)prepacked + RF_PACK_TAG, 0,
                          avx2);
    else
        RF_FN(weights_at)(W, w_ih, w_hh, G, H, I, lbr, RF_FN(line_start)(pack_buffer), 1,
                          avx2);
}

/* Whether prepacked (or NULL) holds int8 weights packed for these sizes (float32 calls
 * only): then W are they (rf_q8_prepared), their scratch from pack_buffer's first cache
 * line (rf_q8_scratch_room elements). */
int RF_FN(rf_prepare_q8)(rf_weight W[3], const REAL *prepacked, ptrdiff_t G, ptrdiff_t H,
                         ptrdiff_t I, int lbr, ptrdiff_t P, REAL *pack_buffer) {
#if RF_IS_FLOAT
    if (prepacked && rf_q8_prepared(W, prepacked, G, H, I, lbr, P,
                                    RF_FN(line_start)(pack_buffer)))
        return 1;
#endif
    (void)W, (void)prepacked, (void)G, (void)H, (void)I, (void)lbr, (void)P;
    (void)pack_buffer;
    return 0;
}

void RF_FN(rf_pack_weights)(REAL *dst, const REAL *w_ih, const REAL *w_hh, ptrdiff_t G,
                            ptrdiff_t H, ptrdiff_t I, int lbr, int avx2) {
    rf_weight W[3];
    memset(dst, 0, RF_PACK_TAG * sizeof(REAL));
    rf_tag_write(dst, pack_tag, G, H, I, lbr, 0);
    RF_FN(weights_at)(W, w_ih, w_hh, G, H, I, lbr, dst + RF_PACK_TAG, 1, avx2);
}

/* C (M,N) (+)= A (M,K) op(W)[k0 : k0+K, :], on float or (float32) int8 weights. */
static void RF_FN(weight_gemm)(const rf_weight *W, ptrdiff_t k0, ptrdiff_t M, ptrdiff_t N,
                               ptrdiff_t K, const REAL *A, ptrdiff_t lda, int accumulate,
                               REAL *C, ptrdiff_t ldc, int step, const rf_runtime *rt) {
#if RF_IS_FLOAT
    if (W->scales) {
        (void)k0;  /* int8 weights serve forwards only, whose products start at k0 = 0 */
        rf_q8_gemm(M, N, K, A, lda, W, accumulate, C, ldc, rf_q8_path(rt));
        return;
    }
#endif
    if (W->in_place)
        RF_FN(rf_transposed_gemm)(M, N, K, A, lda, (const REAL *)W->in_place + k0, W->ldw,
                                  accumulate, C, ldc, rf_simd(rt));
    else
        RF_FN(rf_packed_gemm)(M, N, K, A, lda, (const REAL *)W->packed + k0 * RF_NR,
                              W->panel_stride, accumulate, C, ldc, step, rf_simd(rt));
}

/* One recurrent product of a step: C (M,N) (+)= A (M,K) op(W)[k0 : k0+K, :]. */
void RF_FN(rf_step_gemm)(const rf_runtime *rt, const rf_weight *W, ptrdiff_t k0,
                         ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,
                         ptrdiff_t lda, int accumulate, REAL *C, ptrdiff_t ldc) {
    RF_FN(weight_gemm)(W, k0, M, N, K, A, lda, accumulate, C, ldc, 1, rt);
}

/* C (M,N) (+)= A (M,K) B (K,N), B row-major: its whole panels read in place, a partial last
 * one packed into pack_buffer (rf_pack_buffer_size(K, RF_NR) elements). Each output is one
 * chain over k, rf_step_gemm's on B packed: for a single step's few rows, where packing
 * all of B would cost more than the product. */
void RF_FN(rf_unpacked_step_gemm)(const rf_runtime *rt, ptrdiff_t M, ptrdiff_t N,
                                  ptrdiff_t K, const REAL *A, ptrdiff_t lda, const REAL *B,
                                  ptrdiff_t ldb, int accumulate, REAL *C, ptrdiff_t ldc,
                                  REAL *pack_buffer) {
    ptrdiff_t whole = N / RF_NR * RF_NR;
    if (whole)
        RF_FN(rf_inplace_gemm)(M, whole, K, A, lda, B, ldb, accumulate, C, ldc, rf_simd(rt));
    if (whole == N) return;
    REAL *at = RF_FN(line_start)(pack_buffer);
    RF_FN(rf_pack)(at, B + whole, ldb, 0, K, N - whole, rt->avx2);
    RF_FN(rf_packed_gemm)(M, N - whole, K, A, lda, at, RF_NR * K, accumulate, C + whole, ldc,
                          1, rf_simd(rt));
}

/* One thread's share of an input projection: contiguous whole tiles of rows. */
typedef struct {
    ptrdiff_t rows, GH, I;
    const REAL *x;
    const rf_weight *W;
    REAL *gates;
    const rf_runtime *rt;
} RF_FN(projection);

static void RF_FN(project_part)(void *arg, int part, int parts) {
    const RF_FN(projection) *q = arg;
    ptrdiff_t tiles = (q->rows + RF_MR - 1) / RF_MR;
    ptrdiff_t r0 = tiles * part / parts * RF_MR, r1 = tiles * (part + 1) / parts * RF_MR;
    if (r1 > q->rows) r1 = q->rows;
    if (r0 < r1)
        RF_FN(weight_gemm)(q->W, 0, r1 - r0, q->GH, q->I, q->x + r0 * q->I, q->I, 0,
                           q->gates + r0 * q->GH, q->GH, 0, q->rt);
}

/* Input projection of steps step0 .. step1-1, hoisted out of the time loop:
 * gates = X_packed @ W_ih^T over all their rows at once. (The cells add the biases in
 * their per-step pass, where the gates are in cache anyway.) Our product rounds each row
 * the same way however many rows a call projects, so that a
 * stream stepping one step at a time gets a forward's numbers exactly, which a BLAS does
 * not promise. The rows are shared among the BLAS's threads (the same numbers for any
 * count) as a time loop's are (rf_step_parts): after_blas for a training forward.
 * xbuf receives the gathered rows (unused when x is dense). */
void RF_FN(rf_project)(REAL *gates, REAL *xbuf, const REAL *x, const rf_weight *W_ih,
                       const rf_plan *p, ptrdiff_t step0, ptrdiff_t step1, ptrdiff_t I,
                       ptrdiff_t GH, int after_blas, const rf_runtime *rt) {
    ptrdiff_t rows = p->offsets[step1] - p->offsets[step0];
    const REAL *xs = x + p->offsets[step0] * I;
    if (!rf_dense(p)) {
        RF_FN(rf_gather)(xbuf, x, p, step0, step1, I);
        xs = xbuf;
    }
    RF_FN(projection) job = {rows, GH, I, xs, W_ih, gates, rt};
    double flops = 2.0 * (double)rows * (double)GH * (double)I;
    rf_run_parts(RF_FN(project_part), &job,
                 parts_worth(rt, flops, (rows + RF_MR - 1) / RF_MR, after_blas));
}

/* The biases as one row in buf (GH): b_ih + b_hh, of b_hh only its first hh_cols entries
 * (the GRU's b_hn stays apart, as r scales it); NULL where there is neither. */
const REAL *RF_FN(rf_fold_biases)(REAL *buf, const REAL *b_ih, const REAL *b_hh,
                                  ptrdiff_t GH, ptrdiff_t hh_cols) {
    if (!b_ih && !b_hh) return NULL;
    for (ptrdiff_t k = 0; k < GH; k++)
        buf[k] = (b_ih ? b_ih[k] : 0) + (b_hh && k < hh_cols ? b_hh[k] : 0);
    return buf;
}

/* The bias gradients: both biases enter the pre-activations alike, so each gets the column
 * sums of the gates' gradients (rows x cols), computed once; db_ih, db_hh: or NULL. */
void RF_FN(rf_bias_grads)(REAL *db_ih, REAL *db_hh, const REAL *dgates, ptrdiff_t rows,
                          ptrdiff_t cols, int avx2) {
    REAL *db = db_ih ? db_ih : db_hh;
    if (db) RF_FN(rf_column_sums)(db, dgates, rows, cols, cols, avx2);
    if (db_ih && db_hh) memcpy(db_hh, db_ih, (size_t)cols * sizeof(REAL));
}

/* The input-side gradients, after the time loop, as single GEMMs over all packed rows:
 * dw_ih = dgates^T @ X_packed, and dx = dgates @ w_ih scattered back to time order (dx:
 * or NULL, not wanted: then w_ih is not read at all).
 * xbuf: the training forward's gathered x; dxbuf (which may be xbuf): room for dx's packed
 * rows before the scatter. Neither is used when x is dense. */
void RF_FN(rf_weight_grads)(REAL *dx, REAL *dw_ih, const REAL *xbuf, REAL *dxbuf,
                            const REAL *dgates, const REAL *x, const REAL *w_ih,
                            const rf_plan *p,
                            ptrdiff_t I, ptrdiff_t GH, const rf_runtime *rt) {
    ptrdiff_t N = p->rows;
    const REAL *xs = rf_dense(p) ? x : xbuf;
    RF_FN(rf_grad_gemm)(rt, 1, GH, I, N, dgates, GH, xs, I, dw_ih, I);
    if (!dx) return;
    if (rf_dense(p)) {
        RF_FN(rf_grad_gemm)(rt, 0, N, I, GH, dgates, GH, w_ih, I, dx, I);
    } else {
        RF_FN(rf_grad_gemm)(rt, 0, N, I, GH, dgates, GH, w_ih, I, dxbuf, I);
        RF_FN(rf_scatter)(dx, dxbuf, p, I);
    }
}


/* The "GEMM floor" of a call, for the benchmarks: only its matrix products, one BLAS call
 * each, for a dense batch (T,B), G gates, forward or (train) forward + backward. buf holds
 * rf_gemm_floor_size elements (their values do not matter). */
void RF_FN(rf_gemm_floor)(const rf_runtime *rt, ptrdiff_t T, ptrdiff_t B, ptrdiff_t I,
                          ptrdiff_t H, ptrdiff_t G, int train, REAL *buf) {
    ptrdiff_t N = T * B, GH = G * H;
    REAL *x = buf, *w_ih = x + N * I, *w_hh = w_ih + GH * I, *gates = w_hh + GH * H;
    REAL *h = gates + N * GH, *dh = h + N * H;
    RF_FN(rf_gemm)(rt, 0, 1, N, GH, I, 1, x, I, w_ih, I, 0, gates, GH);
    for (ptrdiff_t t = 0; t < T; t++)
        RF_FN(rf_gemm)(rt, 0, 1, B, GH, H, 1, h + t * B * H, H, w_hh, H, 1, gates + t * B * GH, GH);
    if (!train) return;
    for (ptrdiff_t t = T - 1; t >= 0; t--)
        RF_FN(rf_gemm)(rt, 0, 0, B, H, GH, 1, gates + t * B * GH, GH, w_hh, H, 0, dh, H);
    RF_FN(rf_gemm)(rt, 1, 0, GH, H, N, 1, gates, GH, h, H, 0, w_hh, H);
    RF_FN(rf_gemm)(rt, 1, 0, GH, I, N, 1, gates, GH, x, I, 0, w_ih, I);
    RF_FN(rf_gemm)(rt, 0, 0, N, I, GH, 1, gates, GH, w_ih, I, 0, x, I);
}

#endif /* RF_TEMPLATE */
