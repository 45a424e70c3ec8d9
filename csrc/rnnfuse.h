/* rnnfuse.h -- the contract between the C kernels and their one caller, _kernels.pyx.
 *
 * Notation: T padded time steps, B batch, I input size, H hidden size, G gates per unit
 * (LSTM 4: i f g o; GRU 3: r z n; RNN 1). Every matrix is row-major and C-contiguous;
 * weights are in PyTorch's layout: w_ih (G*H, I), w_hh (G*H, H), biases (G*H).
 * Sizes and offsets are ptrdiff_t (T*B*G*H may pass 2^31). Pointers are never NULL unless
 * the comment says "or NULL". The C code trusts its arguments: the Python layer validates
 * shapes, dtypes and lengths before the GIL is released.
 *
 * Batches are processed in "step space": the plan orders the batch by decreasing length
 * (stably), so that at step s only the first batch_sizes[s] sorted rows are still running,
 * and stores every per-step quantity "packed" as PyTorch's PackedSequence does: step s
 * occupies rows offsets[s] .. offsets[s+1]-1, row j of the step being sorted row j. Step s
 * of sorted row j reads and writes time t = s (forward) or t = length-1-s (reverse).
 */
#ifndef RNNFUSE_H
#define RNNFUSE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* BLAS reached through pointers that _kernels.pyx fills from scipy.linalg.cython_blas
 * (Fortran calling convention, column-major, 32-bit integers). */
typedef void (*rf_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                            float *alpha, float *a, int *lda, float *b, int *ldb,
                            float *beta, float *c, int *ldc);
typedef void (*rf_dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                            double *alpha, double *a, int *lda, double *b, int *ldb,
                            double *beta, double *c, int *ldc);
typedef int (*rf_threads_fn)(void);
typedef void (*rf_set_threads_fn)(int);

/* What a call runs on, filled by _kernels.pyx and read-only during a call: the BLAS, how
 * many threads it may use, and which code path runs our products, the cells' pointwise
 * passes and the activations alike (rf_choose_kernel's decision). */
typedef struct {
    rf_sgemm_fn sgemm;
    rf_dgemm_fn dgemm;
    rf_threads_fn num_threads;  /* the BLAS's current thread count, or NULL: one thread */
    int avx2;  /* 1: the AVX2+FMA code (only where rf_cpu_avx2()); 0: the portable code */
    int avx512;  /* 1 (with avx2, where rf_cpu_avx512()): the products take AVX-512F
                  * register tiles, whose sums run over k as the AVX2 tiles' do: the same
                  * bits, twice the width */
    int vnni;  /* int8 products (quant.c) with avx2: 1, the VNNI code where it runs */
} rf_runtime;

/* The build has AVX2+FMA code beside the portable code (GCC on x86-64 Linux); it runs
 * where the CPU has both, chosen at run time, never by -march=native. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define RF_HAVE_AVX2 1
#else
#define RF_HAVE_AVX2 0
#endif

/* Whether this CPU can run the AVX2+FMA code of this build. */
static inline int rf_cpu_avx2(void) {
#if RF_HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Whether this CPU can also run the AVX-512F products of this build. */
static inline int rf_cpu_avx512(void) {
#if RF_HAVE_AVX2
    return rf_cpu_avx2() && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* The products' code paths, in rf_packed_gemm's simd; rf_simd: the one rt chooses. */
enum { RF_SIMD_PORTABLE = 0, RF_SIMD_AVX2 = 1, RF_SIMD_AVX512 = 2 };
static inline int rf_simd(const rf_runtime *rt) {
    return !rt->avx2 ? RF_SIMD_PORTABLE : rt->avx512 ? RF_SIMD_AVX512 : RF_SIMD_AVX2;
}

/* The one CPU-feature decision (common.c), as an RF_SIMD_* level: "portable" -> 0;
 * "avx2" -> 1, "avx512" -> 2 where the CPU runs it, else -1 (it cannot run here); NULL or
 * "" -> the best this CPU runs; anything else -> -1. */
int rf_choose_kernel(const char *request);

/* Threads (threads.c). The kernels' own parallel parts use as many threads as the BLAS is
 * allowed now: rf_threads, from the num_threads that rf_find_blas_threads finds in the
 * library holding a BLAS function (NULL where there is none). rf_run_parts runs
 * fn(arg, part, parts) for every part, on threads started and joined here. */
#define RF_MAX_THREADS 64
rf_threads_fn rf_find_blas_threads(const void *blas_function);
rf_set_threads_fn rf_find_blas_set_threads(const void *blas_function);  /* or NULL */
int rf_threads(const rf_runtime *rt);
/* The count of the calling thread's calls from now on: n, or the BLAS's for 0 (a caller
 * such as PyTorch that has a thread setting of its own); returns the previous one. */
int rf_set_thread_cap(int n);
void rf_run_parts(void (*fn)(void *arg, int part, int parts), void *arg, int parts);
/* The calling thread's slot among those that run a call's parts, 0 .. RF_MAX_THREADS-1:
 * 0 for the caller (any thread outside the pool), the pool's workers each their own, so
 * that per-thread scratch in a call's workspace is never shared. */
int rf_thread_slot(void);

/* Memory starting on an `align`-byte boundary (a power of two, at least sizeof(void *)),
 * size rounded up to a multiple of align, or NULL; released by rf_aligned_free (common.c). */
void *rf_aligned_alloc(size_t align, size_t size);
void rf_aligned_free(void *p);

/* The batch ordering of one call; built by rf_plan_build, read-only afterwards. */
typedef struct {
    ptrdiff_t T, B;               /* padded steps and batch of x */
    ptrdiff_t steps;              /* longest length: the number of steps that run */
    ptrdiff_t rows;               /* sum of lengths: rows of every packed buffer */
    int reverse;                  /* 1: each sequence runs t = length-1 .. 0 */
    const int64_t *order;         /* (B,) sorted row j -> batch row order[j] */
    const int64_t *lengths;       /* (B,) lengths, indexed by batch row */
    const int64_t *batch_sizes;   /* (steps,) rows still running at step s */
    const int64_t *offsets;       /* (steps+1,) first packed row of step s */
} rf_plan;

/* Sorts the batch by decreasing length (counting sort, stable) and fills order (B),
 * batch_sizes (T) and offsets (T+1); lengths must lie in [0, T]. Returns the number of
 * steps that run (the longest length); offsets[steps] is the number of packed rows. */
ptrdiff_t rf_plan_build(ptrdiff_t T, ptrdiff_t B, const int64_t *lengths,
                        int64_t *order, int64_t *batch_sizes, int64_t *offsets,
                        int64_t *count /* scratch, (T+1) */);

/* A call's time loop shared among threads (common.c): rows of a batch never meet within a
 * step, so each part owns a range of sorted rows for every step and runs the loop on its
 * own, with no waiting between steps. The ranges are whole register tiles (RF_MR rows),
 * so every row is computed by the same tile as on one thread: the same numbers at any
 * thread count. rf_step_parts: how many parts steps step0 .. step1-1 are worth, at
 * flops_per_row; after_blas: the call follows BLAS products whose threads may still spin
 * (a training forward, after the last backward), so only long loops are shared.
 * rf_part_rows: the sorted rows [*j0, *j1) of one part, balanced by the real steps of its
 * rows. */
int rf_step_parts(const rf_plan *p, ptrdiff_t step0, ptrdiff_t step1, double flops_per_row,
                  int after_blas, const rf_runtime *rt);
void rf_part_rows(const rf_plan *p, int part, int parts, ptrdiff_t *j0, ptrdiff_t *j1);

/* Elements of the buffer rf_gemm_floor_* runs on. */
ptrdiff_t rf_gemm_floor_size(ptrdiff_t T, ptrdiff_t B, ptrdiff_t I, ptrdiff_t H, ptrdiff_t G);

/* The best code path this CPU runs (rf_choose_kernel(NULL)), in words. */
const char *rf_simd_path(void);


/* The cells (cells.c), described once: every layer above reads this table. The ids are
 * the C API's cell codes (rnnfuse.capi: RNNFUSE_LSTM = 1, ...). option, per cell: GRU
 * linear_before_reset (1) or not (0); RNN relu (1) or tanh (0); LSTM none (ignored). */
typedef enum { RF_LSTM = 1, RF_GRU = 2, RF_RNN = 3 } rf_cell_id;
#define RF_NUM_CELLS 3
typedef struct {
    int id;         /* an rf_cell_id */
    char name[8];   /* "lstm", "gru", "rnn" */
    int gates;      /* G: gate blocks of H rows in the weights */
    int states;     /* 2: h and c (LSTM); 1: h */
} rf_cell;
extern const rf_cell rf_cells[RF_NUM_CELLS];
/* The table's entry for a cell id, or NULL. */
const rf_cell *rf_cell_find(int id);

/* Workspace sizes, in elements of the call's dtype. "train" keeps what backward needs.
 * rf_workspace: any cell's (-1 for an unknown id). */
ptrdiff_t rf_workspace(int cell, const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train);
ptrdiff_t rf_lstm_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train);
ptrdiff_t rf_gru_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train);
ptrdiff_t rf_rnn_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train);
/* Backward scratch, beyond the forward's workspace. */
ptrdiff_t rf_backward_scratch(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, ptrdiff_t G);

/* A weight prepared for our products C (+)= A op(W) (packed.c): op(W), W or W^T, packed
 * once per call (or once per stream) into panels one cache line wide, RF_NR columns. */
#define RF_PANEL_BYTES 64
#define RF_MR 6  /* rows of a register tile */
/* rf_packed_gemm computes every output as one chain over k in order, whatever the rows
 * around it (batch invariance: a row rounds alike in a stream, a pool or a forward);
 * step: 1 for a step's few rows (panels the outer loop), 0 for a projection's many (row
 * tiles the outer loop), the same numbers either way. */
#define RF_NR ((ptrdiff_t)(RF_PANEL_BYTES / sizeof(REAL)))  /* in the dtype-generic parts */
/* A backward's products of at most this many rows (a step or a small batch) read their
 * weights in place: packing them would cost more than the few row tiles that read them. */
#define RF_FEW_ROWS 16
/* A forward of a single step with at most this many rows reads W_ih and W_hh in place
 * (rf_transposed_gemm) rather than packing all of them per call; with more rows the
 * packing counts for little. */
#define RF_STEP_IN_PLACE_ROWS RF_FEW_ROWS
/* Whether a forward of p without weights packed ahead reads them in place: then it never
 * writes its workspace's room for packing them. */
static inline int rf_weights_in_place(const rf_plan *p) {
    return p->steps == 1 && p->B <= RF_STEP_IN_PLACE_ROWS;
}
typedef struct {
    const void *packed;      /* op(W) in panels */
    const void *in_place;    /* NULL; or op(W) = W^T read where W (N, K) lies, row-major,
                              * its rows ldw apart (rf_transposed_gemm), packed unused */
    ptrdiff_t ldw;
    ptrdiff_t panel_stride;  /* elements from one panel to the next: RF_NR * rows of op(W) */
    const float *scales;     /* NULL; or int8 op(W) (quant.c), a float scale per column */
    const int32_t *sums;     /* int8 op(W): the sum of each column */
    void *scratch;           /* int8 op(W): rf_q8_scratch_size(K) bytes for its products, on
                              * a cache line, or NULL (rf_q8_gemm's slow way) */
} rf_weight;

/* Pre-packed weights (rf_pack_weights_*, rf_lstmp_pack_*, rf_q8_pack_weights) start with
 * a tag of what they are packed for (common.c): rf_tag_write writes RF_TAG_BYTES at dst,
 * the kind's name (RF_TAG_NAME bytes) and G, H, I, the layout and P, the LSTM's
 * projection size (0: none); rf_tag_matches: whether src holds that tag. rf_split_n: the
 * layout, the GRU without linear_before_reset packing its n block apart. Float weights
 * follow their tag after RF_PACK_TAG elements, a cache line of either dtype or two. */
#define RF_TAG_NAME 24
#define RF_TAG_BYTES 64
#define RF_PACK_TAG 16
void rf_tag_write(void *dst, const char *name, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I,
                  int lbr, ptrdiff_t P);
int rf_tag_matches(const void *src, const char *name, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I,
                   int lbr, ptrdiff_t P);
static inline int rf_split_n(ptrdiff_t G, int lbr) { return G == 3 && !lbr; }

/* int8 weights for float32 inference (quant.c): rf_q8_pack_weights packs a forward's
 * weights (rf_q8_pack_size bytes, on a 64-byte boundary) for the forward's packed: with
 * P > 0 the projected LSTM's (lstmp.h; G = 4, w_hh (4H, P), w_hr (P, H)), else w_hr is
 * NULL. rf_prepare_q8_f32 recognises them (rf_q8_prepared, W[0] W_hh^T, W[1] the GRU's n
 * block apart or W_hr^T, W[2] W_ih^T), giving the weights the workspace's room for
 * packing as their scratch (rf_q8_scratch_room elements; rf_q8_prepared's scratch, or
 * NULL: rf_q8_scratch_total bytes, each weight its own part); the steps' products, the
 * projection's and the input projection then
 * quantize A's rows and multiply in int32 (rf_q8_gemm: C (M,N) (+)= A (M,K) op(W),
 * k0 = 0; path: rf_q8_path's, the same bits on each, or -1 for a slow way without
 * W->scratch, taken too where it is NULL). rf_q8_scratch_size: the bytes of scratch for
 * products over K, a part for each thread that may run them (rf_thread_slot).
 * rf_q8_quantize (path as rf_q8_gemm's, not -1): q = round-half-even(a * (63 / max|a|)),
 * 7 bits (as the weights: 63 / max|w_row|), returns the scale max|a| / 63
 * (0 for a row of zeros or of values so small that 63 / max|a| overflows, NaN for a row
 * with inf or NaN; their q are zeros). */
ptrdiff_t rf_q8_pack_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P);
void rf_q8_pack_weights(void *dst, const float *w_ih, const float *w_hh, const float *w_hr,
                        ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P);
int rf_q8_prepared(rf_weight W[3], const void *prepacked, ptrdiff_t G, ptrdiff_t H,
                   ptrdiff_t I, int lbr, ptrdiff_t P, void *scratch);
ptrdiff_t rf_q8_scratch_size(ptrdiff_t K);
ptrdiff_t rf_q8_scratch_total(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr, ptrdiff_t P);
ptrdiff_t rf_q8_scratch_room(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, ptrdiff_t P);
float rf_q8_quantize(int8_t *q, const float *a, ptrdiff_t K, int path);
int rf_q8_cpu_vnni(void);
void rf_q8_gemm(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A, ptrdiff_t lda,
                const rf_weight *W, int accumulate, float *C, ptrdiff_t ldc, int path);
/* The int8 products' code path for rt: 0 portable, 1 AVX2, 2 AVX2 with AVX-VNNI where the
 * CPU has it, 3 also AVX-512 VNNI (only where rt runs AVX-512 too). */
static inline int rf_q8_path(const rf_runtime *rt) {
    return !rt->avx2 ? 0 : !rt->vnni ? 1 : rt->avx512 ? 3 : 2;
}

/* Elements a packed op(W) of K rows and N columns takes (enough for either dtype). */
ptrdiff_t rf_packed_size(ptrdiff_t K, ptrdiff_t N);
/* Elements a buffer handed to rf_prepare_weight needs for it: rf_packed_size and a cache
 * line's slack, since the packed weight starts on the buffer's first line. */
ptrdiff_t rf_pack_buffer_size(ptrdiff_t K, ptrdiff_t N);
/* A forward's weights packed ahead of time, so that calls with the same weights (a stream
 * of single steps) skip packing: pass them as the forward's packed. rf_pack_weights_*
 * writes, from dst's first element on, a tag of what they are packed for, then W_hh^T (for
 * the GRU without linear_before_reset its n block apart) and W_ih^T: rf_weights_packed_size
 * elements of the call's dtype; the forwards read them from there (the loads do not need
 * alignment; a dst on a cache line keeps them from straddling lines). lbr: the GRU's
 * linear_before_reset (other cells: ignored). rf_weights_packed_for: whether packed holds
 * weights packed for these G, H, I and lbr. rf_weights_pack_size: the elements a
 * workspace keeps for packing a forward's weights itself (from its first cache line). */
ptrdiff_t rf_weights_packed_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I);
int rf_weights_packed_for(const void *packed, ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr);
ptrdiff_t rf_weights_pack_size(ptrdiff_t G, ptrdiff_t H, ptrdiff_t I);
void rf_pack_weights_f32(float *dst, const float *w_ih, const float *w_hh, ptrdiff_t G,
                         ptrdiff_t H, ptrdiff_t I, int lbr, int avx2);
void rf_pack_weights_f64(double *dst, const double *w_ih, const double *w_hh, ptrdiff_t G,
                         ptrdiff_t H, ptrdiff_t I, int lbr, int avx2);

/* Zoneout (zoneout.h): each unit of a state keeps its previous value with weight k,
 * s_t = k s_{t-1} + (1-k) s~_t. h, c: the weights of h and of the LSTM's c, or NULL (that
 * state has none), each (T,B,H) (shared = 0: a mask per step, row and unit, indexed as y)
 * or (H,) (shared = 1: one row for all). carry: backward's scratch of 2*B*H elements where
 * h or c is given. Pointers to the call's dtype. */
typedef struct {
    const void *h, *c;
    int shared;
    void *carry;
} rf_zoneout;

/* Variational recurrent dropout (recdrop.h): h_{t-1} enters the recurrent product as
 * h_{t-1} m, m (B,H) one row per batch row, the same at every step; the state itself is
 * not masked. m: NULL for none. buf: scratch of B*H elements (forward) or (rows+B)*H
 * (backward). Pointers to the call's dtype. */
typedef struct {
    const void *m;
    void *buf;
} rf_recdrop;

/* Layer normalization of the LSTM and the GRU with linear_before_reset (layernorm.c):
 * gates = LN(W_ih x; g_ih) + LN(W_hh h; g_hh) + b_ih + b_hh, LN over a row's G*H units;
 * the LSTM's h = o tanh(LN(c; g_c) + b_c). g_ih NULL: none. Backward writes the gains' and
 * b_c's gradients to dg_*, db_c. Pointers to the call's dtype. */
typedef struct {
    const void *g_ih, *g_hh;  /* (G*H) */
    const void *g_c, *b_c;    /* LSTM: (H) */
    void *dg_ih, *dg_hh, *dg_c, *db_c;
} rf_layernorm;

/* Forward passes. Outputs y (T,B,H), h_n (B,H), c_n (B,H): y must be zero at padded
 * positions on entry (they are not written). h0, c0, b_ih, b_hh: or NULL (zeros / no bias).
 * peep: the LSTM's peepholes (3H) in ONNX's order i o f, or NULL (none); backward then
 * takes the same peep and writes their gradient to dpeep (3H; else not touched).
 * zo: zoneout, or NULL; backward takes the forward's. rd: recurrent dropout, or NULL;
 * backward takes the forward's mask.
 * ws: rf_*_workspace(train) elements; with train=1 it is the "ctx" backward reads.
 * packed: w_ih and w_hh as rf_pack_weights_* packed them for this call's G, H, I and lbr,
 * or NULL (packed into ws here).
 * GRU: lbr = linear_before_reset. RNN: relu = 0 for tanh, 1 for relu. */
#define RF_DECLARE_KERNELS(REAL, SFX)                                                       \
    void rf_lstm_forward_##SFX(REAL *y, REAL *h_n, REAL *c_n, REAL *ws,                     \
                               const REAL *x, const REAL *h0, const REAL *c0,               \
                               const REAL *w_ih, const REAL *w_hh,                          \
                               const REAL *b_ih, const REAL *b_hh, const REAL *peep,        \
                               const REAL *packed, const rf_zoneout *zo,                    \
                               const rf_recdrop *rd,                                        \
                               const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train,       \
                               const rf_runtime *rt);                                       \
    void rf_gru_forward_##SFX(REAL *y, REAL *h_n, REAL *ws,                                 \
                              const REAL *x, const REAL *h0,                                \
                              const REAL *w_ih, const REAL *w_hh,                           \
                              const REAL *b_ih, const REAL *b_hh,                           \
                              const REAL *packed, const rf_zoneout *zo,                     \
                              const rf_recdrop *rd,                                         \
                              const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int lbr,          \
                              int train, const rf_runtime *rt);                             \
    void rf_rnn_forward_##SFX(REAL *y, REAL *h_n, REAL *ws,                                 \
                              const REAL *x, const REAL *h0,                                \
                              const REAL *w_ih, const REAL *w_hh,                           \
                              const REAL *b_ih, const REAL *b_hh,                           \
                              const REAL *packed, const rf_zoneout *zo,                     \
                              const rf_recdrop *rd,                                         \
                              const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int relu,         \
                              int train, const rf_runtime *rt);                             \
    /* Backward passes. Outputs dx (T,B,I, zero on entry), dh0, dc0 (B,H), dw_ih, dw_hh,    \
     * db_ih, db_hh (dx, dh0, dc0, db_*: each or NULL when not wanted). dy, dh_n, dc_n:    \
     * or NULL (zeros).                                                                     \
     * ws: the training forward's workspace, read. out: where backward writes its per-row   \
     * gradients, in ws's layout: ws itself (which it then overwrites: backward runs once  \
     * per ctx), or a buffer of as many elements (ws is then only read).                    \
     * scratch: rf_backward_scratch elements. x, w_*: the forward's.                        \
     * Each db_* receives the bias gradient whether or not that bias existed. */            \
    void rf_lstm_backward_##SFX(REAL *dx, REAL *dh0, REAL *dc0, REAL *dw_ih, REAL *dw_hh,   \
                                REAL *db_ih, REAL *db_hh, REAL *dpeep,                      \
                                const REAL *dy, const REAL *dh_n, const REAL *dc_n,         \
                                const REAL *ws, REAL *out, REAL *scratch, const REAL *x,    \
                                const REAL *w_ih, const REAL *w_hh, const REAL *peep,       \
                                const rf_zoneout *zo, const rf_recdrop *rd,                 \
                                const rf_plan *p, ptrdiff_t I, ptrdiff_t H,                 \
                                const rf_runtime *rt);                                      \
    void rf_gru_backward_##SFX(REAL *dx, REAL *dh0, REAL *dw_ih, REAL *dw_hh,               \
                               REAL *db_ih, REAL *db_hh,                                    \
                               const REAL *dy, const REAL *dh_n,                            \
                               const REAL *ws, REAL *out, REAL *scratch, const REAL *x,     \
                               const REAL *w_ih, const REAL *w_hh, const rf_zoneout *zo,    \
                               const rf_recdrop *rd,                                        \
                               const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int lbr,         \
                               const rf_runtime *rt);                                       \
    void rf_rnn_backward_##SFX(REAL *dx, REAL *dh0, REAL *dw_ih, REAL *dw_hh,               \
                               REAL *db_ih, REAL *db_hh,                                    \
                               const REAL *dy, const REAL *dh_n,                            \
                               const REAL *ws, REAL *out, REAL *scratch, const REAL *x,     \
                               const REAL *w_ih, const REAL *w_hh, const rf_zoneout *zo,    \
                               const rf_recdrop *rd,                                        \
                               const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int relu,        \
                               const rf_runtime *rt);                                       \
    /* Shared pieces (common.c). */                                                         \
    void rf_gemm_##SFX(const rf_runtime *rt, int trans_a, int trans_b,                      \
                       ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, REAL alpha,                   \
                       const REAL *A, ptrdiff_t lda, const REAL *B, ptrdiff_t ldb,          \
                       REAL beta, REAL *C, ptrdiff_t ldc);                                  \
    void rf_grad_gemm_##SFX(const rf_runtime *rt, int trans_a, ptrdiff_t M, ptrdiff_t N,    \
                            ptrdiff_t K, const REAL *A, ptrdiff_t lda, const REAL *B,       \
                            ptrdiff_t ldb, REAL *C, ptrdiff_t ldc);                         \
    void rf_gather_##SFX(REAL *packed, const REAL *seq, const rf_plan *p,                   \
                         ptrdiff_t step0, ptrdiff_t step1, ptrdiff_t F);                    \
    void rf_scatter_##SFX(REAL *seq, const REAL *packed, const rf_plan *p, ptrdiff_t F);    \
    void rf_sort_rows_##SFX(REAL *dst, const REAL *src, const rf_plan *p, ptrdiff_t F);     \
    void rf_unsort_rows_##SFX(REAL *dst, const REAL *src, const rf_plan *p, ptrdiff_t F);   \
    void rf_initial_state_##SFX(REAL *state, REAL *final, const REAL *init,                 \
                                const rf_plan *p, ptrdiff_t H);                             \
    const REAL *rf_fold_biases_##SFX(REAL *buf, const REAL *b_ih, const REAL *b_hh,         \
                                     ptrdiff_t GH, ptrdiff_t hh_cols);                      \
    void rf_bias_grads_##SFX(REAL *db_ih, REAL *db_hh, const REAL *dgates, ptrdiff_t rows,  \
                             ptrdiff_t cols, int avx2);                                     \
    void rf_column_sums_##SFX(REAL *out, const REAL *A, ptrdiff_t rows, ptrdiff_t cols,     \
                              ptrdiff_t lda, int avx2);                                     \
    void rf_project_##SFX(REAL *gates, REAL *xbuf, const REAL *x, const rf_weight *W_ih,    \
                          const rf_plan *p, ptrdiff_t step0, ptrdiff_t step1, ptrdiff_t I,  \
                          ptrdiff_t GH, int after_blas, const rf_runtime *rt);              \
    void rf_prepare_weight_##SFX(rf_weight *W, const REAL *w, ptrdiff_t ldw, int trans,     \
                                 ptrdiff_t K, ptrdiff_t N, REAL *pack_buffer,               \
                                 const REAL *prepacked, int avx2);                          \
    void rf_prepare_weights_##SFX(rf_weight W[3], const REAL *w_ih, const REAL *w_hh,       \
                                  ptrdiff_t G, ptrdiff_t H, ptrdiff_t I, int lbr,           \
                                  REAL *pack_buffer, const REAL *prepacked,                 \
                                  const rf_plan *p, int avx2);                              \
    int rf_prepare_q8_##SFX(rf_weight W[3], const REAL *prepacked, ptrdiff_t G, ptrdiff_t H, \
                            ptrdiff_t I, int lbr, ptrdiff_t P, REAL *pack_buffer);          \
    void rf_step_gemm_##SFX(const rf_runtime *rt, const rf_weight *W, ptrdiff_t k0,         \
                            ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,           \
                            ptrdiff_t lda, int accumulate, REAL *C, ptrdiff_t ldc);         \
    /* Ours (packed.c): B packed as rf_pack_* packs op(B), K rows, N columns; avx2: the     \
     * code path (rf_runtime.avx2); simd: the product's, an RF_SIMD_* (rf_simd). */         \
    void rf_pack_##SFX(REAL *Bp, const REAL *B, ptrdiff_t ldb, int trans, ptrdiff_t K,      \
                       ptrdiff_t N, int avx2);                                              \
    /* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols. */                       \
    void rf_transpose_##SFX(REAL *dst, ptrdiff_t ldd, const REAL *src, ptrdiff_t lds,       \
                            ptrdiff_t rows, ptrdiff_t cols, int avx2);                      \
    void rf_packed_gemm_##SFX(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,         \
                              ptrdiff_t lda, const REAL *Bp, ptrdiff_t panel_stride,        \
                              int accumulate, REAL *C, ptrdiff_t ldc, int step,             \
                              int simd);                                                    \
    /* rf_packed_gemm's product with B (K, N) read in place (row stride ldb), unpacked; N   \
     * a multiple of RF_NR. */                                                              \
    void rf_inplace_gemm_##SFX(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,        \
                               ptrdiff_t lda, const REAL *B, ptrdiff_t ldb, int accumulate, \
                               REAL *C, ptrdiff_t ldc, int simd);                           \
    /* rf_packed_gemm's product with op(B) = W^T, W (N, K) read in place (row stride    \
     * ldw), unpacked: every output rf_packed_gemm's chain, so its bits. */                 \
    void rf_transposed_gemm_##SFX(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const REAL *A,     \
                                  ptrdiff_t lda, const REAL *W, ptrdiff_t ldw,              \
                                  int accumulate, REAL *C, ptrdiff_t ldc, int simd);        \
    void rf_unpacked_step_gemm_##SFX(const rf_runtime *rt, ptrdiff_t M, ptrdiff_t N,        \
                                     ptrdiff_t K, const REAL *A, ptrdiff_t lda,             \
                                     const REAL *B, ptrdiff_t ldb, int accumulate, REAL *C, \
                                     ptrdiff_t ldc, REAL *pack_buffer);                     \
    void rf_gemm_floor_##SFX(const rf_runtime *rt, ptrdiff_t T, ptrdiff_t B, ptrdiff_t I,   \
                             ptrdiff_t H, ptrdiff_t G, int train, REAL *buf);               \
    void rf_weight_grads_##SFX(REAL *dx, REAL *dw_ih, const REAL *xbuf, REAL *dxbuf,        \
                               const REAL *dgates, const REAL *x, const REAL *w_ih,         \
                               const rf_plan *p, ptrdiff_t I, ptrdiff_t GH,                 \
                               const rf_runtime *rt);

RF_DECLARE_KERNELS(float, f32)
RF_DECLARE_KERNELS(double, f64)

/* The one entry point per pass (cells.c): one forward or backward of any cell, its buffers
 * as the cell's rf_*_forward_* / rf_*_backward_* take them (pointers to the call's dtype;
 * those a cell does not have, such as c_n but for the LSTM, are ignored). Each call reads
 * rt once, so one call runs on one code path. Returns 0, or -1 for an unknown cell. */
typedef struct {
    void *y, *h_n, *c_n, *ws;
    const void *x, *h0, *c0, *w_ih, *w_hh, *b_ih, *b_hh, *packed;
    const void *peep;  /* LSTM: or NULL */
    rf_zoneout zoneout;  /* h and c NULL: none */
    rf_recdrop recdrop;  /* m NULL: none */
    rf_layernorm layernorm;  /* g_ih NULL: none */
} rf_forward_bufs;
typedef struct {
    void *dx, *dh0, *dc0, *dw_ih, *dw_hh, *db_ih, *db_hh;
    const void *dy, *dh_n, *dc_n;
    void *ws, *scratch;
    void *out;  /* where the plain cells' backward writes, in ws's layout: ws, or another
                 * buffer of as many elements (ws then read only); layer norm's: ws only */
    const void *x, *w_ih, *w_hh;
    const void *peep;  /* LSTM: the forward's, or NULL */
    void *dpeep;       /* with peep: its gradient (3H) */
    rf_zoneout zoneout;  /* the forward's */
    rf_recdrop recdrop;  /* the forward's mask, backward's buf */
    rf_layernorm layernorm;  /* the forward's gains, and their gradients */
} rf_backward_bufs;
/* The layer-normalized cells' passes and workspace (layernorm.c), which rf_forward and
 * rf_backward call where a->layernorm.g_ih is set; the GRU's with linear_before_reset. */
ptrdiff_t rf_ln_workspace(int cell, const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train);
#define RF_DECLARE_LN(REAL, SFX)                                                            \
    void rf_ln_forward_##SFX(int cell, const rf_forward_bufs *a, const rf_zoneout *zo,      \
                             const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I,           \
                             ptrdiff_t H, int train, const rf_runtime *rt);                 \
    void rf_ln_backward_##SFX(int cell, const rf_backward_bufs *a, const rf_zoneout *zo,    \
                              const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I,          \
                              ptrdiff_t H, const rf_runtime *rt);
RF_DECLARE_LN(float, f32)
RF_DECLARE_LN(double, f64)
int rf_forward_f32(int cell, int option, const rf_forward_bufs *a, const rf_plan *p,
                   ptrdiff_t I, ptrdiff_t H, int train, const rf_runtime *rt);
int rf_forward_f64(int cell, int option, const rf_forward_bufs *a, const rf_plan *p,
                   ptrdiff_t I, ptrdiff_t H, int train, const rf_runtime *rt);
int rf_backward_f32(int cell, int option, const rf_backward_bufs *a, const rf_plan *p,
                    ptrdiff_t I, ptrdiff_t H, const rf_runtime *rt);
int rf_backward_f64(int cell, int option, const rf_backward_bufs *a, const rf_plan *p,
                    ptrdiff_t I, ptrdiff_t H, const rf_runtime *rt);

/* ---- Pieces for the kernel bodies, which each cell file instantiates twice. ---- */

#define RF_CAT_(a, b) a##_##b
#define RF_CAT(a, b) RF_CAT_(a, b)
#define RF_FN(name) RF_CAT(name, RF_SUFFIX)   /* rf_gemm -> rf_gemm_f32 / rf_gemm_f64 */

/* A pointwise pass compiled once per code path (passes.h): the copy that simd (an
 * RF_SIMD_*, rf_simd of the call's rf_runtime) picks, name_f32_avx512 (AVX-512F),
 * name_f32_v3 (AVX2, FMA) or name_f32_base. */
#if RF_HAVE_AVX2
#define RF_PICK(name, simd)                                                    \
    ((simd) == RF_SIMD_AVX512 ? RF_CAT(RF_FN(name), avx512)                   \
     : (simd) ? RF_CAT(RF_FN(name), v3) : RF_CAT(RF_FN(name), base))
#else
#define RF_PICK(name, simd) RF_CAT(RF_FN(name), base)
#endif

/* Activations over an array, in place (vmath.c): libm, or for float32 on a vector path
 * (simd, an RF_SIMD_*) a vectorized version with a documented and tested error bound
 * (vmath.h). */
void rf_sigmoid_f32(float *a, ptrdiff_t n, int simd);
void rf_tanh_f32(float *a, ptrdiff_t n, int simd);
void rf_sigmoid_f64(double *a, ptrdiff_t n, int simd);
void rf_tanh_f64(double *a, ptrdiff_t n, int simd);

/* Time index of step s of sorted row j. */
static inline ptrdiff_t rf_time(const rf_plan *p, ptrdiff_t j, ptrdiff_t s) {
    return p->reverse ? (ptrdiff_t)p->lengths[p->order[j]] - 1 - s : s;
}

/* Whether packed rows are x's rows in order (every length T, forward): then x is used in
 * place, without gathering. */
static inline int rf_dense(const rf_plan *p) {
    return !p->reverse && p->rows == p->T * p->B;
}

/* Packed rows the inference forward projects at once: bounds its workspace independently
 * of T (the training forward keeps every step, for backward). */
#define RF_CHUNK_ROWS 1024

static inline ptrdiff_t rf_chunk_rows(const rf_plan *p) {
    ptrdiff_t cap = p->B > RF_CHUNK_ROWS ? p->B : RF_CHUNK_ROWS;
    return p->rows < cap ? p->rows : cap;
}

/* The end of the chunk of steps that starts at step0: with train, every step; otherwise as
 * many steps as fit in rf_chunk_rows (at least one). */
static inline ptrdiff_t rf_chunk_end(const rf_plan *p, ptrdiff_t step0, int train) {
    if (train) return p->steps;
    ptrdiff_t cap = rf_chunk_rows(p), step1 = step0 + 1;
    while (step1 < p->steps && p->offsets[step1 + 1] - p->offsets[step0] <= cap) step1++;
    return step1;
}

#endif /* RNNFUSE_H */
