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
    Py_ssize_t rf_recurrent_pack_size(Py_ssize_t G, Py_ssize_t H)
    void rf_pack_recurrent_f32(float *dst, const float *w_hh, Py_ssize_t G, Py_ssize_t H, int lbr)
    int rf_packed_available()
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
                             const float *w_hh_packed, const rf_plan *p, Py_ssize_t I,
                             Py_ssize_t H, int train, const rf_blas *blas)
    void rf_lstm_forward_f64(double *y, double *h_n, double *c_n, double *ws, const double *x,
                             const double *h0, const double *c0, const double *w_ih,
                             const double *w_hh, const double *b_ih, const double *b_hh,
                             const float *w_hh_packed, const rf_plan *p, Py_ssize_t I,
                             Py_ssize_t H, int train, const rf_blas *blas)
    void rf_gru_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const float *w_hh_packed, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int lbr, int train, const rf_blas *blas)
    void rf_gru_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const float *w_hh_packed,
                            const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int lbr, int train,
                            const rf_blas *blas)
    void rf_rnn_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const float *w_hh_packed, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int relu, int train, const rf_blas *blas)
    void rf_rnn_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const float *w_hh_packed,
                            const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int relu, int train,
                            const rf_blas *blas)

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


_NO_PACK = np.empty(0, np.float32)


def pack_recurrent(const float[::1] w_hh, Py_ssize_t G, Py_ssize_t H, bint lbr):
    """W_hh (G*H, H) of a float32 forward packed ahead of time (rnnfuse.h), to pass as the
    forwards' w_hh_packed; None where the forwards do not pack (no AVX2+FMA)."""
    if w_hh.shape[0] != G * H * H:
        raise ValueError(f"w_hh must have {G}*{H}*{H} elements, got {w_hh.shape[0]}")
    if not rf_packed_available():
        return None
    packed = np.zeros(rf_recurrent_pack_size(G, H), np.float32)
    cdef float[::1] dst = packed
    with nogil:
        rf_pack_recurrent_f32(&dst[0], &w_hh[0], G, H, lbr)
    packed.flags.writeable = False
    return packed


cdef const float *_packed(const float[::1] w_hh_packed, Py_ssize_t G, Py_ssize_t H) except? NULL:
    """The C pointer of a forward's w_hh_packed (NULL: none), after checking its size."""
    if w_hh_packed.shape[0] == 0:
        return NULL
    if w_hh_packed.shape[0] != rf_recurrent_pack_size(G, H):
        raise ValueError("w_hh_packed does not come from pack_recurrent with these sizes")
    return &w_hh_packed[0]


def lstm_forward(floating[::1] y, floating[::1] h_n, floating[::1] c_n, floating[::1] ws,
                 const floating[::1] x, const floating[::1] h0, const floating[::1] c0,
                 const floating[::1] w_ih, const floating[::1] w_hh,
                 const floating[::1] b_ih, const floating[::1] b_hh,
                 Plan plan, Py_ssize_t I, Py_ssize_t H, bint train,
                 const float[::1] w_hh_packed=_NO_PACK):
    cdef rf_plan p = plan.view()
    cdef const float *packed = _packed(w_hh_packed, 4, H)
    with nogil:
        if floating is float:
            rf_lstm_forward_f32(_p(y), _p(h_n), _p(c_n), _p(ws), _c(x), _c(h0), _c(c0), _c(w_ih),
                                _c(w_hh), _c(b_ih), _c(b_hh), packed, &p, I, H, train, &_blas)
        else:
            rf_lstm_forward_f64(_p(y), _p(h_n), _p(c_n), _p(ws), _c(x), _c(h0), _c(c0), _c(w_ih),
                                _c(w_hh), _c(b_ih), _c(b_hh), NULL, &p, I, H, train, &_blas)


def gru_forward(floating[::1] y, floating[::1] h_n, floating[::1] ws,
                const floating[::1] x, const floating[::1] h0,
                const floating[::1] w_ih, const floating[::1] w_hh,
                const floating[::1] b_ih, const floating[::1] b_hh,
                Plan plan, Py_ssize_t I, Py_ssize_t H, bint lbr, bint train,
                const float[::1] w_hh_packed=_NO_PACK):
    cdef rf_plan p = plan.view()
    cdef const float *packed = _packed(w_hh_packed, 3, H)
    with nogil:
        if floating is float:
            rf_gru_forward_f32(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), packed, &p, I, H, lbr, train, &_blas)
        else:
            rf_gru_forward_f64(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), NULL, &p, I, H, lbr, train, &_blas)


def rnn_forward(floating[::1] y, floating[::1] h_n, floating[::1] ws,
                const floating[::1] x, const floating[::1] h0,
                const floating[::1] w_ih, const floating[::1] w_hh,
                const floating[::1] b_ih, const floating[::1] b_hh,
                Plan plan, Py_ssize_t I, Py_ssize_t H, bint relu, bint train,
                const float[::1] w_hh_packed=_NO_PACK):
    cdef rf_plan p = plan.view()
    cdef const float *packed = _packed(w_hh_packed, 1, H)
    with nogil:
        if floating is float:
            rf_rnn_forward_f32(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), packed, &p, I, H, relu, train, &_blas)
        else:
            rf_rnn_forward_f64(_p(y), _p(h_n), _p(ws), _c(x), _c(h0), _c(w_ih), _c(w_hh),
                               _c(b_ih), _c(b_hh), NULL, &p, I, H, relu, train, &_blas)


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


# ---------------------------------------------------------------- streams

cimport numpy as cnp
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.stdlib cimport calloc, free

cnp.import_array()

cdef enum:
    _LSTM, _GRU, _RNN

ctypedef struct _StreamLayer:
    Py_ssize_t n_in            # input size
    void *w_ih
    void *w_hh
    void *b_ih                # or NULL
    void *b_hh                # or NULL
    const float *w_hh_packed  # or NULL
    void *ws                  # the inference workspace of one step
    void *y                   # this layer's output, the next layer's input
    void *h[2]                # the state, double-buffered: read one, write the other
    void *c[2]


cdef void *_data(a):
    return cnp.PyArray_DATA(a) if a is not None and a.size else NULL


cdef class Stream:
    """A unidirectional layer stepped one timestep at a time, its state kept between calls.

    Made by ``layer.stream(batch_size=1, state=None)``. ``stream.step(x_t)`` takes one
    step's input ``(batch_size, input_size)`` and returns that step's output
    ``(batch_size, hidden_size)`` (a new array), the same numbers as the matching row of
    ``layer.forward`` over the whole sequence. ``stream.state`` is the current state in the
    layer's form (copies); ``stream.reset(state=None)`` sets it (None: zeros).

    The stream keeps its own copy of the layer's weights as they were when it was made, and
    runs as in eval mode (no dropout). One stream is stepped by one thread at a time
    (a concurrent step raises RuntimeError); make one stream per thread.
    """
    cdef int cell, option, typenum
    cdef readonly Py_ssize_t batch_size, input_size, hidden_size, num_layers
    cdef readonly object dtype
    cdef _StreamLayer *layers
    cdef rf_plan plan
    cdef int cur
    cdef object _plan_obj, _keep, _h, _c, _n_states
    cdef PyThread_type_lock lock

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, str cell, option, dtype, Py_ssize_t batch_size, list weights):
        """Internal: use ``layer.stream()``. weights: per layer (w_ih, w_hh, b_ih, b_hh),
        C-contiguous arrays of dtype (biases may be None), already checked by the layer."""
        cdef Py_ssize_t l, B = batch_size
        self.cell = {"lstm": _LSTM, "gru": _GRU, "rnn": _RNN}[cell]
        self.option = bool(option)
        self.dtype = np.dtype(dtype)
        self.typenum = cnp.NPY_FLOAT if self.dtype == np.float32 else cnp.NPY_DOUBLE
        G = GATES[cell]
        H = weights[0][1].shape[1]
        self.batch_size, self.hidden_size, self.num_layers = B, H, len(weights)
        self.input_size = weights[0][0].shape[1]
        self._n_states = 2 if cell == "lstm" else 1
        lengths = np.ones(B, np.int64)
        self._plan_obj = Plan(lengths, 1, False)
        self.plan = (<Plan>self._plan_obj).view()
        self.layers = <_StreamLayer *>calloc(len(weights), sizeof(_StreamLayer))
        if self.layers == NULL:
            raise MemoryError()
        self._keep, self._h, self._c = [], [], []  # the arrays the C pointers point into
        for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            I = w_ih.shape[1]
            ws = np.empty(workspace_size(cell, self._plan_obj, I, H, False), self.dtype)
            packed = (pack_recurrent(w_hh.reshape(-1), G, H, self.option)
                      if self.dtype == np.float32 else None)
            y = np.zeros((B, H), self.dtype)
            h = [np.zeros((B, H), self.dtype) for _ in range(2)]
            c = [np.zeros((B, H), self.dtype) for _ in range(2)]
            self._keep += [w_ih, w_hh, b_ih, b_hh, ws, packed, y]
            self._h.append(h)
            self._c.append(c)
            self.layers[l].n_in = I
            self.layers[l].w_ih, self.layers[l].w_hh = _data(w_ih), _data(w_hh)
            self.layers[l].b_ih, self.layers[l].b_hh = _data(b_ih), _data(b_hh)
            self.layers[l].w_hh_packed = <const float *>_data(packed)
            self.layers[l].ws, self.layers[l].y = _data(ws), _data(y)
            self.layers[l].h[0], self.layers[l].h[1] = _data(h[0]), _data(h[1])
            self.layers[l].c[0], self.layers[l].c[1] = _data(c[0]), _data(c[1])
        self.cur = 0

    def __dealloc__(self):
        free(self.layers)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def __repr__(self):
        name = {_LSTM: "LSTM", _GRU: "GRU", _RNN: "RNN"}[self.cell]
        return (f"<rnnfuse {name} stream: {self.num_layers} layer(s), batch_size="
                f"{self.batch_size}, input_size={self.input_size}, hidden_size="
                f"{self.hidden_size}, {self.dtype}>")

    cdef object _states(self):
        """The state buffers being read next, as (h, c) or (h,) lists of (B, H) arrays."""
        return [[bufs[self.cur] for bufs in per_layer]
                for per_layer in (self._h, self._c)[:self._n_states]]

    @property
    def state(self):
        """The current state, in the layer's form: ``(h, c)`` for LSTM, ``h`` for GRU and
        RNN, each (num_layers, batch_size, hidden_size) (copies)."""
        parts = [np.stack(bufs) for bufs in self._states()]
        return tuple(parts) if self._n_states == 2 else parts[0]

    def reset(self, state=None):
        """Set the state: None for zeros, else in the layer's form (see ``state``)."""
        cdef Py_ssize_t L = self.num_layers
        shape = (L, self.batch_size, self.hidden_size)
        if state is None:
            parts = [None] * self._n_states
        elif self._n_states == 2:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"state must be a tuple (h, c) for an LSTM stream, got "
                                f"{type(state).__name__}")
            parts = list(state)
        else:
            parts = [state]
        arrays = []
        for name, s in zip(("h", "c") if self._n_states == 2 else ("state",), parts):
            if s is not None:
                s = np.asarray(s)
                if s.dtype != self.dtype:
                    raise TypeError(f"{name} must have dtype {self.dtype} (the stream's "
                                    f"dtype), got {s.dtype}")
                if s.shape != shape:
                    raise ValueError(f"{name} must have shape {shape} (num_layers, "
                                     f"batch_size, hidden_size), got {s.shape}")
            arrays.append(s)
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            raise RuntimeError(_BUSY)
        try:
            for bufs, s in zip(self._states(), arrays):
                for l in range(L):
                    bufs[l][...] = 0 if s is None else s[l]
        finally:
            PyThread_release_lock(self.lock)

    def step(self, x):
        """Advance every layer by one timestep: x (batch_size, input_size) -> y (batch_size,
        hidden_size), the top layer's output."""
        if not (cnp.PyArray_CheckExact(x) and cnp.PyArray_TYPE(x) == self.typenum
                and cnp.PyArray_NDIM(x) == 2 and cnp.PyArray_ISCARRAY_RO(x)
                and cnp.PyArray_DIM(x, 0) == self.batch_size
                and cnp.PyArray_DIM(x, 1) == self.input_size):
            x = self._check_x(x)
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = self.batch_size, self.hidden_size
        y = cnp.PyArray_EMPTY(2, dims, self.typenum, 0)
        cdef const void *xp = cnp.PyArray_DATA(x)
        cdef void *yp = cnp.PyArray_DATA(y)
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            raise RuntimeError(_BUSY)
        with nogil:
            self._step(xp, yp)
        PyThread_release_lock(self.lock)
        return y

    def _check_x(self, x):
        """The slow path of step: any array-like, with errors that name x."""
        x = np.asarray(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have dtype {self.dtype} (the stream's dtype), got {x.dtype}")
        if x.shape != (self.batch_size, self.input_size):
            raise ValueError(f"x must have shape ({self.batch_size}, {self.input_size}) "
                             f"(batch_size, input_size), got {x.shape}")
        return np.array(x, order="C")  # a C-contiguous, aligned copy

    cdef void _step(self, const void *x, void *y) noexcept nogil:
        cdef Py_ssize_t l, H = self.hidden_size, last = self.num_layers - 1
        cdef int a = self.cur, b = 1 - self.cur
        cdef _StreamLayer *s
        cdef const void *inp
        cdef void *out
        for l in range(self.num_layers):
            s = &self.layers[l]
            out = y if l == last else s.y
            inp = x if l == 0 else self.layers[l - 1].y
            if self.typenum == cnp.NPY_FLOAT:
                if self.cell == _LSTM:
                    rf_lstm_forward_f32(<float *>out, <float *>s.h[b], <float *>s.c[b],
                                        <float *>s.ws, <const float *>inp, <float *>s.h[a],
                                        <float *>s.c[a], <float *>s.w_ih, <float *>s.w_hh,
                                        <float *>s.b_ih, <float *>s.b_hh, s.w_hh_packed,
                                        &self.plan, s.n_in, H, 0, &_blas)
                elif self.cell == _GRU:
                    rf_gru_forward_f32(<float *>out, <float *>s.h[b], <float *>s.ws,
                                       <const float *>inp, <float *>s.h[a], <float *>s.w_ih,
                                       <float *>s.w_hh, <float *>s.b_ih, <float *>s.b_hh,
                                       s.w_hh_packed, &self.plan, s.n_in, H, self.option, 0, &_blas)
                else:
                    rf_rnn_forward_f32(<float *>out, <float *>s.h[b], <float *>s.ws,
                                       <const float *>inp, <float *>s.h[a], <float *>s.w_ih,
                                       <float *>s.w_hh, <float *>s.b_ih, <float *>s.b_hh,
                                       s.w_hh_packed, &self.plan, s.n_in, H, self.option, 0, &_blas)
            else:
                if self.cell == _LSTM:
                    rf_lstm_forward_f64(<double *>out, <double *>s.h[b], <double *>s.c[b],
                                        <double *>s.ws, <const double *>inp, <double *>s.h[a],
                                        <double *>s.c[a], <double *>s.w_ih, <double *>s.w_hh,
                                        <double *>s.b_ih, <double *>s.b_hh, NULL,
                                        &self.plan, s.n_in, H, 0, &_blas)
                elif self.cell == _GRU:
                    rf_gru_forward_f64(<double *>out, <double *>s.h[b], <double *>s.ws,
                                       <const double *>inp, <double *>s.h[a], <double *>s.w_ih,
                                       <double *>s.w_hh, <double *>s.b_ih, <double *>s.b_hh,
                                       NULL, &self.plan, s.n_in, H, self.option, 0, &_blas)
                else:
                    rf_rnn_forward_f64(<double *>out, <double *>s.h[b], <double *>s.ws,
                                       <const double *>inp, <double *>s.h[a], <double *>s.w_ih,
                                       <double *>s.w_hh, <double *>s.b_ih, <double *>s.b_hh,
                                       NULL, &self.plan, s.n_in, H, self.option, 0, &_blas)
        self.cur = b


_BUSY = "this stream is being stepped by another thread; make one stream per thread"
