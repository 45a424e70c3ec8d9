"""What rnnfuse.torch's parts share: the messages of what is refused, tensors as NumPy
views, whether something records operators now, and PyTorch's thread count."""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from .. import _kernels
from .._checks import check_nonlinearity

# The states of each cell, by name (h, c for the LSTM).
_STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}
_N_STATES = {cell: len(names) for cell, names in _STATE_NAMES.items()}

# The Functions run the kernels outside PyTorch's dispatcher, where a tracer cannot see
# them; the modules switch to the operators (torch.ops.rnnfuse.*) when something traces.
_NOT_TRACEABLE = (
    "{name} runs rnnfuse's kernels outside PyTorch's dispatcher, so a trace cannot record "
    "them (got a {kind}, not a plain tensor): under torch.compile, torch.export, "
    "torch.jit.trace or torch.func, call rnnfuse.torch's modules or the operators "
    "torch.ops.rnnfuse.lstm, gru and rnn, which they record")

# The modules export with either exporter (see _onnx.py); the operators called directly,
# with the TorchScript-based one only.
_NO_ONNX = (
    "rnnfuse's operators called directly export to ONNX with torch.onnx.export(..., "
    "dynamo=False) (one standard LSTM/GRU/RNN node per direction); the dynamo-based "
    "exporter has no translation of them. rnnfuse.torch's modules export with either "
    "exporter (one node per layer): call the modules.")

_FIRST_ORDER = ("rnnfuse.torch computes first derivatives only: backward with "
                "create_graph=True (double backward, e.g. a gradient penalty) is not "
                "supported; use the torch.nn module for that")


def _np(t):
    """A NumPy view of a CPU tensor (None stays None); a copy only if it is not contiguous."""
    if t is None:
        return None
    t = t.detach()
    if type(t) is not torch.Tensor:  # a FakeTensor of torch.export, a tensor subclass
        raise RuntimeError(_NOT_TRACEABLE.format(name="rnnfuse.torch's autograd Functions",
                                                 kind=type(t).__name__))
    return _numpy_contiguous(t)


def _numpy_contiguous(t):
    """A C-contiguous NumPy array of a detached CPU tensor: a view, or NumPy's copy of a
    strided one (such as an expanded gradient), which costs less than torch's."""
    return np.ascontiguousarray(t.numpy())


def _recording():
    """Whether something records operators now rather than only running them:
    torch.compile or torch.export tracing, torch.jit.trace, a torch.func transform, a
    TorchDispatchMode (FakeTensorMode, make_fx, ...). (Dynamo reads the first as True.)"""
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _nested_derivative():
    """Whether a torch.func derivative transform (grad, jvp, ...) runs outside the one
    whose backward runs now: a second derivative, which rnnfuse's backward (first order,
    computed without autograd) would silently give as zero."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    kinds = [i.key() for i in retrieve_all_functorch_interpreters()]
    return sum(k in (TransformType.Grad, TransformType.Jvp) for k in kinds) > 1


def _kernel_option(cell, option=None):
    """A cell's option as functional's ctx keeps it: None (LSTM), linear_before_reset
    (GRU), relu (RNN; the nonlinearity checked)."""
    if cell == "rnn":
        return check_nonlinearity(option) == "relu"
    return None if cell == "lstm" else bool(option)


def _lengths_np(lengths):
    return None if lengths is None else lengths.detach().numpy()



_BLAS_LOCK = threading.Lock()
_blas_lowered = [0, 0]  # calls running while the BLAS is lowered; its count before them


def _lower_blas(n):
    """Lower the BLAS's (process-wide) thread count to n for a call, unless it has no more
    or a running call has lowered it already; True: the call must _restore_blas()."""
    with _BLAS_LOCK:
        if _blas_lowered[0]:
            _blas_lowered[0] += 1
            return True
        blas = _kernels.blas_threads()
        if blas <= n or not _kernels.set_blas_threads(n):
            return False
        _blas_lowered[:] = [1, blas]
        return True


def _restore_blas():
    """The last of the calls that ran with the BLAS lowered gives it its count back."""
    with _BLAS_LOCK:
        _blas_lowered[0] -= 1
        if _blas_lowered[0] == 0:
            _kernels.set_blas_threads(_blas_lowered[1])


def _on_torch_threads(kernel_call):
    """``kernel_call`` on PyTorch's thread count (``torch.get_num_threads()``: what
    torch.set_num_threads and OMP_NUM_THREADS say) rather than the BLAS's: the kernels'
    own parallel parts take it, and where the BLAS that they call for large products has
    more threads, it is lowered to it while such calls run (process-wide)."""

    @functools.wraps(kernel_call)
    def call(*args, **kwargs):
        n = torch.get_num_threads()
        previous = _kernels.set_threads(n)
        lowered = _lower_blas(n)
        try:
            return kernel_call(*args, **kwargs)
        finally:
            if lowered:
                _restore_blas()
            _kernels.set_threads(previous)

    return call
