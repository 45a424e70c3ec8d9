# The C-level API of rnnfuse: the reference. Other Cython extensions cimport it as
#
#     from rnnfuse.capi cimport rnnfuse_forward_f32, rnnfuse_ctx, RNNFUSE_LSTM, ...
#
# (rnnfuse/capi.pxd re-exports these names; see it for how to build against them). The
# functions are implemented in rnnfuse._kernels (capi.pxi), beside the kernels they call:
# Cython shares a module's cdef functions with other extensions only through that module's
# own .pxd (its __pyx_capi__, fetched when the cimporting module is imported), so the C
# kernels stay compiled once and callers need neither csrc/ nor rnnfuse.h.
#
# Notation and layout as rnnfuse.functional (docs/design.md): T steps, B batch, I input size,
# H hidden size, G gates (LSTM 4: i f g o; GRU 3: r z n; RNN 1). Every array is a
# C-contiguous, row-major block of the function's dtype, passed as a pointer to its first
# element: x (T,B,I), y (T,B,H), states (B,H), w_ih (G*H,I), w_hh (G*H,H), biases (G*H)
# in PyTorch's layout. Pointers may be NULL only where it says "or NULL"; a buffer of zero
# elements may always be NULL. Outputs never alias inputs. The numbers are bitwise those
# of rnnfuse.functional for the same inputs (the same kernels, plans and workspaces).
#
# Every function is noexcept nogil: call it with or without the GIL, from any thread (a
# ctx is used by one thread at a time). It checks every argument it can before touching a
# buffer, allocates its own plan and workspace (malloc) and frees nothing it did not
# allocate. Given sizes that match the buffers, it never reads or writes outside them. It
# returns RNNFUSE_OK (0) or one of the negative codes below, and then has written nothing
# (a failed forward sets *ctx to NULL).
#
# What callers share: one thread pool per process. A call shares its longer loops and
# larger products among as many threads as SciPy's BLAS is allowed at the time of the call
# (threadpoolctl, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS; one where that count cannot be
# read; at most 64), the calling thread included; the workers are started on first use
# and kept for the life of the process. Calls from several threads at once are safe: one
# of them gets the pool, the others run their parts one after another on their own thread
# meanwhile. The numbers depend on that thread count only, never on which thread ran a
# part or on other callers. After fork() the child has none of the parent's workers: its
# first call that wants threads starts a pool of its own. The code path (AVX2+FMA or
# portable: rnnfuse._kernels.kernel(), chosen at import from the CPU and RNNFUSE_KERNEL) is
# process-wide too, read once at the start of each call. Nothing else is shared between
# calls, and nothing is written outside a call's own buffers.
from libc.stdint cimport int64_t

# Cells; option: GRU linear_before_reset (1: PyTorch's, cuDNN's; 0: the original GRU,
# ONNX's default), RNN nonlinearity (0: tanh, 1: relu), LSTM: 0 or 1, ignored.
cdef enum:
    RNNFUSE_LSTM = 1
    RNNFUSE_GRU = 2
    RNNFUSE_RNN = 3

# Status codes (rnnfuse_strerror gives each its message).
cdef enum:
    RNNFUSE_OK = 0
    RNNFUSE_EARG = -1      # cell unknown, or option or reverse not 0 or 1
    RNNFUSE_ESIZE = -2     # T or B < 0, I or H < 1, G*H or I >= 2^31
    RNNFUSE_ENULL = -3     # a required pointer is NULL (backward: also ctx)
    RNNFUSE_ELENGTHS = -4  # a length outside [0, T]
    RNNFUSE_ENOMEM = -5    # plan, workspace or scratch could not be allocated (or could
                           # not be addressed at all)
    RNNFUSE_EDTYPE = -6    # backward of the other dtype than ctx's forward
    RNNFUSE_EUSED = -7     # ctx was already consumed by a backward
    RNNFUSE_EVERSION = -8  # a variants struct of a version this rnnfuse does not know
    RNNFUSE_EVARIANT = -9  # a variant refused: see rnnfuse_variants

# What a training forward keeps for its backward (opaque; see rnnfuse_forward_*). A C
# typedef of an incomplete struct: Cython's own forward-declared structs are not declared
# at file scope in cimporting modules, whose C compiler then sees two different types.
cdef extern from *:
    """
    typedef struct rnnfuse_ctx rnnfuse_ctx;
    """
    ctypedef struct rnnfuse_ctx


# One forward over the whole sequence: y (T,B,H) and the final states h_n, c_n (B,H)
# (c_n: LSTM only, else ignored). y is zero at padded steps; h_n[b], c_n[b] are the states
# after row b's last valid step (h0, c0 if its length is 0).
#   h0, c0: the initial states (B,H), or NULL for zeros (c0: LSTM only, else ignored).
#   b_ih, b_hh: or NULL (no bias).
#   lengths: (B,) in [0, T], or NULL (every row has T steps); steps t >= lengths[b] are
#     padding. Copied: the caller's array may change after the call.
#   reverse: 1 runs each row from its last valid step to t = 0 (the backward half of a
#     bidirectional layer), writing y at the same time positions; else 0.
#   ctx: NULL for inference (the workspace does not grow with T). For training, the
#     address of a rnnfuse_ctx pointer, set to a new context for rnnfuse_backward_* (NULL
#     on failure). The context keeps the pointers x, w_ih and w_hh, not copies: the caller
#     keeps those buffers alive and unchanged until the backward has returned. Whether or
#     not backward runs, release the context with rnnfuse_ctx_free.
cdef int rnnfuse_forward_f32(int cell, int option, float *y, float *h_n, float *c_n,
                             rnnfuse_ctx **ctx, const float *x, const float *h0,
                             const float *c0, const float *w_ih, const float *w_hh,
                             const float *b_ih, const float *b_hh, const int64_t *lengths,
                             int reverse, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                             Py_ssize_t H) noexcept nogil
cdef int rnnfuse_forward_f64(int cell, int option, double *y, double *h_n, double *c_n,
                             rnnfuse_ctx **ctx, const double *x, const double *h0,
                             const double *c0, const double *w_ih, const double *w_hh,
                             const double *b_ih, const double *b_hh, const int64_t *lengths,
                             int reverse, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                             Py_ssize_t H) noexcept nogil

# Backpropagation through time over a training forward's ctx (of the same dtype; sizes,
# cell and option come from it). Gradients out: dx (T,B,I), dh0, dc0 (B,H; dc0: LSTM only,
# else ignored), dw_ih, dw_hh, db_ih, db_hh (db_*: or NULL if not wanted; the gradient of a
# bias the forward did not have is never written, as Python's is None). Upstream
# gradients: dy (T,B,H), dh_n, dc_n (B,H; dc_n: LSTM only), each or NULL for zeros;
# padded steps of dy are ignored. It consumes ctx (its workspace is overwritten, then
# freed): a second backward returns RNNFUSE_EUSED. A failed call leaves ctx usable.
cdef int rnnfuse_backward_f32(float *dx, float *dh0, float *dc0, float *dw_ih, float *dw_hh,
                              float *db_ih, float *db_hh, const float *dy,
                              const float *dh_n, const float *dc_n,
                              rnnfuse_ctx *ctx) noexcept nogil
cdef int rnnfuse_backward_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                              double *dw_hh, double *db_ih, double *db_hh, const double *dy,
                              const double *dh_n, const double *dc_n,
                              rnnfuse_ctx *ctx) noexcept nogil

# Cell variants (docs/design.md), for rnnfuse_forward_ex_*. Zero the struct (no variant),
# set version to RNNFUSE_VARIANTS_VERSION, then set the variants wanted. Later versions
# only append fields, and rnnfuse keeps reading the fields of the version a caller set; a
# version it does not know is RNNFUSE_EVERSION. Pointers are to the call's dtype; like x
# and the weights, a training forward's ctx keeps them (not copies) for the backward.
#   peepholes: LSTM only: (3H) in ONNX's order i, o, f (an ONNX LSTM's P row), or NULL.
#   zoneout: eval's zoneout, p in [0, 1) (0: none): every unit of h (and of the LSTM's c)
#     keeps its previous value with weight p, h_t = p h_{t-1} + (1-p) h~_t.
#   zoneout_h, zoneout_c: training's zoneout instead: (T,B,H) weights (0/1 masks, drawn
#     per step, row and unit) of h and of the LSTM's c (zoneout_c: LSTM only), each or
#     NULL; with either, zoneout must be 0.
#   recurrent_dropout: a (B,H) mask, finite and >= 0 (already scaled, e.g. 0 or 1/(1-p)),
#     by which h_{t-1} is multiplied where it enters the recurrent product, or NULL.
# Weight drop needs no argument: pass w_hh * mask to the forward and multiply the dw_hh
# that backward returns by the same mask. Anything else (a peephole or zoneout_c on a GRU
# or RNN, zoneout outside [0, 1) or with masks, a negative or non-finite dropout mask) is
# RNNFUSE_EVARIANT.
cdef enum:
    RNNFUSE_VARIANTS_VERSION = 1

ctypedef struct rnnfuse_variants:
    int version
    const void *peepholes
    double zoneout
    const void *zoneout_h
    const void *zoneout_c
    const void *recurrent_dropout

# Gradients of the variants' parameters, for rnnfuse_backward_ex_*; version as above.
#   dpeepholes: (3H), the peepholes' gradient: required (non-NULL) when the forward had
#     peepholes, else not written.
ctypedef struct rnnfuse_variant_grads:
    int version
    void *dpeepholes

# rnnfuse_forward_* with variants (NULL: none, the same as rnnfuse_forward_*).
cdef int rnnfuse_forward_ex_f32(int cell, int option, float *y, float *h_n, float *c_n,
                                rnnfuse_ctx **ctx, const float *x, const float *h0,
                                const float *c0, const float *w_ih, const float *w_hh,
                                const float *b_ih, const float *b_hh,
                                const int64_t *lengths, int reverse, Py_ssize_t T,
                                Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                const rnnfuse_variants *variants) noexcept nogil
cdef int rnnfuse_forward_ex_f64(int cell, int option, double *y, double *h_n, double *c_n,
                                rnnfuse_ctx **ctx, const double *x, const double *h0,
                                const double *c0, const double *w_ih, const double *w_hh,
                                const double *b_ih, const double *b_hh,
                                const int64_t *lengths, int reverse, Py_ssize_t T,
                                Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                                const rnnfuse_variants *variants) noexcept nogil

# rnnfuse_backward_* of a forward_ex's ctx, with the variants' gradients (grads: NULL
# where the forward had no peepholes). rnnfuse_backward_* of a ctx with peepholes is
# RNNFUSE_ENULL (it has nowhere to write dpeepholes).
cdef int rnnfuse_backward_ex_f32(float *dx, float *dh0, float *dc0, float *dw_ih,
                                 float *dw_hh, float *db_ih, float *db_hh, const float *dy,
                                 const float *dh_n, const float *dc_n, rnnfuse_ctx *ctx,
                                 const rnnfuse_variant_grads *grads) noexcept nogil
cdef int rnnfuse_backward_ex_f64(double *dx, double *dh0, double *dc0, double *dw_ih,
                                 double *dw_hh, double *db_ih, double *db_hh,
                                 const double *dy, const double *dh_n, const double *dc_n,
                                 rnnfuse_ctx *ctx,
                                 const rnnfuse_variant_grads *grads) noexcept nogil

# Releases a context (NULL: nothing to do). It never touches the caller's buffers.
cdef void rnnfuse_ctx_free(rnnfuse_ctx *ctx) noexcept nogil

# A static, NUL-terminated message for a status code (never NULL).
cdef const char *rnnfuse_strerror(int status) noexcept nogil
