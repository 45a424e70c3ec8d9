# The only Cython that touches C: flat, typed, C-contiguous buffers in, the GIL released
# once for the whole kernel, C called. Everything here trusts functional.py, which has
# validated dtypes, shapes and lengths and allocated every output and workspace.
#
# Arrays are passed flat (reshape(-1) of C-contiguous arrays) and an absent optional
# array (h0, c0, a bias, dy, dh_n, dc_n, a bias gradient) is passed as an empty array of
# the call's dtype: it reaches C as NULL.
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

import numpy as np

ctypedef fused floating:
    float
    double

cdef extern from "rnnfuse.h" nogil:
    ctypedef void (*rf_sgemm_fn)(char*, char*, int*, int*, int*, float*, float*, int*,
                                 float*, int*, float*, float*, int*)
    ctypedef void (*rf_dgemm_fn)(char*, char*, int*, int*, int*, double*, double*, int*,
                                 double*, int*, double*, double*, int*)
    ctypedef struct rf_blas:
        rf_sgemm_fn sgemm
        rf_dgemm_fn dgemm
    ctypedef struct rf_plan:
        Py_ssize_t T, B, steps, rows
        int reverse
        const int64_t *order
        const int64_t *lengths
        const int64_t *batch_sizes
        const int64_t *offsets

    Py_ssize_t rf_plan_build(Py_ssize_t T, Py_ssize_t B, const int64_t *lengths,
                             int64_t *order, int64_t *batch_sizes, int64_t *offsets,
                             int64_t *count)
    const char *rf_simd_path()
    const char *RNNFUSE_COMPILE_ARGS
    Py_ssize_t rf_lstm_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_gru_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_rnn_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_backward_scratch(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t G)
    void rf_sigmoid_f32(float *a, Py_ssize_t n)
    void rf_tanh_f32(float *a, Py_ssize_t n)
    void rf_sigmoid_f64(double *a, Py_ssize_t n)
    void rf_tanh_f64(double *a, Py_ssize_t n)
    Py_ssize_t rf_gemm_floor_size(Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                  Py_ssize_t G)
    void rf_gemm_floor_f32(const rf_blas *blas, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, float *buf)
    void rf_gemm_floor_f64(const rf_blas *blas, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, double *buf)

    void rf_lstm_forward_f32(float *y, float *h_n, float *c_n, float *ws, const float *x,
                             const float *h0, const float *c0, const float *w_ih,
                             const float *w_hh, const float *b_ih, const float *b_hh,
                             const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train,
                             const rf_blas *blas)
    void rf_lstm_forward_f64(double *y, double *h_n, double *c_n, double *ws, const double *x,
                             const double *h0, const double *c0, const double *w_ih,
                             const double *w_hh, const double *b_ih, const double *b_hh,
                             const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train,
                             const rf_blas *blas)
    void rf_gru_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                            int lbr, int train, const rf_blas *blas)
    void rf_gru_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int lbr, int train, const rf_blas *blas)
    void rf_rnn_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                            int relu, int train, const rf_blas *blas)
    void rf_rnn_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int relu, int train, const rf_blas *blas)

    void rf_lstm_backward_f32(float *dx, float *dh0, float *dc0, float *dw_ih, float *dw_hh,
                              float *db_ih, float *db_hh, const float *dy, const float *dh_n,
                              const float *dc_n, float *ws, float *scratch, const float *x,
                              const float *w_ih, const float *w_hh, const rf_plan *p,
                              Py_ssize_t I, Py_ssize_t H, const rf_blas *blas)
    void rf_lstm_backward_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                              double *dw_hh, double *db_ih, double *db_hh, const double *dy,
                              const double *dh_n, const double *dc_n, double *ws,
                              double *scratch, const double *x, const double *w_ih,
                              const double *w_hh, const rf_plan *p, Py_ssize_t I,
                              Py_ssize_t H, const rf_blas *blas)
    void rf_gru_backward_f32(float *dx, float *dh0, float *dw_ih, float *dw_hh, float *db_ih,
                             float *db_hh, const float *dy, const float *dh_n, float *ws,
                             float *scratch, const float *x, const float *w_ih,
                             const float *w_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                             int lbr, const rf_blas *blas)
    void rf_gru_backward_f64(double *dx, double *dh0, double *dw_ih, double *dw_hh,
                             double *db_ih, double *db_hh, const double *dy,
                             const double *dh_n, double *ws, double *scratch, const double *x,
                             const double *w_ih, const double *w_hh, const rf_plan *p,
                             Py_ssize_t I, Py_ssize_t H, int lbr, const rf_blas *blas)
    void rf_rnn_backward_f32(float *dx, float *dh0, float *dw_ih, float *dw_hh, float *db_ih,
                             float *db_hh, const float *dy, const float *dh_n, float *ws,
                             float *scratch, const float *x, const float *w_ih,
                             const float *w_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                             int relu, const rf_blas *blas)
    void rf_rnn_backward_f64(double *dx, double *dh0, double *dw_ih, double *dw_hh,
                             double *db_ih, double *db_hh, const double *dy,
                             const double *dh_n, double *ws, double *scratch, const double *x,
                             const double *w_ih, const double *w_hh, const rf_plan *p,
                             Py_ssize_t I, Py_ssize_t H, int relu, const rf_blas *blas)


# The BLAS table: SciPy's BLAS, filled once at import and only read afterwards.
cdef rf_blas _blas
_blas.sgemm = <rf_sgemm_fn>sgemm
_blas.dgemm = <rf_dgemm_fn>dgemm

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def simd_path():
    """The vectorized code path the run-time dispatch picks on this CPU."""
    return rf_simd_path().decode()


def gemm_floor_buffer(str cell, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                      dtype):
    """A buffer for gemm_floor (zeros: the values do not matter, and zeros are never NaN)."""
    return np.zeros(rf_gemm_floor_size(T, B, I, H, GATES[cell]), dtype)


def gemm_floor(str cell, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
               floating[::1] buf, bint train):
    """Run only the matrix products of one dense call, one BLAS call each (the benchmarks'
    "GEMM floor"). buf: from gemm_floor_buffer with the same sizes."""
    cdef Py_ssize_t G = GATES[cell]
    if buf.shape[0] < rf_gemm_floor_size(T, B, I, H, G):
        raise ValueError("buf is too small for these sizes; use gemm_floor_buffer")
    with nogil:
        if floating is float:
            rf_gemm_floor_f32(&_blas, T, B, I, H, G, train, &buf[0])
        else:
            rf_gemm_floor_f64(&_blas, T, B, I, H, G, train, &buf[0])


def compile_args():
    """The C compiler flags the kernels were built with."""
    return RNNFUSE_COMPILE_ARGS.decode()


def activation(str name, floating[::1] a):
    """Apply the kernels' own sigmoid or tanh to a, in place (for testing their accuracy)."""
    if name not in ("sigmoid", "tanh"):
        raise ValueError(f"unknown activation {name!r}")
    cdef bint sig = name == "sigmoid"
    with nogil:
        if floating is float:
            (rf_sigmoid_f32 if sig else rf_tanh_f32)(_p(a), a.shape[0])
        else:
            (rf_sigmoid_f64 if sig else rf_tanh_f64)(_p(a), a.shape[0])


cdef class Plan:
    """The batch ordering of one call: rows sorted by decreasing length, and per step
    the number of rows still running and their first packed row (see rnnfuse.h)."""
    cdef readonly Py_ssize_t T, B, steps, rows
    cdef readonly bint reverse
    cdef readonly object lengths, order, batch_sizes, offsets
    cdef const int64_t[::1] _lengths
    cdef int64_t[::1] _order, _batch_sizes, _offsets

    def __init__(self, lengths, Py_ssize_t T, bint reverse):
        cdef const int64_t[::1] lens = lengths
        cdef Py_ssize_t B = lens.shape[0], b
        for b in range(B):  # the C sort indexes by length: never trust it unchecked
            if lens[b] < 0 or lens[b] > T:
                raise ValueError(f"lengths must lie in [0, T={T}], got {lens[b]}")
        self.T, self.B, self.reverse = T, B, reverse
        self.lengths = lengths
        self.order = np.empty(B, dtype=np.int64)
        self.batch_sizes = np.empty(T, dtype=np.int64)
        self.offsets = np.empty(T + 1, dtype=np.int64)
        count = np.empty(T + 1, dtype=np.int64)
        cdef int64_t[::1] c = count
        self._lengths, self._order = lens, self.order
        self._batch_sizes, self._offsets = self.batch_sizes, self.offsets
        self.steps = rf_plan_build(T, B, _p64c(self._lengths), _p64(self._order),
                                   _p64(self._batch_sizes), _p64(self._offsets), &c[0])
        self.rows = self.offsets[T]
        for a in (self.order, self.batch_sizes, self.offsets):  # plans are shared read-only
            a.flags.writeable = False

    cdef rf_plan view(self):
        cdef rf_plan p
        p.T, p.B, p.steps, p.rows, p.reverse = self.T, self.B, self.steps, self.rows, self.reverse
        p.order, p.lengths = _p64(self._order), _p64c(self._lengths)
        p.batch_sizes, p.offsets = _p64(self._batch_sizes), _p64(self._offsets)
        return p


def workspace_size(str cell, Plan plan, Py_ssize_t I, Py_ssize_t H, bint train):
    """Elements of the forward's workspace (with train: the saved state backward reads)."""
    cdef rf_plan p = plan.view()
    if cell == "lstm":
        return rf_lstm_workspace(&p, I, H, train)
    if cell == "gru":
        return rf_gru_workspace(&p, I, H, train)
    if cell == "rnn":
        return rf_rnn_workspace(&p, I, H, train)
    raise ValueError(f"unknown cell {cell!r}")


def backward_scratch_size(str cell, Plan plan, Py_ssize_t I, Py_ssize_t H):
    cdef rf_plan p = plan.view()
    return rf_backward_scratch(&p, I, H, GATES[cell])


cdef inline int64_t *_p64(int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline const int64_t *_p64c(const int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline floating *_p(floating[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline const floating *_c(const floating[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


def lstm_forward(floating[::1] y, floating[::1] h_n, floating[::1] c_n, floating[::1] ws,
                 const floating[::1] x, const floating[::1] h0, const floating[::1] c0,
                 const floating[::1] w_ih, const floating[::1] w_hh,
                 const floating[::1] b_ih, const floating[::1] b_hh,
                 Plan plan, Py_ssize_t I, Py_ssize_t H, bint train):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_lstm_forward_f32(_p(y), _p(h_n), _p(c_n), _p(ws), _c(x), _c(h0), _c(c0),
                                _c(w_ih), _c(w_hh), _c(b_ih), _c(b_hh), &p, I, H, train, &_blas)
        else:
            rf_lstm_forward_f64(_p(y), _p(h_n), _p(c_n), _p(ws), _c(x), _c(h0), _c(c0),
                                _c(w_ih), _c(w_hh), _c(b_ih), _c(b_hh), &p, I, H, train, &_blas)


def gru_forward(floating[::1] y, floating[::1] h_n, floating[::1] ws,
                const floating[::1] x, const floating[::1] h0,
                const floating[::1] w_ih, const floating[::1] w_hh,
                const floating[::1] b_ih, const floating[::1] b_hh,
                Plan plan, Py_ssize_t I, Py_ssize_t H, bint lbr, bint train):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_gru_forward_f32(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), &p, I, H, lbr, train, &_blas)
        else:
            rf_gru_forward_f64(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), &p, I, H, lbr, train, &_blas)


def rnn_forward(floating[::1] y, floating[::1] h_n, floating[::1] ws,
                const floating[::1] x, const floating[::1] h0,
                const floating[::1] w_ih, const floating[::1] w_hh,
                const floating[::1] b_ih, const floating[::1] b_hh,
                Plan plan, Py_ssize_t I, Py_ssize_t H, bint relu, bint train):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_rnn_forward_f32(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), &p, I, H, relu, train, &_blas)
        else:
            rf_rnn_forward_f64(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), &p, I, H, relu, train, &_blas)


def lstm_backward(floating[::1] dx, floating[::1] dh0, floating[::1] dc0,
                  floating[::1] dw_ih, floating[::1] dw_hh,
                  floating[::1] db_ih, floating[::1] db_hh,
                  const floating[::1] dy, const floating[::1] dh_n, const floating[::1] dc_n,
                  floating[::1] ws, floating[::1] scratch, const floating[::1] x,
                  const floating[::1] w_ih, const floating[::1] w_hh,
                  Plan plan, Py_ssize_t I, Py_ssize_t H):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_lstm_backward_f32(_p(dx), _p(dh0), _p(dc0), _p(dw_ih), _p(dw_hh), _p(db_ih),
                                 _p(db_hh), _c(dy), _c(dh_n), _c(dc_n), _p(ws), _p(scratch),
                                 _c(x), _c(w_ih), _c(w_hh), &p, I, H, &_blas)
        else:
            rf_lstm_backward_f64(_p(dx), _p(dh0), _p(dc0), _p(dw_ih), _p(dw_hh), _p(db_ih),
                                 _p(db_hh), _c(dy), _c(dh_n), _c(dc_n), _p(ws), _p(scratch),
                                 _c(x), _c(w_ih), _c(w_hh), &p, I, H, &_blas)


def gru_backward(floating[::1] dx, floating[::1] dh0, floating[::1] dw_ih,
                 floating[::1] dw_hh, floating[::1] db_ih, floating[::1] db_hh,
                 const floating[::1] dy, const floating[::1] dh_n,
                 floating[::1] ws, floating[::1] scratch, const floating[::1] x,
                 const floating[::1] w_ih, const floating[::1] w_hh,
                 Plan plan, Py_ssize_t I, Py_ssize_t H, bint lbr):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_gru_backward_f32(_p(dx), _p(dh0), _p(dw_ih), _p(dw_hh), _p(db_ih), _p(db_hh),
                                _c(dy), _c(dh_n), _p(ws), _p(scratch), _c(x), _c(w_ih),
                                _c(w_hh), &p, I, H, lbr, &_blas)
        else:
            rf_gru_backward_f64(_p(dx), _p(dh0), _p(dw_ih), _p(dw_hh), _p(db_ih), _p(db_hh),
                                _c(dy), _c(dh_n), _p(ws), _p(scratch), _c(x), _c(w_ih),
                                _c(w_hh), &p, I, H, lbr, &_blas)


def rnn_backward(floating[::1] dx, floating[::1] dh0, floating[::1] dw_ih,
                 floating[::1] dw_hh, floating[::1] db_ih, floating[::1] db_hh,
                 const floating[::1] dy, const floating[::1] dh_n,
                 floating[::1] ws, floating[::1] scratch, const floating[::1] x,
                 const floating[::1] w_ih, const floating[::1] w_hh,
                 Plan plan, Py_ssize_t I, Py_ssize_t H, bint relu):
    cdef rf_plan p = plan.view()
    with nogil:
        if floating is float:
            rf_rnn_backward_f32(_p(dx), _p(dh0), _p(dw_ih), _p(dw_hh), _p(db_ih), _p(db_hh),
                                _c(dy), _c(dh_n), _p(ws), _p(scratch), _c(x), _c(w_ih),
                                _c(w_hh), &p, I, H, relu, &_blas)
        else:
            rf_rnn_backward_f64(_p(dx), _p(dh0), _p(dw_ih), _p(dw_hh), _p(db_ih), _p(db_hh),
                                _c(dy), _c(dh_n), _p(ws), _p(scratch), _c(x), _c(w_ih),
                                _c(w_hh), &p, I, H, relu, &_blas)
