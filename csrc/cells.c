/* cells.c -- the cell table, and the one entry point per pass that dispatches a call to
 * its cell's kernels. The dtype-generic part below RF_TEMPLATE is compiled twice, for
 * float and for double. */
#ifndef RF_TEMPLATE
#include "rnnfuse.h"

/* No pointers in the table: it stays read-only data in the shared object. */
const rf_cell rf_cells[RF_NUM_CELLS] = {
    {RF_LSTM, "lstm", 4, 2},
    {RF_GRU, "gru", 3, 1},
    {RF_RNN, "rnn", 1, 1},
};

const rf_cell *rf_cell_find(int id) {
    for (int i = 0; i < RF_NUM_CELLS; i++)
        if (rf_cells[i].id == id) return &rf_cells[i];
    return NULL;
}

ptrdiff_t rf_workspace(int cell, const rf_plan *p, ptrdiff_t I, ptrdiff_t H, int train) {
    switch (cell) {
        case RF_LSTM: return rf_lstm_workspace(p, I, H, train);
        case RF_GRU: return rf_gru_workspace(p, I, H, train);
        case RF_RNN: return rf_rnn_workspace(p, I, H, train);
        default: return -1;
    }
}

#define RF_TEMPLATE_FILE "cells.c"
#include "instantiate.h"

#else /* RF_TEMPLATE: dtype-generic part */

/* A call's zoneout, or NULL where it has none. */
static const rf_zoneout *RF_FN(zoneout_of)(const rf_zoneout *z) {
    return z->h || z->c ? z : NULL;
}

/* A call's recurrent dropout, or NULL where it has none. */
static const rf_recdrop *RF_FN(recdrop_of)(const rf_recdrop *r) {
    return r->m ? r : NULL;
}

int RF_FN(rf_forward)(int cell, int option, const rf_forward_bufs *a, const rf_plan *p,
                      ptrdiff_t I, ptrdiff_t H, int train, const rf_runtime *rt) {
    const rf_runtime call = *rt;  /* one code path for the whole call */
    if (a->layernorm.g_ih) {  /* the LSTM, or the GRU with linear_before_reset */
        if (cell != RF_LSTM && !(cell == RF_GRU && option)) return -1;
        RF_FN(rf_ln_forward)(cell, a, RF_FN(zoneout_of)(&a->zoneout),
                             RF_FN(recdrop_of)(&a->recdrop), p, I, H, train, &call);
        return 0;
    }
    switch (cell) {
        case RF_LSTM:
            RF_FN(rf_lstm_forward)(a->y, a->h_n, a->c_n, a->ws, a->x, a->h0, a->c0, a->w_ih,
                                   a->w_hh, a->b_ih, a->b_hh, a->peep, a->packed,
                                   RF_FN(zoneout_of)(&a->zoneout),
                                   RF_FN(recdrop_of)(&a->recdrop), p, I, H, train, &call);
            return 0;
        case RF_GRU:
            RF_FN(rf_gru_forward)(a->y, a->h_n, a->ws, a->x, a->h0, a->w_ih, a->w_hh, a->b_ih,
                                  a->b_hh, a->packed, RF_FN(zoneout_of)(&a->zoneout),
                                  RF_FN(recdrop_of)(&a->recdrop), p, I, H, option, train,
                                  &call);
            return 0;
        case RF_RNN:
            RF_FN(rf_rnn_forward)(a->y, a->h_n, a->ws, a->x, a->h0, a->w_ih, a->w_hh, a->b_ih,
                                  a->b_hh, a->packed, RF_FN(zoneout_of)(&a->zoneout),
                                  RF_FN(recdrop_of)(&a->recdrop), p, I, H, option, train,
                                  &call);
            return 0;
        default:
            return -1;
    }
}

int RF_FN(rf_backward)(int cell, int option, const rf_backward_bufs *a, const rf_plan *p,
                       ptrdiff_t I, ptrdiff_t H, const rf_runtime *rt) {
    const rf_runtime call = *rt;
    if (a->layernorm.g_ih) {
        if (cell != RF_LSTM && !(cell == RF_GRU && option)) return -1;
        RF_FN(rf_ln_backward)(cell, a, RF_FN(zoneout_of)(&a->zoneout),
                              RF_FN(recdrop_of)(&a->recdrop), p, I, H, &call);
        return 0;
    }
    switch (cell) {
        case RF_LSTM:
            RF_FN(rf_lstm_backward)(a->dx, a->dh0, a->dc0, a->dw_ih, a->dw_hh, a->db_ih,
                                    a->db_hh, a->dpeep, a->dy, a->dh_n, a->dc_n, a->ws,
                                    a->out, a->scratch, a->x, a->w_ih, a->w_hh, a->peep,
                                    RF_FN(zoneout_of)(&a->zoneout),
                                    RF_FN(recdrop_of)(&a->recdrop), p, I, H, &call);
            return 0;
        case RF_GRU:
            RF_FN(rf_gru_backward)(a->dx, a->dh0, a->dw_ih, a->dw_hh, a->db_ih, a->db_hh,
                                   a->dy, a->dh_n, a->ws, a->out, a->scratch, a->x, a->w_ih,
                                   a->w_hh, RF_FN(zoneout_of)(&a->zoneout),
                                   RF_FN(recdrop_of)(&a->recdrop), p, I, H, option,
                                   &call);
            return 0;
        case RF_RNN:
            RF_FN(rf_rnn_backward)(a->dx, a->dh0, a->dw_ih, a->dw_hh, a->db_ih, a->db_hh,
                                   a->dy, a->dh_n, a->ws, a->out, a->scratch, a->x, a->w_ih,
                                   a->w_hh, RF_FN(zoneout_of)(&a->zoneout),
                                   RF_FN(recdrop_of)(&a->recdrop), p, I, H, option,
                                   &call);
            return 0;
        default:
            return -1;
    }
}

#endif /* RF_TEMPLATE */
