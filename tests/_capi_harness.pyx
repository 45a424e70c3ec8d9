"""Test harness for rnnfuse.capi (built by test_capi.py): each entry point called with
pointers, sizes and codes chosen from Python, so the tests reach every cell, dtype and
error path. An array argument passes its data pointer (None: NULL) and nothing else: the
sizes are separate, as for any C caller."""
from libc.stdint cimport int64_t, uintptr_t

from rnnfuse.capi cimport *

CODES = dict(OK=RNNFUSE_OK, EARG=RNNFUSE_EARG, ESIZE=RNNFUSE_ESIZE, ENULL=RNNFUSE_ENULL,
             ELENGTHS=RNNFUSE_ELENGTHS, ENOMEM=RNNFUSE_ENOMEM, EDTYPE=RNNFUSE_EDTYPE,
             EUSED=RNNFUSE_EUSED, EVERSION=RNNFUSE_EVERSION, EVARIANT=RNNFUSE_EVARIANT)
VARIANTS_VERSION = RNNFUSE_VARIANTS_VERSION
CELLS = dict(lstm=RNNFUSE_LSTM, gru=RNNFUSE_GRU, rnn=RNNFUSE_RNN)


cdef void *_p(a) except? NULL:
    return NULL if a is None else <void *><uintptr_t>a.ctypes.data


cdef class Ctx:
    """Owns a rnnfuse_ctx (freed with the object, or by free())."""
    cdef rnnfuse_ctx *ptr

    def __dealloc__(self):
        rnnfuse_ctx_free(self.ptr)

    def free(self):
        rnnfuse_ctx_free(self.ptr)
        self.ptr = NULL

    @property
    def null(self):
        return self.ptr == NULL


cdef void _pointers(void **p, tuple arrays) except *:
    for i, a in enumerate(arrays):
        p[i] = _p(a)


def forward(bint f32, int cell, int option, y, h_n, c_n, Ctx ctx, x, h0, c0, w_ih, w_hh,
            b_ih, b_hh, lengths, int reverse, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
            Py_ssize_t H, variants=None):
    """The status of rnnfuse_forward_f32/f64; ctx None: inference. variants: None, or a
    dict of rnnfuse_variants' fields (arrays for the pointers): rnnfuse_forward_ex_*."""
    cdef rnnfuse_variants v
    cdef bint ex = variants is not None
    if ex:
        v.version = variants.get("version", RNNFUSE_VARIANTS_VERSION)
        v.zoneout = variants.get("zoneout", 0.0)
        v.peepholes = _p(variants.get("peepholes"))
        v.zoneout_h = _p(variants.get("zoneout_h"))
        v.zoneout_c = _p(variants.get("zoneout_c"))
        v.recurrent_dropout = _p(variants.get("recurrent_dropout"))
    cdef rnnfuse_ctx **pctx = NULL if ctx is None else &ctx.ptr
    cdef void *p[10]
    _pointers(p, (y, h_n, c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    cdef float **f = <float **>p
    cdef double **d = <double **>p
    cdef const int64_t *plen = <const int64_t *>_p(lengths)
    cdef int status
    with nogil:
        if f32 and ex:
            status = rnnfuse_forward_ex_f32(cell, option, f[0], f[1], f[2], pctx, f[3], f[4],
                                            f[5], f[6], f[7], f[8], f[9], plen, reverse, T, B,
                                            I, H, &v)
        elif f32:
            status = rnnfuse_forward_f32(cell, option, f[0], f[1], f[2], pctx, f[3], f[4],
                                         f[5], f[6], f[7], f[8], f[9], plen, reverse, T, B,
                                         I, H)
        elif ex:
            status = rnnfuse_forward_ex_f64(cell, option, d[0], d[1], d[2], pctx, d[3], d[4],
                                            d[5], d[6], d[7], d[8], d[9], plen, reverse, T, B,
                                            I, H, &v)
        else:
            status = rnnfuse_forward_f64(cell, option, d[0], d[1], d[2], pctx, d[3], d[4],
                                         d[5], d[6], d[7], d[8], d[9], plen, reverse, T, B,
                                         I, H)
    return status


def backward(bint f32, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n, Ctx ctx,
             grads=None):
    """The status of rnnfuse_backward_f32/f64; ctx None: NULL. grads: None, or a dict of
    rnnfuse_variant_grads' fields: rnnfuse_backward_ex_*."""
    cdef rnnfuse_variant_grads g
    cdef bint ex = grads is not None
    if ex:
        g.version = grads.get("version", RNNFUSE_VARIANTS_VERSION)
        g.dpeepholes = _p(grads.get("dpeepholes"))
    cdef void *p[10]
    _pointers(p, (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dy, dh_n, dc_n))
    cdef float **f = <float **>p
    cdef double **d = <double **>p
    cdef rnnfuse_ctx *c = NULL if ctx is None else ctx.ptr
    cdef int status
    with nogil:
        if f32 and ex:
            status = rnnfuse_backward_ex_f32(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                                             f[8], f[9], c, &g)
        elif f32:
            status = rnnfuse_backward_f32(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                                          f[8], f[9], c)
        elif ex:
            status = rnnfuse_backward_ex_f64(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
                                             d[8], d[9], c, &g)
        else:
            status = rnnfuse_backward_f64(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
                                          d[8], d[9], c)
    return status


def strerror(int status):
    return rnnfuse_strerror(status).decode()
