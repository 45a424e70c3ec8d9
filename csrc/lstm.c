/* lstm.c -- LSTM forward and backward through time.
 *
 *   gates = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh,  blocks i f g o
 *   i, f, o = sigmoid(.), g = tanh(.);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
 * With peepholes P (3H, ONNX's order i o f) the pre-activations of i and f also get
 * P_i c_{t-1} and P_f c_{t-1}, and that of o gets P_o c_t (the new cell).
 *
 * Forward: the input projection of all steps is one GEMM (rf_project); each step adds
 * h_{t-1} W_hh^T into its gate rows (one GEMM over the rows still running) and one fused
 * pass applies the activations, the state update and the writes of y, h_n, c_n.
 * Backward: per step (reversed) one fused pass turns the saved gates into gate gradients
 * (in place, or into another buffer of the workspace's layout), and one GEMM carries dh
 * back through W_hh; dW_hh, dW_ih, dx and the bias
 * gradients are single GEMMs / column sums over all steps after the loop.
 * The part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#include <string.h>

#include "rnnfuse.h"
#include "vmath.h"
#include "lstmp.h"

/* Workspace layout, in elements from the start of ws.
 * train=1 keeps every step for backward, in packed rows (N = p->rows):
 *   bias (4H) | gates (N,4H): post-activation i f g o | h (N,H): h_{t-1} of each row |
 *   c (N,H): c_{t-1} | tanh_c (N,H): tanh(c_t) (with peepholes, backward leaves c_t there) |
 *   xbuf (N,I): gathered x, when not dense |
 *   weights: W_hh^T and W_ih^T packed (rf_prepare_weights)
 * train=0 keeps one chunk of steps and two states (current, next):
 *   bias (4H) | gates (R,4H) | h (2,B,H) | c (2,B,H) | xbuf (R,I), R = chunk rows |
 *   weights */
typedef struct { ptrdiff_t bias, gates, h, c, tanh_c, xbuf, weights, total; } lstm_layout;

static lstm_layout lstm_layout_of(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    lstm_layout L;
    ptrdiff_t rows = train ? p->rows : rf_chunk_rows(p);
    ptrdiff_t states = train ? p->rows * H : 2 * p->B * H;
    L.bias = 0;
    L.gates = L.bias + 4 * H;
    L.h = L.gates + rows * 4 * H;
    L.c = L.h + states;
    L.tanh_c = L.c + states;
    L.xbuf = L.tanh_c + (train ? p->rows * H : 0);
    L.weights = L.xbuf + (rf_dense(p) ? 0 : rows * I);
    L.total = L.weights + rf_weights_pack_size(4, H, I);
    return L;
}

ptrdiff_t rf_lstm_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    return lstm_layout_of(p, I, H, train).total;
}

#define RF_TEMPLATE_FILE "lstm.c"
#include "instantiate.h"

#elif defined(RF_VW) /* the one-pass float code, once per vector width (widths.h) */

/* lstm_step's work on RF_VW (nv - 1) + n_last hidden units of one row, from unit k: every
 * gate in registers, nv vectors of each side by side (see vmath.h). */
V_TARGET static RF_INLINE void V_FN(lstm_units)(float *g, float *tanh_c, const float *c_prev,
                                                float *h_out, float *c_out, float *y,
                                                const float *bias, const float *peep,
                                                ptrdiff_t H, ptrdiff_t k, int nv,
                                                int n_last) {
    V_T a[4][RF_UNITS_MAX], b[RF_UNITS_MAX], c[RF_UNITS_MAX], tc[RF_UNITS_MAX];
    for (int q = 0; q < 4; q++) {
        V_FN(rf_load)(a[q], g + q * H + k, nv, n_last);
        if (bias) {
            V_FN(rf_load)(b, bias + q * H + k, nv, n_last);
            for (int u = 0; u < nv; u++) a[q][u] = V_ADD(a[q][u], b[u]);
        }
    }
    V_FN(rf_load)(c, c_prev + k, nv, n_last);
    if (peep) {  /* i and f see c_prev; gate q's peephole is at peep_at[q] (i o f) */
        static const int peep_at[2] = {0, 2};
        for (int q = 0; q < 2; q++) {
            V_FN(rf_load)(b, peep + peep_at[q] * H + k, nv, n_last);
            for (int u = 0; u < nv; u++)
                a[q][u] = V_ADD(a[q][u], V_MUL(b[u], c[u]));
        }
    }
    V_FN(rf_sigmoid)(a[0], nv);
    V_FN(rf_sigmoid)(a[1], nv);
    V_FN(rf_tanh)(a[2], nv);
    /* c = f c_prev + i g: two products, then their sum (no FMA), as the portable code */
    for (int u = 0; u < nv; u++)
        tc[u] = c[u] = V_ADD(V_MUL(a[1][u], c[u]), V_MUL(a[0][u], a[2][u]));
    if (peep) {  /* o sees the new c */
        V_FN(rf_load)(b, peep + H + k, nv, n_last);
        for (int u = 0; u < nv; u++)
            a[3][u] = V_ADD(a[3][u], V_MUL(b[u], c[u]));
    }
    V_FN(rf_sigmoid)(a[3], nv);
    V_FN(rf_tanh)(tc, nv);
    V_FN(rf_store)(c_out + k, c, nv, n_last);
    if (tanh_c) {  /* training: backward reads the activations */
        V_FN(rf_store)(tanh_c + k, tc, nv, n_last);
        for (int q = 0; q < 4; q++) V_FN(rf_store)(g + q * H + k, a[q], nv, n_last);
    }
    for (int u = 0; u < nv; u++) tc[u] = V_MUL(a[3][u], tc[u]);
    V_FN(rf_store)(h_out + k, tc, nv, n_last);
    if (y) V_FN(rf_store)(y + k, tc, nv, n_last);
}

/* lstm_step's pass over one row on a vector path: one pass over the hidden units,
 * RF_UNITS_MAX vectors at a time, where the portable code makes eight over the row; the
 * same operations on the same values, so the same bits: the gates stay in registers
 * instead of making eight trips through memory. */
V_TARGET static void V_FN(lstm_row)(float *g, float *tanh_c, const float *c_prev,
                                    float *h_out, float *c_out, float *y, const float *bias,
                                    const float *peep, ptrdiff_t H) {
#define UNITS(k, nv, n_last) \
    V_FN(lstm_units)(g, tanh_c, c_prev, h_out, c_out, y, bias, peep, H, k, nv, n_last)
    RF_OVER_UNITS(H, UNITS);
#undef UNITS
}

#elif defined(RF_PASS) /* the pointwise passes, once per code path (passes.h) */

/* One step's pointwise pass over its running rows j0 .. j1-1. g: the step's gate rows,
 * holding pre-activations (less the biases, or NULL) on entry and post-activations on
 * exit. cp: the cell states entering the step; hn, cn: where rows that go on to step s+1
 * (j < next_bs) put their states; the others have finished and write h_n, c_n. tanh_c: or
 * NULL (inference). peep: the peepholes (i o f), or NULL. y and h_n may be NULL (the
 * projected cell, lstmp.c): then every row's o tanh(c) goes to hn and none to y. On the
 * vector paths float takes one pass per row (lstm_row_W). */
RF_PASS_TARGET static void RF_PASS(lstm_step)(REAL *g, REAL *tanh_c, const REAL *cp, REAL *hn,
                                              REAL *cn, REAL *y, REAL *h_n, REAL *c_n,
                                              const REAL *bias, const REAL *peep,
                                              const rf_plan *p, ptrdiff_t s, ptrdiff_t j0,
                                              ptrdiff_t j1, ptrdiff_t next_bs, ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        REAL *gi = g + j * 4 * H, *gf = gi + H, *gg = gi + 2 * H, *go = gi + 3 * H;
        REAL *y_row = y ? y + (rf_time(p, j, s) * p->B + b) * H : NULL;
        REAL *h_out = j < next_bs || !h_n ? hn + j * H : h_n + b * H;
        REAL *c_out = j < next_bs ? cn + j * H : c_n + b * H;
        const REAL *c_prev = cp + j * H;
#if RF_HAVE_AVX2 && RF_IS_FLOAT && RF_PASS_AVX2
        RF_VFN(lstm_row, RF_PASS_VW)(gi, tanh_c ? tanh_c + j * H : NULL, c_prev, h_out, c_out,
                                     y_row, bias, peep, H);
        continue;
#endif
        if (bias)
            for (ptrdiff_t k = 0; k < 4 * H; k++) gi[k] += bias[k];
        if (peep)
            for (ptrdiff_t k = 0; k < H; k++) {
                gi[k] += peep[k] * c_prev[k];
                gf[k] += peep[2 * H + k] * c_prev[k];
            }
        SIGMOID(gi, 2 * H);  /* i, f */
        TANH(gg, H);
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL c = gf[k] * c_prev[k] + gi[k] * gg[k];
            c_out[k] = c;
            h_out[k] = c;
        }
        if (peep)
            for (ptrdiff_t k = 0; k < H; k++) go[k] += peep[H + k] * c_out[k];
        SIGMOID(go, H);
        TANH(h_out, H);
        if (tanh_c) memcpy(tanh_c + j * H, h_out, (size_t)H * sizeof(REAL));
        for (ptrdiff_t k = 0; k < H; k++) h_out[k] = go[k] * h_out[k];
        if (y_row) memcpy(y_row, h_out, (size_t)H * sizeof(REAL));
    }
}

/* One step's backward pointwise pass over rows j0 .. j1-1. g holds the saved i f g o, dg
 * receives their pre-activation gradients (dg may be g). dh, dc: the gradients carried
 * into this step's outputs (sorted rows); dc leaves as the gradient of c_{t-1}. peep: the
 * peepholes, or NULL; with them, c_new receives c_t (c_new may be tanh_c), which their
 * gradient needs after the loop (lstm_peep_grads). */
RF_PASS_TARGET static void RF_PASS(lstm_step_backward)(REAL *dg, const REAL *g, REAL *dh,
                                                       REAL *dc, REAL *c_new,
                                                       const REAL *tanh_c, const REAL *cp,
                                                       const REAL *peep, const REAL *dy,
                                                       const rf_plan *p, ptrdiff_t s,
                                                       ptrdiff_t j0, ptrdiff_t j1,
                                                       ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *si = g + j * 4 * H, *sf = si + H, *sg = si + 2 * H, *so = si + 3 * H;
        REAL *gi = dg + j * 4 * H, *gf = gi + H, *gg = gi + 2 * H, *go = gi + 3 * H;
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        REAL *dh_row = dh + j * H, *dc_row = dc + j * H, *cn_row = c_new + j * H;
        const REAL *tc_row = tanh_c + j * H, *c_prev = cp + j * H;
        if (peep) {
            const REAL *p_i = peep, *p_o = peep + H, *p_f = peep + 2 * H;
            for (ptrdiff_t k = 0; k < H; k++) {
                REAL i = si[k], f = sf[k], gt = sg[k], o = so[k], tc = tc_row[k];
                REAL d_h = dh_row[k] + (dy_row ? dy_row[k] : 0);
                REAL d_o = d_h * tc * o * (1 - o);
                /* c reaches h through tanh and through o's peephole */
                REAL d_c = dc_row[k] + d_h * o * (1 - tc * tc) + d_o * p_o[k];
                REAL d_i = d_c * gt * i * (1 - i), d_f = d_c * c_prev[k] * f * (1 - f);
                /* c_prev reaches c directly and through i's and f's peepholes */
                dc_row[k] = d_c * f + (d_i * p_i[k] + d_f * p_f[k]);
                cn_row[k] = f * c_prev[k] + i * gt;  /* c_t, as the forward rounded it */
                gi[k] = d_i;
                gf[k] = d_f;
                gg[k] = d_c * i * (1 - gt * gt);
                go[k] = d_o;
            }
            continue;
        }
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL i = si[k], f = sf[k], gt = sg[k], o = so[k], tc = tc_row[k];
            REAL d_h = dh_row[k] + (dy_row ? dy_row[k] : 0);
            REAL d_c = dc_row[k] + d_h * o * (1 - tc * tc);   /* h = o tanh(c) */
            dc_row[k] = d_c * f;                              /* c = f c_prev + i g */
            gi[k] = d_c * gt * i * (1 - i);
            gf[k] = d_c * c_prev[k] * f * (1 - f);
            gg[k] = d_c * i * (1 - gt * gt);
            go[k] = d_h * tc * o * (1 - o);
        }
    }
}


#else /* RF_TEMPLATE: dtype-generic part */

#define RF_WIDTHS_FILE "lstm.c"
#include "widths.h"

#define RF_PASSES_FILE "lstm.c"
#include "passes.h"
#include "zoneout.h"
#include "recdrop.h"

/* The time loop of a forward, steps step0 .. step1-1, for one part's rows. */
typedef struct {
    REAL *y, *h_n, *c_n, *ws;
    const REAL *bias, *peep;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    lstm_layout L;
    ptrdiff_t H, step0, step1;
    int train;
    const rf_runtime *rt;
} RF_FN(lstm_steps_job);

static void RF_FN(lstm_steps)(void *arg, int part, int parts) {
    const RF_FN(lstm_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, GH = 4 * H, BH = p->B * H, j0, j1;
    lstm_layout L = q->L;
    REAL *ws = q->ws;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = q->step0; s < q->step1 && p->batch_sizes[s] > j0; s++) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        ptrdiff_t next_bs = s + 1 < p->steps ? p->batch_sizes[s + 1] : 0;
        ptrdiff_t now = q->train ? p->offsets[s] * H : (s & 1) * BH;
        ptrdiff_t next = q->train ? p->offsets[s + 1] * H : ((s + 1) & 1) * BH;
        REAL *g = ws + L.gates + (p->offsets[s] - (q->train ? 0 : p->offsets[q->step0])) * GH;
        /* gates += h_{t-1} W_hh^T (h_{t-1} masked with recurrent dropout) */
        const REAL *hp = RF_FN(recdrop_operand)(q->rd, ws + L.h + now, p, j0, end, H);
        RF_FN(rf_step_gemm)(q->rt, q->W_hh, 0, end - j0, GH, H, hp + j0 * H, H, 1,
                            g + j0 * GH, GH);
        RF_PICK(lstm_step, rf_simd(q->rt))(g, q->train ? ws + L.tanh_c + now : NULL,
                                        ws + L.c + now, ws + L.h + next, ws + L.c + next,
                                        q->y, q->h_n, q->c_n, q->bias, q->peep, p, s, j0,
                                        end, next_bs, H);
        const rf_zoneout *zo = q->zo;
        if (zo && zo->c)
            RF_FN(zoneout_forward)(zo, zo->c, ws + L.c + now, ws + L.c + next, q->c_n, NULL,
                                   p, s, j0, end, next_bs, H);
        if (zo && zo->h)
            RF_FN(zoneout_forward)(zo, zo->h, ws + L.h + now, ws + L.h + next, q->h_n, q->y,
                                   p, s, j0, end, next_bs, H);
    }
}

void RF_FN(rf_lstm_forward)(REAL *y, REAL *h_n, REAL *c_n, REAL *ws,
                            const REAL *x, const REAL *h0, const REAL *c0,
                            const REAL *w_ih, const REAL *w_hh,
                            const REAL *b_ih, const REAL *b_hh, const REAL *peep,
                            const REAL *packed, const rf_zoneout *zo, const rf_recdrop *rd,
                            const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train,
                            const rf_runtime *rt) {
    lstm_layout L = lstm_layout_of(p, I, H, train);
    ptrdiff_t GH = 4 * H;
    const REAL *bias = RF_FN(rf_fold_biases)(ws + L.bias, b_ih, b_hh, GH, GH);
    RF_FN(rf_initial_state)(ws + L.h, h_n, h0, p, H);
    RF_FN(rf_initial_state)(ws + L.c, c_n, c0, p, H);
    rf_weight W[3];
    RF_FN(rf_prepare_weights)(W, w_ih, w_hh, 4, H, I, 0, ws + L.weights, packed, p,
                              rt->avx2);
    RF_FN(lstm_steps_job) job = {y, h_n, c_n, ws, bias, peep, zo, rd, &W[0], p, L, H, 0, 0,
                                 train, rt};
    for (ptrdiff_t step0 = 0; step0 < p->steps;) {
        ptrdiff_t step1 = rf_chunk_end(p, step0, train);
        RF_FN(rf_project)(ws + L.gates, ws + L.xbuf, x, &W[2], p, step0, step1, I, GH,
                          train, rt);
        job.step0 = step0;
        job.step1 = step1;
        rf_run_parts(RF_FN(lstm_steps), &job,
                     rf_step_parts(p, step0, step1, 2.0 * GH * H, train, rt));
        step0 = step1;
    }
}

/* The time loop of a backward, for one part's rows. */
typedef struct {
    const REAL *ws;
    REAL *out, *dh, *dc;
    const REAL *dy, *peep;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    lstm_layout L;
    ptrdiff_t H;
    const rf_runtime *rt;
} RF_FN(lstm_back_steps_job);

static void RF_FN(lstm_back_steps)(void *arg, int part, int parts) {
    const RF_FN(lstm_back_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, GH = 4 * H, j0, j1;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = p->steps - 1; s >= 0; s--) {
        ptrdiff_t bs = p->batch_sizes[s], at = p->offsets[s], end = bs < j1 ? bs : j1;
        if (end <= j0) continue;
        REAL *dg = q->out + q->L.gates + at * GH;
        const rf_zoneout *zo = q->zo;
        const REAL *dy = q->dy;
        REAL *carry_h = zo ? (REAL *)zo->carry : NULL;
        REAL *carry_c = zo ? carry_h + p->B * H : NULL;
        if (zo && zo->h) {
            RF_FN(zoneout_backward)(zo, zo->h, q->dh, carry_h, dy, p, s, j0, end, H);
            dy = NULL;
        }
        if (zo && zo->c)
            RF_FN(zoneout_backward)(zo, zo->c, q->dc, carry_c, NULL, p, s, j0, end, H);
        RF_PICK(lstm_step_backward, rf_simd(q->rt))(dg, q->ws + q->L.gates + at * GH, q->dh,
                                                 q->dc, q->out + q->L.tanh_c + at * H,
                                                 q->ws + q->L.tanh_c + at * H,
                                                 q->ws + q->L.c + at * H, q->peep, dy, p, s,
                                                 j0, end, H);
        if (zo && zo->c) RF_FN(zoneout_carry)(q->dc, carry_c, j0, end, H, 1);
        if (zo && zo->h) RF_FN(zoneout_carry)(q->dh, carry_h, j0, end, H, 0);
        /* dh_{t-1} = dgates W_hh (times the recurrent dropout's mask; + zoneout's carry) */
        if (q->W_hh)  /* (else the caller's, unpacked) */
            RF_FN(recdrop_back_gemm)(q->rt, q->W_hh, 0, GH, dg + j0 * GH, GH, zo && zo->h,
                                     q->dh, q->rd, p, j0, end, H);
    }
}

/* The plain cell's pointwise passes on rt's code path, for the projected cell (lstmp.c). */
void RF_FN(rf_lstm_pointwise)(REAL *g, REAL *tanh_c, const REAL *cp, REAL *hn, REAL *cn,
                              REAL *y, REAL *h_n, REAL *c_n, const REAL *bias,
                              const REAL *peep, const rf_plan *p, ptrdiff_t s, ptrdiff_t j0,
                              ptrdiff_t j1, ptrdiff_t next_bs, ptrdiff_t H,
                              const rf_runtime *rt) {
    RF_PICK(lstm_step, rf_simd(rt))(g, tanh_c, cp, hn, cn, y, h_n, c_n, bias, peep, p, s, j0,
                                    j1, next_bs, H);
}

void RF_FN(rf_lstm_pointwise_backward)(REAL *g, REAL *dh, REAL *dc, REAL *tanh_c,
                                       const REAL *cp, const REAL *peep, const REAL *dy,
                                       const rf_plan *p, ptrdiff_t s, ptrdiff_t j0,
                                       ptrdiff_t j1, ptrdiff_t H, const rf_runtime *rt) {
    RF_PICK(lstm_step_backward, rf_simd(rt))(g, g, dh, dc, tanh_c, tanh_c, cp, peep, dy, p, s,
                                             j0, j1, H);
}

/* The peepholes' gradient (i o f), from the gate gradients and the states after the
 * backward's loop: dP_i = sum of da_i c_{t-1}, dP_f = sum of da_f c_{t-1}, dP_o = sum of
 * da_o c_t over every packed row, in row order (the same bits at any thread count). */
void RF_FN(rf_lstm_peep_grads)(REAL *dpeep, const REAL *dgates, const REAL *c_prev,
                               const REAL *c_new, ptrdiff_t rows, ptrdiff_t H) {
    REAL *dp_i = dpeep, *dp_o = dpeep + H, *dp_f = dpeep + 2 * H;
    for (ptrdiff_t k = 0; k < 3 * H; k++) dpeep[k] = 0;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const REAL *da = dgates + r * 4 * H, *cp = c_prev + r * H, *cn = c_new + r * H;
        for (ptrdiff_t k = 0; k < H; k++) {
            dp_i[k] += da[k] * cp[k];
            dp_f[k] += da[H + k] * cp[k];
            dp_o[k] += da[3 * H + k] * cn[k];
        }
    }
}

void RF_FN(rf_lstm_backward)(REAL *dx, REAL *dh0, REAL *dc0, REAL *dw_ih, REAL *dw_hh,
                             REAL *db_ih, REAL *db_hh, REAL *dpeep,
                             const REAL *dy, const REAL *dh_n, const REAL *dc_n,
                             const REAL *ws, REAL *out, REAL *scratch, const REAL *x,
                             const REAL *w_ih, const REAL *w_hh, const REAL *peep,
                             const rf_zoneout *zo, const rf_recdrop *rd, const rf_plan *p,
                             ptrdiff_t I, ptrdiff_t H, const rf_runtime *rt) {
    lstm_layout L = lstm_layout_of(p, I, H, 1);
    ptrdiff_t GH = 4 * H, B = p->B;
    REAL *dh = scratch, *dc = scratch + B * H;
    rf_weight W;
    /* dh carried through W_hh: after a single step it only makes dh0 */
    int carried = dh0 || p->steps > 1;
    /* a single step's few rows: dh0 = dgates W_hh after the step, W_hh read in place */
    int unpacked = p->steps == 1 && B <= RF_FEW_ROWS && !zo && !rd;
    if (carried && !unpacked)
        RF_FN(rf_prepare_weight)(&W, w_hh, H, 0, GH, H, scratch + 2 * B * H, NULL, rt->avx2);
    /* A row's final-state gradient enters at its last step; until then it waits here. */
    RF_FN(rf_sort_rows)(dh, dh_n, p, H);
    RF_FN(rf_sort_rows)(dc, dc_n, p, H);
    RF_FN(lstm_back_steps_job) job = {ws, out, dh, dc, dy, peep, zo, rd,
                                      carried && !unpacked ? &W : NULL, p, L, H, rt};
    rf_run_parts(RF_FN(lstm_back_steps), &job,
                 rf_step_parts(p, 0, p->steps, 2.0 * GH * H, 0, rt));
    if (carried && unpacked)
        RF_FN(rf_unpacked_step_gemm)(rt, p->batch_sizes[0], H, GH, out + L.gates, GH, w_hh,
                                     H, 0, dh, H, scratch + 2 * B * H);
    RF_FN(rf_unsort_rows)(dh0, dh, p, H);
    RF_FN(rf_unsort_rows)(dc0, dc, p, H);
    const REAL *dgates = out + L.gates;
    /* dW_hh = sum_t dgates_t^T h_{t-1} (masked with recurrent dropout) */
    const REAL *h_prev = RF_FN(recdrop_all_operands)(rd, ws + L.h, p, H);
    RF_FN(rf_grad_gemm)(rt, 1, GH, H, p->rows, dgates, GH, h_prev, H, dw_hh, H);
    RF_FN(rf_weight_grads)(dx, dw_ih, ws + L.xbuf, out + L.xbuf, dgates, x, w_ih, p, I, GH,
                           rt);
    RF_FN(rf_bias_grads)(db_ih, db_hh, dgates, p->rows, GH, rt->avx2);
    if (peep) RF_FN(rf_lstm_peep_grads)(dpeep, dgates, ws + L.c, out + L.tanh_c, p->rows, H);
}

#endif /* RF_TEMPLATE */
