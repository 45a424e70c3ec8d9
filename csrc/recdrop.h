/* recdrop.h -- variational recurrent dropout, for every cell; included by each cell file
 * in its dtype-generic part (once per dtype, so without an include guard).
 *
 * h_{t-1} enters the recurrent product as h_{t-1} m, m (B,H) one row per batch row, the
 * same at every step (sorted row j reads batch row order[j]). The forward masks a step's
 * rows into a buffer the product reads; the backward multiplies the gradient the product
 * gives h_{t-1} by m, and dW_hh takes the masked h of every packed row. */

/* dst's rows j0 .. j1-1 = src's, each times its batch row's mask (sorted rows). */
static void RF_FN(recdrop_rows)(REAL *dst, const REAL *src, const REAL *m, const rf_plan *p,
                                ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *mr = m + p->order[j] * H, *in = src + j * H;
        REAL *out = dst + j * H;
        for (ptrdiff_t u = 0; u < H; u++) out[u] = in[u] * mr[u];
    }
}

/* d's rows j0 .. j1-1 get g's times the mask, added (add) or in place of what is there. */
static void RF_FN(recdrop_grad)(REAL *d, const REAL *g, const REAL *m, const rf_plan *p,
                                ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H, int add) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *mr = m + p->order[j] * H, *in = g + j * H;
        REAL *out = d + j * H;
        if (add)
            for (ptrdiff_t u = 0; u < H; u++) out[u] += in[u] * mr[u];
        else
            for (ptrdiff_t u = 0; u < H; u++) out[u] = in[u] * mr[u];
    }
}

/* The masked h_{t-1} of every packed row (h: the training forward's, packed as its
 * workspace keeps them) into dst (rows, H). */
static void RF_FN(recdrop_all)(REAL *dst, const REAL *h, const REAL *m, const rf_plan *p,
                               ptrdiff_t H) {
    for (ptrdiff_t s = 0; s < p->steps; s++) {
        ptrdiff_t at = p->offsets[s] * H;
        RF_FN(recdrop_rows)(dst + at, h + at, m, p, 0, p->batch_sizes[s], H);
    }
}

/* A forward step's product operand: hp (rows j0 .. j1-1 of h_{t-1}, sorted), or with
 * recurrent dropout those rows masked into rd's buffer. */
static const REAL *RF_FN(recdrop_operand)(const rf_recdrop *rd, const REAL *hp,
                                          const rf_plan *p, ptrdiff_t j0, ptrdiff_t j1,
                                          ptrdiff_t H) {
    if (!rd) return hp;
    RF_FN(recdrop_rows)((REAL *)rd->buf, hp, rd->m, p, j0, j1, H);
    return rd->buf;
}

/* Backward: h_{t-1} of every packed row as the recurrent product saw it (dW_hh's operand):
 * h itself, or with recurrent dropout masked into rd's buffer (its first rows*H). */
static const REAL *RF_FN(recdrop_all_operands)(const rf_recdrop *rd, const REAL *h,
                                               const rf_plan *p, ptrdiff_t H) {
    if (!rd) return h;
    RF_FN(recdrop_all)((REAL *)rd->buf, h, rd->m, p, H);
    return rd->buf;
}

/* Backward: rows j0 .. j1-1 of dh (+)= A W (K columns of W from k0: the gradient the
 * product gives h_{t-1}), with recurrent dropout through rd's buffer (after its first
 * rows*H) and times the mask. add: onto dh, else in place of it. */
static void RF_FN(recdrop_back_gemm)(const rf_runtime *rt, const rf_weight *W, ptrdiff_t k0,
                                     ptrdiff_t K, const REAL *A, ptrdiff_t lda, int add,
                                     REAL *dh, const rf_recdrop *rd, const rf_plan *p,
                                     ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H) {
    if (!rd) {
        RF_FN(rf_step_gemm)(rt, W, k0, j1 - j0, H, K, A, lda, add, dh + j0 * H, H);
        return;
    }
    REAL *prod = (REAL *)rd->buf + p->rows * H;
    RF_FN(rf_step_gemm)(rt, W, k0, j1 - j0, H, K, A, lda, 0, prod + j0 * H, H);
    RF_FN(recdrop_grad)(dh, prod, rd->m, p, j0, j1, H, add);
}
