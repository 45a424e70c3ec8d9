"""rnnfuse's C-level API from another Cython extension: an LSTM run for inference (plain,
and with peepholes and zoneout) and a training step (forward, loss gradient, backward),
each entirely without the GIL.

Build: python setup.py build_ext --inplace (see setup.py). Arrays are float32 and
C-contiguous, in rnnfuse.functional's layout: x (T, B, I), w_ih (4H, I), w_hh (4H, H).
"""
from libc.string cimport memset
from rnnfuse.capi cimport (RNNFUSE_LSTM, RNNFUSE_VARIANTS_VERSION, rnnfuse_backward_f32,
                           rnnfuse_ctx, rnnfuse_ctx_free, rnnfuse_forward_ex_f32,
                           rnnfuse_forward_f32, rnnfuse_strerror, rnnfuse_variants)

import numpy as np


cdef int check(int status) except -1:
    if status != 0:
        raise RuntimeError(rnnfuse_strerror(status).decode())
    return 0


def predict(const float[:, :, ::1] x, const float[:, ::1] w_ih, const float[:, ::1] w_hh,
            const float[::1] b_ih, const float[::1] b_hh, int repeat=1):
    """y, h_n, c_n of an LSTM over x from zero states (computed repeat times: for timing
    the call from compiled code)."""
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1]
    y = np.empty((T, B, H), np.float32)
    h_n, c_n = np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    cdef float[:, :, ::1] y_ = y
    cdef float[:, ::1] h_ = h_n, c_ = c_n
    cdef int status = 0, r
    with nogil:
        for r in range(repeat):
            status = rnnfuse_forward_f32(RNNFUSE_LSTM, 0, &y_[0, 0, 0], &h_[0, 0], &c_[0, 0],
                                         NULL,                      # no ctx: inference
                                         &x[0, 0, 0], NULL, NULL,   # h0, c0: zeros
                                         &w_ih[0, 0], &w_hh[0, 0], &b_ih[0], &b_hh[0],
                                         NULL, 0,  # no lengths (all T), not reversed
                                         T, B, I, H)
            if status != 0:
                break
    check(status)
    return y, h_n, c_n


def predict_variants(const float[:, :, ::1] x, const float[:, ::1] w_ih,
                     const float[:, ::1] w_hh, const float[::1] b_ih, const float[::1] b_hh,
                     const float[::1] peepholes, double zoneout):
    """predict() of an LSTM with peepholes (3H, ONNX's order i, o, f) and eval's zoneout p,
    through rnnfuse_forward_ex_f32 and a rnnfuse_variants struct."""
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1]
    y = np.empty((T, B, H), np.float32)
    h_n, c_n = np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    cdef float[:, :, ::1] y_ = y
    cdef float[:, ::1] h_ = h_n, c_ = c_n
    cdef rnnfuse_variants v
    memset(&v, 0, sizeof(v))  # no variant, then the ones wanted
    v.version = RNNFUSE_VARIANTS_VERSION
    v.peepholes = &peepholes[0]
    v.zoneout = zoneout
    cdef int status
    with nogil:
        status = rnnfuse_forward_ex_f32(RNNFUSE_LSTM, 0, &y_[0, 0, 0], &h_[0, 0], &c_[0, 0],
                                        NULL, &x[0, 0, 0], NULL, NULL, &w_ih[0, 0],
                                        &w_hh[0, 0], &b_ih[0], &b_hh[0], NULL, 0, T, B, I, H,
                                        &v)
    check(status)
    return y, h_n, c_n


def train_step(const float[:, :, ::1] x, const float[:, :, ::1] target,
               const float[:, ::1] w_ih, const float[:, ::1] w_hh,
               const float[::1] b_ih, const float[::1] b_hh):
    """The loss 0.5 * sum((y - target)^2) of an LSTM over x and its gradients:
    loss, (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh)."""
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1], k
    y, dy = np.empty((T, B, H), np.float32), np.empty((T, B, H), np.float32)
    h_n, c_n = np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    grads = (np.empty((T, B, I), np.float32), np.empty((B, H), np.float32),
             np.empty((B, H), np.float32), np.empty((4 * H, I), np.float32),
             np.empty((4 * H, H), np.float32), np.empty(4 * H, np.float32),
             np.empty(4 * H, np.float32))
    cdef float[:, :, ::1] y_ = y, dy_ = dy, dx = grads[0]
    cdef float[:, ::1] h_ = h_n, c_ = c_n, dh0 = grads[1], dc0 = grads[2]
    cdef float[:, ::1] dw_ih = grads[3], dw_hh = grads[4]
    cdef float[::1] db_ih = grads[5], db_hh = grads[6]
    cdef float *yp = &y_[0, 0, 0]
    cdef float *dyp = &dy_[0, 0, 0]
    cdef const float *tp = &target[0, 0, 0]
    cdef double loss = 0
    cdef rnnfuse_ctx *ctx = NULL
    cdef int status
    with nogil:
        # x, w_ih and w_hh must stay alive and unchanged until the backward has run.
        status = rnnfuse_forward_f32(RNNFUSE_LSTM, 0, yp, &h_[0, 0], &c_[0, 0], &ctx,
                                     &x[0, 0, 0], NULL, NULL, &w_ih[0, 0], &w_hh[0, 0],
                                     &b_ih[0], &b_hh[0], NULL, 0, T, B, I, H)
        if status == 0:
            for k in range(T * B * H):
                dyp[k] = yp[k] - tp[k]
                loss += 0.5 * dyp[k] * dyp[k]
            status = rnnfuse_backward_f32(&dx[0, 0, 0], &dh0[0, 0], &dc0[0, 0], &dw_ih[0, 0],
                                          &dw_hh[0, 0], &db_ih[0], &db_hh[0], dyp,
                                          NULL, NULL,  # dh_n, dc_n: zeros
                                          ctx)
        rnnfuse_ctx_free(ctx)  # always (NULL if the forward failed)
    check(status)
    return loss, grads
