/* gru.c -- GRU forward and backward through time.
 *
 *   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
 *   linear_before_reset (PyTorch, cuDNN): n = tanh(W_in x + b_in + r (W_hn h + b_hn))
 *   otherwise (original GRU, ONNX):       n = tanh(W_in x + b_in + W_hn (r h) + b_hn)
 *   h' = (1 - z) n + z h
 *
 * Same loop shape as lstm.c. b_hn is the one bias not folded into the input projection:
 * the reset gate multiplies it (lbr) or it joins after the product with r h (not lbr),
 * which then needs a second GEMM per step, between the r pass and the n pass.
 * The part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#include "rnnfuse.h"
#include "vmath.h"

/* Workspace layout, in elements from the start of ws.
 * train=1, packed rows (N = p->rows):
 *   bias (3H) | gates (N,3H): post-activation r z n | aux (N,H): W_hn h + b_hn when lbr,
 *   r h otherwise | h (N,H): h_{t-1} | step (B,3H): one step's recurrent product |
 *   xbuf (N,I): gathered x, when not dense | weights: W_hh^T and W_ih^T
 *   packed (rf_prepare_weights)
 * train=0: bias (3H) | gates (R,3H) | aux (B,H) | h (2,B,H) | step (B,3H) | xbuf (R,I) |
 *   weights */
typedef struct { ptrdiff_t bias, gates, aux, h, step, xbuf, weights, total; } gru_layout;

static gru_layout gru_layout_of(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    gru_layout L;
    ptrdiff_t rows = train ? p->rows : rf_chunk_rows(p);
    L.bias = 0;
    L.gates = L.bias + 3 * H;
    L.aux = L.gates + rows * 3 * H;
    L.h = L.aux + (train ? p->rows * H : p->B * H);
    L.step = L.h + (train ? p->rows * H : 2 * p->B * H);
    L.xbuf = L.step + p->B * 3 * H;
    L.weights = L.xbuf + (rf_dense(p) ? 0 : rows * I);
    L.total = L.weights + rf_weights_pack_size(3, H, I);
    return L;
}

ptrdiff_t rf_gru_workspace(const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    return gru_layout_of(p, I, H, train).total;
}

#define RF_TEMPLATE_FILE "gru.c"
#include "instantiate.h"

#elif defined(RF_VW) /* the one-pass float code, once per vector width (widths.h) */

/* nv vectors of an optional bias from bias + at, zeros where it is absent: the portable
 * code adds 0 then too (-0 + 0 is +0). */
V_TARGET static RF_INLINE void V_FN(bias_vectors)(V_T *b, const float *bias, ptrdiff_t at,
                                                  int nv, int n_last) {
    if (bias) V_FN(rf_load)(b, bias + at, nv, n_last);
    else for (int u = 0; u < nv; u++) b[u] = V_ZERO();
}

/* gru_step_n's work on RF_VW (nv - 1) + n_last units of one row, from unit k, every gate
 * in registers; with lbr also gru_step_rz's (without, r and z come from g, made by it, as
 * the product with r h sits between the two). keep: store r, z, n for backward. */
V_TARGET static RF_INLINE void V_FN(gru_units)(float *g, const float *st, const float *h_prev,
                                               const float *bias, const float *b_hn,
                                               float *aux, float *h_out, float *y, int keep,
                                               int lbr, ptrdiff_t H, ptrdiff_t k, int nv,
                                               int n_last) {
    V_T rz[2][RF_UNITS_MAX], n[RF_UNITS_MAX], hl[RF_UNITS_MAX], t[RF_UNITS_MAX];
    V_T b[RF_UNITS_MAX], one = V_SET1(1.0f), *r = rz[0], *z = rz[1];
    if (lbr) {
        for (int q = 0; q < 2; q++) {  /* r, z = sigmoid(g + bias + st) */
            V_FN(rf_load)(rz[q], g + q * H + k, nv, n_last);
            V_FN(bias_vectors)(b, bias, q * H + k, nv, n_last);
            V_FN(rf_load)(t, st + q * H + k, nv, n_last);
            for (int u = 0; u < nv; u++)
                rz[q][u] = V_ADD(V_ADD(rz[q][u], b[u]), t[u]);
            V_FN(rf_sigmoid)(rz[q], nv);
            if (keep) V_FN(rf_store)(g + q * H + k, rz[q], nv, n_last);
        }
    } else {
        V_FN(rf_load)(z, g + H + k, nv, n_last);
    }
    V_FN(bias_vectors)(b, b_hn, k, nv, n_last);
    V_FN(rf_load)(hl, st + 2 * H + k, nv, n_last);
    for (int u = 0; u < nv; u++) hl[u] = V_ADD(hl[u], b[u]);
    if (lbr && aux) V_FN(rf_store)(aux + k, hl, nv, n_last);
    V_FN(bias_vectors)(b, bias, 2 * H + k, nv, n_last);
    V_FN(rf_load)(n, g + 2 * H + k, nv, n_last);
    for (int u = 0; u < nv; u++)
        n[u] = V_ADD(V_ADD(n[u], b[u]), lbr ? V_MUL(r[u], hl[u]) : hl[u]);
    V_FN(rf_tanh)(n, nv);
    if (keep) V_FN(rf_store)(g + 2 * H + k, n, nv, n_last);
    V_FN(rf_load)(t, h_prev + k, nv, n_last);
    for (int u = 0; u < nv; u++)  /* h' = (1 - z) n + z h */
        t[u] = V_ADD(V_MUL(V_SUB(one, z[u]), n[u]), V_MUL(z[u], t[u]));
    V_FN(rf_store)(h_out + k, t, nv, n_last);
    V_FN(rf_store)(y + k, t, nv, n_last);
}

/* The step's pointwise work for one row on a vector path (float): one pass over the
 * units, RF_UNITS_MAX vectors at a time, where the portable code makes four or five; the
 * same operations on the same values, so the same bits. */
V_TARGET static void V_FN(gru_row)(float *g, const float *st, const float *h_prev,
                                   const float *bias, const float *b_hn, float *aux,
                                   float *h_out, float *y, int keep, int lbr, ptrdiff_t H) {
#define UNITS(k, nv, n_last) \
    V_FN(gru_units)(g, st, h_prev, bias, b_hn, aux, h_out, y, keep, lbr, H, k, nv, n_last)
    RF_OVER_UNITS(H, UNITS);
#undef UNITS
}

#elif defined(RF_PASS) /* the pointwise passes, once per code path (passes.h) */

/* r and z of a step's rows j0 .. j1-1, in place over their pre-activations (input part in
 * g, folded biases in bias or NULL, recurrent part in st). Without lbr, also
 * rh = r h_{t-1}, the operand of W_hn. */
RF_PASS_TARGET static void RF_PASS(gru_step_rz)(REAL *g, REAL *rh, const REAL *st,
                                                const REAL *hp, const REAL *bias,
                                                ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H,
                                                int lbr) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        REAL *grz = g + j * 3 * H;
        const REAL *srz = st + j * 3 * H, *h = hp + j * H;
        for (ptrdiff_t k = 0; k < 2 * H; k++) grz[k] = (grz[k] + (bias ? bias[k] : 0)) + srz[k];
        SIGMOID(grz, 2 * H);
        if (!lbr)
            for (ptrdiff_t k = 0; k < H; k++) rh[j * H + k] = grz[k] * h[k];
    }
}

/* n and the new state of a step's rows j0 .. j1-1. g's n block holds W_in x, bias the
 * folded biases (or NULL; the n block's is b_in), st's n block W_hn h (lbr) or W_hn (r h);
 * with lbr, aux (or NULL) keeps W_hn h + b_hn for backward. Rows j < next_bs go on to the
 * next step (their state goes to hn), the others have finished (h_n). On the vector paths
 * float takes one pass per row, with lbr r and z too (gru_step_rz is skipped: RF_ONE_PASS);
 * train: keep the activations in g for backward. */
RF_PASS_TARGET static void RF_PASS(gru_step_n)(REAL *g, REAL *aux, const REAL *st,
                                               const REAL *hp, REAL *hn, REAL *y, REAL *h_n,
                                               const REAL *bias, const REAL *b_hn,
                                               const rf_plan *p, ptrdiff_t s, ptrdiff_t j0,
                                               ptrdiff_t j1, ptrdiff_t next_bs, ptrdiff_t H,
                                               int lbr, int train) {
    const REAL *b_in = bias ? bias + 2 * H : NULL;
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        REAL *gr = g + j * 3 * H, *gz = gr + H, *gn = gr + 2 * H;
        const REAL *sn = st + j * 3 * H + 2 * H, *h = hp + j * H;
        REAL *y_row = y + (rf_time(p, j, s) * p->B + b) * H;
        REAL *h_out = j < next_bs ? hn + j * H : h_n + b * H;
#if RF_HAVE_AVX2 && RF_IS_FLOAT && RF_PASS_AVX2
        RF_VFN(gru_row, RF_PASS_VW)(gr, st + j * 3 * H, h, bias, b_hn,
                                    aux ? aux + j * H : NULL, h_out, y_row, train, lbr, H);
        continue;
#else
        (void)train;
#endif
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL hl = sn[k] + (b_hn ? b_hn[k] : 0);
            if (lbr && aux) aux[j * H + k] = hl;
            gn[k] = (gn[k] + (b_in ? b_in[k] : 0)) + (lbr ? gr[k] * hl : hl);
        }
        TANH(gn, H);
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL h_new = (1 - gz[k]) * gn[k] + gz[k] * h[k];
            h_out[k] = h_new;
            y_row[k] = h_new;
        }
    }
}

/* One step's backward pointwise pass over rows j0 .. j1-1 (lbr, or the first pass without
 * lbr). g holds the saved r z n, aux (lbr) W_hn h + b_hn; dg's z and n blocks receive their
 * pre-activation gradients, and with lbr its r block too, daux the gradient of
 * W_hn h + b_hn, and st the step's recurrent-side gate gradients [dr dz d(W_hn h)] (dg may
 * be g, daux aux). dh: the gradient carried into h_t; leaves as the direct part of the
 * gradient of h_{t-1}, z dh. */
RF_PASS_TARGET static void RF_PASS(gru_step_backward)(REAL *dg, const REAL *g, REAL *daux,
                                                      const REAL *aux, REAL *st, REAL *dh,
                                                      const REAL *hp, const REAL *dy,
                                                      const rf_plan *p, ptrdiff_t s,
                                                      ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H,
                                                      int lbr) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *saved_r = g + j * 3 * H, *saved_z = saved_r + H, *saved_n = saved_r + 2 * H;
        REAL *gr = dg + j * 3 * H, *gz = gr + H, *gn = gr + 2 * H;
        REAL *sr = st + j * 3 * H, *sz = sr + H, *sn = sr + 2 * H;
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        const REAL *h = hp + j * H, *aux_row = aux + j * H;
        REAL *dh_row = dh + j * H, *daux_row = daux + j * H;
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL r = saved_r[k], z = saved_z[k], n = saved_n[k];
            REAL d_h = dh_row[k] + (dy_row ? dy_row[k] : 0);
            REAL dz = d_h * (h[k] - n) * z * (1 - z);           /* h' = (1-z) n + z h */
            REAL dn = d_h * (1 - z) * (1 - n * n);
            dh_row[k] = d_h * z;
            gz[k] = dz;
            gn[k] = dn;
            if (lbr) {                                          /* n = tanh(.. + r hl) */
                REAL hl = aux_row[k];
                REAL dr = dn * hl * r * (1 - r);
                gr[k] = dr;
                daux_row[k] = dn * r;
                sr[k] = dr; sz[k] = dz; sn[k] = dn * r;
            }
        }
    }
}

/* Without lbr, the second backward pass: drh = d(r h_{t-1}) = dn W_hn is in st; gives dr
 * (from g's saved r block into dg's, which may be g's) and adds r drh to dh. With recurrent
 * dropout (m: the (B,H) mask, else NULL) hp holds the masked h_{t-1}, and dh gets
 * r drh m. */
RF_PASS_TARGET static void RF_PASS(gru_step_backward_r)(REAL *dg, const REAL *g, REAL *dh,
                                                        const REAL *drh, const REAL *hp,
                                                        const REAL *m, const rf_plan *p,
                                                        ptrdiff_t j0, ptrdiff_t j1,
                                                        ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *saved_r = g + j * 3 * H;
        REAL *gr = dg + j * 3 * H;
        const REAL *d = drh + j * H, *h = hp + j * H;
        const REAL *mr = m ? m + p->order[j] * H : NULL;
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL r = saved_r[k];
            gr[k] = d[k] * h[k] * r * (1 - r);
            dh[j * H + k] += mr ? d[k] * r * mr[k] : d[k] * r;
        }
    }
}


#else /* RF_TEMPLATE: dtype-generic part */

#define RF_WIDTHS_FILE "gru.c"
#include "widths.h"

#define RF_PASSES_FILE "gru.c"
#include "passes.h"
#include "zoneout.h"
#include "recdrop.h"

/* The time loop of a forward, steps step0 .. step1-1, for one part's rows. */
typedef struct {
    REAL *y, *h_n, *ws;
    const REAL *bias, *b_hn;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W;  /* W[0], and without lbr W[1] (rf_prepare_weights) */
    const rf_plan *p;
    gru_layout L;
    ptrdiff_t H, step0, step1;
    int lbr, train;
    const rf_runtime *rt;
} RF_FN(gru_steps_job);

static void RF_FN(gru_steps)(void *arg, int part, int parts) {
    const RF_FN(gru_steps_job) *q = arg;
    const rf_plan *p = q->p;
    const rf_runtime *rt = q->rt;
    ptrdiff_t H = q->H, GH = 3 * H, BH = p->B * H, j0, j1;
    gru_layout L = q->L;
    int lbr = q->lbr, train = q->train, simd = rf_simd(rt), one_pass = RF_ONE_PASS(rt);
    REAL *ws = q->ws, *st = ws + L.step;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = q->step0; s < q->step1 && p->batch_sizes[s] > j0; s++) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1, m = end - j0;
        ptrdiff_t next_bs = s + 1 < p->steps ? p->batch_sizes[s + 1] : 0;
        const REAL *hp = ws + L.h + (train ? p->offsets[s] * H : (s & 1) * BH);
        REAL *hn = ws + L.h + (train ? p->offsets[s + 1] * H : ((s + 1) & 1) * BH);
        REAL *aux = ws + L.aux + (train ? p->offsets[s] * H : 0);
        REAL *g = ws + L.gates + (p->offsets[s] - (train ? 0 : p->offsets[q->step0])) * GH;
        /* the products' h_{t-1}: masked with recurrent dropout (z h_{t-1} is not) */
        const REAL *hm = RF_FN(recdrop_operand)(q->rd, hp, p, j0, end, H);
        if (lbr) {  /* st = h_{t-1} W_hh^T, all three blocks */
            RF_FN(rf_step_gemm)(rt, &q->W[0], 0, m, GH, H, hm + j0 * H, H, 0,
                                st + j0 * GH, GH);
            if (!one_pass)
                RF_PICK(gru_step_rz, simd)(g, aux, st, hp, q->bias, j0, end, H, lbr);
        } else {    /* st_rz = h_{t-1} W_hrz^T;  st_n = (r h_{t-1}) W_hn^T */
            RF_FN(rf_step_gemm)(rt, &q->W[0], 0, m, 2 * H, H, hm + j0 * H, H, 0,
                                st + j0 * GH, GH);
            RF_PICK(gru_step_rz, simd)(g, aux, st, hm, q->bias, j0, end, H, lbr);
            RF_FN(rf_step_gemm)(rt, &q->W[1], 0, m, H, H, aux + j0 * H, H, 0,
                                st + j0 * GH + 2 * H, GH);
        }
        RF_PICK(gru_step_n, simd)(g, train ? aux : NULL, st, hp, hn, q->y, q->h_n, q->bias,
                                  q->b_hn, p, s, j0, end, next_bs, H, lbr, train);
        if (q->zo && q->zo->h)
            RF_FN(zoneout_forward)(q->zo, q->zo->h, hp, hn, q->h_n, q->y, p, s, j0, end,
                                   next_bs, H);
    }
}

void RF_FN(rf_gru_forward)(REAL *y, REAL *h_n, REAL *ws,
                           const REAL *x, const REAL *h0,
                           const REAL *w_ih, const REAL *w_hh,
                           const REAL *b_ih, const REAL *b_hh, const REAL *packed,
                           const rf_zoneout *zo, const rf_recdrop *rd, const rf_plan *p,
                           ptrdiff_t I, ptrdiff_t H, int lbr, int train,
                           const rf_runtime *rt) {
    gru_layout L = gru_layout_of(p, I, H, train);
    ptrdiff_t GH = 3 * H;
    const REAL *bias = RF_FN(rf_fold_biases)(ws + L.bias, b_ih, b_hh, GH, 2 * H);
    const REAL *b_hn = b_hh ? b_hh + 2 * H : NULL;
    RF_FN(rf_initial_state)(ws + L.h, h_n, h0, p, H);
    rf_weight W[3];  /* with lbr W[0] is all of W_hh^T; without, the r z and n blocks */
    RF_FN(rf_prepare_weights)(W, w_ih, w_hh, 3, H, I, lbr, ws + L.weights, packed, p,
                              rt->avx2);
    RF_FN(gru_steps_job) job = {y, h_n, ws, bias, b_hn, zo, rd, W, p, L, H, 0, 0, lbr, train,
                                rt};
    for (ptrdiff_t step0 = 0; step0 < p->steps;) {
        ptrdiff_t step1 = rf_chunk_end(p, step0, train);
        RF_FN(rf_project)(ws + L.gates, ws + L.xbuf, x, &W[2], p, step0, step1, I, GH,
                          train, rt);
        job.step0 = step0;
        job.step1 = step1;
        rf_run_parts(RF_FN(gru_steps), &job,
                     rf_step_parts(p, step0, step1, 2.0 * GH * H, train, rt));
        step0 = step1;
    }
}

/* The time loop of a backward, for one part's rows. */
typedef struct {
    const REAL *ws;
    REAL *out, *dh;
    const REAL *dy;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const REAL *h_op;  /* every packed row's h_{t-1} as the products saw it */
    const rf_weight *W_hh;
    const rf_plan *p;
    gru_layout L;
    ptrdiff_t H;
    int lbr;
    const rf_runtime *rt;
} RF_FN(gru_back_steps_job);

static void RF_FN(gru_back_steps)(void *arg, int part, int parts) {
    const RF_FN(gru_back_steps_job) *q = arg;
    const rf_plan *p = q->p;
    const rf_weight *W = q->W_hh;
    const rf_runtime *rt = q->rt;
    ptrdiff_t H = q->H, GH = 3 * H, j0, j1;
    REAL *st = q->out + q->L.step, *dh = q->dh;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = p->steps - 1; s >= 0; s--) {
        ptrdiff_t bs = p->batch_sizes[s], at = p->offsets[s], end = bs < j1 ? bs : j1;
        ptrdiff_t m = end - j0;
        if (m <= 0) continue;
        const REAL *g = q->ws + q->L.gates + at * GH, *aux = q->ws + q->L.aux + at * H;
        const REAL *hp = q->ws + q->L.h + at * H;
        REAL *dg = q->out + q->L.gates + at * GH, *daux = q->out + q->L.aux + at * H;
        const rf_zoneout *zo = q->zo && q->zo->h ? q->zo : NULL;
        if (zo) RF_FN(zoneout_backward)(zo, zo->h, dh, zo->carry, q->dy, p, s, j0, end, H);
        RF_PICK(gru_step_backward, rf_simd(rt))(dg, g, daux, aux, st, dh, hp,
                                             zo ? NULL : q->dy, p, s, j0, end, H, q->lbr);
        if (zo) RF_FN(zoneout_carry)(dh, zo->carry, j0, end, H, 1);
        /* the products' part of dh_{t-1}, times the recurrent dropout's mask */
        if (q->lbr) {  /* dh_{t-1} += [dr dz d(W_hn h)] W_hh (else the caller's, unpacked) */
            if (W)
                RF_FN(recdrop_back_gemm)(rt, W, 0, GH, st + j0 * GH, GH, 1, dh, q->rd, p, j0,
                                         end, H);
        } else {       /* drh = dn W_hn;  then dh_{t-1} += r drh + [dr dz] W_hrz */
            RF_FN(rf_step_gemm)(rt, W, 2 * H, m, H, H, dg + j0 * GH + 2 * H, GH, 0,
                                st + j0 * H, H);
            RF_PICK(gru_step_backward_r, rf_simd(rt))(dg, g, dh, st, q->h_op + at * H,
                                                   q->rd ? q->rd->m : NULL, p, j0, end, H);
            RF_FN(recdrop_back_gemm)(rt, W, 0, 2 * H, dg + j0 * GH, GH, 1, dh, q->rd, p, j0,
                                     end, H);
        }
    }
}

void RF_FN(rf_gru_backward)(REAL *dx, REAL *dh0, REAL *dw_ih, REAL *dw_hh,
                            REAL *db_ih, REAL *db_hh,
                            const REAL *dy, const REAL *dh_n,
                            const REAL *ws, REAL *out, REAL *scratch, const REAL *x,
                            const REAL *w_ih, const REAL *w_hh, const rf_zoneout *zo,
                            const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                            int lbr, const rf_runtime *rt) {
    gru_layout L = gru_layout_of(p, I, H, 1);
    ptrdiff_t GH = 3 * H, N = p->rows;
    REAL *dh = scratch;
    rf_weight W;  /* W_hh itself: rows 0..2H-1 for r z, 2H..3H-1 for n */
    /* dh carried through W_hh: after a single step it only makes dh0 */
    int carried = dh0 || p->steps > 1;
    /* a single step's few rows (linear_before_reset): dh0 += [dr dz d(W_hn h)] W_hh after
     * the step, W_hh read in place */
    int unpacked = lbr && p->steps == 1 && p->B <= RF_FEW_ROWS && !zo && !rd;
    /* without linear_before_reset, r's gradient needs dn W_hn: W_hh packed regardless */
    int packed = !unpacked && (carried || !lbr);
    if (packed)
        RF_FN(rf_prepare_weight)(&W, w_hh, H, 0, GH, H, scratch + 2 * p->B * H, NULL, rt->avx2);
    RF_FN(rf_sort_rows)(dh, dh_n, p, H);
    const REAL *h = RF_FN(recdrop_all_operands)(rd, ws + L.h, p, H);  /* masked h_{t-1} */
    RF_FN(gru_back_steps_job) job = {ws, out, dh, dy, zo, rd, h, packed ? &W : NULL, p, L,
                                     H, lbr, rt};
    rf_run_parts(RF_FN(gru_back_steps), &job,
                 rf_step_parts(p, 0, p->steps, 2.0 * GH * H, 0, rt));
    if (carried && unpacked)
        RF_FN(rf_unpacked_step_gemm)(rt, p->batch_sizes[0], H, GH, out + L.step, GH, w_hh, H,
                                     1, dh, H, scratch + 2 * p->B * H);
    RF_FN(rf_unsort_rows)(dh0, dh, p, H);
    /* aux: with lbr the gradient of W_hn h + b_hn, else the saved r h_{t-1} */
    const REAL *dgates = out + L.gates, *aux = (lbr ? out : ws) + L.aux;
    /* dW_hrz = sum_t [dr dz]^T h_{t-1};  dW_hn = sum_t d(W_hn h)^T h_{t-1} (lbr)
     * or dn^T (r h_{t-1}) (not lbr) */
    RF_FN(rf_grad_gemm)(rt, 1, 2 * H, H, N, dgates, GH, h, H, dw_hh, H);
    if (lbr)
        RF_FN(rf_grad_gemm)(rt, 1, H, H, N, aux, H, h, H, dw_hh + 2 * H * H, H);
    else
        RF_FN(rf_grad_gemm)(rt, 1, H, H, N, dgates + 2 * H, GH, aux, H, dw_hh + 2 * H * H, H);
    /* db_hh's n block with lbr is that of W_hn h + b_hn, inside the reset gate */
    RF_FN(rf_bias_grads)(db_ih, db_hh, dgates, N, GH, rt->avx2);
    if (db_hh && lbr) RF_FN(rf_column_sums)(db_hh + 2 * H, aux, N, H, H, rt->avx2);
    RF_FN(rf_weight_grads)(dx, dw_ih, ws + L.xbuf, out + L.xbuf, dgates, x, w_ih, p, I, GH,
                           rt);
}

#endif /* RF_TEMPLATE */
