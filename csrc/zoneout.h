/* zoneout.h -- zoneout on a step's new states, for every cell; included by each cell file
 * in its dtype-generic part (once per dtype, so without an include guard).
 *
 * A unit of a state keeps its previous value with weight k:  s_t = k s_{t-1} + (1-k) s~_t,
 * s~_t the cell's new state. k comes from an rf_zoneout's z: in training a 0/1 mask per
 * step, row and unit, (T,B,H) read at the row's time and batch row (as y); in eval one (H,)
 * row for all (every unit p). The cell's output y_t is the state s_t.
 * Backward: the gradient reaching s_t splits into (1-k) for s~_t, which the cell's pass
 * takes, and k for s_{t-1}, which waits in carry (sorted rows) and joins the gradient the
 * pass and the product give s_{t-1}. */
#include <string.h>

/* The weights k of sorted row j at step s. */
static inline const REAL *RF_FN(zoneout_row)(const rf_zoneout *z, const REAL *zk,
                                             const rf_plan *p, ptrdiff_t j, ptrdiff_t s,
                                             ptrdiff_t H) {
    return z->shared ? zk : zk + (rf_time(p, j, s) * p->B + p->order[j]) * H;
}

/* After a step's pass over rows j0 .. j1-1 wrote s~ (to next's rows j < next_bs, to the
 * final states' batch rows for the others, and to y where y is not NULL): mix in the
 * previous states prev (sorted rows) and write the result to the same places. */
static void RF_FN(zoneout_forward)(const rf_zoneout *z, const REAL *zk, const REAL *prev,
                                   REAL *next, REAL *final, REAL *y, const rf_plan *p,
                                   ptrdiff_t s, ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t next_bs,
                                   ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        ptrdiff_t b = p->order[j];
        const REAL *k = RF_FN(zoneout_row)(z, zk, p, j, s, H), *old = prev + j * H;
        REAL *out = j < next_bs ? next + j * H : final + b * H;
        for (ptrdiff_t u = 0; u < H; u++) out[u] = k[u] * old[u] + (1 - k[u]) * out[u];
        if (y) memcpy(y + (rf_time(p, j, s) * p->B + b) * H, out, (size_t)H * sizeof(REAL));
    }
}

/* Before a step's backward pass over rows j0 .. j1-1: d (sorted rows), plus dy where not
 * NULL, is the gradient of s_t; d leaves holding that of s~_t, carry that of s_{t-1}
 * through zoneout. The pass then runs without dy. */
static void RF_FN(zoneout_backward)(const rf_zoneout *z, const REAL *zk, REAL *d,
                                    REAL *carry, const REAL *dy, const rf_plan *p,
                                    ptrdiff_t s, ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H) {
    for (ptrdiff_t j = j0; j < j1; j++) {
        const REAL *k = RF_FN(zoneout_row)(z, zk, p, j, s, H);
        const REAL *dy_row = dy ? dy + (rf_time(p, j, s) * p->B + p->order[j]) * H : NULL;
        REAL *d_row = d + j * H, *c_row = carry + j * H;
        for (ptrdiff_t u = 0; u < H; u++) {
            REAL g = d_row[u] + (dy_row ? dy_row[u] : 0);
            c_row[u] = k[u] * g;
            d_row[u] = (1 - k[u]) * g;
        }
    }
}

/* After the pass: rows j0 .. j1-1 of d get carry, added (add) or in place of what is
 * there (the product that follows then accumulates onto it). */
static void RF_FN(zoneout_carry)(REAL *d, const REAL *carry, ptrdiff_t j0, ptrdiff_t j1,
                                 ptrdiff_t H, int add) {
    if (!add) {
        memcpy(d + j0 * H, carry + j0 * H, (size_t)((j1 - j0) * H) * sizeof(REAL));
        return;
    }
    for (ptrdiff_t u = j0 * H; u < j1 * H; u++) d[u] += carry[u];
}
