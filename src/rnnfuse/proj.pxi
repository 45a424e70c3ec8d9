# The LSTM with a projection (PyTorch's proj_size), included by _kernels.pyx: lstmp.c's
# forward and backward. functional.py validates and takes the ctx's state; these wrappers
# re-check what keeps C inside its buffers, as forward and backward do.

cdef extern from "lstmp.h" nogil:
    Py_ssize_t rf_lstmp_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                                  int train)
    Py_ssize_t rf_lstmp_backward_scratch(const rf_plan *p, Py_ssize_t H, Py_ssize_t P)
    # The kernels' arrays declared as void * (C converts them to the dtype's pointers), so
    # that the float and the double call read alike.
    void rf_lstmp_forward_f32(void *y, void *h_n, void *c_n, void *ws, const void *x,
                              const void *h0, const void *c0, const void *w_ih,
                              const void *w_hh, const void *w_hr, const void *b_ih,
                              const void *b_hh, const void *peep, const void *packed,
                              const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                              int train, const rf_runtime *rt)
    void rf_lstmp_forward_f64(void *y, void *h_n, void *c_n, void *ws, const void *x,
                              const void *h0, const void *c0, const void *w_ih,
                              const void *w_hh, const void *w_hr, const void *b_ih,
                              const void *b_hh, const void *peep, const void *packed,
                              const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                              int train, const rf_runtime *rt)
    void rf_lstmp_backward_f32(void *dx, void *dh0, void *dc0, void *dw_ih, void *dw_hh,
                               void *dw_hr, void *db_ih, void *db_hh, void *dpeep,
                               const void *dy, const void *dh_n, const void *dc_n, void *ws,
                               void *scratch, const void *x, const void *w_ih,
                               const void *w_hh, const void *w_hr, const void *peep,
                               const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                               const rf_runtime *rt)
    void rf_lstmp_backward_f64(void *dx, void *dh0, void *dc0, void *dw_ih, void *dw_hh,
                               void *dw_hr, void *db_ih, void *db_hh, void *dpeep,
                               const void *dy, const void *dh_n, const void *dc_n, void *ws,
                               void *scratch, const void *x, const void *w_ih,
                               const void *w_hh, const void *w_hr, const void *peep,
                               const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                               const rf_runtime *rt)


def lstmp_workspace_size(Plan plan not None, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                         bint train):
    """Elements of the projected LSTM forward's workspace (with train: its ctx)."""
    cdef rf_plan p = plan.view()
    return rf_lstmp_workspace(&p, I, H, P, train)


cdef int _check_proj_shapes(w_ih, w_hh, w_hr, Py_ssize_t I, Py_ssize_t H,
                            Py_ssize_t P) except -1:
    if not (cnp.PyArray_Check(w_ih) and cnp.PyArray_Check(w_hh) and cnp.PyArray_Check(w_hr)
            and w_ih.shape == (4 * H, I) and w_hh.shape == (4 * H, P)
            and w_hr.shape == (P, H) and 0 < P < H):
        raise ValueError(f"_kernels: w_ih, w_hh and w_hr must be {(4 * H, I)}, "
                         f"{(4 * H, P)} and {(P, H)} with 0 < P < H, got "
                         f"{getattr(w_ih, 'shape', w_ih)}, {getattr(w_hh, 'shape', w_hh)} "
                         f"and {getattr(w_hr, 'shape', w_hr)}")
    return 0


def lstmp_forward(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, peep, Plan plan not None, ws,
                  Py_ssize_t I, Py_ssize_t H, Py_ssize_t P, bint train):
    """One forward of the projected LSTM over ws (lstmp_workspace_size elements): returns
    y (T,B,P, zero at padding), h_n (B,P) and c_n (B,H)."""
    cdef int t = _typenum(x)
    cdef Py_ssize_t T = plan.T, B = plan.B, G = 4
    _check_proj_shapes(w_ih, w_hh, w_hr, I, H, P)
    y = _empty(t, 3, T, B, P, zeros=plan.rows < T * B)  # the kernel skips padding
    h_n = _empty(t, 2, B, P)
    c_n = _empty(t, 2, B, H)
    cdef rf_plan p = plan.view()
    cdef void *a_y = _buf(y, T * B * P, t, "y", _OUT)
    cdef void *a_hn = _buf(h_n, B * P, t, "h_n", _OUT)
    cdef void *a_cn = _buf(c_n, B * H, t, "c_n", _OUT)
    cdef void *a_ws = _buf(ws, rf_lstmp_workspace(&p, I, H, P, train), t, "ws", _OUT)
    cdef void *a_x = _buf(x, T * B * I, t, "x", _REQUIRED)
    cdef void *a_h0 = _buf(h0, B * P, t, "h0", _OPTIONAL)
    cdef void *a_c0 = _buf(c0, B * H, t, "c0", _OPTIONAL)
    cdef void *a_wih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    cdef void *a_whh = _buf(w_hh, G * H * P, t, "w_hh", _REQUIRED)
    cdef void *a_whr = _buf(w_hr, P * H, t, "w_hr", _REQUIRED)
    cdef void *a_bih = _buf(b_ih, G * H, t, "b_ih", _OPTIONAL)
    cdef void *a_bhh = _buf(b_hh, G * H, t, "b_hh", _OPTIONAL)
    cdef void *a_peep = _buf(peep, 3 * H, t, "peep", _OPTIONAL)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rf_lstmp_forward_f32(a_y, a_hn, a_cn, a_ws, a_x, a_h0, a_c0, a_wih, a_whh, a_whr,
                                 a_bih, a_bhh, a_peep, NULL, &p, I, H, P, train, &_rt)
        else:
            rf_lstmp_forward_f64(a_y, a_hn, a_cn, a_ws, a_x, a_h0, a_c0, a_wih, a_whh, a_whr,
                                 a_bih, a_bhh, a_peep, NULL, &p, I, H, P, train, &_rt)
    return y, h_n, c_n


def lstmp_backward(dy, dh_n, dc_n, ws, x, w_ih, w_hh, w_hr, peep, Plan plan not None,
                   Py_ssize_t I, Py_ssize_t H, Py_ssize_t P, bint has_b_ih, bint has_b_hh):
    """One backward over a training lstmp_forward's ws (overwritten): returns dx, dh0,
    dc0, dw_ih, dw_hh, dw_hr, db_ih, db_hh (None for an absent bias) and dpeep (None
    without peep). dy, dh_n, dc_n: None or C-contiguous arrays of the call's dtype."""
    cdef int t = _typenum(x)
    cdef Py_ssize_t T = plan.T, B = plan.B, G = 4
    _check_proj_shapes(w_ih, w_hh, w_hr, I, H, P)
    cdef rf_plan p = plan.view()
    scratch = _aligned_empty(rf_lstmp_backward_scratch(&p, H, P), t)
    dx = _empty(t, 3, T, B, I, zeros=plan.rows < T * B)  # padding's gradient is zero
    dh0, dc0 = _empty(t, 2, B, P), _empty(t, 2, B, H)
    dw_ih, dw_hh, dw_hr = _empty(t, 2, G * H, I), _empty(t, 2, G * H, P), _empty(t, 2, P, H)
    db_ih = _empty(t, 1, G * H, 0) if has_b_ih else None
    db_hh = _empty(t, 1, G * H, 0) if has_b_hh else None
    dpeep = _empty(t, 1, 3 * H, 0) if peep is not None else None
    cdef void *a_dx = _buf(dx, T * B * I, t, "dx", _OUT)
    cdef void *a_dh0 = _buf(dh0, B * P, t, "dh0", _OUT)
    cdef void *a_dc0 = _buf(dc0, B * H, t, "dc0", _OUT)
    cdef void *a_dwih = _buf(dw_ih, G * H * I, t, "dw_ih", _OUT)
    cdef void *a_dwhh = _buf(dw_hh, G * H * P, t, "dw_hh", _OUT)
    cdef void *a_dwhr = _buf(dw_hr, P * H, t, "dw_hr", _OUT)
    cdef void *a_dbih = _buf(db_ih, G * H, t, "db_ih", _OPTIONAL | _OUT)
    cdef void *a_dbhh = _buf(db_hh, G * H, t, "db_hh", _OPTIONAL | _OUT)
    cdef void *a_dpeep = _buf(dpeep, 3 * H, t, "dpeep", _OPTIONAL | _OUT)
    cdef void *a_dy = _buf(dy, T * B * P, t, "dy", _OPTIONAL)
    cdef void *a_dhn = _buf(dh_n, B * P, t, "dh_n", _OPTIONAL)
    cdef void *a_dcn = _buf(dc_n, B * H, t, "dc_n", _OPTIONAL)
    cdef void *a_ws = _buf(ws, rf_lstmp_workspace(&p, I, H, P, True), t, "ws", _OUT)
    cdef void *a_sc = _buf(scratch, rf_lstmp_backward_scratch(&p, H, P), t, "scratch", _OUT)
    cdef void *a_x = _buf(x, T * B * I, t, "x", _REQUIRED)
    cdef void *a_wih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    cdef void *a_whh = _buf(w_hh, G * H * P, t, "w_hh", _REQUIRED)
    cdef void *a_whr = _buf(w_hr, P * H, t, "w_hr", _REQUIRED)
    cdef void *a_peep = _buf(peep, 3 * H, t, "peep", _OPTIONAL)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rf_lstmp_backward_f32(a_dx, a_dh0, a_dc0, a_dwih, a_dwhh, a_dwhr, a_dbih, a_dbhh,
                                  a_dpeep, a_dy, a_dhn, a_dcn, a_ws, a_sc, a_x, a_wih, a_whh,
                                  a_whr, a_peep, &p, I, H, P, &_rt)
        else:
            rf_lstmp_backward_f64(a_dx, a_dh0, a_dc0, a_dwih, a_dwhh, a_dwhr, a_dbih, a_dbhh,
                                  a_dpeep, a_dy, a_dhn, a_dcn, a_ws, a_sc, a_x, a_wih, a_whh,
                                  a_whr, a_peep, &p, I, H, P, &_rt)
    return dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db_ih, db_hh, dpeep
