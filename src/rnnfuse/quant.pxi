# int8 inference, included by _kernels.pyx: weights packed once as int8 with a float scale
# per output row (quant.c), and the float32 forward running on them. rnnfuse.quantized
# builds its layers on these.
from libc.stdint cimport int8_t, int32_t

cdef extern from "rnnfuse.h" nogil:
    ctypedef struct rf_weight:
        const void *packed
        Py_ssize_t panel_stride
        const float *scales
        const int32_t *sums
        void *scratch
    Py_ssize_t rf_q8_pack_size(Py_ssize_t G, Py_ssize_t H, Py_ssize_t I, int lbr,
                               Py_ssize_t P)
    void rf_q8_pack_weights(void *dst, const float *w_ih, const float *w_hh,
                            const float *w_hr, Py_ssize_t G, Py_ssize_t H, Py_ssize_t I,
                            int lbr, Py_ssize_t P)
    int rf_q8_prepared(rf_weight W[3], const void *prepacked, Py_ssize_t G, Py_ssize_t H,
                       Py_ssize_t I, int lbr, Py_ssize_t P, void *scratch)
    Py_ssize_t rf_q8_scratch_size(Py_ssize_t K)
    float rf_q8_quantize(int8_t *q, const float *a, Py_ssize_t K, int path)
    int rf_q8_cpu_vnni()
    void rf_q8_gemm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *A, Py_ssize_t lda,
                    const rf_weight *W, int accumulate, float *C, Py_ssize_t ldc, int path)
    int rf_q8_path(const rf_runtime *rt)

_rt.vnni = rf_q8_cpu_vnni()


def set_int8_vnni(bint on):
    """For tests and measurements: with True (the default where the CPU has them), int8
    products on the "avx2" path use the VNNI instructions; False: AVX2's. Process-wide,
    as set_kernel. Returns whether VNNI now runs."""
    _rt.vnni = on and rf_q8_cpu_vnni()
    return bool(_rt.vnni)


cdef int _q8_sizes(Py_ssize_t I, Py_ssize_t H) except -1:
    if not (I >= 1 and H >= 1):
        raise ValueError(f"int8 weights need input_size and hidden_size >= 1, got "
                         f"input_size={I}, hidden_size={H}")
    return 0


def q8_pack_weights(w_ih, w_hh, Py_ssize_t G, bint lbr, w_hr=None):
    """w_ih (G*H, I) and w_hh (G*H, H), float32, packed as int8 with a float scale per
    output row (rnnfuse.h): the packed of q8_forward. lbr: the GRU's linear_before_reset.
    With w_hr (P, H), 0 < P < H, the projected LSTM's (G = 4, w_hh (4H, P)), W_hr int8
    too."""
    if not (_typenum(w_hh, "w_hh") == _typenum(w_ih, "w_ih") == cnp.NPY_FLOAT
            and (w_hr is None or _typenum(w_hr, "w_hr") == cnp.NPY_FLOAT)):
        raise TypeError(f"int8 weights are made from float32 weights, got w_ih "
                        f"{w_ih.dtype}, w_hh {w_hh.dtype}"
                        + ("" if w_hr is None else f" and w_hr {w_hr.dtype}"))
    cdef Py_ssize_t H, I, P = 0
    if w_hr is not None:
        if G != 4:
            raise ValueError(f"only the LSTM (G=4) has a projection w_hr, got G={G}")
        P, H = (w_hr.shape[0], w_hr.shape[1]) if w_hr.ndim == 2 else (-1, -1)
        I = w_ih.shape[1] if w_ih.ndim == 2 else -1
        _check_proj_shapes(w_ih, w_hh, w_hr, I, H, P)
    elif not (G in GATES.values() and w_ih.ndim == 2 and w_hh.ndim == 2
              and w_hh.shape[0] == w_ih.shape[0] == G * w_hh.shape[1]):
        raise ValueError(f"w_ih and w_hh must be (G*H, I) and (G*H, H) with G in "
                         f"{tuple(sorted(GATES.values()))}, got {w_ih.shape} and "
                         f"{w_hh.shape} for G={G}")
    else:
        H, I = w_hh.shape[1], w_ih.shape[1]
    _q8_sizes(I, H)
    cdef const float *src_ih = <const float *>_buf(w_ih, G * H * I, cnp.NPY_FLOAT, "w_ih",
                                                   _REQUIRED)
    cdef const float *src_hh = <const float *>_buf(w_hh, G * H * (P or H), cnp.NPY_FLOAT,
                                                   "w_hh", _REQUIRED)
    cdef const float *src_hr = <const float *>_buf(w_hr, P * H, cnp.NPY_FLOAT, "w_hr",
                                                   _OPTIONAL)
    cdef Py_ssize_t size = rf_q8_pack_size(G, H, I, lbr, P)
    packed = aligned_empty((size + 3) // 4, np.float32).view(np.uint8)[:size]
    cdef void *dst = cnp.PyArray_DATA(packed)
    with nogil:
        rf_q8_pack_weights(dst, src_ih, src_hh, src_hr, G, H, I, lbr, P)
    packed.flags.writeable = False
    return packed


cdef const void *_q8_packed(packed, Py_ssize_t G, Py_ssize_t H, Py_ssize_t I,
                            bint lbr, Py_ssize_t P=0) except NULL:
    """packed's data, after checking that q8_pack_weights made it for these sizes (P: the
    projection's, 0 for none)."""
    cdef rf_weight W[3]
    _q8_sizes(I, H)
    if not (cnp.PyArray_CheckExact(packed) and cnp.PyArray_TYPE(packed) == cnp.NPY_UINT8
            and cnp.PyArray_ISCARRAY_RO(packed) and P >= 0
            and cnp.PyArray_SIZE(packed) == rf_q8_pack_size(G, H, I, lbr, P)
            and rf_q8_prepared(W, cnp.PyArray_DATA(packed), G, H, I, lbr, P, NULL)):
        raise ValueError(f"_kernels: packed must be q8_pack_weights' array for G={G}, "
                         f"H={H}, I={I}, lbr={lbr}" + (f", P={P}" if P else ""))
    return cnp.PyArray_DATA(packed)


cpdef tuple q8_forward(str cell, x, h0, c0, packed, b_ih, b_hh, Plan plan, ws, Py_ssize_t I,
                       Py_ssize_t H, bint option=False, peep=None, zoneout=None,
                       Py_ssize_t P=0):
    """The inference forward of forward() (float32) on int8 weights: packed from
    q8_pack_weights with the cell's G and lbr = option for the GRU; peep and zoneout as
    forward() takes them. P > 0: the projected LSTM's (lstmp.h: packed with its w_hr, h0,
    h_n and y P wide, ws of lstmp_workspace_size; no zoneout)."""
    if plan is None:
        raise TypeError("_kernels: plan must be a Plan, got None")
    cdef const rf_cell *c = _cell(cell)
    if _typenum(x) != cnp.NPY_FLOAT:
        raise TypeError(f"int8 layers run float32 inputs, got {x.dtype}")
    if P and (c.id != RF_LSTM or zoneout is not None):
        raise ValueError(f"a projection (P={P}) runs the LSTM without zoneout only, got "
                         f"{cell}" + (" with zoneout" if zoneout is not None else ""))
    cdef const void *q = _q8_packed(packed, c.gates, H, I, option and c.id == RF_GRU, P)
    cdef int status = 0
    cdef Py_ssize_t T = plan.T, B = plan.B, R = P or H  # R: the width of h and y
    y = _empty(cnp.NPY_FLOAT, 3, T, B, R, zeros=plan.rows < T * B)
    h_n = _empty(cnp.NPY_FLOAT, 2, B, R)
    c_n = _empty(cnp.NPY_FLOAT, 2, B, H) if c.states == 2 else None
    cdef Py_ssize_t G = c.gates, BH = B * H
    cdef bint lstm = c.states == 2
    cdef rf_plan p = plan.view()
    if peep is not None and not lstm:
        raise ValueError(f"peepholes are an LSTM option; {cell} has none")
    cdef rf_forward_bufs a
    memset(&a, 0, sizeof(a))  # no recurrent dropout: inference
    a.peep = _buf(peep, 3 * H, cnp.NPY_FLOAT, "peepholes", _OPTIONAL) if lstm else NULL
    a.zoneout = _zoneout(zoneout, lstm, cnp.NPY_FLOAT, T * BH, H)
    a.y = _buf(y, T * B * R, cnp.NPY_FLOAT, "y", _OUT)
    a.h_n = _buf(h_n, B * R, cnp.NPY_FLOAT, "h_n", _OUT)
    a.c_n = _buf(c_n, BH, cnp.NPY_FLOAT, "c_n", _OUT) if lstm else NULL
    a.ws = _buf(ws, rf_lstmp_workspace(&p, I, H, P, False) if P else
                rf_workspace(c.id, &p, I, H, False), cnp.NPY_FLOAT, "ws", _OUT)
    a.x = _buf(x, T * B * I, cnp.NPY_FLOAT, "x", _REQUIRED)
    a.h0 = _buf(h0, B * R, cnp.NPY_FLOAT, "h0", _OPTIONAL)
    a.c0 = _buf(c0, BH, cnp.NPY_FLOAT, "c0", _OPTIONAL) if lstm else NULL
    a.b_ih = _buf(b_ih, G * H, cnp.NPY_FLOAT, "b_ih", _OPTIONAL)
    a.b_hh = _buf(b_hh, G * H, cnp.NPY_FLOAT, "b_hh", _OPTIONAL)
    a.packed = q
    a.w_ih = a.w_hh = NULL  # never read: packed holds the weights
    with nogil:
        if P:
            _step_layer(True, c.id, False, &a, NULL, &p, I, H, P)
        else:
            status = _forward(True, c.id, option, &a, &p, I, H, False)
    if status:
        raise RuntimeError(f"_kernels: no forward for cell {cell!r}")
    return y, h_n, c_n


def q8_quantize(a):
    """Test hook: the rows of a (M, K) float32 quantized as the kernels quantize them on
    the current code path: (q int8 (M, K), scales float32 (M,))."""
    cdef const float[:, ::1] src = a
    cdef Py_ssize_t M = src.shape[0], K = src.shape[1], r
    q = np.zeros((M, K), np.int8)
    scales = np.zeros(M, np.float32)
    cdef int8_t[:, ::1] qv = q
    cdef float[::1] sv = scales
    if K:
        for r in range(M):
            sv[r] = rf_q8_quantize(&qv[r, 0], &src[r, 0], K, rf_q8_path(&_rt))
    return q, scales


def q8_product(a, w, c=None, bint unbuffered=False):
    """Test hook: a (M, K) @ w (N, K)^T with w quantized per row as q8_pack_weights does and
    a's rows at run time, the product the steps and the projection run on int8 weights:
    returns c + that (a new array; c: None for zeros). unbuffered: the slow way taken
    without scratch."""
    cdef const float[:, ::1] av = a
    cdef Py_ssize_t M = av.shape[0], K = av.shape[1], N = w.shape[0]
    if w.shape[1] != K or M < 1:
        raise ValueError(f"a (M, K) with M >= 1 and w (N, K), got {a.shape} and {w.shape}")
    packed = q8_pack_weights(w, np.zeros((N, N), np.float32), 1, False)
    cdef rf_weight W[3]
    rf_q8_prepared(W, cnp.PyArray_DATA(packed), 1, N, K, 0, 0, NULL)
    scratch = aligned_empty((rf_q8_scratch_size(K) + 3) // 4, np.float32)  # bytes, on a line
    W[2].scratch = cnp.PyArray_DATA(scratch)
    out = np.zeros((M, N), np.float32) if c is None else np.array(c, np.float32, order="C")
    if out.shape != (M, N):
        raise ValueError(f"c must be ({M}, {N}), got {out.shape}")
    cdef float[:, ::1] cv = out
    cdef int path = -1 if unbuffered else rf_q8_path(&_rt)
    with nogil:
        rf_q8_gemm(M, N, K, &av[0, 0], K, &W[2], c is not None, &cv[0, 0], N, path)
    return out


cdef tuple _q8_stream_sizes(str who, const rf_cell *spec, bint option, list weights,
                            Py_ssize_t P=0):
    """_stream_sizes for int8 weights: per layer (packed, input size, b_ih, b_hh); P: the
    projection's size (0: none), the input size of the layers after the first."""
    cdef Py_ssize_t G = spec.gates, H = -1, I = -1, l
    cdef bint lbr = option and spec.id == RF_GRU
    for l, (packed, n_in, b_ih, b_hh) in enumerate(weights):
        if l == 0:
            I = n_in
            if (isinstance(packed, np.ndarray) and packed.dtype == np.uint8
                    and packed.ndim == 1 and packed.size >= 64):
                H = packed[:64].view(np.int64)[4]  # the header's H, checked just below
        if n_in != (I if l == 0 else P or H):
            raise ValueError(f"{who}: layer {l}'s input size is {n_in}, expected "
                             f"{I if l == 0 else P or H}")
        _q8_packed(packed, G, H, n_in, lbr, P)
        _buf(b_ih, G * H, cnp.NPY_FLOAT, "b_ih", _OPTIONAL)
        _buf(b_hh, G * H, cnp.NPY_FLOAT, "b_hh", _OPTIONAL)
    return I, H
