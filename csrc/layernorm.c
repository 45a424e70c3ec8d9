/* layernorm.c -- the layer-normalized LSTM and GRU (haste's form), forward and backward.
 *
 *   LN(v; g) = g (v - mean(v)) / sqrt(var(v) + eps), over the G*H gate units of a row
 *   gates = LN(W_ih x_t; g_ih) + LN(W_hh h_{t-1}; g_hh) + b_ih + b_hh
 *   LSTM: i f g o as lstm.c, c_t = f c_{t-1} + i g (unnormalized),
 *         h_t = o tanh(LN(c_t; g_c) + b_c), the cell's LN over its H units
 *   GRU (linear_before_reset only): n = tanh(LN_ih_n + b_in + r (LN_hh_n + b_hn))
 *
 * The loop is the plain cells' (lstm.c, gru.c): the input projection of all steps is one
 * product, and each step's recurrent product goes to a row buffer, because its LN needs
 * the whole row's sums before any gate. Then one pass per row does both LNs, the gates,
 * the state update, the cell's LN and the writes. Training keeps the normalized values
 * and 1/sqrt(var + eps) of every row and step. Backward sums the biases' and gains'
 * gradients in a row of sums per batch row, in the row's step order, joined in row order
 * after the loop (the same at any thread count: a part owns its rows at every step);
 * the weights' gradients stay single products after the loop.
 * The part below RF_TEMPLATE is compiled twice, for float and for double. */
#ifndef RF_TEMPLATE
#include <string.h>

#include "rnnfuse.h"

#define LN_EPS 1e-5

/* Workspace layout, in elements from the start of ws (G = 4 LSTM, 3 GRU).
 * train=1, packed rows (N = p->rows):
 *   bias (GH) | gates (N,GH): the input projection, then post-activations | nih (N,GH):
 *   normalized input projection | prod (N,GH): the recurrent product, normalized in
 *   place (nhh) | da (B,2GH): backward's gate gradients of a step's row (both sides) |
 *   acc (B,LN_ACC): backward's sums per batch row (ln_acc_at) | rstd (N,3): ih, hh, cell |
 *   h (N,H): h_{t-1} | LSTM: c (N,H): c_{t-1} | nc (N,H): normalized c_t |
 *   tc (N,H): tanh(LN(c_t) + b_c) | GRU: aux (N,H): LN_hh_n + b_hn |
 *   xbuf (N,I), when not dense | weights (rf_prepare_weights)
 * train=0: the same with R chunk rows for gates, B rows (one step) for prod, rstd, nc
 *   and tc, states (2,B,H) each; no nih (the projection is normalized in place), da, acc
 *   or aux. */
typedef struct {
    ptrdiff_t bias, gates, nih, prod, da, acc, rstd, h, c, nc, tc, aux, xbuf, weights,
        total;
} ln_layout;

/* A row of backward's sums: of the gate gradients on the input and the recurrent side
 * (the GRU's differ in the n block), of the gains' gradients g_ih, g_hh (each GH wide),
 * and of the LSTM's cell bias's and gain's (H); ln_acc_at: where each starts. */
enum { LN_DAI, LN_DAH, LN_DGI, LN_DGH, LN_DBC, LN_DGC };
static ptrdiff_t ln_acc_at(int which, ptrdiff_t GH, ptrdiff_t H) {
    return which < LN_DBC ? which * GH : 4 * GH + (which - LN_DBC) * H;
}
#define LN_ACC(GH, H) (4 * (GH) + 2 * (H))

static ln_layout ln_layout_of(int lstm, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                              int train) {
    ln_layout L;
    ptrdiff_t G = lstm ? 4 : 3, GH = G * H, N = p->rows;
    ptrdiff_t rows = train ? N : rf_chunk_rows(p), step = train ? N : p->B;
    ptrdiff_t states = train ? N * H : 2 * p->B * H;
    L.bias = 0;
    L.gates = L.bias + GH;
    L.nih = L.gates + rows * GH;
    L.prod = L.nih + (train ? N * GH : 0);
    L.da = L.prod + step * GH;
    L.acc = L.da + (train ? p->B * 2 * GH : 0);
    L.rstd = L.acc + (train ? p->B * LN_ACC(GH, H) : 0);
    L.h = L.rstd + step * 3;
    L.c = L.h + states;
    L.nc = L.c + (lstm ? states : 0);
    L.tc = L.nc + (lstm ? step * H : 0);
    L.aux = L.tc + (lstm ? step * H : 0);
    L.xbuf = L.aux + (!lstm && train ? N * H : 0);
    L.weights = L.xbuf + (rf_dense(p) ? 0 : rows * I);
    L.total = L.weights + rf_weights_pack_size(G, H, I);
    return L;
}

ptrdiff_t rf_ln_workspace(int cell, const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    if (cell != RF_LSTM && cell != RF_GRU) return -1;
    return ln_layout_of(cell == RF_LSTM, p, I, H, train).total;
}

#define RF_TEMPLATE_FILE "layernorm.c"
#include "instantiate.h"

#elif defined(RF_PASS) /* the pointwise passes, once per code path (passes.h) */

/* Sums run in LN_LANES lanes (lane l takes the units k with k % LN_LANES == l), joined
 * pairwise: the same order on every path. With GCC or clang the lanes are one vector of
 * the compiler's vector extension, which each path splits into its own registers (one
 * loop vectorizer's reordering of a lane loop cost more than the sums). */
#define LN_LANES 16

static inline REAL RF_PASS(ln_join)(const REAL *s) {
    REAL t[LN_LANES];
    for (int l = 0; l < LN_LANES; l++) t[l] = s[l];
    for (int w = LN_LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) t[l] = t[2 * l] + t[2 * l + 1];
    return t[0];
}

/* Lane sums s of a (b NULL) or a - b[0] squared (sq), or of a * b and a * b * c (q too),
 * over the whole lanes of n units; returns the first unit left over. */
RF_PASS_TARGET static ptrdiff_t RF_PASS(ln_lanes)(REAL *s, REAL *q, const REAL *a,
                                                  const REAL *b, const REAL *c, int sq,
                                                  ptrdiff_t n) {
    ptrdiff_t k = 0;
#if defined(__GNUC__)
    typedef REAL lanes __attribute__((vector_size(LN_LANES * sizeof(REAL))));
    lanes vs = {0}, vq = {0}, va, vb, vc;
    for (; k + LN_LANES <= n; k += LN_LANES) {
        memcpy(&va, a + k, sizeof va);
        if (sq) {
            va -= b[0];
            vs += va * va;
        } else if (b) {
            memcpy(&vb, b + k, sizeof vb);
            memcpy(&vc, c + k, sizeof vc);
            va = va * vb;
            vs += va;
            vq += va * vc;
        } else {
            vs += va;
        }
    }
    memcpy(s, &vs, sizeof vs);
    memcpy(q, &vq, sizeof vq);
#else
    for (int l = 0; l < LN_LANES; l++) s[l] = q[l] = 0;
    for (; k + LN_LANES <= n; k += LN_LANES)
        for (int l = 0; l < LN_LANES; l++) {
            REAL x = a[k + l];
            if (sq) {
                x -= b[0];
                s[l] += x * x;
            } else if (b) {
                x = x * b[k + l];
                s[l] += x;
                q[l] += x * c[k + l];
            } else {
                s[l] += x;
            }
        }
#endif
    return k;
}

/* mean(v) and 1 / sqrt(var(v) + eps) over n units (two passes: the deviations' squares). */
RF_PASS_TARGET static void RF_PASS(ln_stats)(const REAL *v, ptrdiff_t n, REAL *mean,
                                             REAL *rstd) {
    REAL s[LN_LANES], q[LN_LANES], m;
    ptrdiff_t k = RF_PASS(ln_lanes)(s, q, v, NULL, NULL, 0, n);
    for (int l = 0; k + l < n; l++) s[l] += v[k + l];
    m = RF_PASS(ln_join)(s) / (REAL)n;
    k = RF_PASS(ln_lanes)(s, q, v, &m, NULL, 1, n);
    for (int l = 0; k + l < n; l++) {
        REAL d = v[k + l] - m;
        s[l] += d * d;
    }
    *mean = m;
    *rstd = 1 / (REAL)sqrt(RF_PASS(ln_join)(s) / (REAL)n + (REAL)LN_EPS);
}

/* The means LN's backward needs, mean(g da) and mean(g da nrm), in one pass. */
RF_PASS_TARGET static void RF_PASS(ln_back_means)(const REAL *da, const REAL *g,
                                                  const REAL *nrm, ptrdiff_t n, REAL *m1,
                                                  REAL *m2) {
    REAL s[LN_LANES], q[LN_LANES];
    ptrdiff_t k = RF_PASS(ln_lanes)(s, q, da, g, nrm, 0, n);
    for (int l = 0; k + l < n; l++) {
        REAL d = da[k + l] * g[k + l];
        s[l] += d;
        q[l] += d * nrm[k + l];
    }
    *m1 = RF_PASS(ln_join)(s) / (REAL)n;
    *m2 = RF_PASS(ln_join)(q) / (REAL)n;
}

/* The cell's LN backward over H units, from the gradient du of g_c nrm + b_c (nrm the
 * normalized c): dc += rstd (g du - mean(g du) - nrm mean(g du nrm)); acc's rows of sums
 * of b_c's and g_c's gradients get du and du nrm. */
RF_PASS_TARGET static void RF_PASS(ln_cell_backward)(REAL *dc, const REAL *nrm,
                                                     const REAL *du, const REAL *g,
                                                     REAL rstd, ptrdiff_t H, REAL *acc_b,
                                                     REAL *acc_g) {
    REAL m1, m2;
    RF_PASS(ln_back_means)(du, g, nrm, H, &m1, &m2);
    for (ptrdiff_t k = 0; k < H; k++) {
        REAL d = du[k], x = nrm[k];
        dc[k] += rstd * ((g[k] * d - m1) - x * m2);
        acc_b[k] += d;
        acc_g[k] += d * x;
    }
}

/* A row's two gate LNs forward over units k0 .. k1-1: g holds the input projection on
 * entry, hh the recurrent product; with their statistics (mean, rstd of each) nih (or
 * NULL) gets the first normalized, hh leaves normalized, and g = g_ih nih + g_hh nhh +
 * bias. (restrict: the loop vectorizes without run-time overlap checks.) */
RF_PASS_TARGET static void RF_PASS(ln_gates)(REAL *restrict g, REAL *restrict nih,
                                             REAL *restrict hh, const REAL *stats,
                                             const RF_FN(ln_gains) *ln,
                                             const REAL *restrict bias, ptrdiff_t k0,
                                             ptrdiff_t k1) {
    REAL mi = stats[0], ri = stats[1], mh = stats[2], rh = stats[3];
    const REAL *restrict g_ih = ln->g_ih, *restrict g_hh = ln->g_hh;
    for (ptrdiff_t k = k0; k < k1; k++) {
        REAL a = (g[k] - mi) * ri, b = (hh[k] - mh) * rh;
        if (nih) nih[k] = a;
        hh[k] = b;
        g[k] = (g_ih[k] * a + g_hh[k] * b) + (bias ? bias[k] : 0);
    }
}

/* A row's statistics of xw and pw (GH units): stats = mean, rstd of each; rstd[0], [1]. */
RF_PASS_TARGET static void RF_PASS(ln_row_stats)(REAL *stats, REAL *rstd, const REAL *xw,
                                                 const REAL *pw, ptrdiff_t GH) {
    RF_PASS(ln_stats)(xw, GH, &stats[0], &stats[1]);
    RF_PASS(ln_stats)(pw, GH, &stats[2], &stats[3]);
    rstd[0] = stats[1];
    rstd[1] = stats[3];
}

/* One step's forward pass over its running rows j0 .. j1-1 (see ln_step_rows). */
RF_PASS_TARGET static void RF_PASS(ln_lstm_step)(const RF_FN(ln_step_rows) *r,
                                                 const RF_FN(ln_gains) *ln, const REAL *bias,
                                                 const rf_plan *p, ptrdiff_t s, ptrdiff_t j0,
                                                 ptrdiff_t j1, ptrdiff_t next_bs,
                                                 ptrdiff_t H) {
    ptrdiff_t GH = 4 * H;
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        REAL *g = r->g + j * GH, *pw = r->prod + j * GH, stats[4], mc, rc;
        REAL *rstd = r->rstd + j * 3, *nc = r->nc + j * H, *tc = r->tc + j * H;
        REAL *gi = g, *gf = g + H, *gg = g + 2 * H, *go = g + 3 * H;
        REAL *y_row = r->y + (rf_time(p, j, s) * p->B + b) * H;
        REAL *h_out = j < next_bs ? r->hn + j * H : r->h_n + b * H;
        REAL *c_out = j < next_bs ? r->cn + j * H : r->c_n + b * H;
        const REAL *c_prev = r->cp + j * H;
        RF_PASS(ln_row_stats)(stats, rstd, g, pw, GH);
        RF_PASS(ln_gates)(g, r->nih ? r->nih + j * GH : NULL, pw, stats, ln, bias, 0, GH);
        SIGMOID(gi, 2 * H);  /* i, f */
        TANH(gg, H);
        SIGMOID(go, H);
        for (ptrdiff_t k = 0; k < H; k++) c_out[k] = gf[k] * c_prev[k] + gi[k] * gg[k];
        RF_PASS(ln_stats)(c_out, H, &mc, &rc);
        rstd[2] = rc;
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL n = (c_out[k] - mc) * rc;
            nc[k] = n;
            tc[k] = ln->g_c[k] * n + ln->b_c[k];
        }
        TANH(tc, H);
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL h = go[k] * tc[k];
            h_out[k] = h;
            y_row[k] = h;
        }
    }
}

/* The GRU's (linear_before_reset), as ln_lstm_step; aux (or NULL) keeps LN_hh_n + b_hn. */
RF_PASS_TARGET static void RF_PASS(ln_gru_step)(const RF_FN(ln_step_rows) *r,
                                                const RF_FN(ln_gains) *ln, const REAL *bias,
                                                const REAL *b_hn, const rf_plan *p,
                                                ptrdiff_t s, ptrdiff_t j0, ptrdiff_t j1,
                                                ptrdiff_t next_bs, ptrdiff_t H) {
    ptrdiff_t GH = 3 * H;
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        REAL *g = r->g + j * GH, *pw = r->prod + j * GH, stats[4];
        REAL *nih = r->nih ? r->nih + j * GH : NULL;
        REAL *gr = g, *gz = g + H, *gn = g + 2 * H;
        REAL *aux = r->aux ? r->aux + j * H : NULL;
        REAL *y_row = r->y + (rf_time(p, j, s) * p->B + b) * H;
        REAL *h_out = j < next_bs ? r->hn + j * H : r->h_n + b * H;
        const REAL *h_prev = r->hp + j * H;
        RF_PASS(ln_row_stats)(stats, r->rstd + j * 3, g, pw, GH);
        RF_PASS(ln_gates)(g, nih, pw, stats, ln, bias, 0, 2 * H);
        SIGMOID(g, 2 * H);  /* r, z */
        for (ptrdiff_t k = 0; k < H; k++) {
            ptrdiff_t u = 2 * H + k;
            REAL a = (g[u] - stats[0]) * stats[1], bb = (pw[u] - stats[2]) * stats[3];
            REAL hl = ln->g_hh[u] * bb + (b_hn ? b_hn[k] : 0);
            if (nih) nih[u] = a;
            pw[u] = bb;
            if (aux) aux[k] = hl;
            gn[k] = (ln->g_ih[u] * a + (bias ? bias[u] : 0)) + gr[k] * hl;
        }
        TANH(gn, H);
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL h = (1 - gz[k]) * gn[k] + gz[k] * h_prev[k];
            h_out[k] = h;
            y_row[k] = h;
        }
    }
}

/* Both gate LNs' backward over a row's GH units, from the gradients da_i of g_ih nih and
 * da_h of g_hh nhh (nih, nhh the normalized rows): those of the input projection into
 * dv_i and of the product into hh (which holds nhh on entry), rstd (g da - mean(g da) -
 * n mean(g da n)) each; acc's sums (ln_acc_at) get da_i, da_h, da_i nih and da_h nhh.
 * Nothing written overlaps anything else read (restrict: the loop vectorizes without
 * run-time overlap checks). */
RF_PASS_TARGET static void RF_PASS(ln_gates_backward)(REAL *restrict dv_i,
                                                      const REAL *restrict nih,
                                                      const REAL *restrict da_i,
                                                      REAL *restrict hh,
                                                      const REAL *restrict da_h,
                                                      const REAL *rstd,
                                                      const RF_FN(ln_gains) *ln,
                                                      REAL *restrict acc, ptrdiff_t GH) {
    REAL m1i, m2i, m1h, m2h, ri = rstd[0], rh = rstd[1];
    REAL *restrict s_ai = acc + LN_DAI * GH, *restrict s_ah = acc + LN_DAH * GH;
    REAL *restrict s_gi = acc + LN_DGI * GH, *restrict s_gh = acc + LN_DGH * GH;
    const REAL *restrict g_ih = ln->g_ih, *restrict g_hh = ln->g_hh;
    RF_PASS(ln_back_means)(da_i, ln->g_ih, nih, GH, &m1i, &m2i);
    RF_PASS(ln_back_means)(da_h, ln->g_hh, hh, GH, &m1h, &m2h);
    for (ptrdiff_t k = 0; k < GH; k++) {
        REAL di = da_i[k], dh = da_h[k], xi = nih[k], xh = hh[k];
        dv_i[k] = ri * ((g_ih[k] * di - m1i) - xi * m2i);
        hh[k] = rh * ((g_hh[k] * dh - m1h) - xh * m2h);
        s_ai[k] += di;
        s_ah[k] += dh;
        s_gi[k] += di * xi;
        s_gh[k] += dh * xh;
    }
}

/* One step's backward pass over rows j0 .. j1-1. In: the saved rows of the step (r: g
 * the activations i f g o); dh, dc the gradients reaching h_t and c_t (sorted rows), plus
 * dy where not NULL. Out: g the gradient of W_ih x, prod that of W_hh h_{t-1}, dc that of
 * c_{t-1}; the biases' and gains' gradients added into acc's rows (da, tc: scratch). */
RF_PASS_TARGET static void RF_PASS(ln_lstm_step_backward)(const RF_FN(ln_step_rows) *r,
                                                          const RF_FN(ln_gains) *ln,
                                                          REAL *dh, REAL *dc, const REAL *dy,
                                                          const rf_plan *p, ptrdiff_t s,
                                                          ptrdiff_t j0, ptrdiff_t j1,
                                                          ptrdiff_t H) {
    ptrdiff_t GH = 4 * H;
    for (ptrdiff_t j = j0; j < j1; j++) {
        REAL *g = r->g + j * GH, *da = r->da + j * 2 * GH, *rstd = r->rstd + j * 3;
        REAL *tc = r->tc + j * H, *dh_row = dh + j * H, *dc_row = dc + j * H;
        REAL *acc = r->acc + j * LN_ACC(GH, H);
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        const REAL *c_prev = r->cp + j * H;
        for (ptrdiff_t k = 0; k < H; k++) {  /* h = o tanh(u), u = LN(c) + b_c */
            REAL o = g[3 * H + k], t = tc[k];
            REAL d_h = dh_row[k] + (dy_row ? dy_row[k] : 0);
            da[3 * H + k] = d_h * t * o * (1 - o);
            tc[k] = d_h * o * (1 - t * t);  /* du, the cell bias's gradient */
        }
        RF_PASS(ln_cell_backward)(dc_row, r->nc + j * H, tc, ln->g_c, rstd[2], H,
                                  acc + ln_acc_at(LN_DBC, GH, H),
                                  acc + ln_acc_at(LN_DGC, GH, H));
        for (ptrdiff_t k = 0; k < H; k++) {  /* c = f c_prev + i g */
            REAL i = g[k], f = g[H + k], gt = g[2 * H + k], d_c = dc_row[k];
            da[k] = d_c * gt * i * (1 - i);
            da[H + k] = d_c * c_prev[k] * f * (1 - f);
            da[2 * H + k] = d_c * i * (1 - gt * gt);
            dc_row[k] = d_c * f;
        }
        RF_PASS(ln_gates_backward)(g, r->nih + j * GH, da, r->prod + j * GH, da, rstd, ln,
                                   acc, GH);
    }
}

/* The GRU's, as ln_lstm_step_backward (no dc); dh leaves as the direct part of the
 * gradient of h_{t-1}, z dh. */
RF_PASS_TARGET static void RF_PASS(ln_gru_step_backward)(const RF_FN(ln_step_rows) *r,
                                                         const RF_FN(ln_gains) *ln, REAL *dh,
                                                         const REAL *dy, const rf_plan *p,
                                                         ptrdiff_t s, ptrdiff_t j0,
                                                         ptrdiff_t j1, ptrdiff_t H) {
    ptrdiff_t GH = 3 * H;
    for (ptrdiff_t j = j0; j < j1; j++) {
        REAL *g = r->g + j * GH, *da = r->da + j * 2 * GH, *dhh = da + GH;
        REAL *aux = r->aux + j * H, *dh_row = dh + j * H;
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        const REAL *h = r->hp + j * H;
        for (ptrdiff_t k = 0; k < H; k++) {
            REAL rr = g[k], z = g[H + k], n = g[2 * H + k], hl = aux[k];
            REAL d_h = dh_row[k] + (dy_row ? dy_row[k] : 0);
            REAL dz = d_h * (h[k] - n) * z * (1 - z);   /* h' = (1-z) n + z h */
            REAL dn = d_h * (1 - z) * (1 - n * n);
            REAL dr = dn * hl * rr * (1 - rr);           /* n = tanh(.. + r hl) */
            dh_row[k] = d_h * z;
            da[k] = dr;
            da[H + k] = dz;
            da[2 * H + k] = dn;
            dhh[k] = dr;   /* the recurrent side's gate gradients */
            dhh[H + k] = dz;
            dhh[2 * H + k] = dn * rr;
        }
        RF_PASS(ln_gates_backward)(g, r->nih + j * GH, da, r->prod + j * GH, dhh,
                                   r->rstd + j * 3, ln, r->acc + j * LN_ACC(GH, H), GH);
    }
}

#else /* RF_TEMPLATE: dtype-generic part */

/* The gains (and the LSTM's cell bias) as the passes read them. */
typedef struct {
    const REAL *g_ih, *g_hh, *g_c, *b_c;
} RF_FN(ln_gains);

/* One step's buffers, row j of each at j times its width: the gates, the normalized input
 * projection (training, else NULL), the product (normalized in place) and backward's da
 * (2GH), acc (LN_ACC), rstd (3), the cell's LN rows nc, tc (H), the GRU's aux (H, or NULL),
 * the states entering (hp, cp) and leaving (hn, cn for rows that go on, h_n, c_n by batch
 * row for the others), y. */
typedef struct {
    REAL *g, *nih, *prod, *da, *acc, *rstd, *nc, *tc, *aux;
    const REAL *hp, *cp;
    REAL *hn, *cn, *h_n, *c_n, *y;
} RF_FN(ln_step_rows);

#define RF_PASSES_FILE "layernorm.c"
#include "passes.h"
#include "zoneout.h"
#include "recdrop.h"

/* A step's rows in the workspace: at (packed row of the step's first row) with train,
 * else one step's (gates: from the chunk's first row chunk0). */
static RF_FN(ln_step_rows) RF_FN(ln_rows_of)(REAL *ws, const ln_layout *L, const rf_plan *p,
                                             ptrdiff_t s, ptrdiff_t chunk0, ptrdiff_t H,
                                             int lstm, int train) {
    RF_FN(ln_step_rows) r;
    ptrdiff_t at = train ? p->offsets[s] : 0, BH = p->B * H, GH = (lstm ? 4 : 3) * H;
    r.g = ws + L->gates + (p->offsets[s] - (train ? 0 : chunk0)) * GH;
    r.prod = ws + L->prod + at * GH;
    r.nih = train ? ws + L->nih + at * GH : NULL;
    r.da = ws + L->da;
    r.acc = ws + L->acc;
    r.rstd = ws + L->rstd + at * 3;
    r.nc = ws + L->nc + at * H;
    r.tc = ws + L->tc + at * H;
    r.aux = train && !lstm ? ws + L->aux + at * H : NULL;
    r.hp = ws + L->h + (train ? at * H : (s & 1) * BH);
    r.cp = ws + L->c + (train ? at * H : (s & 1) * BH);
    r.hn = ws + L->h + (train ? p->offsets[s + 1] * H : ((s + 1) & 1) * BH);
    r.cn = ws + L->c + (train ? p->offsets[s + 1] * H : ((s + 1) & 1) * BH);
    r.h_n = r.c_n = r.y = NULL;
    return r;
}

/* The time loop of a forward, steps step0 .. step1-1, for one part's rows. */
typedef struct {
    REAL *y, *h_n, *c_n, *ws;
    const REAL *bias, *b_hn;
    RF_FN(ln_gains) ln;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    ln_layout L;
    ptrdiff_t H, step0, step1;
    int lstm, train;
    const rf_runtime *rt;
} RF_FN(ln_steps_job);

static void RF_FN(ln_steps)(void *arg, int part, int parts) {
    const RF_FN(ln_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, GH = (q->lstm ? 4 : 3) * H, j0, j1;
    int simd = rf_simd(q->rt);
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = q->step0; s < q->step1 && p->batch_sizes[s] > j0; s++) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        ptrdiff_t next_bs = s + 1 < p->steps ? p->batch_sizes[s + 1] : 0;
        RF_FN(ln_step_rows) r = RF_FN(ln_rows_of)(q->ws, &q->L, p, s, p->offsets[q->step0],
                                                  H, q->lstm, q->train);
        r.h_n = q->h_n;
        r.c_n = q->c_n;
        r.y = q->y;
        /* prod = h_{t-1} W_hh^T (h_{t-1} masked with recurrent dropout) */
        const REAL *hm = RF_FN(recdrop_operand)(q->rd, r.hp, p, j0, end, H);
        RF_FN(rf_step_gemm)(q->rt, q->W_hh, 0, end - j0, GH, H, hm + j0 * H, H, 0,
                            r.prod + j0 * GH, GH);
        if (q->lstm)
            RF_PICK(ln_lstm_step, simd)(&r, &q->ln, q->bias, p, s, j0, end, next_bs, H);
        else
            RF_PICK(ln_gru_step, simd)(&r, &q->ln, q->bias, q->b_hn, p, s, j0, end, next_bs,
                                       H);
        const rf_zoneout *zo = q->zo;
        if (zo && zo->c && q->lstm)
            RF_FN(zoneout_forward)(zo, zo->c, r.cp, r.cn, q->c_n, NULL, p, s, j0, end,
                                   next_bs, H);
        if (zo && zo->h)
            RF_FN(zoneout_forward)(zo, zo->h, r.hp, r.hn, q->h_n, q->y, p, s, j0, end,
                                   next_bs, H);
    }
}

void RF_FN(rf_ln_forward)(int cell, const rf_forward_bufs *a, const rf_zoneout *zo,
                          const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                          int train, const rf_runtime *rt) {
    int lstm = cell == RF_LSTM;
    ptrdiff_t G = lstm ? 4 : 3, GH = G * H;
    ln_layout L = ln_layout_of(lstm, p, I, H, train);
    REAL *ws = a->ws;
    const REAL *b_hh = a->b_hh;
    const REAL *bias = RF_FN(rf_fold_biases)(ws + L.bias, a->b_ih, b_hh, GH,
                                             lstm ? GH : 2 * H);
    RF_FN(rf_initial_state)(ws + L.h, a->h_n, a->h0, p, H);
    if (lstm) RF_FN(rf_initial_state)(ws + L.c, a->c_n, a->c0, p, H);
    rf_weight W[3];
    RF_FN(rf_prepare_weights)(W, a->w_ih, a->w_hh, G, H, I, 1, ws + L.weights, a->packed,
                              p, rt->avx2);
    const rf_layernorm *ln = &a->layernorm;
    RF_FN(ln_steps_job) job = {a->y, a->h_n, lstm ? a->c_n : NULL, ws, bias,
                               !lstm && b_hh ? b_hh + 2 * H : NULL,
                               {ln->g_ih, ln->g_hh, ln->g_c, ln->b_c}, zo, rd, &W[0], p, L,
                               H, 0, 0, lstm, train, rt};
    for (ptrdiff_t step0 = 0; step0 < p->steps;) {
        ptrdiff_t step1 = rf_chunk_end(p, step0, train);
        RF_FN(rf_project)(ws + L.gates, ws + L.xbuf, a->x, &W[2], p, step0, step1, I, GH,
                          train, rt);
        job.step0 = step0;
        job.step1 = step1;
        rf_run_parts(RF_FN(ln_steps), &job,
                     rf_step_parts(p, step0, step1, 2.0 * GH * H, train, rt));
        step0 = step1;
    }
}

/* The time loop of a backward, for one part's rows. */
typedef struct {
    REAL *ws, *dh, *dc;
    const REAL *dy;
    RF_FN(ln_gains) ln;
    const rf_zoneout *zo;
    const rf_recdrop *rd;
    const rf_weight *W_hh;
    const rf_plan *p;
    ln_layout L;
    ptrdiff_t H;
    int lstm;
    const rf_runtime *rt;
} RF_FN(ln_back_steps_job);

static void RF_FN(ln_back_steps)(void *arg, int part, int parts) {
    const RF_FN(ln_back_steps_job) *q = arg;
    const rf_plan *p = q->p;
    ptrdiff_t H = q->H, GH = (q->lstm ? 4 : 3) * H, B = p->B, j0, j1;
    int simd = rf_simd(q->rt);
    const rf_zoneout *zo = q->zo;
    REAL *carry_h = zo ? (REAL *)zo->carry : NULL, *carry_c = zo ? carry_h + B * H : NULL;
    rf_part_rows(p, part, parts, &j0, &j1);
    for (ptrdiff_t s = p->steps - 1; s >= 0; s--) {
        ptrdiff_t bs = p->batch_sizes[s], end = bs < j1 ? bs : j1;
        if (end <= j0) continue;
        RF_FN(ln_step_rows) r = RF_FN(ln_rows_of)(q->ws, &q->L, p, s, 0, H, q->lstm, 1);
        const REAL *dy = q->dy;
        int zo_h = zo && zo->h, zo_c = zo && zo->c && q->lstm;
        if (zo_h) {
            RF_FN(zoneout_backward)(zo, zo->h, q->dh, carry_h, dy, p, s, j0, end, H);
            dy = NULL;
        }
        if (zo_c) RF_FN(zoneout_backward)(zo, zo->c, q->dc, carry_c, NULL, p, s, j0, end, H);
        if (q->lstm)
            RF_PICK(ln_lstm_step_backward, simd)(&r, &q->ln, q->dh, q->dc, dy, p, s, j0, end,
                                                 H);
        else
            RF_PICK(ln_gru_step_backward, simd)(&r, &q->ln, q->dh, dy, p, s, j0, end, H);
        if (zo_c) RF_FN(zoneout_carry)(q->dc, carry_c, j0, end, H, 1);
        /* the LSTM's dh_{t-1} is the product's (+ zoneout's carry); the GRU's adds it to
         * z dh */
        int add = !q->lstm || zo_h;
        if (zo_h) RF_FN(zoneout_carry)(q->dh, carry_h, j0, end, H, q->lstm ? 0 : 1);
        /* dh_{t-1} (+)= d(W_hh h_{t-1}) W_hh (times the recurrent dropout's mask) */
        RF_FN(recdrop_back_gemm)(q->rt, q->W_hh, 0, GH, r.prod + j0 * GH, GH, add, q->dh,
                                 q->rd, p, j0, end, H);
    }
}

void RF_FN(rf_ln_backward)(int cell, const rf_backward_bufs *a, const rf_zoneout *zo,
                           const rf_recdrop *rd, const rf_plan *p, ptrdiff_t I, ptrdiff_t H,
                           const rf_runtime *rt) {
    int lstm = cell == RF_LSTM;
    ptrdiff_t G = lstm ? 4 : 3, GH = G * H, B = p->B, N = p->rows;
    ln_layout L = ln_layout_of(lstm, p, I, H, 1);
    REAL *ws = a->ws, *scratch = a->scratch, *dh = scratch, *dc = scratch + B * H;
    const rf_layernorm *ln = &a->layernorm;
    rf_weight W;
    RF_FN(rf_prepare_weight)(&W, a->w_hh, H, 0, GH, H, scratch + 2 * B * H, NULL, rt->avx2);
    /* A row's final-state gradient enters at its last step; until then it waits here. */
    RF_FN(rf_sort_rows)(dh, a->dh_n, p, H);
    if (lstm) RF_FN(rf_sort_rows)(dc, a->dc_n, p, H);
    memset(ws + L.acc, 0, (size_t)(B * LN_ACC(GH, H)) * sizeof(REAL));
    RF_FN(ln_back_steps_job) job = {ws, dh, dc, a->dy, {ln->g_ih, ln->g_hh, ln->g_c, ln->b_c},
                                    zo, rd, &W, p, L, H, lstm, rt};
    rf_run_parts(RF_FN(ln_back_steps), &job,
                 rf_step_parts(p, 0, p->steps, 2.0 * GH * H, 0, rt));
    RF_FN(rf_unsort_rows)(a->dh0, dh, p, H);
    if (lstm) RF_FN(rf_unsort_rows)(a->dc0, dc, p, H);
    /* dW_hh = sum_t d(W_hh h_{t-1})^T h_{t-1} (masked with recurrent dropout) */
    const REAL *h_prev = RF_FN(recdrop_all_operands)(rd, ws + L.h, p, H);
    RF_FN(rf_grad_gemm)(rt, 1, GH, H, N, ws + L.prod, GH, h_prev, H, a->dw_hh, H);
    RF_FN(rf_weight_grads)(a->dx, a->dw_ih, ws + L.xbuf, ws + L.xbuf, ws + L.gates, a->x,
                           a->w_ih, p, I, GH, rt);
    /* the biases' and gains' gradients: the rows of sums joined (the GRU's b_hn is
     * inside the reset gate: the recurrent side's n block) */
    const REAL *acc = ws + L.acc;
    ptrdiff_t width = LN_ACC(GH, H);
    REAL *outs[6] = {a->db_ih, a->db_hh, ln->dg_ih, ln->dg_hh, ln->db_c, ln->dg_c};  /* LN_* */
    for (int k = LN_DAI; k <= (lstm ? LN_DGC : LN_DGH); k++)
        if (outs[k])
            RF_FN(rf_column_sums)(outs[k], acc + ln_acc_at(k, GH, H), B,
                                  k < LN_DBC ? GH : H, width, rt->avx2);
}

#endif /* RF_TEMPLATE */
