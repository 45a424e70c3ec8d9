# StreamPool, included by _kernels.pyx after stream.pxi: many sessions of one unidirectional
# layer, each with its own state, any subset of them stepped together by one kernel call
# per layer.
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.string cimport memcpy, memset

ctypedef struct _PoolLayer:
    Py_ssize_t n_in  # input size
    char *h          # (capacity, H) the sessions' states, a row per slot
    char *c          # (capacity, H) the LSTM's cell states, else NULL
    char *h0         # (capacity, H) a step's states gathered in the order of its ids
    char *c0
    char *h_n        # (capacity, H) the states the step leaves, scattered back to the slots
    char *c_n
    void *y          # (capacity, H) this layer's output, the next layer's input
    const void *w_hr # the LSTM's projection (proj_size), else NULL; then h, h0, h_n and y
                     # have rows of P, not H
    rf_forward_bufs call


cdef object _ids_as_int64(ids):
    """step's ids without Python-level checks where they are plainly valid: a C-contiguous,
    aligned, native 1-D int64 array as it is, or a list of ints (not bools) within int64
    converted in C; None for anything else (StreamPool._check_ids then decides, and words
    the errors)."""
    if cnp.PyArray_CheckExact(ids):
        if (cnp.PyArray_TYPE(ids) == cnp.NPY_INT64 and cnp.PyArray_NDIM(ids) == 1
                and cnp.PyArray_ISCARRAY_RO(ids) and cnp.PyArray_ISNOTSWAPPED(ids)):
            return ids
        return None
    if type(ids) is not list:
        return None
    cdef cnp.npy_intp n = PyList_GET_SIZE(ids), i
    out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT64, 0)
    cdef int64_t *dst = <int64_t *>cnp.PyArray_DATA(out)
    cdef int overflow
    cdef object item
    for i in range(n):
        item = <object>PyList_GET_ITEM(ids, i)
        if type(item) is not int:
            return None
        dst[i] = PyLong_AsLongLongAndOverflow(item, &overflow)
        if overflow:
            return None
    return out


cdef class StreamPool:
    """Sessions of one unidirectional layer, each with its own state, stepped together.

    Made by ``layer.stream_pool(capacity)``. ``pool.open(state=None)`` starts a session and
    returns its id (an int, never reused by this pool); ``pool.step(ids, x)`` advances the
    sessions ``ids`` (distinct open ids, in any order, any subset) by one timestep, x
    ``(len(ids), input_size)`` row i being session ``ids[i]``'s input, and returns their
    outputs ``(len(ids), hidden_size)`` in the same order (a new array);
    ``pool.state(sid)`` is a session's state in the layer's form for batch 1 (copies):
    ``(h, c)`` for LSTM, ``h`` for GRU and RNN, each (num_layers, 1, hidden_size) (h
    and the outputs proj_size wide with a projection), as ``layer.forward`` takes and
    returns it; ``pool.close(sid)`` ends it and frees its slot.

    A step is one kernel call per layer over the sessions that step, their states gathered
    and scattered in C, the GIL released. Batch invariance: the steps' products round each
    session's row alike whatever other sessions step with it, in whatever order, and at any
    thread count, so a session's outputs are bitwise the same whoever shares its steps, and
    those of a stream of batch 1 and of the session's row of ``layer.forward`` in eval
    mode.

    Every argument is checked before any state changes: unknown, closed or repeated ids,
    a full pool, wrong shapes or dtypes raise with nothing done. The pool keeps its own
    copy of the layer's weights, packed once, and runs as in eval mode (no dropout). One
    thread at a time: a call that overlaps another call on the same pool raises
    RuntimeError (make one pool per thread, or serialise the calls).
    """
    cdef int cell, option, typenum
    cdef readonly Py_ssize_t capacity, input_size, hidden_size, num_layers, proj_size
    cdef readonly object dtype
    cdef _PoolLayer *layers
    cdef int64_t *order      # (capacity,) 0, 1, ...: a step's rows in the order of its ids
    cdef int64_t *ones       # (capacity,) every row of a step runs one step
    cdef int64_t *slots      # (capacity,) the slots of the step being run
    cdef int64_t *gen        # (capacity,) per slot: the generation of its current session
    cdef int64_t *seen       # (capacity,) per slot: the call that last named it (repeats)
    cdef int64_t *free_slots # a stack of the free slots
    cdef Py_ssize_t n_free
    cdef int64_t calls
    cdef object _keep
    cdef PyThread_type_lock lock

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, str cell, option, dtype, Py_ssize_t capacity, list weights,
                 bint int8=False, *, double zoneout=0.0, bint layer_norm=False,
                 Py_ssize_t proj_size=0):
        """Internal: use ``layer.stream_pool()``. weights: see _stream_sizes. zoneout:
        eval's p."""
        cdef Py_ssize_t l, k, C = capacity, G, H, I, size, P = proj_size
        cdef const rf_cell *spec = _cell(cell) if cell in CELLS else NULL
        cdef _PoolLayer *s
        if self.layers != NULL:
            raise RuntimeError("a StreamPool is initialised once")
        if spec == NULL or not weights or C < 1 or dtype not in (np.float32, np.float64):
            raise ValueError("StreamPool(cell, option, dtype, capacity, weights): use "
                             "layer.stream_pool()")
        self.cell = spec.id
        self.option = bool(option)
        self.dtype = np.dtype(dtype)
        self.typenum = cnp.NPY_FLOAT if self.dtype == np.float32 else cnp.NPY_DOUBLE
        G = spec.gates
        I, H = _stream_sizes("StreamPool", spec, self.option, self.typenum, weights, int8,
                             layer_norm, P)
        self.capacity, self.hidden_size, self.num_layers = C, H, len(weights)
        self.proj_size = P
        self.input_size = I
        # the bookkeeping, one block of int64: order, ones, slots, gen, seen, free slots
        index = np.zeros(6 * C, np.int64)
        cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(index)
        self.order, self.ones, self.slots = ip, ip + C, ip + 2 * C
        self.gen, self.seen, self.free_slots = ip + 3 * C, ip + 4 * C, ip + 5 * C
        for k in range(C):
            self.order[k] = k
            self.ones[k] = 1
            self.seen[k] = -1
            self.free_slots[k] = C - 1 - k  # the lowest slot is taken first
        self.n_free = C
        self.calls = 0
        self.layers = <_PoolLayer *>calloc(len(weights), sizeof(_PoolLayer))
        if self.layers == NULL:
            raise MemoryError()
        plan = Plan(np.ones(C, np.int64), 1, False)  # the largest step: the workspace's size
        zone = _shared_zoneout(zoneout, H, self.dtype, P)
        self._keep = [index, zone]  # the arrays the C pointers point into
        for l, (w_ih, w_hh, b_ih, b_hh, *extra) in enumerate(weights):
            s = &self.layers[l]
            I = w_hh if int8 else w_ih.shape[1]
            w_hr, ln, peep = _extra_weights(extra, layer_norm, P > 0 and not int8)
            ws = aligned_empty(_layer_workspace(cell, plan, I, H, P, layer_norm), self.dtype)
            packed = w_ih if int8 else _lstmp_pack(w_ih, w_hh, w_hr, P) if P else \
                pack_weights(w_ih, w_hh, G, self.option)
            lstm = spec.states == 2
            bufs = np.zeros((7 if lstm else 4, C, H), self.dtype)  # (h's rows: P or H)
            self._keep += [w_ih, w_hh, b_ih, b_hh, ws, packed, bufs, *extra]
            s.n_in = I
            s.w_hr = _data(w_hr)
            size = C * H * self.dtype.itemsize
            s.h = <char *>_data(bufs)
            s.h0, s.h_n, s.y = s.h + size, s.h + 2 * size, <void *>(s.h + 3 * size)
            s.c = s.h + 4 * size if lstm else NULL
            s.c0 = s.h + 5 * size if lstm else NULL
            s.c_n = s.h + 6 * size if lstm else NULL
            if not int8:  # (int8: never read, packed holds the weights)
                s.call.w_ih, s.call.w_hh = _data(w_ih), _data(w_hh)
            s.call.b_ih, s.call.b_hh = _data(b_ih), _data(b_hh)
            s.call.packed = _data(packed)
            s.call.peep = _data(peep)
            s.call.layernorm = _layernorm(spec, self.option, peep is not None, ln, None, H,
                                          self.typenum)
            _set_zoneout(&s.call.zoneout, zone, spec.states == 2)
            s.call.ws = _data(ws)
            s.call.h0, s.call.h_n = s.h0, s.h_n
            s.call.c0, s.call.c_n = s.c0, s.c_n

    def __dealloc__(self):
        free(self.layers)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def __repr__(self):
        name = rf_cell_find(self.cell).name.decode().upper()
        return (f"<rnnfuse {name} stream pool: {self.num_layers} layer(s), "
                f"{self.capacity - self.n_free}/{self.capacity} sessions open, input_size="
                f"{self.input_size}, hidden_size={self.hidden_size}, {self.dtype}>")

    def __len__(self):
        """The number of open sessions."""
        return self.capacity - self.n_free

    @property
    def sessions(self):
        """The open sessions' ids, ascending (a new int64 array)."""
        cdef Py_ssize_t k
        ids = []
        self._acquire()
        try:
            for k in range(self.capacity):
                if not self._is_free(k):
                    ids.append(self.gen[k] * self.capacity + k)
        finally:
            PyThread_release_lock(self.lock)
        return np.array(sorted(ids), np.int64)

    cdef Py_ssize_t _row_bytes(self, int k) noexcept nogil:
        """The bytes of one row of h (k = 0: proj_size or hidden_size wide) or of the
        LSTM's c (k = 1)."""
        cdef Py_ssize_t n = self.proj_size if k == 0 and self.proj_size else self.hidden_size
        return n * (4 if self.typenum == cnp.NPY_FLOAT else 8)

    cdef bint _is_free(self, Py_ssize_t slot) noexcept:
        # a slot is open while its generation is odd: open and close each advance it
        return self.gen[slot] % 2 == 0

    cdef int _acquire(self) except -1:
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            raise RuntimeError(_POOL_BUSY)
        return 0

    cdef Py_ssize_t _slot(self, sid, str name="sid") except -1:
        """The slot of open session sid (under the lock); errors name the argument."""
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"{name} must be a session id (an int from open()), got "
                            f"{type(sid).__name__}")
        cdef int64_t v = sid if -2**63 <= sid < 2**63 else -1
        cdef Py_ssize_t slot = v % self.capacity if v >= 0 else -1
        if slot < 0 or v // self.capacity != self.gen[slot] or self._is_free(slot):
            raise ValueError(f"{name}: {sid} is not an open session of this pool")
        return slot

    def _parts(self, state):
        """The arrays of a state in the layer's form for batch 1 (None: zeros), checked."""
        cdef Py_ssize_t L = self.num_layers
        lstm = self.layers[0].c != NULL
        shapes = [(L, 1, n) for n in (self.proj_size or self.hidden_size, self.hidden_size)]
        if state is None:
            return [None] * (2 if lstm else 1)
        if lstm:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"state must be a tuple (h, c) for an LSTM pool, got "
                                f"{type(state).__name__}")
            parts = list(state)
        else:
            parts = [state]
        arrays = []
        for name, s, shape in zip(("h", "c") if lstm else ("state",), parts, shapes):
            if s is not None:
                s = np.asarray(s)
                if s.dtype != self.dtype:
                    raise TypeError(f"{name} must have dtype {self.dtype} (the pool's "
                                    f"dtype), got {s.dtype}")
                if s.shape != shape:
                    width = "proj_size" if name == "h" and self.proj_size else "hidden_size"
                    raise ValueError(f"{name} must have shape {shape} (num_layers, 1, "
                                     f"{width}), got {s.shape}")
                s = np.ascontiguousarray(s)
            arrays.append(s)
        return arrays

    def open(self, state=None):
        """Start a session from ``state`` (the layer's form for batch 1, see the class;
        None: zeros) and return its id. RuntimeError when all capacity slots are open."""
        arrays = self._parts(state)
        cdef Py_ssize_t l, slot, nbytes
        cdef _PoolLayer *s
        cdef char *dst
        cdef const char *src
        self._acquire()
        try:
            if self.n_free == 0:
                raise RuntimeError(f"the pool is full: all capacity={self.capacity} "
                                   f"sessions are open; close one first")
            self.n_free -= 1
            slot = self.free_slots[self.n_free]
            self.gen[slot] += 1
            for l in range(self.num_layers):
                s = &self.layers[l]
                for k, a in enumerate(arrays):
                    nbytes = self._row_bytes(k)
                    dst = (s.h if k == 0 else s.c) + slot * nbytes
                    if a is None:
                        memset(dst, 0, nbytes)
                    else:
                        src = <const char *>cnp.PyArray_DATA(a) + l * nbytes
                        memcpy(dst, src, nbytes)
            return self.gen[slot] * self.capacity + slot
        finally:
            PyThread_release_lock(self.lock)

    def close(self, sid):
        """End session sid and free its slot; its id is never valid again."""
        self._acquire()
        try:
            slot = self._slot(sid)
            self.gen[slot] += 1
            self.free_slots[self.n_free] = slot
            self.n_free += 1
        finally:
            PyThread_release_lock(self.lock)

    def state(self, sid):
        """Session sid's current state, in the layer's form for batch 1: ``(h, c)`` for
        LSTM, ``h`` for GRU and RNN, each (num_layers, 1, hidden_size) (copies)."""
        cdef Py_ssize_t l, slot, L = self.num_layers, H = self.hidden_size, nbytes
        cdef _PoolLayer *s
        lstm = self.layers[0].c != NULL
        parts = [np.empty((L, 1, n), self.dtype)
                 for n in (self.proj_size or H, H)[:2 if lstm else 1]]
        self._acquire()
        try:
            slot = self._slot(sid)
            for l in range(L):
                s = &self.layers[l]
                for k, a in enumerate(parts):
                    nbytes = self._row_bytes(k)
                    memcpy(<char *>cnp.PyArray_DATA(a) + l * nbytes,
                           (s.h if k == 0 else s.c) + slot * nbytes, nbytes)
        finally:
            PyThread_release_lock(self.lock)
        return tuple(parts) if lstm else parts[0]

    def step(self, ids, x):
        """Advance the sessions ``ids`` by one timestep: ids, distinct open session ids (a
        1-D integer array or sequence, any order); x (len(ids), input_size), row i the
        input of ids[i] -> y (len(ids), hidden_size), row i the top layer's output for
        ids[i] (proj_size wide with a projection)."""
        checked = _ids_as_int64(ids)
        ids = checked if checked is not None else self._check_ids(ids)
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0)
        if not (cnp.PyArray_CheckExact(x) and cnp.PyArray_TYPE(x) == self.typenum
                and cnp.PyArray_NDIM(x) == 2 and cnp.PyArray_ISCARRAY_RO(x)
                and cnp.PyArray_ISNOTSWAPPED(x) and cnp.PyArray_DIM(x, 0) == n
                and cnp.PyArray_DIM(x, 1) == self.input_size):
            x = self._check_x(x, n)
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = n, self.proj_size or self.hidden_size
        y = cnp.PyArray_EMPTY(2, dims, self.typenum, 0)
        cdef const int64_t *idp = <const int64_t *>cnp.PyArray_DATA(ids)
        cdef const void *xp = cnp.PyArray_DATA(x)
        cdef void *yp = cnp.PyArray_DATA(y)
        cdef Py_ssize_t i, slot, C = self.capacity
        cdef int64_t v
        self._acquire()
        try:
            # every id checked before any state changes (a C loop: no Python per session)
            self.calls += 1
            for i in range(n):
                v = idp[i]
                slot = v % C if v >= 0 else 0
                if v < 0 or v // C != self.gen[slot] or self._is_free(slot):
                    raise ValueError(f"ids[{i}]: {v} is not an open session of this pool")
                if self.seen[slot] == self.calls:
                    raise ValueError(f"ids[{i}]: session {v} appears more than once")
                self.seen[slot] = self.calls
                self.slots[i] = slot
            with nogil:
                self._step(n, xp, yp)
        finally:
            PyThread_release_lock(self.lock)
        return y

    def _check_ids(self, ids):
        """The slow path of step's ids (_ids_as_int64's): a C-contiguous 1-D int64 array,
        with errors that name ids."""
        a = ids if cnp.PyArray_Check(ids) else np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"ids must be 1-D (one id per row of x), got shape {a.shape}")
        if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
            raise TypeError(f"ids must be integers (session ids from open()), got {a.dtype}")
        if a.dtype.kind == "u" and a.size and a.max() > 2**63 - 1:
            raise ValueError(f"ids: {a.max()} is not an open session of this pool")
        return np.ascontiguousarray(a, np.int64)

    def _check_x(self, x, Py_ssize_t n):
        """The slow path of step: any array-like, with errors that name x."""
        x = np.asarray(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have dtype {self.dtype} (the pool's dtype), got {x.dtype}")
        if x.shape != (n, self.input_size):
            raise ValueError(f"x must have shape ({n}, {self.input_size}) (len(ids), "
                             f"input_size), got {x.shape}")
        return np.array(x, order="C")  # a C-contiguous, aligned copy in native byte order

    cdef void _step(self, Py_ssize_t n, const void *x, void *y) noexcept nogil:
        """The step of the n sessions in self.slots: per layer, gather their states into
        rows 0 .. n-1, one forward of one timestep over those rows, scatter the states
        back."""
        cdef Py_ssize_t l, i, last = self.num_layers - 1
        cdef Py_ssize_t nbytes = self._row_bytes(0), cbytes = self._row_bytes(1)
        cdef int64_t batch[1]
        cdef int64_t offsets[2]
        cdef rf_plan p
        cdef _PoolLayer *s
        if n == 0:
            return
        batch[0], offsets[0], offsets[1] = n, 0, n
        p.T, p.B, p.steps, p.rows, p.reverse = 1, n, 1, n, 0
        p.order, p.lengths, p.batch_sizes, p.offsets = self.order, self.ones, batch, offsets
        for l in range(self.num_layers):
            s = &self.layers[l]
            for i in range(n):
                memcpy(s.h0 + i * nbytes, s.h + self.slots[i] * nbytes, nbytes)
                if s.c != NULL:
                    memcpy(s.c0 + i * cbytes, s.c + self.slots[i] * cbytes, cbytes)
            s.call.x = x if l == 0 else <const void *>self.layers[l - 1].y
            s.call.y = y if l == last else s.y
            _step_layer(self.typenum == cnp.NPY_FLOAT, self.cell, self.option, &s.call,
                        s.w_hr, &p, s.n_in, self.hidden_size, self.proj_size)
            for i in range(n):
                memcpy(s.h + self.slots[i] * nbytes, s.h_n + i * nbytes, nbytes)
                if s.c != NULL:
                    memcpy(s.c + self.slots[i] * cbytes, s.c_n + i * cbytes, cbytes)


_POOL_BUSY = ("this stream pool is in use by another thread; make one pool per thread or "
              "serialise the calls")
