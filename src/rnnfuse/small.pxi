# The small-call fast path, included by _kernels.pyx.

# From this size on, functional.py keeps a call's workspace for the next call (and checks
# its arguments in Python). A smaller call whose arguments are already what the kernels
# take runs from here: functional.py's checks, in Python, cost as much as the kernels of
# a small call.
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


cdef bint _upstream_taken(dy, dh_n, dc_n, bint lstm, int typenum, Py_ssize_t T, Py_ssize_t B,
                          Py_ssize_t H) noexcept:
    """backward's fast check: dy (T,B,H), dh_n and dc_n (B,H; dc_n only for the LSTM) are
    None or exactly what the kernels take."""
    return ((dy is None or _takes(dy, typenum, 3, T, B, H))
            and (dh_n is None or _takes(dh_n, typenum, 2, B, H))
            and (dc_n is None or lstm and _takes(dc_n, typenum, 2, B, H)))


def forward_small(str cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, bint train,
                  bint option, full_plan, packed=None):
    """forward, without lengths, where every argument is already what the kernels take and
    the workspace is under SMALL_BYTES: returns (y, h_n, c_n, ws, plan), plan =
    full_plan(T, B, reverse). Anything else returns None with nothing done: functional.py
    then checks, explains or converts. packed: as forward's."""
    cdef const rf_cell *c = _cell(cell)
    cdef Py_ssize_t G = c.gates, T, B, I, H, n
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
            and (c0 is None or c.states == 2 and _takes(c0, t, 2, B, H))):
        return None
    cdef Plan plan = full_plan(T, B, reverse)
    n = workspace_size(cell, plan, I, H, train)
    # where the weights come packed or are read in place, the workspace's room for packing
    # them is not written (int8 weights take a little of it as scratch): it costs no
    # memory traffic
    cdef rf_plan p = plan.view()
    cdef bint unpacked = packed is not None or rf_weights_in_place(&p)
    cdef Py_ssize_t written = n - (rf_weights_pack_size(G, H, I) if unpacked else 0)
    if written * (4 if t == cnp.NPY_FLOAT else 8) >= SMALL_BYTES:
        return None
    ws = _aligned_empty(n, t)
    return (*forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, plan, ws, I, H, train, option,
                     packed=packed), ws, plan)
