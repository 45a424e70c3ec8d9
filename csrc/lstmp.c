/* lstmp.c -- the LSTM with a projection (lstmp.h), forward and backward through time.
 *
 * Forward, per step: gates += h_{t-1} W_hh^T (our packed product, K = P); lstm.c's fused
 * pass turns them into c_t and m_t = o_t tanh(c_t), which it writes to the saved m rows
 * instead of y; then one packed product h_t = m_t W_hr^T gives the next state and y[t].
 * Backward, per step (reversed): dh_t (carried, plus dy) is saved, dm_t = dh_t W_hr, lstm.c's
 * backward pass takes dm_t where the plain cell takes dh, and dh_{t-1} = dgates W_hh.
 * dW_hr = sum_t dh_t^T m_t, dW_hh, dW_ih, dx and the biases are single products / column
 * sums over all steps after the loop, as in lstm.c. The part below RF_TEMPLATE is compiled
 * twice, for float and for double. */
#ifndef RF_TEMPLATE
#include <string.h>

#include "lstmp.h"

/* Workspace layout, in elements from the start of ws.
 * train=1 keeps every step for backward, in packed rows (N = p->rows):
 *   bias (4H) | gates (N,4H) | h (N,P): h_{t-1} | c (N,H): c_{t-1} | tanh_c (N,H) |
 *   m (N,H): m_t | hout (B,P): h_t of rows ending at their step | xbuf (N,I) | weights
 * train=0 keeps one chunk of steps and two states (current, next):
 *   bias (4H) | gates (R,4H) | h (2,B,P) | c (2,B,H) | m (B,H) | hout (B,P) | xbuf (R,I) |
 *   weights
 * weights: W_hh^T (P rows, 4H columns), W_ih^T (I, 4H), W_hr^T (H, P), packed. */
typedef struct {
    ptrdiff_t bias, gates, h, c, tanh_c, m, hout, xbuf, w_hh, w_ih, w_hr, total;
} lstmp_layout;

static lstmp_layout lstmp_layout_of(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, ptrdiff_t P,
                                    int train) {
    lstmp_layout L;
    ptrdiff_t rows = train ? p->rows : rf_chunk_rows(p);
    ptrdiff_t states = train ? p->rows : 2 * p->B;
    L.bias = 0;
    L.gates = L.bias + 4 * H;
    L.h = L.gates + rows * 4 * H;
    L.c = L.h + states * P;
    L.tanh_c = L.c + states * H;
    L.m = L.tanh_c + (train ? p->rows * H : 0);
    L.hout = L.m + (train ? p->rows : p->B) * H;
    L.xbuf = L.hout + p->B * P;
    L.w_hh = L.xbuf + (rf_dense(p) ? 0 : rows * I);
    L.w_ih = L.w_hh + rf_pack_buffer_size(P, 4 * H);
    L.w_hr = L.w_ih + rf_pack_buffer_size(I, 4 * H);
    L.total = L.w_hr + rf_pack_buffer_size(H, P);
    /* int8 weights take the room for packing as their products' scratch */
    ptrdiff_t q8 = L.w_hh + rf_q8_scratch_room(4, H, I, P);
    L.total = L.total > q8 ? L.total : q8;
    return L;
}

ptrdiff_t rf_lstmp_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, ptrdiff_t P,
                             int train) {
    return lstmp_layout_of(p, I, H, P, train).total;
}

/* Packed weights as the workspace holds them: W_hh^T | W_ih^T | W_hr^T; rf_lstmp_pack's
 * start with their tag (RF_PACK_TAG elements), so that int8 weights (rf_prepare_q8) are
 * never taken for them. */
static ptrdiff_t lstmp_pack_at_ih(ptrdiff_t H, ptrdiff_t P) {
    return rf_pack_buffer_size(P, 4 * H);
}
static ptrdiff_t lstmp_pack_at_hr(ptrdiff_t I, ptrdiff_t H, ptrdiff_t P) {
    return lstmp_pack_at_ih(H, P) + rf_pack_buffer_size(I, 4 * H);
}
static const char lstmp_tag[RF_TAG_NAME] = "rnnfuse lstmp weights 1";

ptrdiff_t rf_lstmp_pack_size(ptrdiff_t I, ptrdiff_t H, ptrdiff_t P) {
    return RF_PACK_TAG + lstmp_pack_at_hr(I, H, P) + rf_pack_buffer_size(H, P);
}

/* Backward scratch: dh (B,P) | dc (B,H) | dm (B,H) | dhs (N,P): dh_t of every packed row |
 * W_hh (4H rows, P columns) and W_hr (P rows, H columns), packed. */
typedef struct { ptrdiff_t dh, dc, dm, dhs, w_hh, w_hr, total; } lstmp_scratch;

static lstmp_scratch lstmp_scratch_of(const rf_plan *p, ptrdiff_t H, ptrdiff_t P) {
    lstmp_scratch S;
    S.dh = 0;
    S.dc = S.dh + p->B * P;
    S.dm = S.dc + p->B * H;
    S.dhs = S.dm + p->B * H;
    S.w_hh = S.dhs + p->rows * P;
    S.w_hr = S.w_hh + rf_pack_buffer_size(4 * H, P);
    S.total = S.w_hr + rf_pack_buffer_size(P, H);
    return S;
}

ptrdiff_t rf_lstmp_backward_scratch(const rf_plan *p, ptrdiff_t H, ptrdiff_t P) {
    return lstmp_scratch_of(p, H, P).total;
}

#define RF_TEMPLATE_FILE "lstmp.c"
#include "instantiate.h"

#else /* RF_TEMPLATE: dtype-generic part */

/* The time loop of a forward, steps step0 .. step1-1, for one part's rows. */
typedef struct {
    REAL *y, *h_n, *c_n, *ws;
    const REAL *bias, *peep;
    const rf_weight *W_hh, *W_hr;
    const rf_plan *p;
    lstmp_layout L;
    ptrdiff_t H, P, step0, step1;
    int train;
    const rf_runtime *rt;
} RF_FN(lstmp_steps_job);

/* y[t] and, for rows that end at step s, h_n from the new states h (rows j of hs, those
 * from next_bs on in hout). */
static void RF_FN(lstmp_write_out)(REAL *y, REAL *h_n, const REAL *hs, const REAL *hout,
                                   const rf_plan *p, ptrdiff_t s, ptrdiff_t j0, ptrdiff_t j1,
                                   ptrdiff_t next_bs, ptrdiff_t P) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        const REAL *h = j < next_bs ? hs + j * P : hout + j * P;
        memcpy(y + (rf_time(p, j, s) * p->B + b) * P, h, (size_t)P * sizeof(REAL));
        if (j >= next_bs) memcpy(h_n + b * P, h, (size_t)P * sizeof(REAL));
    }
}

static void RF_FN(lstmp_steps)(void *arg, int part, int parts) {
    const RF_FN(lstmp_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, P = q->P, GH = 4 * H, B = p->B, j0, j1;
    lstmp_layout L = q->L;
    REAL *ws = q->ws;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = q->step0; s < q->step1 && p->batch_sizes[s] > j0; s++) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        ptrdiff_t next_bs = s + 1 < p->steps ? p->batch_sizes[s + 1] : 0;
        ptrdiff_t now = q->train ? p->offsets[s] : (s & 1) * B;
        ptrdiff_t next = q->train ? p->offsets[s + 1] : ((s + 1) & 1) * B;
        REAL *g = ws + L.gates + (p->offsets[s] - (q->train ? 0 : p->offsets[q->step0])) * GH;
        REAL *m = ws + L.m + (q->train ? p->offsets[s] * H : 0);
        REAL *h_next = ws + L.h + next * P, *hout = ws + L.hout;
        /* gates += h_{t-1} W_hh^T */
        RF_FN(rf_step_gemm)(q->rt, q->W_hh, 0, end - j0, GH, P, ws + L.h + now * P + j0 * P,
                            P, 1, g + j0 * GH, GH);
        RF_FN(rf_lstm_pointwise)(g, q->train ? ws + L.tanh_c + now * H : NULL,
                                 ws + L.c + now * H, m, ws + L.c + next * H, NULL, NULL,
                                 q->c_n, q->bias, q->peep, p, s, j0, end, next_bs, H, q->rt);
        /* h_t = m_t W_hr^T: into the next step's rows, or hout for rows that end here */
        ptrdiff_t split = next_bs < j0 ? j0 : next_bs < end ? next_bs : end;
        RF_FN(rf_step_gemm)(q->rt, q->W_hr, 0, split - j0, P, H, m + j0 * H, H, 0,
                            h_next + j0 * P, P);
        RF_FN(rf_step_gemm)(q->rt, q->W_hr, 0, end - split, P, H, m + split * H, H, 0,
                            hout + split * P, P);
        RF_FN(lstmp_write_out)(q->y, q->h_n, h_next, hout, p, s, j0, end, next_bs, P);
    }
}

void RF_FN(rf_lstmp_forward)(REAL *y, REAL *h_n, REAL *c_n, REAL *ws,
                             const REAL *x, const REAL *h0, const REAL *c0,
                             const REAL *w_ih, const REAL *w_hh, const REAL *w_hr,
                             const REAL *b_ih, const REAL *b_hh, const REAL *peep,
                             const REAL *packed, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                             ptrdiff_t P, int train, const rf_runtime *rt) {
    lstmp_layout L = lstmp_layout_of(p, I, H, P, train);
    ptrdiff_t GH = 4 * H;
    const REAL *bias = RF_FN(rf_fold_biases)(ws + L.bias, b_ih, b_hh, GH, GH);
    RF_FN(rf_initial_state)(ws + L.h, h_n, h0, p, P);
    RF_FN(rf_initial_state)(ws + L.c, c_n, c0, p, H);
    rf_weight W[3];  /* W_hh^T, W_hr^T, W_ih^T, as int8 weights order them */
    if (!RF_FN(rf_prepare_q8)(W, packed, 4, H, I, 0, P, ws + L.w_hh)) {
        const REAL *pre = packed ? packed + RF_PACK_TAG : NULL;
        RF_FN(rf_prepare_weight)(&W[0], w_hh, P, 1, P, GH, ws + L.w_hh, pre, rt->avx2);
        RF_FN(rf_prepare_weight)(&W[2], w_ih, I, 1, I, GH, ws + L.w_ih,
                                 pre ? pre + lstmp_pack_at_ih(H, P) : NULL, rt->avx2);
        RF_FN(rf_prepare_weight)(&W[1], w_hr, H, 1, H, P, ws + L.w_hr,
                                 pre ? pre + lstmp_pack_at_hr(I, H, P) : NULL, rt->avx2);
    }
    RF_FN(lstmp_steps_job) job = {y, h_n, c_n, ws, bias, peep, &W[0], &W[1], p, L, H, P, 0,
                                  0, train, rt};
    for (ptrdiff_t step0 = 0; step0 < p->steps;) {
        ptrdiff_t step1 = rf_chunk_end(p, step0, train);
        RF_FN(rf_project)(ws + L.gates, ws + L.xbuf, x, &W[2], p, step0, step1, I, GH,
                          train, rt);
        job.step0 = step0;
        job.step1 = step1;
        rf_run_parts(RF_FN(lstmp_steps), &job,
                     rf_step_parts(p, step0, step1, 2.0 * (GH + H) * P, train, rt));
        step0 = step1;
    }
}

void RF_FN(rf_lstmp_pack)(REAL *packed, const REAL *w_ih, const REAL *w_hh, const REAL *w_hr,
                          ptrdiff_t I, ptrdiff_t H, ptrdiff_t P, int avx2) {
    rf_weight W;
    memset(packed, 0, RF_PACK_TAG * sizeof(REAL));
    rf_tag_write(packed, lstmp_tag, 4, H, I, 0, P);
    packed += RF_PACK_TAG;
    RF_FN(rf_prepare_weight)(&W, w_hh, P, 1, P, 4 * H, packed, NULL, avx2);
    RF_FN(rf_prepare_weight)(&W, w_ih, I, 1, I, 4 * H, packed + lstmp_pack_at_ih(H, P), NULL,
                             avx2);
    RF_FN(rf_prepare_weight)(&W, w_hr, H, 1, H, P, packed + lstmp_pack_at_hr(I, H, P), NULL,
                             avx2);
}

/* The time loop of a backward, for one part's rows. */
typedef struct {
    REAL *ws, *sc;
    const REAL *dy, *peep;
    const rf_weight *W_hh, *W_hr;
    const rf_plan *p;
    lstmp_layout L;
    lstmp_scratch S;
    ptrdiff_t H, P;
    const rf_runtime *rt;
} RF_FN(lstmp_back_steps_job);

/* dhs rows j0 .. j1-1 of step s: the carried dh plus dy[t] (the gradient of h_t). */
static void RF_FN(lstmp_dh_total)(REAL *dhs, const REAL *dh, const REAL *dy,
                                  const rf_plan *p, ptrdiff_t s, ptrdiff_t j0, ptrdiff_t j1,
                                  ptrdiff_t P) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *carried = dh + j * P;
        REAL *out = dhs + j * P;
        if (!dy) {
            memcpy(out, carried, (size_t)P * sizeof(REAL));
            continue;
        }
        const REAL *dy_row = dy + (rf_time(p, j, s) * p->B + p->order[j]) * P;
        for (ptrdiff_t k = 0; k < P; k++) out[k] = carried[k] + dy_row[k];
    }
}

static void RF_FN(lstmp_back_steps)(void *arg, int part, int parts) {
    const RF_FN(lstmp_back_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, P = q->P, GH = 4 * H, j0, j1;
    REAL *dh = q->sc + q->S.dh, *dc = q->sc + q->S.dc, *dm = q->sc + q->S.dm;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = p->steps - 1; s >= 0; s--) {
        ptrdiff_t bs = p->batch_sizes[s], at = p->offsets[s], end = bs < j1 ? bs : j1;
        if (end <= j0) continue;
        REAL *g = q->ws + q->L.gates + at * GH, *dhs = q->sc + q->S.dhs + at * P;
        RF_FN(lstmp_dh_total)(dhs, dh, q->dy, p, s, j0, end, P);
        /* dm_t = dh_t W_hr */
        RF_FN(rf_step_gemm)(q->rt, q->W_hr, 0, end - j0, H, P, dhs + j0 * P, P, 0,
                            dm + j0 * H, H);
        RF_FN(rf_lstm_pointwise_backward)(g, dm, dc, q->ws + q->L.tanh_c + at * H,
                                          q->ws + q->L.c + at * H, q->peep, NULL, p, s, j0,
                                          end, H, q->rt);
        /* dh_{t-1} = dgates W_hh */
        RF_FN(rf_step_gemm)(q->rt, q->W_hh, 0, end - j0, P, GH, g + j0 * GH, GH, 0,
                            dh + j0 * P, P);
    }
}

void RF_FN(rf_lstmp_backward)(REAL *dx, REAL *dh0, REAL *dc0, REAL *dw_ih, REAL *dw_hh,
                              REAL *dw_hr, REAL *db_ih, REAL *db_hh, REAL *dpeep,
                              const REAL *dy, const REAL *dh_n, const REAL *dc_n,
                              REAL *ws, REAL *scratch, const REAL *x,
                              const REAL *w_ih, const REAL *w_hh, const REAL *w_hr,
                              const REAL *peep, const rf_plan *p, ptrdiff_t I,
                              ptrdiff_t H, ptrdiff_t P, const rf_runtime *rt) {
    lstmp_layout L = lstmp_layout_of(p, I, H, P, 1);
    lstmp_scratch S = lstmp_scratch_of(p, H, P);
    ptrdiff_t GH = 4 * H;
    rf_weight W_hh, W_hr;
    RF_FN(rf_prepare_weight)(&W_hh, w_hh, P, 0, GH, P, scratch + S.w_hh, NULL, rt->avx2);
    RF_FN(rf_prepare_weight)(&W_hr, w_hr, H, 0, P, H, scratch + S.w_hr, NULL, rt->avx2);
    /* A row's final-state gradient enters at its last step; until then it waits here. */
    RF_FN(rf_sort_rows)(scratch + S.dh, dh_n, p, P);
    RF_FN(rf_sort_rows)(scratch + S.dc, dc_n, p, H);
    RF_FN(lstmp_back_steps_job) job = {ws, scratch, dy, peep, &W_hh, &W_hr, p, L, S, H, P,
                                       rt};
    rf_run_parts(RF_FN(lstmp_back_steps), &job,
                 rf_step_parts(p, 0, p->steps, 2.0 * (GH + H) * P, 0, rt));
    RF_FN(rf_unsort_rows)(dh0, scratch + S.dh, p, P);
    RF_FN(rf_unsort_rows)(dc0, scratch + S.dc, p, H);
    const REAL *dgates = ws + L.gates;
    /* dW_hh = sum_t dgates_t^T h_{t-1}; dW_hr = sum_t dh_t^T m_t */
    RF_FN(rf_grad_gemm)(rt, 1, GH, P, p->rows, dgates, GH, ws + L.h, P, dw_hh, P);
    RF_FN(rf_grad_gemm)(rt, 1, P, H, p->rows, scratch + S.dhs, P, ws + L.m, H, dw_hr, H);
    RF_FN(rf_weight_grads)(dx, dw_ih, ws + L.xbuf, ws + L.xbuf, dgates, x, w_ih, p, I, GH,
                           rt);
    RF_FN(rf_bias_grads)(db_ih, db_hh, dgates, p->rows, GH, rt->avx2);
    if (peep) RF_FN(rf_lstm_peep_grads)(dpeep, dgates, ws + L.c, ws + L.tanh_c, p->rows, H);
}

#endif /* RF_TEMPLATE */
