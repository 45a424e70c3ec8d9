# The only Cython that touches C: C-contiguous ndarrays in, the GIL released once for the
# whole kernel, C called. functional.py validates shapes, dtypes and lengths (and converts
# what needs it) and provides the forward's workspace; the outputs are allocated here. The
# wrappers re-check what keeps C inside its buffers. An absent optional array (h0, c0, a
# bias, dy, dh_n, dc_n, a bias gradient) is passed as None and reaches C as NULL.
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

import os
import warnings
from collections import namedtuple

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
        int avx512
        int vnni
    rf_threads_fn rf_find_blas_threads(const void *blas_function)
    ctypedef void (*rf_set_threads_fn)(int)
    rf_set_threads_fn rf_find_blas_set_threads(const void *blas_function)
    int rf_threads(const rf_runtime *rt)
    int rf_set_thread_cap(int n)
    int rf_choose_kernel(const char *request)
    int rf_simd(const rf_runtime *rt)
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
    int rf_weights_in_place(const rf_plan *p)
    int rf_step_parts(const rf_plan *p, Py_ssize_t step0, Py_ssize_t step1,
                      double flops_per_row, int after_blas, const rf_runtime *rt)
    void rf_part_rows(const rf_plan *p, int part, int parts, Py_ssize_t *j0, Py_ssize_t *j1)
    const char *rf_simd_path()
    const char *RNNFUSE_COMPILE_ARGS
    ctypedef struct rf_cell:
        int id
        char name[8]
        int gates
        int states
    enum: RF_NUM_CELLS, RF_LSTM, RF_GRU, RF_RNN
    const rf_cell rf_cells[]
    const rf_cell *rf_cell_find(int id)
    Py_ssize_t rf_workspace(int cell, const rf_plan *p, Py_ssize_t I, Py_ssize_t H, int train)
    Py_ssize_t rf_backward_scratch(const rf_plan *p, Py_ssize_t I, Py_ssize_t H, Py_ssize_t G)
    Py_ssize_t rf_weights_packed_size(Py_ssize_t G, Py_ssize_t H, Py_ssize_t I)
    Py_ssize_t rf_weights_pack_size(Py_ssize_t G, Py_ssize_t H, Py_ssize_t I)
    int rf_weights_packed_for(const void *packed, Py_ssize_t G, Py_ssize_t H, Py_ssize_t I,
                              int lbr)
    void rf_pack_weights_f32(float *dst, const float *w_ih, const float *w_hh, Py_ssize_t G,
                             Py_ssize_t H, Py_ssize_t I, int lbr, int avx2)
    void rf_pack_weights_f64(double *dst, const double *w_ih, const double *w_hh,
                             Py_ssize_t G, Py_ssize_t H, Py_ssize_t I, int lbr, int avx2)
    void rf_sigmoid_f32(float *a, Py_ssize_t n, int simd)
    void rf_tanh_f32(float *a, Py_ssize_t n, int simd)
    void rf_sigmoid_f64(double *a, Py_ssize_t n, int simd)
    void rf_tanh_f64(double *a, Py_ssize_t n, int simd)
    Py_ssize_t rf_gemm_floor_size(Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                  Py_ssize_t G)
    void rf_gemm_floor_f32(const rf_runtime *rt, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, float *buf)
    void rf_gemm_floor_f64(const rf_runtime *rt, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                           Py_ssize_t H, Py_ssize_t G, int train, double *buf)

    ctypedef struct rf_zoneout:
        const void *h
        const void *c
        int shared
        void *carry
    ctypedef struct rf_recdrop:
        const void *m
        void *buf
    ctypedef struct rf_layernorm:
        const void *g_ih
        const void *g_hh
        const void *g_c
        const void *b_c
        void *dg_ih
        void *dg_hh
        void *dg_c
        void *db_c
    Py_ssize_t rf_ln_workspace(int cell, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                               int train)
    ctypedef struct rf_forward_bufs:
        void *y
        void *h_n
        void *c_n
        void *ws
        const void *x
        const void *h0
        const void *c0
        const void *w_ih
        const void *w_hh
        const void *b_ih
        const void *b_hh
        const void *packed
        const void *peep
        rf_zoneout zoneout
        rf_recdrop recdrop
        rf_layernorm layernorm
    ctypedef struct rf_backward_bufs:
        void *dx
        void *dh0
        void *dc0
        void *dw_ih
        void *dw_hh
        void *db_ih
        void *db_hh
        const void *dy
        const void *dh_n
        const void *dc_n
        void *ws
        void *scratch
        void *out
        const void *x
        const void *w_ih
        const void *w_hh
        const void *peep
        void *dpeep
        rf_zoneout zoneout
        rf_recdrop recdrop
        rf_layernorm layernorm
    int rf_forward_f32(int cell, int option, const rf_forward_bufs *a, const rf_plan *p,
                       Py_ssize_t I, Py_ssize_t H, int train, const rf_runtime *rt)
    int rf_forward_f64(int cell, int option, const rf_forward_bufs *a, const rf_plan *p,
                       Py_ssize_t I, Py_ssize_t H, int train, const rf_runtime *rt)
    int rf_backward_f32(int cell, int option, const rf_backward_bufs *a, const rf_plan *p,
                        Py_ssize_t I, Py_ssize_t H, const rf_runtime *rt)
    int rf_backward_f64(int cell, int option, const rf_backward_bufs *a, const rf_plan *p,
                        Py_ssize_t I, Py_ssize_t H, const rf_runtime *rt)


# After rnnfuse.h: NumPy's headers bring complex.h, whose macro I would rename the
# prototypes' I parameters.
cimport numpy as cnp

cnp.import_array()

# The cells, from C's table (rnnfuse.h): name -> Cell(id, gates, states). The ids are the C
# API's cell codes.
Cell = namedtuple("Cell", "id gates states")
CELLS = {rf_cells[i].name.decode(): Cell(rf_cells[i].id, rf_cells[i].gates, rf_cells[i].states)
         for i in range(RF_NUM_CELLS)}
GATES = {name: c.gates for name, c in CELLS.items()}


cdef const rf_cell *_cell(str name) except NULL:
    """The table's entry for a cell name; ValueError for any other name."""
    c = CELLS.get(name)
    if c is None:
        raise ValueError(f"unknown cell {name!r}")
    return rf_cell_find(c.id)


# What every call runs on: SciPy's BLAS, its thread count, and the code path. Filled at
# import; afterwards only set_kernel writes it.
cdef rf_runtime _rt
_rt.sgemm = <rf_sgemm_fn>sgemm
_rt.dgemm = <rf_dgemm_fn>dgemm
_rt.num_threads = rf_find_blas_threads(<void *>sgemm)
cdef rf_set_threads_fn _set_blas_threads = rf_find_blas_set_threads(<void *>sgemm)


KERNELS = ("portable", "avx2", "avx512")  # by RF_SIMD_* level


def set_kernel(name=None):
    """Choose the code path of the products, the pointwise passes and the activations
    alike: "avx512" (AVX2+FMA with AVX-512F products: the same numbers as "avx2", faster),
    "avx2" (AVX2+FMA), "portable" (as on CPUs without AVX2+FMA); ValueError where the CPU
    cannot run it. None: the default, the environment variable RNNFUSE_KERNEL if set, else
    the best this CPU runs. Process-wide and for tests: not while kernels run in other
    threads (each call reads it once, at its start)."""
    source = "kernel"
    if name is None and os.environ.get("RNNFUSE_KERNEL"):
        name, source = os.environ["RNNFUSE_KERNEL"], "RNNFUSE_KERNEL"
    if name is not None and not isinstance(name, str):
        raise TypeError(f"kernel name must be a str or None, got {type(name).__name__}")
    request = name.encode() if name else None
    cdef int level = rf_choose_kernel(<const char *>request if request else NULL)
    if level < 0 or name == "":
        raise ValueError(f"{source} must be one of {KERNELS} (or None), got {name!r}"
                         + (" (this CPU cannot run it)" if name in KERNELS else ""))
    _rt.avx2 = level >= 1
    _rt.avx512 = level == 2


try:
    set_kernel()
except ValueError as e:  # a bad RNNFUSE_KERNEL must not make the package unimportable
    warnings.warn(f"{e}: ignored, running {KERNELS[rf_choose_kernel(NULL)]!r}",
                  RuntimeWarning)
    set_kernel(KERNELS[rf_choose_kernel(NULL)])


def kernel():
    """The code path the kernels run now (see set_kernel): one of KERNELS."""
    return KERNELS[rf_simd(&_rt)]


def threads():
    """How many threads the kernels' own parallel parts use now in this thread's calls:
    set_threads's count, else the BLAS's thread count (threadpoolctl's limit), or 1
    where it cannot be read."""
    return rf_threads(&_rt)


def set_threads(int n):
    """The thread count of the kernels' own parallel parts in the calling thread's calls
    from now on (at most 64): n, or 0 to follow the BLAS's again (the default). Returns the
    previous setting. For a caller with a thread setting of its own (rnnfuse.torch:
    torch.get_num_threads()); the BLAS's own threads are not changed."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: follow the BLAS), got {n}")
    return rf_set_thread_cap(n)


def blas_threads():
    """The thread count of the BLAS that the kernels call (SciPy's), or 1 where it cannot
    be read."""
    return _rt.num_threads() if _rt.num_threads != NULL else 1


def set_blas_threads(int n):
    """Set the thread count of the BLAS that the kernels call (SciPy's) to n >= 1,
    process-wide, as threadpoolctl does, but at the cost of one C call. Returns False
    where this BLAS's count cannot be read and set (then nothing changes)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if _set_blas_threads == NULL or _rt.num_threads == NULL:
        return False
    _set_blas_threads(n)
    return True


def simd_path():
    """The best code path this CPU runs, in words (kernel() says which one runs now)."""
    return rf_simd_path().decode()


def gemm_floor_buffer(str cell, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                      dtype):
    """A buffer for gemm_floor (zeros: the values do not matter, and zeros are never NaN)."""
    return np.zeros(rf_gemm_floor_size(T, B, I, H, _cell(cell).gates), dtype)


def gemm_floor(str cell, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
               floating[::1] buf, bint train):
    """Run only the matrix products of one dense call, one BLAS call each (the benchmarks'
    "GEMM floor"). buf: from gemm_floor_buffer with the same sizes."""
    cdef Py_ssize_t G = _cell(cell).gates
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
            (rf_sigmoid_f32 if sig else rf_tanh_f32)(_p(a), a.shape[0], rf_simd(&_rt))
        else:
            (rf_sigmoid_f64 if sig else rf_tanh_f64)(_p(a), a.shape[0], rf_simd(&_rt))


cdef class Plan:
    """The batch ordering of one call: rows sorted by decreasing length, and per step
    the number of rows still running and their first packed row (see rnnfuse.h)."""
    cdef readonly Py_ssize_t T, B, steps, rows
    cdef readonly bint reverse
    cdef readonly object lengths, order, batch_sizes, offsets
    cdef const int64_t[::1] _lengths
    cdef int64_t[::1] _order, _batch_sizes, _offsets

    def __init__(self, lengths, Py_ssize_t T, bint reverse):
        # A copy: the kernels index by these lengths, in this call and in its backward,
        # whatever the caller does with its array in between.
        lengths = np.array(lengths, order="C")  # int64: the memoryview below checks
        lengths.flags.writeable = False
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
        cdef double G = _cell(cell).gates
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
    straddled two lines, and every load of one touched two."""
    return _aligned_empty(n, np.dtype(dtype).num)


cdef cnp.ndarray _aligned_empty(cnp.npy_intp n, int typenum):
    """aligned_empty through NumPy's C API (several times cheaper than through Python)."""
    cdef cnp.npy_intp pad = 64 // (4 if typenum == cnp.NPY_FLOAT else 8), whole = n + pad
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &whole, typenum, 0)
    cdef char *data = <char *>cnp.PyArray_DATA(buf)
    cdef cnp.ndarray view = cnp.PyArray_SimpleNewFromData(1, &n, typenum,
                                                          data + (64 - <size_t>data % 64) % 64)
    cnp.set_array_base(view, buf)  # the view keeps the whole buffer alive
    return view


def workspace_size(str cell, Plan plan not None, Py_ssize_t I, Py_ssize_t H, bint train,
                   bint layer_norm=False):
    """Elements of the forward's workspace (with train: the saved state backward reads);
    layer_norm: the layer-normalized cell's."""
    cdef int c = _cell(cell).id
    cdef rf_plan p = plan.view()
    if layer_norm and c == RF_RNN:
        raise ValueError("_kernels: layer_norm is for the LSTM and the GRU, not the rnn")
    return _workspace_size(c, &p, I, H, train, layer_norm)


def workspace_weights_size(str cell, Py_ssize_t I, Py_ssize_t H):
    """Elements at the end of every forward workspace of these sizes where the forward
    packs its weights (int8 weights: their products' scratch); not all of them are
    written."""
    return rf_weights_pack_size(_cell(cell).gates, H, I)


cdef Py_ssize_t _workspace_size(int cell, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                                bint train, bint layer_norm):
    return rf_ln_workspace(cell, p, I, H, train) if layer_norm else \
        rf_workspace(cell, p, I, H, train)


cdef rf_layernorm _layernorm(const rf_cell *c, bint option, bint peep, gains, grads,
                             Py_ssize_t H, int t) except *:
    """A call's layer normalization for C: gains None (none), or (g_ih, g_hh) for the GRU
    with linear_before_reset and (g_ih, g_hh, g_c, b_c) for the LSTM without peepholes;
    grads None (forward) or arrays of the same shapes. C reads every one of them."""
    cdef rf_layernorm n
    n.g_ih = n.g_hh = n.g_c = n.b_c = NULL
    n.dg_ih = n.dg_hh = n.dg_c = n.db_c = NULL
    if gains is None:
        return n
    cdef bint lstm = c.id == RF_LSTM
    if not (lstm or c.id == RF_GRU and option) or peep:
        raise ValueError(f"_kernels: layer_norm is for the LSTM without peepholes and the "
                         f"GRU with linear_before_reset, got {c.name.decode()} with "
                         f"option={option}, peepholes={peep}")
    names = ("g_ih", "g_hh", "g_c", "b_c") if lstm else ("g_ih", "g_hh")
    cdef void *p[4]
    cdef void *dp[4]
    _layernorm_arrays(p, "layer_norm", gains, names, c, H, t, _REQUIRED)
    n.g_ih, n.g_hh = p[0], p[1]
    if lstm:
        n.g_c, n.b_c = p[2], p[3]
    if grads is not None:
        _layernorm_arrays(dp, "dlayer_norm", grads, names, c, H, t, _OUT)
        n.dg_ih, n.dg_hh = dp[0], dp[1]
        if lstm:
            n.dg_c, n.db_c = dp[2], dp[3]
    return n


cdef int _layernorm_arrays(void **data, str which, arrays, tuple names, const rf_cell *c,
                           Py_ssize_t H, int t, int flags) except -1:
    """data[k] = the data of arrays[k], after checking that arrays holds one array of
    shape (G*H,) or, for g_c and b_c, (H,) per name."""
    if not (isinstance(arrays, (tuple, list)) and len(arrays) == len(names)):
        raise ValueError(f"_kernels: {which} must hold {len(names)} arrays "
                         f"({', '.join(names)}) for the {c.name.decode()}, got "
                         f"{type(arrays).__name__}"
                         + (f" of {len(arrays)}" if isinstance(arrays, (tuple, list)) else ""))
    cdef Py_ssize_t k, size
    for k in range(len(names)):
        a, size = arrays[k], c.gates * H if k < 2 else H
        if not (cnp.PyArray_Check(a) and a.shape == (size,)):
            raise ValueError(f"_kernels: {which} {names[k]} must have shape ({size},), got "
                             f"{getattr(a, 'shape', type(a).__name__)}")
        data[k] = _buf(a, size, t, f"{which} {names[k]}", flags)
    return 0


def backward_scratch_size(str cell, Plan plan not None, Py_ssize_t I, Py_ssize_t H):
    cdef rf_plan p = plan.view()
    return rf_backward_scratch(&p, I, H, _cell(cell).gates)


cdef inline int64_t *_p64(int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline const int64_t *_p64c(const int64_t[::1] a) noexcept:
    return &a[0] if a.shape[0] > 0 else NULL

cdef inline floating *_p(floating[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# The kernel wrappers take ndarrays and hand C their data pointers (NumPy's C API: cheaper
# than typed memoryviews). They trust functional.py for shapes and values but check, per
# array, what keeps C inside its buffers: exact type, dtype, C-contiguous and aligned,
# writable for outputs, and the element count C will touch.

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
    as the forwards' packed with the same weights: tagged with G, H, I and lbr (the GRU's
    linear_before_reset), which the forwards check; on a cache line, as the kernels read
    it fastest (a copy elsewhere gives the same numbers)."""
    cdef int t = _typenum(w_hh, "w_hh")
    _typenum(w_ih, "w_ih")  # the same dtype is checked below
    if not (G in GATES.values() and w_ih.ndim == 2 and w_hh.ndim == 2 and w_hh.shape[1] >= 1
            and w_ih.shape[1] >= 1 and w_hh.shape[0] == w_ih.shape[0] == G * w_hh.shape[1]):
        raise ValueError(f"w_ih and w_hh must be (G*H, I) and (G*H, H) with G in "
                         f"{tuple(sorted(GATES.values()))}, got {w_ih.shape} and "
                         f"{w_hh.shape} for G={G}")
    cdef Py_ssize_t H = w_hh.shape[1], I = w_ih.shape[1]
    cdef void *src_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    cdef void *src_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    packed = aligned_empty(rf_weights_packed_size(G, H, I), w_hh.dtype)
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


# ---------------------------------------------------------------- forward and backward

cdef object _empty(int typenum, int nd, cnp.npy_intp d0, cnp.npy_intp d1,
                   cnp.npy_intp d2=0, bint zeros=False):
    cdef cnp.npy_intp dims[3]
    dims[0], dims[1], dims[2] = d0, d1, d2
    if zeros:
        return cnp.PyArray_ZEROS(nd, dims, typenum, 0)
    return cnp.PyArray_EMPTY(nd, dims, typenum, 0)


cdef inline int _forward(bint f32, int cell, int option, const rf_forward_bufs *a,
                         const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                         bint train) noexcept nogil:
    """C's one forward entry point, of the call's dtype, on the current code path."""
    return (rf_forward_f32 if f32 else rf_forward_f64)(cell, option, a, p, I, H, train, &_rt)


cdef inline int _backward(bint f32, int cell, int option, const rf_backward_bufs *a,
                          const rf_plan *p, Py_ssize_t I, Py_ssize_t H) noexcept nogil:
    """C's one backward entry point, as _forward."""
    return (rf_backward_f32 if f32 else rf_backward_f64)(cell, option, a, p, I, H, &_rt)


cdef int _check_weight_shapes(w_ih, w_hh, Py_ssize_t G, Py_ssize_t I,
                              Py_ssize_t H) except -1:
    """w_ih (G*H, I) and w_hh (G*H, H): the shapes, not only the sizes, so that I and H
    cannot disagree with the weights (an empty batch pins neither through x or y)."""
    if not (cnp.PyArray_Check(w_ih) and cnp.PyArray_Check(w_hh) and w_ih.ndim == 2
            and w_hh.ndim == 2 and w_ih.shape[0] == G * H and w_ih.shape[1] == I
            and w_hh.shape[0] == G * H and w_hh.shape[1] == H):
        raise ValueError(f"_kernels: w_ih and w_hh must be {(G * H, I)} and {(G * H, H)}, "
                         f"got {getattr(w_ih, 'shape', w_ih)} and "
                         f"{getattr(w_hh, 'shape', w_hh)}")
    return 0


cdef rf_forward_bufs _forward_args(const rf_cell *c, y, h_n, c_n, ws, x, h0, c0, w_ih, w_hh,
                                   b_ih, b_hh, Plan plan, Py_ssize_t I, Py_ssize_t H,
                                   bint train, bint option, peep, zoneout, recdrop,
                                   recdrop_buf, packed=None, layer_norm=None) except *:
    cdef int t = _typenum(x)
    cdef Py_ssize_t G = c.gates, TB = plan.T * plan.B, BH = plan.B * H
    cdef bint lstm = c.states == 2
    cdef rf_plan p = plan.view()
    cdef rf_forward_bufs a
    _check_weight_shapes(w_ih, w_hh, G, I, H)
    a.y = _buf(y, TB * H, t, "y", _OUT)
    a.h_n = _buf(h_n, BH, t, "h_n", _OUT)
    a.c_n = _buf(c_n, BH, t, "c_n", _OUT) if lstm else NULL
    a.peep = _buf(peep, 3 * H, t, "peep", _OPTIONAL) if lstm else NULL
    a.layernorm = _layernorm(c, option, a.peep != NULL, layer_norm, None, H, t)
    a.ws = _buf(ws, _workspace_size(c.id, &p, I, H, train, layer_norm is not None), t, "ws",
                _OUT)
    a.x = _buf(x, TB * I, t, "x", _REQUIRED)
    a.h0 = _buf(h0, BH, t, "h0", _OPTIONAL)
    a.c0 = _buf(c0, BH, t, "c0", _OPTIONAL) if lstm else NULL
    a.w_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    a.w_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    a.b_ih = _buf(b_ih, G * H, t, "b_ih", _OPTIONAL)
    a.b_hh = _buf(b_hh, G * H, t, "b_hh", _OPTIONAL)
    # packed None: the kernel packs the weights into ws itself
    a.packed = _buf(packed, rf_weights_packed_size(G, H, I), t, "packed", _OPTIONAL)
    if a.packed != NULL and not rf_weights_packed_for(a.packed, G, H, I, option):
        raise ValueError(f"_kernels: packed must be pack_weights' array for G={G}, H={H}, "
                         f"I={I}" + (f", lbr={option}" if c.id == RF_GRU else ""))
    a.zoneout = _zoneout(zoneout, lstm, t, TB * H, H)
    a.recdrop = _recdrop(recdrop, recdrop_buf, t, BH, BH)
    return a


cdef rf_recdrop _recdrop(mask, buf, int t, Py_ssize_t BH, Py_ssize_t scratch) except *:
    """A call's recurrent dropout for C: mask None (none) or (B,H); buf its scratch."""
    cdef rf_recdrop r
    r.m = r.buf = NULL
    if mask is not None:
        r.m = _buf(mask, BH, t, "recurrent_dropout", _REQUIRED)
        r.buf = _buf(buf, scratch, t, "recdrop_buf", _OUT)
    return r


cdef rf_zoneout _zoneout(zoneout, bint lstm, int t, Py_ssize_t full,
                         Py_ssize_t H) except *:
    """A call's zoneout for C, less backward's carry: zoneout is None or (z_h, z_c,
    shared), z_c None but for the LSTM, each None or of full elements (shared: H)."""
    cdef rf_zoneout z
    z.h = z.c = z.carry = NULL
    z.shared = 0
    if zoneout is None:
        return z
    z_h, z_c, shared = zoneout
    cdef Py_ssize_t n = H if shared else full
    z.shared = bool(shared)
    z.h = _buf(z_h, n, t, "zoneout", _OPTIONAL)
    z.c = _buf(z_c, n, t, "zoneout", _OPTIONAL) if lstm else NULL
    return z


cpdef tuple forward(str cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, Plan plan, ws, Py_ssize_t I,
                    Py_ssize_t H, bint train, bint option=False, peep=None, zoneout=None,
                    recurrent_dropout=None, packed=None, layer_norm=None):
    """One forward of cell "lstm" (c0 used), "gru" (option = linear_before_reset) or "rnn"
    (option = relu) over ws (workspace_size elements): returns y (zero at padding), h_n
    and c_n (None but for the LSTM). c0, peep (3H, i o f): None but for the LSTM.
    zoneout: None or (z_h, z_c, shared), the weights (T,B,H), or (H,) if shared, with which
    the units of h and the LSTM's c (each or None) keep their previous values.
    recurrent_dropout: None or the (B,H) mask h_{t-1} is multiplied by in the recurrent
    product. packed: None, or w_ih and w_hh as pack_weights packed them for this cell,
    option and code path (kernel()). layer_norm: None, or the gains (g_ih, g_hh), for the
    LSTM (g_ih, g_hh, g_c, b_c) (ws: workspace_size(layer_norm=True) elements)."""
    if plan is None:  # (a cpdef function cannot say "not None")
        raise TypeError("_kernels: plan must be a Plan, got None")
    cdef const rf_cell *c = _cell(cell)
    cdef int t = _typenum(x), status
    cdef Py_ssize_t T = plan.T, B = plan.B
    y = _empty(t, 3, T, B, H, zeros=plan.rows < T * B)  # the kernels skip padding
    h_n = _empty(t, 2, B, H)
    c_n = _empty(t, 2, B, H) if c.states == 2 else None
    rd_buf = _empty(t, 1, B * H, 0) if recurrent_dropout is not None else None
    cdef rf_forward_bufs a = _forward_args(c, y, h_n, c_n, ws, x, h0, c0, w_ih, w_hh, b_ih,
                                           b_hh, plan, I, H, train, option, peep,
                                           zoneout, recurrent_dropout, rd_buf, packed,
                                           layer_norm)
    cdef rf_plan p = plan.view()
    with nogil:
        status = _forward(t == cnp.NPY_FLOAT, c.id, option, &a, &p, I, H, train)
    if status:
        raise RuntimeError(f"_kernels: no forward for cell {cell!r}")
    return y, h_n, c_n


cdef rf_backward_bufs _backward_args(const rf_cell *c, dx, dh0, dc0, dw_ih, dw_hh, db_ih,
                                     db_hh, dy, dh_n, dc_n, ws, out, scratch, x, w_ih,
                                     w_hh, Plan plan, Py_ssize_t I, Py_ssize_t H,
                                     bint option, peep, dpeep, zoneout, carry, recdrop,
                                     recdrop_buf, layer_norm=None, dlayer_norm=None) except *:
    cdef int t = _typenum(x)
    cdef Py_ssize_t G = c.gates, TB = plan.T * plan.B, BH = plan.B * H
    cdef bint lstm = c.states == 2
    cdef rf_plan p = plan.view()
    cdef rf_backward_bufs a
    _check_weight_shapes(w_ih, w_hh, G, I, H)
    a.dx = _buf(dx, TB * I, t, "dx", _OPTIONAL | _OUT)
    a.dh0 = _buf(dh0, BH, t, "dh0", _OPTIONAL | _OUT)
    a.dc0 = _buf(dc0, BH, t, "dc0", _OPTIONAL | _OUT) if lstm else NULL
    a.dw_ih = _buf(dw_ih, G * H * I, t, "dw_ih", _OUT)
    a.dw_hh = _buf(dw_hh, G * H * H, t, "dw_hh", _OUT)
    a.db_ih = _buf(db_ih, G * H, t, "db_ih", _OPTIONAL | _OUT)
    a.db_hh = _buf(db_hh, G * H, t, "db_hh", _OPTIONAL | _OUT)
    a.dy = _buf(dy, TB * H, t, "dy", _OPTIONAL)
    a.dh_n = _buf(dh_n, BH, t, "dh_n", _OPTIONAL)
    a.dc_n = _buf(dc_n, BH, t, "dc_n", _OPTIONAL) if lstm else NULL
    a.peep = _buf(peep, 3 * H, t, "peep", _OPTIONAL) if lstm else NULL
    a.layernorm = _layernorm(c, option, a.peep != NULL, layer_norm, dlayer_norm, H, t)
    cdef Py_ssize_t n_ws = _workspace_size(c.id, &p, I, H, True, layer_norm is not None)
    if out is not None and layer_norm is not None:
        raise ValueError("_kernels: out must be None with layer_norm (its backward writes "
                         "into ws)")
    a.ws = _buf(ws, n_ws, t, "ws", _REQUIRED if out is not None else _OUT)
    a.out = a.ws if out is None else _buf(out, n_ws, t, "out", _OUT)
    a.scratch = _buf(scratch, rf_backward_scratch(&p, I, H, G), t, "scratch", _OUT)
    a.x = _buf(x, TB * I, t, "x", _REQUIRED)
    a.w_ih = _buf(w_ih, G * H * I, t, "w_ih", _REQUIRED)
    a.w_hh = _buf(w_hh, G * H * H, t, "w_hh", _REQUIRED)
    a.dpeep = _buf(dpeep, 3 * H, t, "dpeep", _OUT) if a.peep != NULL else NULL
    a.zoneout = _zoneout(zoneout, lstm, t, TB * H, H)
    if a.zoneout.h != NULL or a.zoneout.c != NULL:
        a.zoneout.carry = _buf(carry, 2 * BH, t, "carry", _OUT)
    a.recdrop = _recdrop(recdrop, recdrop_buf, t, BH, plan.rows * H + BH)
    return a


def backward(str cell, dy, dh_n, dc_n, ctx, out=None, bint inputs=True, bint states=True,
             weight_grads=None):
    """One backward over a training forward's ctx (functional.py's Context, checked there)
    whose dy, dh_n and dc_n (LSTM only) are None or already what the kernels take:
    returns dx (None unless inputs), dh0 and dc0 (None unless states; dc0 None but for the
    LSTM), dw_ih, dw_hh, db_ih, db_hh (written into weight_grads' arrays where given: a
    tuple of four, each None for a new array; None for an absent bias), dpeep (the
    peepholes' gradient, None without ctx.peep), dlayer_norm (the
    gradients of ctx.layer_norm's arrays, a tuple, or None without it) and the
    workspace, taken from ctx by ctx.take() and overwritten, or with ``out`` (an array of
    as many elements; not with layer norm) only read, the backward writing into out
    instead. For any other dy, dh_n or dc_n: None, with ctx untouched (functional.py then
    checks, explains or converts)."""
    cdef Plan plan = ctx.plan
    if plan is None:
        raise TypeError("_kernels: ctx.plan must be a Plan, got None")
    cdef const rf_cell *c = _cell(cell)
    cdef Py_ssize_t G = c.gates, T = plan.T, B = plan.B
    cdef Py_ssize_t I = ctx.input_size, H = ctx.hidden_size
    cdef bint lstm = c.states == 2
    x, w_ih, w_hh = ctx.x, ctx.w_ih, ctx.w_hh
    cdef int t = _typenum(x), status
    if not _upstream_taken(dy, dh_n, dc_n, lstm, t, T, B, H):
        return None
    ws = ctx.take()
    has_ih, has_hh = ctx.has_bias
    cdef bint option = ctx.option
    cdef rf_backward_bufs a
    try:  # a refusal or a failed allocation leaves ctx as it was
        scratch = _aligned_empty(backward_scratch_size(cell, plan, I, H), t)
        # padding's gradient is zero
        dx = _empty(t, 3, T, B, I, zeros=plan.rows < T * B) if inputs else None
        dh0 = _empty(t, 2, B, H) if states else None
        dc0 = _empty(t, 2, B, H) if lstm and states else None
        dw_ih, dw_hh, db_ih, db_hh = (None,) * 4 if weight_grads is None else weight_grads
        dw_ih = _empty(t, 2, G * H, I) if dw_ih is None else dw_ih
        dw_hh = _empty(t, 2, G * H, H) if dw_hh is None else dw_hh
        db_ih = None if not has_ih else _empty(t, 1, G * H, 0) if db_ih is None else db_ih
        db_hh = None if not has_hh else _empty(t, 1, G * H, 0) if db_hh is None else db_hh
        peep = ctx.peep if lstm else None  # functional.Context: None without peepholes
        dpeep = _empty(t, 1, 3 * H, 0) if peep is not None else None
        zoneout = ctx.zoneout  # functional.Context: None without zoneout
        carry = _empty(t, 1, 2 * B * H, 0) if zoneout is not None else None
        recdrop = ctx.recurrent_dropout  # functional.Context: None without it
        rd_buf = _empty(t, 1, (plan.rows + B) * H, 0) if recdrop is not None else None
        ln = ctx.layer_norm  # functional.Context: None without layer norm
        dln = None if ln is None else tuple(_empty(t, 1, g.shape[0], 0) for g in ln)
        a = _backward_args(c, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n, ws,
                           out, scratch, x, w_ih, w_hh, plan, I, H, option, peep, dpeep,
                           zoneout, carry, recdrop, rd_buf, ln, dln)
    except BaseException:
        ctx.ws = ws
        raise
    cdef rf_plan p = plan.view()
    with nogil:
        status = _backward(t == cnp.NPY_FLOAT, c.id, option, &a, &p, I, H)
    if status:
        raise RuntimeError(f"_kernels: no backward for cell {cell!r}")
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeep, dln, ws


include "small.pxi"  # the small-call fast path: forward_small, _takes
include "stream.pxi"  # Stream: a layer stepped one timestep at a time
include "pool.pxi"  # StreamPool: sessions of one layer stepped together
include "capi.pxi"  # the C-level API of _kernels.pxd (rnnfuse.capi)
include "quant.pxi"  # int8 weights for inference (rnnfuse.quantized)
include "proj.pxi"  # the LSTM with a projection (proj_size): lstmp.c
