# The only Cython that touches C: C-contiguous ndarrays in, the GIL released once for the
# whole kernel, C called. functional.py validates shapes, dtypes and lengths (and converts
# what needs it) and provides the forward's workspace; the outputs are allocated here. The
# wrappers re-check what keeps C inside its buffers. An absent optional array (h0, c0, a
# bias, dy, dh_n, dc_n, a bias gradient) is passed as None and reaches C as NULL.
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

import os

import numpy as np

ctypedef fused floating:
    float
    double

cdef extern from "rnnfuse.h" nogil:
    ctypedef void (*rf_sgemm_fn)(char*, char*, int*, int*, int*, float*, float*, int*,
                                 float*, int*, float*, float*, int*)
    ctypedef void (*rf_dgemm_fn)(char*, char*, int*, int*, int*, double*, double*, int*,
                                 double*, int*, double*, double*, int*)
    ctypedef int (*rf_threads_fn)()
    ctypedef struct rf_runtime:
        rf_sgemm_fn sgemm
        rf_dgemm_fn dgemm
        rf_threads_fn num_threads
        int avx2
    rf_threads_fn rf_find_blas_threads(const void *blas_function)
    int rf_threads(const rf_runtime *rt)
    int rf_choose_kernel(const char *request)
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
    int rf_step_parts(const rf_plan *p, Py_ssize_t step0, Py_ssize_t step1,
                      double flops_per_row, int after_blas, const rf_runtime *rt)
    void rf_part_rows(const rf_plan *p, int part, int parts, Py_ssize_t *j0, Py_ssize_t *j1)
    const char *rf_simd_path()
    const char *RNNFUSE_COMPILE_ARGS
    Py_ssize_t rf_lstm_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_gru_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_rnn_workspace(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_backward_scratch(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t G)
    Py_ssize_t rf_weights_pack_size(Py_ssize_t G, Py_ssize_t H, Py_ssize_t I)
    void rf_pack_weights_f32(float *dst, const float *w_ih, const float *w_hh, Py_ssize_t G,
                             Py_ssize_t H, Py_ssize_t I, int lbr, int avx2)
    void rf_pack_weights_f64(double *dst, const double *w_ih, const double *w_hh,
                             Py_ssize_t G, Py_ssize_t H, Py_ssize_t I, int lbr, int avx2)
    void rf_sigmoid_f32(float *a, Py_ssize_t n, int avx2)
    void rf_tanh_f32(float *a, Py_ssize_t n, int avx2)
    void rf_sigmoid_f64(double *a, Py_ssize_t n, int avx2)
    void rf_tanh_f64(double *a, Py_ssize_t n, int avx2)
    Py_ssize_t rf_gemm_floor_size(Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                  Py_ssize_t G)
    void rf_gemm_floor_f32(const rf_runtime *rt, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, float *buf)
    void rf_gemm_floor_f64(const rf_runtime *rt, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, double *buf)

    void rf_lstm_forward_f32(float *y, float *h_n, float *c_n, float *ws, const float *x,
                             const float *h0, const float *c0, const float *w_ih,
                             const float *w_hh, const float *b_ih, const float *b_hh,
                             const float *packed, const rf_plan *p, Py_ssize_t I,
                             Py_ssize_t H, int train, const rf_runtime *rt)
    void rf_lstm_forward_f64(double *y, double *h_n, double *c_n, double *ws, const double *x,
                             const double *h0, const double *c0, const double *w_ih,
                             const double *w_hh, const double *b_ih, const double *b_hh,
                             const double *packed, const rf_plan *p, Py_ssize_t I,
                             Py_ssize_t H, int train, const rf_runtime *rt)
    void rf_gru_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const float *packed, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int lbr, int train, const rf_runtime *rt)
    void rf_gru_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const double *packed,
                            const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int lbr, int train,
                            const rf_runtime *rt)
    void rf_rnn_forward_f32(float *y, float *h_n, float *ws, const float *x, const float *h0,
                            const float *w_ih, const float *w_hh, const float *b_ih,
                            const float *b_hh, const float *packed, const rf_plan *p,
                            Py_ssize_t I, Py_ssize_t H, int relu, int train, const rf_runtime *rt)
    void rf_rnn_forward_f64(double *y, double *h_n, double *ws, const double *x,
                            const double *h0, const double *w_ih, const double *w_hh,
                            const double *b_ih, const double *b_hh, const double *packed,
                            const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int relu, int train,
                            const rf_runtime *rt)

    void rf_lstm_backward_f32(float *dx, float *dh0, float *dc0, float *dw_ih, float *dw_hh,
                              float *db_ih, float *db_hh, const float *dy, const float *dh_n,
                              const float *dc_n, float *ws, float *scratch, const float *x,
                              const float *w_ih, const float *w_hh, const rf_plan *p,
                              Py_ssize_t I, Py_ssize_t H, const rf_runtime *rt)
    void rf_lstm_backward_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                              double *dw_hh, double *db_ih, double *db_hh, const double *dy,
                              const double *dh_n, const double *dc_n, double *ws,
                              double *scratch, const double *x, const double *w_ih,
                              const double *w_hh, const rf_plan *p, Py_ssize_t I,
                              Py_ssize_t H, const rf_runtime *rt)
    void rf_gru_backward_f32(float *dx, float *dh0, float *dw_ih, float *dw_hh, float *db_ih,
                             float *db_hh, const float *dy, const float *dh_n, float *ws,
                             float *scratch, const float *x, const float *w_ih,
                             const float *w_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                             int lbr, const rf_runtime *rt)
    void rf_gru_backward_f64(double *dx, double *dh0, double *dw_ih, double *dw_hh,
                             double *db_ih, double *db_hh, const double *dy,
                             const double *dh_n, double *ws, double *scratch, const double *x,
                             const double *w_ih, const double *w_hh, const rf_plan *p,
                             Py_ssize_t I, Py_ssize_t H, int lbr, const rf_runtime *rt)
    void rf_rnn_backward_f32(float *dx, float *dh0, float *dw_ih, float *dw_hh, float *db_ih,
                             float *db_hh, const float *dy, const float *dh_n, float *ws,
                             float *scratch, const float *x, const float *w_ih,
                             const float *w_hh, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                             int relu, const rf_runtime *rt)
    void rf_rnn_backward_f64(double *dx, double *dh0, double *dw_ih, double *dw_hh,
                             double *db_ih, double *db_hh, const double *dy,
                             const double *dh_n, double *ws, double *scratch, const double *x,
                             const double *w_ih, const double *w_hh, const rf_plan *p,
                             Py_ssize_t I, Py_ssize_t H, int relu, const rf_runtime *rt)


# After rnnfuse.h: NumPy's headers bring complex.h, whose macro I would rename the
# prototypes' I parameters.
cimport numpy as cnp

cnp.import_array()

cdef enum:
    _LSTM, _GRU, _RNN


cdef int _cell(str cell) except -1:
    if cell == "lstm":
        return _LSTM
    if cell == "gru":
        return _GRU
    if cell == "rnn":
        return _RNN
    raise ValueError(f"unknown cell {cell!r}")


# What every call runs on: SciPy's BLAS, its thread count, and the code path. Filled at
# import; afterwards only set_kernel writes it.
cdef rf_runtime _rt
_rt.sgemm = <rf_sgemm_fn>sgemm
_rt.dgemm = <rf_dgemm_fn>dgemm
_rt.num_threads = rf_find_blas_threads(<void *>sgemm)


def set_kernel(name=None):
    """Choose the code path of the products, the pointwise passes and the activations
    alike: "avx2" (AVX2+FMA; ValueError where the CPU lacks it), "portable" (as on CPUs
    without AVX2+FMA), or None: the default, "portable" if the environment variable
    RNNFUSE_KERNEL is "portable", else the best this CPU runs. Process-wide and for
    tests: not while kernels run in other threads (each call reads it once, at its start)."""
    if name is None and os.environ.get("RNNFUSE_KERNEL") == "portable":
        name = "portable"
    if name is not None and not isinstance(name, str):
        raise TypeError(f"kernel name must be a str or None, got {type(name).__name__}")
    request = name.encode() if name else None
    cdef int avx2 = rf_choose_kernel(<const char *>request if request else NULL)
    if avx2 < 0 or name == "":
        raise ValueError(f"kernel must be 'avx2' or 'portable' (or None), got {name!r}"
                         + (" (this CPU lacks AVX2+FMA)" if name == "avx2" else ""))
    _rt.avx2 = avx2


set_kernel()


def kernel():
    """The code path the kernels run now (see set_kernel): "avx2" or "portable"."""
    return "avx2" if _rt.avx2 else "portable"


def threads():
    """How many threads the kernels' own parallel parts use now: the BLAS's thread count
    (threadpoolctl's limit), or 1 where it cannot be read."""
    return rf_threads(&_rt)


GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def simd_path():
    """The best code path this CPU runs, in words (kernel() says which one runs now)."""
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
            rf_gemm_floor_f32(&_rt, T, B, I, H, G, train, &buf[0])
        else:
            rf_gemm_floor_f64(&_rt, T, B, I, H, G, train, &buf[0])


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
            (rf_sigmoid_f32 if sig else rf_tanh_f32)(_p(a), a.shape[0], _rt.avx2)
        else:
            (rf_sigmoid_f64 if sig else rf_tanh_f64)(_p(a), a.shape[0], _rt.avx2)


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

    def step_parts(self, str cell, Py_ssize_t H):
        """How a backward's time loop is shared among threads now: the sorted-row ranges
        [j0, j1) each thread runs every step of (one range where threads do not pay)."""
        cdef rf_plan p = self.view()
        cdef Py_ssize_t j0, j1
        cdef double G = GATES[cell]
        cdef int parts = rf_step_parts(&p, 0, self.steps, 2 * G * H * H, 0, &_rt)
        ranges = []
        for part in range(parts):
            rf_part_rows(&p, part, parts, &j0, &j1)
            ranges.append((j0, j1))
        return ranges

    cdef rf_plan view(self):
        cdef rf_plan p
        p.T, p.B, p.steps, p.rows, p.reverse = self.T, self.B, self.steps, self.rows, self.reverse
        p.order, p.lengths = _p64(self._order), _p64c(self._lengths)
        p.batch_sizes, p.offsets = _p64(self._batch_sizes), _p64(self._offsets)
        return p


def aligned_empty(Py_ssize_t n, dtype):
    """An uninitialised 1-D array of n elements of dtype whose data starts on a cache line
    (64 bytes). NumPy only aligns to 16: the packed weights' panel rows, a line each, then
    straddled two lines (an LSTM forward at (200,8,128,128) ran ~8% slower)."""
    return _aligned_empty(n, np.dtype(dtype).num)


cdef cnp.ndarray _aligned_empty(cnp.npy_intp n, int typenum):
    """aligned_empty through NumPy's C API (~0.3 us a call; through Python, ~1.4)."""
    cdef cnp.npy_intp pad = 64 // (4 if typenum == cnp.NPY_FLOAT else 8), whole = n + pad
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &whole, typenum, 0)
    cdef char *data = <char *>cnp.PyArray_DATA(buf)
    cdef cnp.ndarray view = cnp.PyArray_SimpleNewFromData(1, &n, typenum,
                                                          data + (64 - <size_t>data % 64) % 64)
    cnp.set_array_base(view, buf)  # the view keeps the whole buffer alive
    return view


def workspace_size(str cell, Plan plan not None, Py_ssize_t I, Py_ssize_t H, bint train):
    """Elements of the forward's workspace (with train: the saved state backward reads)."""
    cdef rf_plan p = plan.view()
    if cell == "lstm":
        return rf_lstm_workspace(&p, I, H, train)
    if cell == "gru":
        return rf_gru_workspace(&p, I, H, train)
    if cell == "rnn":
        return rf_rnn_workspace(&p, I, H, train)
    raise ValueError(f"unknown cell {cell!r}")


def backward_scratch_size(str cell, Plan plan not None, Py_ssize_t I, Py_ssize_t H):
    cdef rf_plan p = plan.view()
    return rf_backward_scratch(&p, I, H, GATES[cell])


cdef inline int64_t *_p64(int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline const int64_t *_p64c(const int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline floating *_p(floating[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# The kernel wrappers take ndarrays and hand C their data pointers (NumPy's C API: cheaper
# than typed memoryviews, which cost ~0.2 us each). They trust functional.py for shapes
# and values but check, per array, what keeps C inside its buffers: exact type, dtype,
# C-contiguous and aligned, writable for outputs, and the element count C will touch.

cdef enum:
    _REQUIRED = 0
    _OPTIONAL = 1  # None is allowed: NULL
    _OUT = 2       # written by C: must be writable


cdef void *_buf(a, Py_ssize_t size, int typenum, str name, int flags) except? NULL:
    """a's data for C (NULL for None where optional, or for an empty array)."""
    cdef bint optional = flags & _OPTIONAL, out = flags & _OUT
    if a is None and optional:
        return NULL
    if not (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(a) == typenum
            and cnp.PyArray_ISCARRAY_RO(a) and cnp.PyArray_SIZE(a) == size
            and (not out or cnp.PyArray_ISWRITEABLE(a))):
        raise ValueError(f"_kernels: {name} must be a C-contiguous, aligned"
                         f"{', writable' if out else ''} ndarray of {size} elements of the "
                         f"call's dtype, got {type(a).__name__} {getattr(a, 'dtype', '')} "
                         f"{getattr(a, 'shape', '')}")
    return cnp.PyArray_DATA(a) if size else NULL


cdef int _typenum(a, str name="x") except -1:
    if cnp.PyArray_Check(a) and cnp.PyArray_TYPE(a) in (cnp.NPY_FLOAT, cnp.NPY_DOUBLE):
        return cnp.PyArray_TYPE(a)
    raise TypeError(f"_kernels: {name} must be a float32 or float64 ndarray, got "
                    f"{type(a).__name__}")


def pack_weights(w_ih, w_hh, Py_ssize_t G, bint lbr):
    """A forward's w_ih (G*H, I) and w_hh (G*H, H) packed ahead of time (rnnfuse.h), to pass
    as the forwards' packed with the same weights. lbr: the GRU's linear_before_reset."""
    cdef int t = _typenum(w_hh, "w_hh")
    _typenum(w_ih, "w_ih")  # the same dtype is checked below
    if not (G in (1, 3, 4) and w_ih.ndim == 2 and w_hh.ndim == 2 and w_hh.shape[1] >= 1
            and w_ih.shape[1] >= 1 and w_hh.shape[0] == w_ih.shape[0] == G * w_hh.shape[1]):
        raise ValueError(f"w_ih and w_hh must be (G*H, I) and (G*H, H) with G in (1, 3, 4), "
                         f"got {w_ih.shape} and {w_hh.shape} for G={G}")
    cdef Py_ssize_t H = w_hh.shape[1], I = w_ih.shape[1]
    cdef void *src_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    cdef void *src_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    packed = aligned_empty(rf_weights_pack_size(G, H, I), w_hh.dtype)
    packed[:] = 0
    cdef void *dst = cnp.PyArray_DATA(packed)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rf_pack_weights_f32(<float *>dst, <float *>src_ih, <float *>src_hh, G, H, I, lbr,
                                _rt.avx2)
        else:
            rf_pack_weights_f64(<double *>dst, <double *>src_ih, <double *>src_hh, G, H, I,
                                lbr, _rt.avx2)
    packed.flags.writeable = False
    return packed


# ---------------------------------------------------------------- small calls

# From this size on, functional.py keeps a call's workspace for the next call (and checks
# its arguments in Python). A smaller call whose arguments are already what the kernels
# take runs from here: functional.py's checks, in Python, cost ~10 us a call, as much as
# the kernels of an RNN training step at (T,B,I,H) = (50,1,32,32) (~7 us forward, ~13
# backward).
SMALL_BYTES = 1 << 20
cdef Py_ssize_t _MAX_DIM = 2**31 - 1  # SciPy's BLAS takes 32-bit dimensions


cdef bint _takes(a, int typenum, int nd, cnp.npy_intp d0, cnp.npy_intp d1=0,
                 cnp.npy_intp d2=0) noexcept:
    """a is exactly what the kernels take: an ndarray (no subclass), aligned, C-contiguous,
    in the machine's byte order, of this dtype and shape (nd = 1, 2 or 3)."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if not (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_NDIM(arr) == nd
            and cnp.PyArray_ISCARRAY_RO(arr) and cnp.PyArray_ISNOTSWAPPED(arr)):
        return False
    cdef cnp.npy_intp *d = cnp.PyArray_DIMS(arr)
    return d[0] == d0 and (nd < 2 or d[1] == d1) and (nd < 3 or d[2] == d2)


cdef object _empty(int typenum, int nd, cnp.npy_intp d0, cnp.npy_intp d1,
                   cnp.npy_intp d2=0, bint zeros=False):
    cdef cnp.npy_intp dims[3]
    dims[0], dims[1], dims[2] = d0, d1, d2
    if zeros:
        return cnp.PyArray_ZEROS(nd, dims, typenum, 0)
    return cnp.PyArray_EMPTY(nd, dims, typenum, 0)


cdef struct _Fwd:  # one forward's pointers; x's dtype decides float or double
    void *y
    void *h_n
    void *c_n
    void *ws
    void *x
    void *h0
    void *c0
    void *w_ih
    void *w_hh
    void *b_ih
    void *b_hh
    const void *packed


cdef _Fwd _forward_args(str cell, y, h_n, c_n, ws, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                        Plan plan, Py_ssize_t I, Py_ssize_t H, bint train) except *:
    cdef int t = _typenum(x)
    cdef Py_ssize_t G = GATES[cell], TB = plan.T * plan.B, BH = plan.B * H
    cdef _Fwd a
    a.y = _buf(y, TB * H, t, "y", _OUT)
    a.h_n = _buf(h_n, BH, t, "h_n", _OUT)
    a.c_n = _buf(c_n, BH, t, "c_n", _OUT) if G == 4 else NULL
    a.ws = _buf(ws, workspace_size(cell, plan, I, H, train), t, "ws", _OUT)
    a.x = _buf(x, TB * I, t, "x", _REQUIRED)
    a.h0 = _buf(h0, BH, t, "h0", _OPTIONAL)
    a.c0 = _buf(c0, BH, t, "c0", _OPTIONAL) if G == 4 else NULL
    a.w_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    a.w_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    a.b_ih = _buf(b_ih, G * H, t, "b_ih", _OPTIONAL)
    a.b_hh = _buf(b_hh, G * H, t, "b_hh", _OPTIONAL)
    a.packed = NULL  # the kernel packs the weights into ws itself
    return a


cpdef tuple forward(str cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, Plan plan, ws, Py_ssize_t I,
                    Py_ssize_t H, bint train, bint option=False):
    """One forward of cell "lstm" (c0 used), "gru" (option = linear_before_reset) or "rnn"
    (option = relu) over ws (workspace_size elements): returns y (zero at padding), h_n
    and c_n (None but for the LSTM). c0: None but for the LSTM."""
    if plan is None:  # (a cpdef function cannot say "not None")
        raise TypeError("_kernels: plan must be a Plan, got None")
    cdef int t = _typenum(x)
    cdef Py_ssize_t T = plan.T, B = plan.B
    y = _empty(t, 3, T, B, H, zeros=plan.rows < T * B)  # the kernels skip padding
    h_n = _empty(t, 2, B, H)
    c_n = _empty(t, 2, B, H) if cell == "lstm" else None
    cdef _Fwd a = _forward_args(cell, y, h_n, c_n, ws, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                plan, I, H, train)
    cdef rf_plan p = plan.view()
    cdef int c = _cell(cell)
    with nogil:
        _run_forward(c, t == cnp.NPY_FLOAT, &a, &p, I, H, train, option)
    return y, h_n, c_n


def forward_small(str cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, bint train,
                  bint option, full_plan):
    """forward, without lengths, where every argument is already what the kernels take and
    the workspace is under SMALL_BYTES: returns (y, h_n, c_n, ws, plan), plan =
    full_plan(T, B, reverse). Anything else returns None with nothing done: functional.py
    then checks, explains or converts."""
    cdef Py_ssize_t G = GATES[cell], T, B, I, H, n
    if not (cnp.PyArray_CheckExact(x) and cnp.PyArray_NDIM(<cnp.ndarray>x) == 3
            and cnp.PyArray_CheckExact(w_hh) and cnp.PyArray_NDIM(<cnp.ndarray>w_hh) == 2
            and (reverse is True or reverse is False)):
        return None
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>x)
    cdef cnp.npy_intp *d = cnp.PyArray_DIMS(<cnp.ndarray>x)
    T, B, I = d[0], d[1], d[2]
    H = cnp.PyArray_DIMS(<cnp.ndarray>w_hh)[1]
    if not ((t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE) and T > 0 and B > 0
            and 0 < I <= _MAX_DIM and 0 < H and G * H <= _MAX_DIM
            and _takes(x, t, 3, T, B, I) and _takes(w_hh, t, 2, G * H, H)
            and _takes(w_ih, t, 2, G * H, I)
            and (b_ih is None or _takes(b_ih, t, 1, G * H))
            and (b_hh is None or _takes(b_hh, t, 1, G * H))
            and (h0 is None or _takes(h0, t, 2, B, H))
            and (c0 is None or G == 4 and _takes(c0, t, 2, B, H))):
        return None
    cdef Plan plan = full_plan(T, B, reverse)
    n = workspace_size(cell, plan, I, H, train)
    if n * (4 if t == cnp.NPY_FLOAT else 8) >= SMALL_BYTES:
        return None
    ws = _aligned_empty(n, t)
    return (*forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, plan, ws, I, H, train, option),
            ws, plan)


cdef void _run_forward(int cell, bint f32, const _Fwd *a, const rf_plan *p, Py_ssize_t I,
                       Py_ssize_t H, bint train, bint option) noexcept nogil:
    if f32:
        if cell == _LSTM:
            rf_lstm_forward_f32(<float *>a.y, <float *>a.h_n, <float *>a.c_n, <float *>a.ws,
                                <float *>a.x, <float *>a.h0, <float *>a.c0, <float *>a.w_ih,
                                <float *>a.w_hh, <float *>a.b_ih, <float *>a.b_hh,
                                <float *>a.packed, p, I, H, train, &_rt)
        elif cell == _GRU:
            rf_gru_forward_f32(<float *>a.y, <float *>a.h_n, <float *>a.ws, <float *>a.x,
                               <float *>a.h0, <float *>a.w_ih, <float *>a.w_hh,
                               <float *>a.b_ih, <float *>a.b_hh, <float *>a.packed, p, I, H,
                               option, train, &_rt)
        else:
            rf_rnn_forward_f32(<float *>a.y, <float *>a.h_n, <float *>a.ws, <float *>a.x,
                               <float *>a.h0, <float *>a.w_ih, <float *>a.w_hh,
                               <float *>a.b_ih, <float *>a.b_hh, <float *>a.packed, p, I, H,
                               option, train, &_rt)
    else:
        if cell == _LSTM:
            rf_lstm_forward_f64(<double *>a.y, <double *>a.h_n, <double *>a.c_n,
                                <double *>a.ws, <double *>a.x, <double *>a.h0,
                                <double *>a.c0, <double *>a.w_ih, <double *>a.w_hh,
                                <double *>a.b_ih, <double *>a.b_hh, <double *>a.packed, p, I,
                                H, train, &_rt)
        elif cell == _GRU:
            rf_gru_forward_f64(<double *>a.y, <double *>a.h_n, <double *>a.ws, <double *>a.x,
                               <double *>a.h0, <double *>a.w_ih, <double *>a.w_hh,
                               <double *>a.b_ih, <double *>a.b_hh, <double *>a.packed, p, I,
                               H, option, train, &_rt)
        else:
            rf_rnn_forward_f64(<double *>a.y, <double *>a.h_n, <double *>a.ws, <double *>a.x,
                               <double *>a.h0, <double *>a.w_ih, <double *>a.w_hh,
                               <double *>a.b_ih, <double *>a.b_hh, <double *>a.packed, p, I,
                               H, option, train, &_rt)


cdef struct _Bwd:  # one backward's pointers, as _Fwd is a forward's
    void *dx
    void *dh0
    void *dc0
    void *dw_ih
    void *dw_hh
    void *db_ih
    void *db_hh
    void *dy
    void *dh_n
    void *dc_n
    void *ws
    void *scratch
    void *x
    void *w_ih
    void *w_hh


cdef _Bwd _backward_args(str cell, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n,
                        ws, scratch, x, w_ih, w_hh, Plan plan, Py_ssize_t I,
                        Py_ssize_t H) except *:
    cdef int t = _typenum(x)
    cdef Py_ssize_t G = GATES[cell], TB = plan.T * plan.B, BH = plan.B * H
    cdef bint lstm = G == 4
    cdef _Bwd a
    a.dx = _buf(dx, TB * I, t, "dx", _OUT)
    a.dh0 = _buf(dh0, BH, t, "dh0", _OUT)
    a.dc0 = _buf(dc0, BH, t, "dc0", _OUT) if lstm else NULL
    a.dw_ih = _buf(dw_ih, G * H * I, t, "dw_ih", _OUT)
    a.dw_hh = _buf(dw_hh, G * H * H, t, "dw_hh", _OUT)
    a.db_ih = _buf(db_ih, G * H, t, "db_ih", _OPTIONAL | _OUT)
    a.db_hh = _buf(db_hh, G * H, t, "db_hh", _OPTIONAL | _OUT)
    a.dy = _buf(dy, TB * H, t, "dy", _OPTIONAL)
    a.dh_n = _buf(dh_n, BH, t, "dh_n", _OPTIONAL)
    a.dc_n = _buf(dc_n, BH, t, "dc_n", _OPTIONAL) if lstm else NULL
    a.ws = _buf(ws, workspace_size(cell, plan, I, H, True), t, "ws", _OUT)
    a.scratch = _buf(scratch, backward_scratch_size(cell, plan, I, H), t, "scratch", _OUT)
    a.x = _buf(x, TB * I, t, "x", _REQUIRED)
    a.w_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    a.w_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    return a


def backward(str cell, dy, dh_n, dc_n, ctx):
    """One backward over a training forward's ctx (functional.py's Context, checked there)
    whose dy, dh_n and dc_n (LSTM only) are None or already what the kernels take:
    returns dx, dh0, dc0 (None but for the LSTM), dw_ih, dw_hh, db_ih, db_hh (None for an
    absent bias) and the workspace, taken from ctx by ctx.take() and overwritten. For any
    other dy, dh_n or dc_n: None, with ctx untouched (functional.py then checks, explains
    or converts)."""
    cdef Plan plan = ctx.plan
    if plan is None:
        raise TypeError("_kernels: ctx.plan must be a Plan, got None")
    cdef Py_ssize_t G = GATES[cell], T = plan.T, B = plan.B
    cdef Py_ssize_t I = ctx.input_size, H = ctx.hidden_size
    x, w_ih, w_hh = ctx.x, ctx.w_ih, ctx.w_hh
    cdef int t = _typenum(x)
    if not ((dy is None or _takes(dy, t, 3, T, B, H))
            and (dh_n is None or _takes(dh_n, t, 2, B, H))
            and (dc_n is None or G == 4 and _takes(dc_n, t, 2, B, H))):
        return None
    ws = ctx.take()
    has_ih, has_hh = ctx.has_bias
    scratch = _aligned_empty(backward_scratch_size(cell, plan, I, H), t)
    dx = _empty(t, 3, T, B, I, zeros=plan.rows < T * B)  # padding's gradient is zero
    dh0 = _empty(t, 2, B, H)
    dc0 = _empty(t, 2, B, H) if G == 4 else None
    dw_ih = _empty(t, 2, G * H, I)
    dw_hh = _empty(t, 2, G * H, H)
    db_ih = _empty(t, 1, G * H, 0) if has_ih else None
    db_hh = _empty(t, 1, G * H, 0) if has_hh else None
    cdef _Bwd a = _backward_args(cell, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n,
                                 dc_n, ws, scratch, x, w_ih, w_hh, plan, I, H)
    cdef rf_plan p = plan.view()
    cdef int c = _cell(cell)
    cdef bint option = ctx.option
    with nogil:
        _run_backward(c, t == cnp.NPY_FLOAT, &a, &p, I, H, option)
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, ws


cdef void _run_backward(int cell, bint f32, const _Bwd *a, const rf_plan *p, Py_ssize_t I,
                        Py_ssize_t H, bint option) noexcept nogil:
    if f32:
        if cell == _LSTM:
            rf_lstm_backward_f32(<float *>a.dx, <float *>a.dh0, <float *>a.dc0,
                                 <float *>a.dw_ih, <float *>a.dw_hh, <float *>a.db_ih,
                                 <float *>a.db_hh, <float *>a.dy, <float *>a.dh_n,
                                 <float *>a.dc_n, <float *>a.ws, <float *>a.scratch,
                                 <float *>a.x, <float *>a.w_ih, <float *>a.w_hh, p, I, H, &_rt)
        elif cell == _GRU:
            rf_gru_backward_f32(<float *>a.dx, <float *>a.dh0, <float *>a.dw_ih,
                                <float *>a.dw_hh, <float *>a.db_ih, <float *>a.db_hh,
                                <float *>a.dy, <float *>a.dh_n, <float *>a.ws,
                                <float *>a.scratch, <float *>a.x, <float *>a.w_ih,
                                <float *>a.w_hh, p, I, H, option, &_rt)
        else:
            rf_rnn_backward_f32(<float *>a.dx, <float *>a.dh0, <float *>a.dw_ih,
                                <float *>a.dw_hh, <float *>a.db_ih, <float *>a.db_hh,
                                <float *>a.dy, <float *>a.dh_n, <float *>a.ws,
                                <float *>a.scratch, <float *>a.x, <float *>a.w_ih,
                                <float *>a.w_hh, p, I, H, option, &_rt)
    else:
        if cell == _LSTM:
            rf_lstm_backward_f64(<double *>a.dx, <double *>a.dh0, <double *>a.dc0,
                                 <double *>a.dw_ih, <double *>a.dw_hh, <double *>a.db_ih,
                                 <double *>a.db_hh, <double *>a.dy, <double *>a.dh_n,
                                 <double *>a.dc_n, <double *>a.ws, <double *>a.scratch,
                                 <double *>a.x, <double *>a.w_ih, <double *>a.w_hh, p, I, H,
                                 &_rt)
        elif cell == _GRU:
            rf_gru_backward_f64(<double *>a.dx, <double *>a.dh0, <double *>a.dw_ih,
                                <double *>a.dw_hh, <double *>a.db_ih, <double *>a.db_hh,
                                <double *>a.dy, <double *>a.dh_n, <double *>a.ws,
                                <double *>a.scratch, <double *>a.x, <double *>a.w_ih,
                                <double *>a.w_hh, p, I, H, option, &_rt)
        else:
            rf_rnn_backward_f64(<double *>a.dx, <double *>a.dh0, <double *>a.dw_ih,
                                <double *>a.dw_hh, <double *>a.db_ih, <double *>a.db_hh,
                                <double *>a.dy, <double *>a.dh_n, <double *>a.ws,
                                <double *>a.scratch, <double *>a.x, <double *>a.w_ih,
                                <double *>a.w_hh, p, I, H, option, &_rt)



# ---------------------------------------------------------------- streams

from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.stdlib cimport calloc, free

ctypedef struct _StreamLayer:
    Py_ssize_t n_in  # input size
    void *y          # this layer's output, the next layer's input
    _Fwd call[2]     # the forward's pointers when reading state 0 or 1 (double-buffered)


cdef void *_data(a):
    return cnp.PyArray_DATA(a) if a is not None and a.size else NULL


cdef class Stream:
    """A unidirectional layer stepped one timestep at a time, its state kept between calls.

    Made by ``layer.stream(batch_size=1, state=None)``. ``stream.step(x_t)`` takes one
    step's input ``(batch_size, input_size)`` and returns that step's output
    ``(batch_size, hidden_size)`` (a new array): the matching row of ``layer.forward`` over
    the whole sequence, bit for bit. ``stream.state`` is the current state in the
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
        C-contiguous arrays of dtype (biases may be None); checked again here for what keeps
        C inside its buffers."""
        cdef Py_ssize_t l, k, B = batch_size, G, H, I
        cdef _Fwd *call
        if self.layers != NULL:
            raise RuntimeError("a Stream is initialised once")
        if cell not in GATES or not weights or B < 0 or dtype not in (np.float32, np.float64):
            raise ValueError("Stream(cell, option, dtype, batch_size, weights): use "
                             "layer.stream()")
        self.cell = {"lstm": _LSTM, "gru": _GRU, "rnn": _RNN}[cell]
        self.option = bool(option)
        self.dtype = np.dtype(dtype)
        self.typenum = cnp.NPY_FLOAT if self.dtype == np.float32 else cnp.NPY_DOUBLE
        G = GATES[cell]
        H = weights[0][1].shape[1]
        I = weights[0][0].shape[1]
        for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            if H < 1 or w_ih.ndim != 2 or w_ih.shape[1] != (I if l == 0 else H) or I < 1:
                raise ValueError(f"Stream: layer {l}'s w_ih has shape {w_ih.shape}")
            _buf(w_ih, G * H * w_ih.shape[1], self.typenum, "w_ih", _REQUIRED)
            _buf(w_hh, G * H * H, self.typenum, "w_hh", _REQUIRED)
            _buf(b_ih, G * H, self.typenum, "b_ih", _OPTIONAL)
            _buf(b_hh, G * H, self.typenum, "b_hh", _OPTIONAL)
        self.batch_size, self.hidden_size, self.num_layers = B, H, len(weights)
        self.input_size = I
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
            ws = aligned_empty(workspace_size(cell, self._plan_obj, I, H, False), self.dtype)
            packed = pack_weights(w_ih, w_hh, G, self.option)
            y = np.zeros((B, H), self.dtype)
            h = [np.zeros((B, H), self.dtype) for _ in range(2)]
            c = [np.zeros((B, H), self.dtype) for _ in range(2)]
            self._keep += [w_ih, w_hh, b_ih, b_hh, ws, packed, y]
            self._h.append(h)
            self._c.append(c)
            self.layers[l].n_in = I
            self.layers[l].y = _data(y)
            for k in range(2):  # read state k, write state 1-k
                call = &self.layers[l].call[k]
                call.w_ih, call.w_hh = _data(w_ih), _data(w_hh)
                call.b_ih, call.b_hh = _data(b_ih), _data(b_hh)
                call.packed = _data(packed)
                call.ws = _data(ws)
                call.h0, call.h_n = _data(h[k]), _data(h[1 - k])
                call.c0, call.c_n = _data(c[k]), _data(c[1 - k])
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
        cdef Py_ssize_t l, last = self.num_layers - 1
        cdef _StreamLayer *s
        cdef _Fwd *call
        for l in range(self.num_layers):
            s = &self.layers[l]
            call = &s.call[self.cur]
            call.x = <void *>x if l == 0 else self.layers[l - 1].y
            call.y = y if l == last else s.y
            _run_forward(self.cell, self.typenum == cnp.NPY_FLOAT, call, &self.plan, s.n_in,
                         self.hidden_size, 0, self.option)
        self.cur = 1 - self.cur


_BUSY = "this stream is being stepped by another thread; make one stream per thread"

include "capi.pxi"  # the C-level API of _kernels.pxd (rnnfuse.capi)
