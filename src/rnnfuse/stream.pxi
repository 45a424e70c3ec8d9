# Stream, included by _kernels.pyx: a unidirectional layer stepped one timestep at a time,
# through the same forward entry point as whole sequences.
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.stdlib cimport calloc, free

ctypedef struct _StreamLayer:
    Py_ssize_t n_in  # input size
    void *y          # this layer's output, the next layer's input
    const void *w_hr # the LSTM's projection (proj_size), else NULL
    rf_forward_bufs call[2]  # the forward's pointers reading state 0 or 1 (double-buffered)


cdef void *_data(a):
    return cnp.PyArray_DATA(a) if a is not None and a.size else NULL


def _shared_zoneout(double p, Py_ssize_t H, dtype, Py_ssize_t proj_size=0):
    """Eval's zoneout for a stream or a pool: one (H,) row of p, or None for none."""
    if not 0 <= p < 1:
        raise ValueError(f"zoneout must be a probability in [0, 1), got {p}")
    if p and proj_size:
        raise ValueError("zoneout is not supported with proj_size")
    return np.full(H, p, dtype) if p else None


def _extra_weights(list extra, bint layer_norm, bint has_w_hr):
    """A layer's weights after (w_ih, w_hh, b_ih, b_hh), as _stream_sizes checked them:
    (w_hr, layer norm's gains, peepholes), each None where absent. has_w_hr: a float
    layer's projection comes first."""
    w_hr = extra[0] if has_w_hr else None
    rest = extra[1:] if has_w_hr else extra
    if layer_norm:
        return w_hr, rest, None
    return w_hr, None, rest[0] if rest else None


def _layer_workspace(str cell, Plan plan, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                     bint layer_norm):
    """Elements of the inference workspace of one layer's step."""
    return lstmp_workspace_size(plan, I, H, P, False) if P else \
        workspace_size(cell, plan, I, H, False, layer_norm)


cdef void _set_zoneout(rf_zoneout *z, row, bint lstm):
    z.h = _data(row)
    z.c = z.h if lstm else NULL
    z.shared = 1
    z.carry = NULL


cdef tuple _stream_sizes(str who, const rf_cell *spec, bint option, int typenum,
                         list weights, bint int8, bint layer_norm=False,
                         Py_ssize_t proj_size=0):
    """(input size, hidden size) of a stream's or a pool's weights, after checking what
    keeps C inside its buffers. weights: per layer (w_ih, w_hh, b_ih, b_hh), C-contiguous
    arrays of the dtype (biases may be None); with int8 (float32 only), per layer
    (q8_pack_weights' array, input size, b_ih, b_hh), the hidden size read from the
    packed array (which is then checked whole); either followed by the LSTM's peepholes
    if it has them, or with layer_norm by its gains (g_ih, g_hh, and the LSTM's g_c, b_c).
    With proj_size P (the LSTM's projection): w_hh is (4H, P), then w_hr (P, H) before
    the peepholes (int8: inside the packed array), and the layers after the first take P
    inputs."""
    cdef Py_ssize_t G = spec.gates, H, I, l, P = proj_size
    if layer_norm and not (spec.id == RF_LSTM or (spec.id == RF_GRU and option)):
        raise ValueError(f"{who}: layer_norm runs the LSTM and the GRU with "
                         "linear_before_reset only")
    if P and (spec.id != RF_LSTM or layer_norm or P < 0):
        raise ValueError(f"{who}: proj_size runs the LSTM without layer_norm only")
    if int8:
        if typenum != cnp.NPY_FLOAT:
            raise TypeError(f"{who}: int8 weights run float32 only")
        I, H = _q8_stream_sizes(who, spec, option, [w[:4] for w in weights], P)
    else:
        H = weights[0][1].shape[0] // G if P else weights[0][1].shape[1]
        I = weights[0][0].shape[1]
        for l, (w_ih, w_hh, b_ih, b_hh, *_) in enumerate(weights):
            if H < 1 or w_ih.ndim != 2 or w_ih.shape[1] != (I if l == 0 else P or H) or I < 1:
                raise ValueError(f"{who}: layer {l}'s w_ih has shape {w_ih.shape}")
            _buf(w_ih, G * H * w_ih.shape[1], typenum, "w_ih", _REQUIRED)
            _buf(w_hh, G * H * (P or H), typenum, "w_hh", _REQUIRED)
            _buf(b_ih, G * H, typenum, "b_ih", _OPTIONAL)
            _buf(b_hh, G * H, typenum, "b_hh", _OPTIONAL)
    for l, w in enumerate(weights):
        extra = w[4:]
        if P and not int8:
            if not extra:
                raise ValueError(f"{who}: layer {l}'s weights lack w_hr (proj_size)")
            _check_proj_shapes(w[0], w[1], extra[0], w[0].shape[1], H, P)
            _buf(extra[0], P * H, typenum, "w_hr", _REQUIRED)
            extra = extra[1:]
        if layer_norm:
            if len(extra) != 2 * spec.states:
                raise ValueError(f"{who}: layer {l}'s weights have {4 + len(extra)} parts"
                                 f" (with layer_norm {4 + 2 * spec.states}: the gains last)")
            _layernorm(spec, option, False, extra, None, H, typenum)  # checks them
            continue
        if extra and (spec.id != RF_LSTM or len(extra) > 1):
            raise ValueError(f"{who}: layer {l}'s weights have {4 + len(w[4:])} parts"
                             " (only the LSTM's have a fifth, its peepholes, after w_hr"
                             " with proj_size)")
        _buf(extra[0] if extra else None, 3 * H, typenum, "peepholes", _OPTIONAL)
    return I, H


cdef extern from "lstmp.h" nogil:
    Py_ssize_t rf_lstmp_pack_size(Py_ssize_t I, Py_ssize_t H, Py_ssize_t P)
    void rf_lstmp_pack_f32(float *packed, const float *w_ih, const float *w_hh,
                           const float *w_hr, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                           int avx2)
    void rf_lstmp_pack_f64(double *packed, const double *w_ih, const double *w_hh,
                           const double *w_hr, Py_ssize_t I, Py_ssize_t H, Py_ssize_t P,
                           int avx2)


def _lstmp_pack(w_ih, w_hh, w_hr, Py_ssize_t P):
    """A projected layer's weights packed once, on the current code path, for its steps'
    forwards (after _stream_sizes checked them)."""
    cdef Py_ssize_t H = w_hh.shape[0] // 4, I = w_ih.shape[1]
    cdef int t = _typenum(w_hh)
    _check_proj_shapes(w_ih, w_hh, w_hr, I, H, P)
    cdef const void *ih = _buf(w_ih, 4 * H * I, t, "w_ih", _REQUIRED)
    cdef const void *hh = _buf(w_hh, 4 * H * P, t, "w_hh", _REQUIRED)
    cdef const void *hr = _buf(w_hr, P * H, t, "w_hr", _REQUIRED)
    packed = aligned_empty(rf_lstmp_pack_size(I, H, P), w_hh.dtype)
    cdef void *dst = cnp.PyArray_DATA(packed)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rf_lstmp_pack_f32(<float *>dst, <const float *>ih, <const float *>hh,
                              <const float *>hr, I, H, P, _rt.avx2)
        else:
            rf_lstmp_pack_f64(<double *>dst, <const double *>ih, <const double *>hh,
                              <const double *>hr, I, H, P, _rt.avx2)
    packed.flags.writeable = False
    return packed


cdef inline void _step_layer(bint f32, int cell, int option, const rf_forward_bufs *a,
                             const void *w_hr, const rf_plan *p, Py_ssize_t I, Py_ssize_t H,
                             Py_ssize_t P) noexcept nogil:
    """One timestep of one layer of a stream or a pool: C's forward entry point, or with
    a projection (P > 0) lstmp.c's forward, reading a's pointers (a.packed: _lstmp_pack's)."""
    if P == 0:
        _forward(f32, cell, option, a, p, I, H, 0)
    elif f32:
        rf_lstmp_forward_f32(a.y, a.h_n, a.c_n, a.ws, a.x, a.h0, a.c0, a.w_ih, a.w_hh, w_hr,
                             a.b_ih, a.b_hh, a.peep, a.packed, p, I, H, P, 0, &_rt)
    else:
        rf_lstmp_forward_f64(a.y, a.h_n, a.c_n, a.ws, a.x, a.h0, a.c0, a.w_ih, a.w_hh, w_hr,
                             a.b_ih, a.b_hh, a.peep, a.packed, p, I, H, P, 0, &_rt)


cdef class Stream:
    """A unidirectional layer stepped one timestep at a time, its state kept between calls.

    Made by ``layer.stream(batch_size=1, state=None)``. ``stream.step(x_t)`` takes one
    step's input ``(batch_size, input_size)`` and returns that step's output
    ``(batch_size, hidden_size)`` (a new array; proj_size wide with a projection): the
    matching row of ``layer.forward`` over the whole sequence, bit for bit.
    ``stream.state`` is the current state in the layer's form (copies);
    ``stream.reset(state=None)`` sets it (None: zeros).

    The stream keeps its own copy of the layer's weights as they were when it was made, and
    runs as in eval mode (no dropout). One stream is stepped by one thread at a time
    (a concurrent step raises RuntimeError); make one stream per thread.
    """
    cdef int cell, option, typenum
    cdef readonly Py_ssize_t batch_size, input_size, hidden_size, num_layers, proj_size
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

    def __init__(self, str cell, option, dtype, Py_ssize_t batch_size, list weights,
                 bint int8=False, *, double zoneout=0.0, bint layer_norm=False,
                 Py_ssize_t proj_size=0):
        """Internal: use ``layer.stream()``. weights: see _stream_sizes. zoneout: eval's
        p."""
        cdef Py_ssize_t l, k, B = batch_size, G, H, I, P = proj_size, R
        cdef const rf_cell *spec = _cell(cell) if cell in CELLS else NULL
        cdef rf_forward_bufs *call
        if self.layers != NULL:
            raise RuntimeError("a Stream is initialised once")
        if spec == NULL or not weights or B < 0 or dtype not in (np.float32, np.float64):
            raise ValueError("Stream(cell, option, dtype, batch_size, weights): use "
                             "layer.stream()")
        self.cell = spec.id
        self.option = bool(option)
        self.dtype = np.dtype(dtype)
        self.typenum = cnp.NPY_FLOAT if self.dtype == np.float32 else cnp.NPY_DOUBLE
        G = spec.gates
        I, H = _stream_sizes("Stream", spec, self.option, self.typenum, weights, int8,
                             layer_norm, P)
        R = P or H  # the width of h and y
        self.batch_size, self.hidden_size, self.num_layers = B, H, len(weights)
        self.proj_size = P
        self.input_size = I
        self._n_states = spec.states
        lengths = np.ones(B, np.int64)
        self._plan_obj = Plan(lengths, 1, False)
        self.plan = (<Plan>self._plan_obj).view()
        self.layers = <_StreamLayer *>calloc(len(weights), sizeof(_StreamLayer))
        if self.layers == NULL:
            raise MemoryError()
        self._keep, self._h, self._c = [], [], []  # the arrays the C pointers point into
        zone = _shared_zoneout(zoneout, H, self.dtype, P)
        self._keep.append(zone)
        for l, (w_ih, w_hh, b_ih, b_hh, *extra) in enumerate(weights):
            I = w_hh if int8 else w_ih.shape[1]
            w_hr, ln, peep = _extra_weights(extra, layer_norm, P > 0 and not int8)
            ws = aligned_empty(_layer_workspace(cell, self._plan_obj, I, H, P, layer_norm),
                               self.dtype)
            packed = w_ih if int8 else _lstmp_pack(w_ih, w_hh, w_hr, P) if P else \
                pack_weights(w_ih, w_hh, G, self.option)
            y = np.zeros((B, R), self.dtype)
            h = [np.zeros((B, R), self.dtype) for _ in range(2)]
            c = [np.zeros((B, H), self.dtype) for _ in range(2)]
            self._keep += [w_ih, w_hh, b_ih, b_hh, ws, packed, y, *extra]
            self._h.append(h)
            self._c.append(c)
            self.layers[l].n_in = I
            self.layers[l].y = _data(y)
            self.layers[l].w_hr = _data(w_hr)
            for k in range(2):  # read state k, write state 1-k
                call = &self.layers[l].call[k]
                if not int8:  # (int8: never read, packed holds the weights)
                    call.w_ih, call.w_hh = _data(w_ih), _data(w_hh)
                call.b_ih, call.b_hh = _data(b_ih), _data(b_hh)
                call.packed = _data(packed)
                call.peep = _data(peep)
                call.layernorm = _layernorm(spec, self.option, peep is not None, ln, None, H,
                                            self.typenum)
                _set_zoneout(&call.zoneout, zone, spec.states == 2)
                call.ws = _data(ws)
                call.h0, call.h_n = _data(h[k]), _data(h[1 - k])
                call.c0, call.c_n = _data(c[k]), _data(c[1 - k])
        self.cur = 0

    def __dealloc__(self):
        free(self.layers)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def __repr__(self):
        name = rf_cell_find(self.cell).name.decode().upper()
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
        RNN, each (num_layers, batch_size, hidden_size) (copies; h proj_size wide with a
        projection)."""
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):  # not half a step's state
            raise RuntimeError(_BUSY)
        try:
            parts = [np.stack(bufs) for bufs in self._states()]
        finally:
            PyThread_release_lock(self.lock)
        return tuple(parts) if self._n_states == 2 else parts[0]

    def reset(self, state=None):
        """Set the state: None for zeros, else in the layer's form (see ``state``)."""
        cdef Py_ssize_t L = self.num_layers
        shapes = [(L, self.batch_size, n) for n in (self.proj_size or self.hidden_size,
                                                    self.hidden_size)]
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
        for name, s, shape in zip(("h", "c") if self._n_states == 2 else ("state",), parts,
                                  shapes):
            if s is not None:
                s = np.asarray(s)
                if s.dtype != self.dtype:
                    raise TypeError(f"{name} must have dtype {self.dtype} (the stream's "
                                    f"dtype), got {s.dtype}")
                if s.shape != shape:
                    width = "proj_size" if name == "h" and self.proj_size else "hidden_size"
                    raise ValueError(f"{name} must have shape {shape} (num_layers, "
                                     f"batch_size, {width}), got {s.shape}")
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
        hidden_size, or proj_size with a projection), the top layer's output."""
        if not (cnp.PyArray_CheckExact(x) and cnp.PyArray_TYPE(x) == self.typenum
                and cnp.PyArray_NDIM(x) == 2 and cnp.PyArray_ISCARRAY_RO(x)
                and cnp.PyArray_DIM(x, 0) == self.batch_size
                and cnp.PyArray_DIM(x, 1) == self.input_size):
            x = self._check_x(x)
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = self.batch_size, self.proj_size or self.hidden_size
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
        cdef rf_forward_bufs *call
        for l in range(self.num_layers):
            s = &self.layers[l]
            call = &s.call[self.cur]
            call.x = x if l == 0 else <const void *>self.layers[l - 1].y
            call.y = y if l == last else s.y
            _step_layer(self.typenum == cnp.NPY_FLOAT, self.cell, self.option, call, s.w_hr,
                        &self.plan, s.n_in, self.hidden_size, self.proj_size)
        self.cur = 1 - self.cur


_BUSY = "this stream is being stepped by another thread; make one stream per thread"
