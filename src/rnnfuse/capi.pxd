# rnnfuse's C-level API for other Cython extensions: the kernels called from nogil code,
# without Python objects or overhead.
#
#     from rnnfuse.capi cimport rnnfuse_forward_f32, RNNFUSE_LSTM, rnnfuse_strerror
#     ...
#     with nogil:
#         status = rnnfuse_forward_f32(RNNFUSE_LSTM, 0, y, h_n, c_n, NULL, x, NULL, NULL,
#                                      w_ih, w_hh, b_ih, b_hh, NULL, 0, T, B, I, H)
#
# The functions, codes and arguments are documented where they are declared, in
# rnnfuse/_kernels.pxd (Cython exports cdef functions only from the .pxd of the module
# that defines them, and they are defined in rnnfuse._kernels next to the kernels). This
# file only gives them their public name; cimporting from here is the same as from there.
#
# Building: Cython finds this file on sys.path (or pass the directory above the installed
# rnnfuse package as an include path); the extension needs no rnnfuse header or library to
# link: importing it imports rnnfuse._kernels and takes the functions from there (a
# signature mismatch with the installed rnnfuse is an ImportError, not a crash). See
# examples/capi/ for a module and its setup.py.
from rnnfuse._kernels cimport (
    RNNFUSE_EARG, RNNFUSE_EDTYPE, RNNFUSE_ELENGTHS, RNNFUSE_ENOMEM, RNNFUSE_ENULL,
    RNNFUSE_ESIZE, RNNFUSE_EUSED, RNNFUSE_EVARIANT, RNNFUSE_EVERSION, RNNFUSE_GRU,
    RNNFUSE_LSTM, RNNFUSE_OK, RNNFUSE_RNN, RNNFUSE_VARIANTS_VERSION, rnnfuse_backward_ex_f32,
    rnnfuse_backward_ex_f64, rnnfuse_backward_f32, rnnfuse_backward_f64, rnnfuse_ctx,
    rnnfuse_ctx_free, rnnfuse_forward_ex_f32, rnnfuse_forward_ex_f64, rnnfuse_forward_f32,
    rnnfuse_forward_f64, rnnfuse_strerror, rnnfuse_variant_grads, rnnfuse_variants)
