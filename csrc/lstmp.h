/* lstmp.h -- the LSTM with a projection (PyTorch's proj_size, "LSTMP"), lstmp.c.
 *
 * P < H: W_hh is (4H, P), W_hr (P, H); the cell c is (B,H), the state h and y are P wide:
 *   m_t = o_t tanh(c_t) (the plain cell's h),  h_t = W_hr m_t,  y[t] = h_t.
 * Buffers as rnnfuse.h's LSTM forward and backward take them, with h0, h_n, dh0, dh_n
 * (B,P), y and dy (T,B,P), w_hh and dw_hh (4H,P), and w_hr, dw_hr (P,H); n_in is I
 * (complex.h, which Cython's C includes first, defines I). */
#ifndef RNNFUSE_LSTMP_H
#define RNNFUSE_LSTMP_H

#include "rnnfuse.h"

ptrdiff_t rf_lstmp_workspace(const rf_plan *p, ptrdiff_t n_in, ptrdiff_t H, ptrdiff_t P,
                             int train);
ptrdiff_t rf_lstmp_backward_scratch(const rf_plan *p, ptrdiff_t H, ptrdiff_t P);
/* Elements of rf_lstmp_pack's packed weights, which forwards reuse (streams: once). */
ptrdiff_t rf_lstmp_pack_size(ptrdiff_t n_in, ptrdiff_t H, ptrdiff_t P);

#define RF_DECLARE_LSTMP(REAL, SFX)                                                         \
    void rf_lstmp_forward_##SFX(REAL *y, REAL *h_n, REAL *c_n, REAL *ws,                    \
                                const REAL *x, const REAL *h0, const REAL *c0,              \
                                const REAL *w_ih, const REAL *w_hh, const REAL *w_hr,       \
                                const REAL *b_ih, const REAL *b_hh, const REAL *peep,       \
                                const REAL *packed, const rf_plan *p, ptrdiff_t n_in,       \
                                ptrdiff_t H, ptrdiff_t P, int train, const rf_runtime *rt); \
    /* packed: NULL (the forward packs into ws), or this, from a packed on a cache line    \
     * (its three parts then start on lines, where the forward reads them), or for float32  \
     * rf_q8_pack_weights' int8 weights (P > 0; w_ih, w_hh, w_hr then unread) */            \
    void rf_lstmp_pack_##SFX(REAL *packed, const REAL *w_ih, const REAL *w_hh,              \
                             const REAL *w_hr, ptrdiff_t n_in, ptrdiff_t H, ptrdiff_t P,    \
                             int avx2);                                                     \
    void rf_lstmp_backward_##SFX(REAL *dx, REAL *dh0, REAL *dc0, REAL *dw_ih, REAL *dw_hh,  \
                                 REAL *dw_hr, REAL *db_ih, REAL *db_hh, REAL *dpeep,        \
                                 const REAL *dy, const REAL *dh_n, const REAL *dc_n,        \
                                 REAL *ws, REAL *scratch, const REAL *x,                    \
                                 const REAL *w_ih, const REAL *w_hh, const REAL *w_hr,      \
                                 const REAL *peep, const rf_plan *p, ptrdiff_t n_in,        \
                                 ptrdiff_t H, ptrdiff_t P, const rf_runtime *rt);           \
    /* lstm.c's pointwise passes (its lstm_step, lstm_step_backward) on rt's code path,     \
     * and the peepholes' gradient after a backward's loop. */                              \
    void rf_lstm_pointwise_##SFX(REAL *g, REAL *tanh_c, const REAL *cp, REAL *hn,           \
                                 REAL *cn, REAL *y, REAL *h_n, REAL *c_n, const REAL *bias, \
                                 const REAL *peep, const rf_plan *p, ptrdiff_t s,           \
                                 ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t next_bs,             \
                                 ptrdiff_t H, const rf_runtime *rt);                        \
    void rf_lstm_pointwise_backward_##SFX(REAL *g, REAL *dh, REAL *dc, REAL *tanh_c,        \
                                          const REAL *cp, const REAL *peep,                 \
                                          const REAL *dy, const rf_plan *p, ptrdiff_t s,    \
                                          ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t H,          \
                                          const rf_runtime *rt);                            \
    void rf_lstm_peep_grads_##SFX(REAL *dpeep, const REAL *dgates, const REAL *c_prev,      \
                                  const REAL *c_new, ptrdiff_t rows, ptrdiff_t H);

RF_DECLARE_LSTMP(float, f32)
RF_DECLARE_LSTMP(double, f64)

#endif /* RNNFUSE_LSTMP_H */
