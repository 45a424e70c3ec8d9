/* rnn.c -- Elman RNN forward and backward through time.
 *
 *   h' = act(W_ih x + b_ih + W_hh h + b_hh),  act = tanh or relu
 *
 * Same loop shape as lstm.c, with one gate: the saved activation h' is all backward needs
 * (tanh' = 1 - h'^2, relu' = [h' > 0]).
 * The part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#include <string.h>

#include "rnnfuse.h"
#include "vmath.h"

/* Workspace layout, in elements from the start of ws.
 * train=1, packed rows (N = p->rows):
 *   bias (H) | gates (N,H): h' | h (N,H): h_{t-1} | xbuf (N,I): gathered x, when not dense |
 *   weights: W_hh^T and W_ih^T packed (rf_prepare_weights)
 * train=0: bias (H) | gates (R,H) | h (2,B,H) | xbuf (R,I) | weights */
typedef struct { ptrdiff_t bias, gates, h, xbuf, weights, total; } rnn_layout;

static rnn_layout rnn_layout_of(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    rnn_layout L;
    ptrdiff_t rows = train ? p->rows : rf_chunk_rows(p);
    L.bias = 0;
    L.gates = L.bias + H;
    L.h = L.gates + rows * H;
    L.xbuf = L.h + (train ? p->rows * H : 2 * p->B * H);
    L.weights = L.xbuf + (rf_dense(p) ? 0 : rows * I);
    L.total = L.weights + rf_weights_pack_size(1, H, I);
    return L;
}

ptrdiff_t rf_rnn_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    return rnn_layout_of(p, I, H, train).total;
}

#define RF_TEMPLATE_FILE "rnn.c"
#include "instantiate.h"

#elif defined(RF_VW) /* the one-pass float code, once per vector width (widths.h) */

/* rnn_step's work (tanh) on RF_VW (nv - 1) + n_last units of one row, from unit k. */
V_TARGET static RF_INLINE void V_FN(rnn_units)(float *g, float *h_out, float *y,
                                               const float *bias, ptrdiff_t k, int nv,
                                               int n_last) {
    V_T a[RF_UNITS_MAX], b[RF_UNITS_MAX];
    V_FN(rf_load)(a, g + k, nv, n_last);
    if (bias) {
        V_FN(rf_load)(b, bias + k, nv, n_last);
        for (int u = 0; u < nv; u++) a[u] = V_ADD(a[u], b[u]);
    }
    V_FN(rf_tanh)(a, nv);
    V_FN(rf_store)(g + k, a, nv, n_last);
    V_FN(rf_store)(h_out + k, a, nv, n_last);
    V_FN(rf_store)(y + k, a, nv, n_last);
}

/* rnn_step for one row on a vector path (float, tanh): one pass, where the portable code
 * makes four; the same bits. */
V_TARGET static void V_FN(rnn_row)(float *g, float *h_out, float *y, const float *bias,
                                   ptrdiff_t H) {
#define UNITS(k, nv, n_last) V_FN(rnn_units)(g, h_out, y, bias, k, nv, n_last)
    RF_OVER_UNITS(H, UNITS);
#undef UNITS
}

#elif defined(RF_PASS) /* the pointwise passes, once per code path (passes.h) */

/* One step's pointwise pass over its running rows j0 .. j1-1: g holds their
 * pre-activations (less the bias, or NULL) and leaves holding h'. Rows j < next_bs go on
 * (hn), the others have finished (h_n). On the vector paths float tanh takes one pass
 * per row. */
RF_PASS_TARGET static void RF_PASS(rnn_step)(REAL *g, REAL *hn, REAL *y, REAL *h_n,
                                             const REAL *bias, const rf_plan *p, ptrdiff_t s,
                                             ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t next_bs,
                                             ptrdiff_t H, int relu) {
#if RF_HAVE_AVX2 && RF_IS_FLOAT && RF_PASS_AVX2
    if (!relu) {
        for (ptrdiff_t j = j0; j < j1; j++) {
            ptrdiff_t b = p->order[j];
            RF_VFN(rnn_row, RF_PASS_VW)(g + j * H, j < next_bs ? hn + j * H : h_n + b * H,
                                        y + (rf_time(p, j, s) * p->B + b) * H, bias, H);
        }
        return;
    }
#endif
    REAL *rows = g + j0 * H;
    ptrdiff_t n = (j1 - j0) * H;
    if (bias)
        for (ptrdiff_t j = 0; j < j1 - j0; j++)
            for (ptrdiff_t k = 0; k < H; k++) rows[j * H + k] += bias[k];
    if (relu) {  /* max(a, 0) that keeps NaN: (NaN < 0) is false */
        for (ptrdiff_t k = 0; k < n; k++) rows[k] = rows[k] < 0 ? 0 : rows[k];
    } else {
        TANH(rows, n);
    }
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        const REAL *h = g + j * H;
        REAL *y_row = y + (rf_time(p, j, s) * p->B + b) * H;
        REAL *h_out = j < next_bs ? hn + j * H : h_n + b * H;
        memcpy(h_out, h, (size_t)H * sizeof(REAL));
        memcpy(y_row, h, (size_t)H * sizeof(REAL));
    }
}

/* One step's backward pointwise pass over rows j0 .. j1-1: g holds h', dg (which may be g)
 * receives the pre-activation gradient; dh is the gradient carried into h_t. */
RF_PASS_TARGET static void RF_PASS(rnn_step_backward)(REAL *dg, const REAL *g,
                                                      const REAL *dh, const REAL *dy,
                                                      const rf_plan *p, ptrdiff_t s,
                                                      ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H,
                                                      int relu) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *a = g + j * H;
        REAL *da = dg + j * H;
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL d_h = dh[j * H + k] + (dy_row ? dy_row[k] : 0);
            REAL h = a[k];
            da[k] = relu ? (h > 0 ? d_h : 0) : d_h * (1 - h * h);
        }
    }
}

#else /* RF_TEMPLATE: dtype-generic part */

#define RF_WIDTHS_FILE "rnn.c"
#include "widths.h"

#define RF_PASSES_FILE "rnn.c"
#include "passes.h"
#include "zoneout.h"
#include "recdrop.h"

/* The time loop of a forward, steps step0 .. step1-1, for one part's rows. */
typedef struct {
    REAL *y, *h_n, *ws;
    const REAL *bias;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    rnn_layout L;
    ptrdiff_t H, step0, step1;
    int train, relu;
    const rf_runtime *rt;
} RF_FN(rnn_steps_job);

static void RF_FN(rnn_steps)(void *arg, int part, int parts) {
    const RF_FN(rnn_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, BH = p->B * H, j0, j1;
    REAL *ws = q->ws;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = q->step0; s < q->step1 && p->batch_sizes[s] > j0; s++) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        ptrdiff_t next_bs = s + 1 < p->steps ? p->batch_sizes[s + 1] : 0;
        const REAL *hp = ws + q->L.h + (q->train ? p->offsets[s] * H : (s & 1) * BH);
        REAL *hn = ws + q->L.h + (q->train ? p->offsets[s + 1] * H : ((s + 1) & 1) * BH);
        REAL *g = ws + q->L.gates
                  + (p->offsets[s] - (q->train ? 0 : p->offsets[q->step0])) * H;
        /* g += h_{t-1} W_hh^T (h_{t-1} masked with recurrent dropout) */
        const REAL *operand = RF_FN(recdrop_operand)(q->rd, hp, p, j0, end, H);
        RF_FN(rf_step_gemm)(q->rt, q->W_hh, 0, end - j0, H, H, operand + j0 * H, H, 1,
                            g + j0 * H, H);
        RF_PICK(rnn_step, rf_simd(q->rt))(g, hn, q->y, q->h_n, q->bias, p, s, j0, end, next_bs,
                                       H, q->relu);
        if (q->zo && q->zo->h)
            RF_FN(zoneout_forward)(q->zo, q->zo->h, hp, hn, q->h_n, q->y, p, s, j0, end,
                                   next_bs, H);
    }
}

void RF_FN(rf_rnn_forward)(REAL *y, REAL *h_n, REAL *ws,
                           const REAL *x, const REAL *h0,
                           const REAL *w_ih, const REAL *w_hh,
                           const REAL *b_ih, const REAL *b_hh, const REAL *packed,
                           const rf_zoneout *zo, const rf_recdrop *rd, const rf_plan *p,
                           ptrdiff_t I, ptrdiff_t H, int relu, int train,
                           const rf_runtime *rt) {
    rnn_layout L = rnn_layout_of(p, I, H, train);
    const REAL *bias = RF_FN(rf_fold_biases)(ws + L.bias, b_ih, b_hh, H, H);
    RF_FN(rf_initial_state)(ws + L.h, h_n, h0, p, H);
    rf_weight W[3];
    RF_FN(rf_prepare_weights)(W, w_ih, w_hh, 1, H, I, 0, ws + L.weights, packed, p,
                              rt->avx2);
    RF_FN(rnn_steps_job) job = {y, h_n, ws, bias, zo, rd, &W[0], p, L, H, 0, 0, train, relu,
                                rt};
    for (ptrdiff_t step0 = 0; step0 < p->steps;) {
        ptrdiff_t step1 = rf_chunk_end(p, step0, train);
        RF_FN(rf_project)(ws + L.gates, ws + L.xbuf, x, &W[2], p, step0, step1, I, H,
                          train, rt);
        job.step0 = step0;
        job.step1 = step1;
        rf_run_parts(RF_FN(rnn_steps), &job,
                     rf_step_parts(p, step0, step1, 2.0 * H * H, train, rt));
        step0 = step1;
    }
}

/* The time loop of a backward, for one part's rows. */
typedef struct {
    const REAL *gates;  /* the saved h' */
    REAL *dgates, *dh;
    const REAL *dy;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    ptrdiff_t H;
    int relu;
    const rf_runtime *rt;
} RF_FN(rnn_back_steps_job);

static void RF_FN(rnn_back_steps)(void *arg, int part, int parts) {
    const RF_FN(rnn_back_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, j0, j1;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = p->steps - 1; s >= 0; s--) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        if (end <= j0) continue;
        REAL *dg = q->dgates + p->offsets[s] * H;
        const rf_zoneout *zo = q->zo && q->zo->h ? q->zo : NULL;
        if (zo) RF_FN(zoneout_backward)(zo, zo->h, q->dh, zo->carry, q->dy, p, s, j0, end, H);
        RF_PICK(rnn_step_backward, rf_simd(q->rt))(dg, q->gates + p->offsets[s] * H, q->dh,
                                                zo ? NULL : q->dy, p, s, j0, end, H, q->relu);
        if (zo) RF_FN(zoneout_carry)(q->dh, zo->carry, j0, end, H, 0);
        /* dh_{t-1} = dpre W_hh (times the recurrent dropout's mask; + zoneout's carry) */
        if (q->W_hh)  /* (else the caller's, unpacked) */
            RF_FN(recdrop_back_gemm)(q->rt, q->W_hh, 0, H, dg + j0 * H, H, zo != NULL, q->dh,
                                     q->rd, p, j0, end, H);
    }
}

void RF_FN(rf_rnn_backward)(REAL *dx, REAL *dh0, REAL *dw_ih, REAL *dw_hh,
                            REAL *db_ih, REAL *db_hh,
                            const REAL *dy, const REAL *dh_n,
                            const REAL *ws, REAL *out, REAL *scratch, const REAL *x,
                            const REAL *w_ih, const REAL *w_hh, const rf_zoneout *zo,
                            const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                            int relu, const rf_runtime *rt) {
    rnn_layout L = rnn_layout_of(p, I, H, 1);
    REAL *dh = scratch;
    rf_weight W;
    /* dh carried through W_hh: after a single step it only makes dh0 */
    int carried = dh0 || p->steps > 1;
    /* a single step's few rows: dh0 = dpre W_hh after the step, W_hh read in place */
    int unpacked = p->steps == 1 && p->B <= RF_FEW_ROWS && !zo && !rd;
    if (carried && !unpacked)
        RF_FN(rf_prepare_weight)(&W, w_hh, H, 0, H, H, scratch + 2 * p->B * H, NULL, rt->avx2);
    RF_FN(rf_sort_rows)(dh, dh_n, p, H);
    RF_FN(rnn_back_steps_job) job = {ws + L.gates, out + L.gates, dh, dy, zo, rd,
                                     carried && !unpacked ? &W : NULL, p, H, relu, rt};
    rf_run_parts(RF_FN(rnn_back_steps), &job,
                 rf_step_parts(p, 0, p->steps, 2.0 * H * H, 0, rt));
    if (carried && unpacked)
        RF_FN(rf_unpacked_step_gemm)(rt, p->batch_sizes[0], H, H, out + L.gates, H, w_hh, H,
                                     0, dh, H, scratch + 2 * p->B * H);
    RF_FN(rf_unsort_rows)(dh0, dh, p, H);
    const REAL *dgates = out + L.gates;
    /* dW_hh = sum_t dpre_t^T h_{t-1} (masked with recurrent dropout) */
    const REAL *h_prev = RF_FN(recdrop_all_operands)(rd, ws + L.h, p, H);
    RF_FN(rf_grad_gemm)(rt, 1, H, H, p->rows, dgates, H, h_prev, H, dw_hh, H);
    RF_FN(rf_weight_grads)(dx, dw_ih, ws + L.xbuf, out + L.xbuf, dgates, x, w_ih, p, I, H,
                           rt);
    RF_FN(rf_bias_grads)(db_ih, db_hh, dgates, p->rows, H, rt->avx2);
}

#endif /* RF_TEMPLATE */
