# The C-level API declared (and documented) in _kernels.pxd, public as rnnfuse.capi.
# Included at the end of _kernels.pyx: it calls the kernels through the same entry points
# (_forward, _backward) and runtime as the Python wrappers, so its numbers are theirs. Where
# functional.py validates in Python, these functions validate in C and return a status;
# the order is: codes and sizes, then required pointers, lengths and variants, then
# allocations, and only then any write to the caller's buffers.
from libc.float cimport DBL_MAX
from libc.stdint cimport INT32_MAX
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

cdef struct _Ctx:  # what a rnnfuse_ctx points to
    int cell, option
    bint f32, has_b_ih, has_b_hh
    Py_ssize_t n_in, hidden  # I and H (a field named I would meet complex.h's macro I)
    rf_plan plan
    int64_t *plan_mem  # lengths (B) | order (B) | batch_sizes (T) | offsets, count (T+1 each)
    void *ws           # the forward's workspace; NULL once a backward consumed it
    const void *x
    const void *w_ih
    const void *w_hh
    const void *peep   # the variants (rnnfuse_variants): NULL where none
    rf_zoneout zoneout
    const void *recdrop
    void *extra        # eval zoneout's (H) row of p | the forward's recurrent dropout (B*H)


# The public cell codes are the C table's ids (rnnfuse.h), so they go to C as they are.
if (RNNFUSE_LSTM, RNNFUSE_GRU, RNNFUSE_RNN) != (RF_LSTM, RF_GRU, RF_RNN):
    raise ImportError("rnnfuse._kernels: the C API's cell codes differ from rnnfuse.h's")


cdef inline bint _given(const void *p, Py_ssize_t n) noexcept nogil:
    """A required buffer of n elements: present, unless it has none."""
    return p != NULL or n == 0


cdef inline Py_ssize_t _esize(bint f32) noexcept nogil:
    return sizeof(float) if f32 else sizeof(double)


cdef inline void *_at(void *p, Py_ssize_t n, bint f32) noexcept nogil:
    """p + n elements of the call's dtype."""
    return <char *>p + n * _esize(f32)


cdef void *_alloc(Py_ssize_t n, bint f32) noexcept nogil:
    """n elements of the call's dtype (never a NULL success: malloc(0) may return NULL)."""
    return malloc(max(n, 1) * (sizeof(float) if f32 else sizeof(double)))


cdef int _check_sizes(int cell, int option, int reverse, Py_ssize_t T, Py_ssize_t B,
                      Py_ssize_t I, Py_ssize_t H) noexcept nogil:
    cdef const rf_cell *c = rf_cell_find(cell)
    if c == NULL or option not in (0, 1) or reverse not in (0, 1):
        return RNNFUSE_EARG
    cdef Py_ssize_t G = c.gates
    if T < 0 or B < 0 or I < 1 or H < 1 or H > INT32_MAX // G or I > INT32_MAX:
        return RNNFUSE_ESIZE  # SciPy's BLAS takes 32-bit dimensions
    # A bound on the elements of every buffer either pass allocates or touches, in floating
    # point (no overflow): within 2^57, every count the kernels compute fits a ptrdiff_t
    # and every byte count a size_t. B + 1, not B: the plan's T-sized arrays exist at B=0.
    if (<double>T + 2) * (B + 1) * (I + 8 * G * H) + 4 * (<double>G * H + 16) * (H + 16) \
            > 2.0 ** 57:
        return RNNFUSE_ENOMEM
    return RNNFUSE_OK


cdef int _capi_forward(bint f32, int cell, int option, void *y, void *h_n, void *c_n,
                       rnnfuse_ctx **ctx_out, const void *x, const void *h0, const void *c0,
                       const void *w_ih, const void *w_hh, const void *b_ih,
                       const void *b_hh, const int64_t *lengths, int reverse, Py_ssize_t T,
                       Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                       const rnnfuse_variants *v) noexcept nogil:
    cdef bint train = ctx_out != NULL, lstm = cell == RNNFUSE_LSTM
    if train:
        ctx_out[0] = NULL
    cdef int status = _check_sizes(cell, option, reverse, T, B, I, H)
    if status:
        return status
    cdef Py_ssize_t b, TB = T * B, BH = B * H
    if not (_given(y, TB * H) and _given(h_n, BH) and (_given(c_n, BH) or not lstm)
            and _given(x, TB * I) and w_ih != NULL and w_hh != NULL):
        return RNNFUSE_ENULL
    if lengths != NULL:
        for b in range(B):
            if lengths[b] < 0 or lengths[b] > T:
                return RNNFUSE_ELENGTHS
    status = _check_variants(v, cell, f32, B * H)
    if status:
        return status

    cdef _Ctx *c = <_Ctx *>calloc(1, sizeof(_Ctx))
    if c == NULL:
        return RNNFUSE_ENOMEM
    c.cell, c.option, c.f32, c.n_in, c.hidden = cell, option, f32, I, H
    c.has_b_ih, c.has_b_hh = b_ih != NULL, b_hh != NULL
    c.x, c.w_ih, c.w_hh = x, w_ih, w_hh
    status = _plan_new(c, lengths, reverse, T, B)
    if status == RNNFUSE_OK:
        c.ws = _alloc(_workspace(c, train), f32)
        status = _set_variants(c, v, B) if c.ws != NULL else RNNFUSE_ENOMEM
    if status:
        rnnfuse_ctx_free(<rnnfuse_ctx *>c)
        return status

    if c.plan.rows < TB:  # the kernels leave padded steps of y alone
        memset(y, 0, TB * H * (sizeof(float) if f32 else sizeof(double)))
    cdef rf_forward_bufs a
    a.y, a.h_n, a.c_n, a.ws = y, h_n, c_n if lstm else NULL, c.ws
    a.x, a.h0, a.c0 = x, h0, c0 if lstm else NULL
    a.w_ih, a.w_hh, a.b_ih, a.b_hh = w_ih, w_hh, b_ih, b_hh
    a.packed = NULL  # the kernel packs the weights into ws itself
    a.peep, a.zoneout, a.recdrop.m = c.peep, c.zoneout, c.recdrop
    a.recdrop.buf = _at(c.extra, H, f32) if c.recdrop != NULL else NULL
    a.layernorm.g_ih = NULL  # the C API has no layer norm
    _forward(f32, cell, option, &a, &c.plan, I, H, train)  # cell checked: it returns 0
    if train:
        ctx_out[0] = <rnnfuse_ctx *>c
    else:
        rnnfuse_ctx_free(<rnnfuse_ctx *>c)
    return RNNFUSE_OK


cdef int _check_variants(const rnnfuse_variants *v, int cell, bint f32,
                         Py_ssize_t BH) noexcept nogil:
    if v == NULL:
        return RNNFUSE_OK
    if v.version != RNNFUSE_VARIANTS_VERSION:
        return RNNFUSE_EVERSION
    if cell != RNNFUSE_LSTM and (v.peepholes != NULL or v.zoneout_c != NULL):
        return RNNFUSE_EVARIANT
    if not 0 <= v.zoneout < 1 or (v.zoneout != 0 and (v.zoneout_h != NULL
                                                       or v.zoneout_c != NULL)):
        return RNNFUSE_EVARIANT  # NaN too
    cdef Py_ssize_t i
    cdef double m
    if v.recurrent_dropout != NULL:
        for i in range(BH):
            m = (<const float *>v.recurrent_dropout)[i] if f32 else \
                (<const double *>v.recurrent_dropout)[i]
            if not (m >= 0 and m <= DBL_MAX):
                return RNNFUSE_EVARIANT
    return RNNFUSE_OK


cdef int _set_variants(_Ctx *c, const rnnfuse_variants *v, Py_ssize_t B) noexcept nogil:
    """c's variants from v (checked), and c.extra: eval zoneout's row of p and the
    forward's recurrent-dropout scratch."""
    c.zoneout.h = c.zoneout.c = c.zoneout.carry = NULL
    c.zoneout.shared = 0
    if v == NULL:
        return RNNFUSE_OK
    cdef Py_ssize_t i, H = c.hidden
    c.extra = _alloc(H + (B * H if v.recurrent_dropout != NULL else 0), c.f32)
    if c.extra == NULL:
        return RNNFUSE_ENOMEM
    c.peep, c.recdrop = v.peepholes, v.recurrent_dropout
    c.zoneout.h, c.zoneout.c = v.zoneout_h, v.zoneout_c
    if v.zoneout != 0:
        for i in range(H):
            if c.f32:
                (<float *>c.extra)[i] = <float>v.zoneout
            else:
                (<double *>c.extra)[i] = v.zoneout
        c.zoneout.h = c.extra
        c.zoneout.c = c.extra if c.cell == RNNFUSE_LSTM else NULL
        c.zoneout.shared = 1
    return RNNFUSE_OK


cdef int _plan_new(_Ctx *c, const int64_t *lengths, int reverse, Py_ssize_t T,
                   Py_ssize_t B) noexcept nogil:
    """c.plan over a private copy of lengths (backward reads them again), as Plan does."""
    cdef int64_t *m = <int64_t *>malloc((2 * B + 3 * T + 2) * sizeof(int64_t))
    if m == NULL:
        return RNNFUSE_ENOMEM
    cdef Py_ssize_t b
    for b in range(B):
        m[b] = lengths[b] if lengths != NULL else T
    c.plan_mem = m
    c.plan.T, c.plan.B, c.plan.reverse = T, B, reverse
    c.plan.lengths, c.plan.order, c.plan.batch_sizes = m, m + B, m + 2 * B
    c.plan.offsets = m + 2 * B + T
    c.plan.steps = rf_plan_build(T, B, m, m + B, m + 2 * B, m + 2 * B + T,
                                 m + 2 * B + 2 * T + 1)
    c.plan.rows = c.plan.offsets[T]
    return RNNFUSE_OK


cdef Py_ssize_t _workspace(const _Ctx *c, bint train) noexcept nogil:
    return rf_workspace(c.cell, &c.plan, c.n_in, c.hidden, train)


cdef int _capi_backward(bint f32, void *dx, void *dh0, void *dc0, void *dw_ih, void *dw_hh,
                        void *db_ih, void *db_hh, const void *dy, const void *dh_n,
                        const void *dc_n, rnnfuse_ctx *ctx,
                        const rnnfuse_variant_grads *g) noexcept nogil:
    cdef _Ctx *c = <_Ctx *>ctx
    if c == NULL:
        return RNNFUSE_ENULL
    if c.f32 != f32:
        return RNNFUSE_EDTYPE
    if c.ws == NULL:
        return RNNFUSE_EUSED
    if g != NULL and g.version != RNNFUSE_VARIANTS_VERSION:
        return RNNFUSE_EVERSION
    cdef void *dpeep = g.dpeepholes if g != NULL and c.peep != NULL else NULL
    if c.peep != NULL and dpeep == NULL:
        return RNNFUSE_ENULL
    cdef bint lstm = c.cell == RNNFUSE_LSTM
    cdef Py_ssize_t TB = c.plan.T * c.plan.B, BH = c.plan.B * c.hidden
    if not (_given(dx, TB * c.n_in) and _given(dh0, BH) and (_given(dc0, BH) or not lstm)
            and dw_ih != NULL and dw_hh != NULL):
        return RNNFUSE_ENULL
    cdef Py_ssize_t G = rf_cell_find(c.cell).gates
    cdef Py_ssize_t n = rf_backward_scratch(&c.plan, c.n_in, c.hidden, G)
    cdef Py_ssize_t carry = 2 * BH if c.zoneout.h != NULL or c.zoneout.c != NULL else 0
    cdef void *scratch = _alloc(n + carry + (
        (c.plan.rows + c.plan.B) * c.hidden if c.recdrop != NULL else 0), f32)
    if scratch == NULL:
        return RNNFUSE_ENOMEM

    if c.plan.rows < TB:  # the kernels leave padded steps of dx alone
        memset(dx, 0, TB * c.n_in * (sizeof(float) if f32 else sizeof(double)))
    cdef rf_backward_bufs a
    a.dx, a.dh0, a.dc0, a.dw_ih, a.dw_hh = dx, dh0, dc0 if lstm else NULL, dw_ih, dw_hh
    a.db_ih = db_ih if c.has_b_ih else NULL
    a.db_hh = db_hh if c.has_b_hh else NULL
    a.dy, a.dh_n, a.dc_n = dy, dh_n, dc_n if lstm else NULL
    a.ws, a.out, a.scratch = c.ws, c.ws, scratch
    a.x, a.w_ih, a.w_hh = c.x, c.w_ih, c.w_hh
    a.peep, a.dpeep, a.zoneout, a.recdrop.m = c.peep, dpeep, c.zoneout, c.recdrop
    a.zoneout.carry = _at(scratch, n, f32) if carry else NULL
    a.recdrop.buf = _at(scratch, n + carry, f32) if c.recdrop != NULL else NULL
    a.layernorm.g_ih = NULL  # the C API has no layer norm
    _backward(f32, c.cell, c.option, &a, &c.plan, c.n_in, c.hidden)  # a forward's cell
    free(scratch)
    free(c.ws)  # overwritten by the backward: release it now
    c.ws = NULL
    return RNNFUSE_OK


# ---- the entry points: one body per idea above, typed once per dtype here

cdef int rnnfuse_forward_f32(int cell, int option, float *y, float *h_n, float *c_n,
                             rnnfuse_ctx **ctx, const float *x, const float *h0,
                             const float *c0, const float *w_ih, const float *w_hh,
                             const float *b_ih, const float *b_hh, const int64_t *lengths,
                             int reverse, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                             Py_ssize_t H) noexcept nogil:
    return _capi_forward(True, cell, option, y, h_n, c_n, ctx, x, h0, c0, w_ih, w_hh, b_ih,
                         b_hh, lengths, reverse, T, B, I, H, NULL)


cdef int rnnfuse_forward_f64(int cell, int option, double *y, double *h_n, double *c_n,
                             rnnfuse_ctx **ctx, const double *x, const double *h0,
                             const double *c0, const double *w_ih, const double *w_hh,
                             const double *b_ih, const double *b_hh, const int64_t *lengths,
                             int reverse, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                             Py_ssize_t H) noexcept nogil:
    return _capi_forward(False, cell, option, y, h_n, c_n, ctx, x, h0, c0, w_ih, w_hh, b_ih,
                         b_hh, lengths, reverse, T, B, I, H, NULL)


cdef int rnnfuse_backward_f32(float *dx, float *dh0, float *dc0, float *dw_ih, float *dw_hh,
                              float *db_ih, float *db_hh, const float *dy,
                              const float *dh_n, const float *dc_n,
                              rnnfuse_ctx *ctx) noexcept nogil:
    return _capi_backward(True, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n, ctx,
                          NULL)


cdef int rnnfuse_backward_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                              double *dw_hh, double *db_ih, double *db_hh, const double *dy,
                              const double *dh_n, const double *dc_n,
                              rnnfuse_ctx *ctx) noexcept nogil:
    return _capi_backward(False, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n,
                          ctx, NULL)


cdef int rnnfuse_forward_ex_f32(int cell, int option, float *y, float *h_n, float *c_n,
                                rnnfuse_ctx **ctx, const float *x, const float *h0,
                                const float *c0, const float *w_ih, const float *w_hh,
                                const float *b_ih, const float *b_hh,
                                const int64_t *lengths, int reverse, Py_ssize_t T,
                                Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                const rnnfuse_variants *variants) noexcept nogil:
    return _capi_forward(True, cell, option, y, h_n, c_n, ctx, x, h0, c0, w_ih, w_hh, b_ih,
                         b_hh, lengths, reverse, T, B, I, H, variants)


cdef int rnnfuse_forward_ex_f64(int cell, int option, double *y, double *h_n, double *c_n,
                                rnnfuse_ctx **ctx, const double *x, const double *h0,
                                const double *c0, const double *w_ih, const double *w_hh,
                                const double *b_ih, const double *b_hh,
                                const int64_t *lengths, int reverse, Py_ssize_t T,
                                Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                const rnnfuse_variants *variants) noexcept nogil:
    return _capi_forward(False, cell, option, y, h_n, c_n, ctx, x, h0, c0, w_ih, w_hh, b_ih,
                         b_hh, lengths, reverse, T, B, I, H, variants)


cdef int rnnfuse_backward_ex_f32(float *dx, float *dh0, float *dc0, float *dw_ih,
                                 float *dw_hh, float *db_ih, float *db_hh, const float *dy,
                                 const float *dh_n, const float *dc_n, rnnfuse_ctx *ctx,
                                 const rnnfuse_variant_grads *grads) noexcept nogil:
    return _capi_backward(True, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n, ctx,
                          grads)


cdef int rnnfuse_backward_ex_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                                 double *dw_hh, double *db_ih, double *db_hh,
                                 const double *dy, const double *dh_n, const double *dc_n,
                                 rnnfuse_ctx *ctx,
                                 const rnnfuse_variant_grads *grads) noexcept nogil:
    return _capi_backward(False, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n,
                          ctx, grads)


cdef void rnnfuse_ctx_free(rnnfuse_ctx *ctx) noexcept nogil:
    cdef _Ctx *c = <_Ctx *>ctx
    if c != NULL:
        free(c.ws)
        free(c.plan_mem)
        free(c.extra)
        free(c)


cdef const char *rnnfuse_strerror(int status) noexcept nogil:
    if status == RNNFUSE_OK:
        return "rnnfuse: ok"
    if status == RNNFUSE_EARG:
        return "rnnfuse: unknown cell, or option or reverse not 0 or 1"
    if status == RNNFUSE_ESIZE:
        return "rnnfuse: invalid size (T and B must be >= 0, I and H >= 1, G*H and I < 2**31)"
    if status == RNNFUSE_ENULL:
        return "rnnfuse: a required pointer is NULL"
    if status == RNNFUSE_ELENGTHS:
        return "rnnfuse: lengths must lie in [0, T]"
    if status == RNNFUSE_ENOMEM:
        return "rnnfuse: out of memory"
    if status == RNNFUSE_EDTYPE:
        return "rnnfuse: ctx comes from the forward of the other dtype"
    if status == RNNFUSE_EUSED:
        return "rnnfuse: ctx was already used by a backward call; run forward again"
    if status == RNNFUSE_EVERSION:
        return "rnnfuse: unknown version of a variants struct (set RNNFUSE_VARIANTS_VERSION)"
    if status == RNNFUSE_EVARIANT:
        return ("rnnfuse: bad variant: peepholes and zoneout_c are LSTM only, zoneout must "
                "lie in [0, 1) and be 0 with zoneout masks, a recurrent_dropout mask finite "
                "and >= 0")
    return "rnnfuse: unknown status code"
