"""PyTorch modules over the rnnfuse kernels: drop-in ``torch.nn.LSTM``, ``GRU`` and ``RNN``.

::

    import torch
    from rnnfuse.torch import LSTM, swap_modules

    lstm = LSTM(64, 128, num_layers=2, bidirectional=True)   # as torch.nn.LSTM(...)
    y, (h_n, c_n) = lstm(x)            # x (T, B, 64), (B, T, 64) if batch_first, (T, 64)
                                       # unbatched, or a PackedSequence
    lstm.load_state_dict(torch_lstm.state_dict())            # and the other way round
    swapped = swap_modules(model)      # in place: every torch.nn.LSTM/GRU/RNN in model

The modules are subclasses of their ``torch.nn`` namesakes (``isinstance(lstm,
torch.nn.LSTM)``; ``_flat_weights`` and the rest of torch.nn's attributes are there): they
take the same constructor arguments, have the same ``forward(input, hx=None)``, return the
same outputs, and register the same parameters (``weight_ih_l0``, ``bias_hh_l1_reverse``,
...) with the same initialisation, so state dicts load both ways and ``torch.optim`` trains
them. Only ``forward`` differs: it runs on rnnfuse's kernels. What rnnfuse does not do is refused at
construction: ``proj_size > 0``, devices other than the CPU, dtypes other than float32 and
float64.

Each direction of each layer is one call of an autograd Function over
``rnnfuse.functional``: ``LSTMFunction``, ``GRUFunction``, ``RNNFunction``. Tensors reach
the kernels as NumPy views (no copy when contiguous) and come back with
``torch.from_numpy``. When autograd records nothing (``torch.no_grad()``,
``torch.inference_mode()``, or no input or parameter requires grad) the kernels run with
``need_ctx=False`` and keep no training workspace; eval mode alone does not turn gradients
off, as in torch.nn (it only turns dropout off). Backward may run again over a graph kept
with ``retain_graph=True`` (it replays the forward); double backward (``create_graph=True``)
is refused.

Under tracing the modules call the same kernels as PyTorch operators instead,
``torch.ops.rnnfuse.lstm``, ``gru`` and ``rnn`` (with their backward operators and
autograd formula; see "custom operators" below), which tracers record:
``torch.compile(model, fullgraph=True)`` compiles them without a graph break,
``torch.export.export`` exports them with a dynamic sequence length and batch
(``torch.export.Dim``), ``torch.jit.trace`` records the operator (not its output), and
``torch.func``'s ``grad`` and ``vmap`` transform them (first derivatives only, as
above). Eager calls keep the direct path above, which costs less per call. The
operators' training workspaces are kept per thread for reuse; ``release_workspace()``
frees them. Dynamo refuses subclasses of torch.nn's RNNs unless
``torch._dynamo.config.allow_rnn`` is set; rnnfuse's modules are let in without changing
that setting (torch.nn's own RNNs still graph-break). ``torch.onnx.export(...,
dynamo=False)`` writes one standard ONNX LSTM, GRU or RNN node per layer and direction
(the dynamo-based exporter has no translation of the operators: export the ``torch.nn``
twins, ``module.to_torch()`` or ``unswap_modules(model)``, which share the parameters).
``torch.jit.script(model)`` scripts the twins by itself and, as it does with any module's
``__prepare_scriptable__``, leaves them in ``model``.

Importing this module needs PyTorch; ``import rnnfuse`` never imports it.
"""
from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.util
import numbers
import sys
import threading
import warnings
from typing import Any, TypeVar

import numpy as np

try:
    import torch
except ImportError as e:
    raise ImportError(f"rnnfuse.torch needs PyTorch, which could not be imported ({e}); "
                      "install it with `pip install torch`") from e
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _kernels, functional as F
from ._checks import check_bool as _check_bool, check_int as _check_int

_M = TypeVar("_M", bound="_Fused")

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LSTMFunction",
           "GRUFunction", "RNNFunction", "swap_modules", "unswap_modules",
           "release_workspace"]


# ---------------------------------------------------------------- autograd Functions

# The Functions run the kernels outside PyTorch's dispatcher, where a tracer cannot see
# them; the modules switch to the operators (torch.ops.rnnfuse.*) when something traces.
_NOT_TRACEABLE = (
    "{name} runs rnnfuse's kernels outside PyTorch's dispatcher, so a trace cannot record "
    "them (got a {kind}, not a plain tensor): under torch.compile, torch.export, "
    "torch.jit.trace or torch.func, call rnnfuse.torch's modules or the operators "
    "torch.ops.rnnfuse.lstm, gru and rnn, which they record")

# The TorchScript exporter translates the operators (see "ONNX" below); the dynamo-based
# one has no translation of them.
_NO_ONNX = (
    "rnnfuse.torch's modules export to ONNX with torch.onnx.export(..., dynamo=False) (one "
    "standard LSTM/GRU/RNN node per layer and direction); the dynamo-based exporter has no "
    "translation of rnnfuse's operators. Or export the torch.nn twin: module.to_torch(), or "
    "rnnfuse.torch.unswap_modules(model) for a whole model (both share the parameters).")

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
    return t.contiguous().numpy()


def _split(function, args):
    """A Function's arguments as (x, states..., w_ih, w_hh, b_ih, b_hh) and
    (lengths, reverse, options...)."""
    n = _N_STATES[function.cell] + 5
    return args[:n], args[n:]


def _kernel_forward(function, args, need_ctx):
    """Run the kernel of ``function``'s cell on its arguments: (y, finals, kernel ctx)."""
    tensors, (lengths, reverse, *options) = _split(function, args)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.numpy()
    forward = getattr(F, function.cell + "_forward")
    y, *finals, kctx = forward(*map(_np, tensors), lengths, reverse, *options, need_ctx=need_ctx)
    return torch.from_numpy(y), [torch.from_numpy(f) for f in finals], kctx


def _record(ctx, function, args):
    """Function.forward of every cell: run the kernel, keeping what backward needs."""
    need = any(ctx.needs_input_grad)
    y, finals, kctx = _kernel_forward(function, args, need_ctx=need)
    if need:
        ctx.set_materialize_grads(False)  # an unused output's gradient reaches the kernel as None
        tensors, rest = _split(function, args)
        # Saved through autograd, so that torch refuses if an input is changed in place
        # before backward (the kernel's ctx reads x and the weights through NumPy views).
        ctx.save_for_backward(*tensors)
        ctx.function, ctx.rest = function, rest
    ctx.kernel = kctx
    return (y, *finals)


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


def _run(cell, *args):
    """The call of a module's forward: ``function.apply(*args)`` when autograd records
    this call; otherwise the kernel alone with need_ctx=False, which keeps no workspace
    for backward. Under tracing (``_recording``), or for tensor subclasses, the cell's
    operator (torch.ops.rnnfuse.*) instead: the same kernels, seen by the tracer."""
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in args)
    if (_recording() or type(args[0]) not in _PLAIN
            or type(args[1 + _N_STATES[cell]]) not in _PLAIN):  # x, w_ih: a subclass
        # A TorchScript trace runs with or without autograd later: it keeps no workspace
        # (backward then replays the forward), so that it does not depend on grad mode.
        return _run_op(cell, args, grad and not torch.jit.is_tracing())
    function = _FUNCTIONS[cell]
    if grad:
        return function.apply(*args)
    y, finals, _ = _kernel_forward(function, args, need_ctx=False)
    return (y, *finals)


def _run_op(cell, args, train):
    """A cell's Function's arguments through its operator: (y, finals...)."""
    if torch.onnx.is_in_onnx_export():
        if torch._C._get_tracing_state() is None:  # the dynamo exporter: no translation
            raise RuntimeError(_NO_ONNX)
    n = _N_STATES[cell] + 5
    tensors, (lengths, reverse, *options) = args[:n], args[n:]
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.int64)
    if torch._C._are_functorch_transforms_active():
        return _OPS[cell][2].apply(*tensors, lengths, reverse, *options, train)[:-1]
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        # (an exported program keeps the operator itself, with its registered autograd)
        return _OPS[cell][3].apply(*tensors, lengths, reverse, *options, train)[:-1]
    return _OPS[cell][0](*tensors, lengths, reverse, *options, train)[:-1]


class _CellFunction(torch.autograd.Function):
    """The backward shared by the three cells (their forwards differ only in arguments)."""

    cell: Any = None
    n_states = 1

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            # create_graph=True. (once_differentiable would hand back constants whenever the
            # incoming gradients do not require grad, so a gradient penalty would silently
            # lose its second-order terms: refuse instead.)
            raise RuntimeError(_FIRST_ORDER)
        saved = ctx.saved_tensors  # torch refuses here if the graph was freed or an input changed
        kctx, ctx.kernel = ctx.kernel, None
        if kctx is None:
            # A second backward over a graph kept with retain_graph=True: the first one
            # consumed the kernel's record (backward overwrites it), so replay the forward.
            kctx = _kernel_forward(ctx.function, (*saved, *ctx.rest), need_ctx=True)[2]
        backward = getattr(F, ctx.function.cell + "_backward")
        out = backward(*(None if g is None else _np(g) for g in grads), kctx)
        out = list(out) + [None] * (len(ctx.needs_input_grad) - len(out))  # lengths, reverse, ...
        return tuple(torch.from_numpy(g) if need and g is not None else None
                     for g, need in zip(out, ctx.needs_input_grad))


class LSTMFunction(_CellFunction):
    """One direction of one LSTM layer, as an autograd Function::

        y, h_n, c_n = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)

    Arguments as ``rnnfuse.functional.lstm_forward``: time-major ``x (T, B, I)``, states
    ``(B, H)``, weights in PyTorch's layout; ``h0``, ``c0``, the biases and ``lengths`` (B,)
    may be None. Padding steps (t >= lengths[b]) give y = 0 and no gradient.
    """

    cell, n_states = "lstm", 2

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False):
        return _record(ctx, LSTMFunction, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse))


class GRUFunction(_CellFunction):
    """One direction of one GRU layer, as an autograd Function::

        y, h_n = GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                   linear_before_reset)

    Arguments as ``rnnfuse.functional.gru_forward`` (``linear_before_reset=True`` is
    PyTorch's GRU).
    """

    cell = "gru"

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                linear_before_reset=True):
        return _record(ctx, GRUFunction, (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                          linear_before_reset))


class RNNFunction(_CellFunction):
    """One direction of one Elman RNN layer, as an autograd Function::

        y, h_n = RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                   nonlinearity)

    Arguments as ``rnnfuse.functional.rnn_forward``; ``nonlinearity`` "tanh" or "relu".
    """

    cell = "rnn"

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                nonlinearity="tanh"):
        return _record(ctx, RNNFunction, (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                          nonlinearity))


_FUNCTIONS = {"lstm": LSTMFunction, "gru": GRUFunction, "rnn": RNNFunction}
_N_STATES = {"lstm": 2, "gru": 1, "rnn": 1}


# ---------------------------------------------------------------- custom operators

# The same kernels as PyTorch operators (torch.library), for what records operators rather
# than running Python: torch.compile (no graph break), torch.export (dynamic T and B),
# torch.jit.trace, torch.func. Per cell, forward and backward:
#
#   y, h_n, c_n, ws = torch.ops.rnnfuse.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
#                                            reverse, train)
#   y, h_n, ws = torch.ops.rnnfuse.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
#                                      linear_before_reset, train)
#   y, h_n, ws = torch.ops.rnnfuse.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
#                                      nonlinearity, train)
#   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.rnnfuse.lstm_backward(
#       dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse)
#   dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.rnnfuse.gru_backward(
#       dy, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, linear_before_reset)
#                                                  (rnn_backward: nonlinearity last)
#
# Arguments as rnnfuse.functional's (time-major; None for zero states, absent biases and
# full lengths; lengths an int64 tensor); backward takes the forward's. ``ws`` is the
# training workspace that functional's ctx holds, as a 1-D tensor, and one element more
# that says whether a backward has used it: with train=False it is empty (nothing is kept
# for backward). Its size without lengths is a fixed formula in T, B, T*B for given (I, H)
# (_workspace_size); with lengths it depends on their values (an unbacked size under
# tracing). Backward overwrites ws (declared: ``Tensor(a!) ws``), as the kernels reuse the
# saved state for gradients, so that nothing is copied; over a used ws (a graph kept with
# retain_graph=True) it replays the forward into it first. The gradient of an absent bias
# is an empty tensor. Autograd is registered on the forwards: their gradient is the
# backward operator.

_OPTION = {"lstm": "", "gru": ", bool linear_before_reset", "rnn": ", str nonlinearity"}
_STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}


def _schemas(cell):
    """The forward's and the backward's schema (torch.library's syntax)."""
    states = _STATE_NAMES[cell]
    inputs = ("Tensor x, " + "".join(f"Tensor? {s}0, " for s in states)
              + "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, ")
    fwd = (f"({inputs}Tensor? lengths, bool reverse{_OPTION[cell]}, bool train) -> ("
           + ", ".join(["Tensor"] * (len(states) + 2)) + ")")
    bwd = ("(Tensor? dy, " + "".join(f"Tensor? d{s}_n, " for s in states)
           + f"{inputs}Tensor(a!) ws, Tensor? lengths, bool reverse{_OPTION[cell]}) -> ("
           + ", ".join(["Tensor"] * (5 + len(states))) + ")")
    return fwd, bwd


def _option(cell, option):
    """An operator's option as functional's forward takes it (None for the LSTM)."""
    return () if cell == "lstm" else (option,)


@functools.lru_cache(maxsize=None)
def _workspace_terms(cell, I, H, reverse):
    """(a, b, c, d) with the training workspace of a call without lengths a + b*T + c*B +
    d*T*B elements, read from the kernels' own sizes at four small shapes."""
    n = {(T, B): _kernels.workspace_size(cell, F._full_plan(T, B, reverse), I, H, True)
         for T in (1, 2) for B in (1, 2)}
    d = n[2, 2] - n[2, 1] - n[1, 2] + n[1, 1]
    b, c = n[2, 1] - n[1, 1] - d, n[1, 2] - n[1, 1] - d
    return n[1, 1] - b - c - d, b, c, d


def _workspace_size(cell, T, B, I, H, reverse):
    """The training workspace's elements without lengths (T and B may be symbolic; I and
    H are made concrete: the packed weights' size rounds them)."""
    a, b, c, d = _workspace_terms(cell, int(I), int(H), bool(reverse))
    return a + b * T + c * B + d * T * B


def _kernel_option(cell, option=None):
    """The option as functional's ctx keeps it: None (LSTM), linear_before_reset (GRU),
    relu (RNN)."""
    return None if cell == "lstm" else bool(option) if cell == "gru" else option == "relu"


@functools.lru_cache(maxsize=None)
def _pack_size(cell, I, H):
    """Elements of the packed weights, the training workspace's last part."""
    G = F._GATES[cell]
    return _kernels.pack_weights(np.zeros((G * H, I)), np.zeros((G * H, H)), G, True).size


# The operators' training workspaces come from a small per-thread pool of buffers, reused
# once nothing else holds them (by their storage's use count; a graph kept with
# retain_graph=True holds its own): as functional keeps a spare workspace, for fresh
# memory costs page faults on every call.
_POOL = threading.local()
_POOL_SIZE = 8


def _storage_users(t):
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _pooled_empty(n, like):
    """An uninitialised 1-D tensor of n elements of like's dtype: a view of a pooled
    buffer that nothing else uses, else of a new pooled buffer."""
    pool = _POOL.__dict__.setdefault("buffers", [])
    for buf in pool:
        if buf.dtype == like.dtype and n <= buf.numel() <= 2 * n and _storage_users(buf) == 2:
            return buf[:n]  # (the pool's tensor and the storage object above: nobody else)
    buf = like.new_empty(n)
    pool.append(buf)
    del pool[:-_POOL_SIZE]
    return buf[:n]


def release_workspace() -> None:
    """Free the workspaces this thread keeps for its next calls: those of the operators
    (training under torch.compile, torch.export, torch.func) and functional's."""
    _POOL.__dict__.pop("buffers", None)
    F.release_workspace()


def _lengths_np(lengths):
    return None if lengths is None else lengths.detach().numpy()


def _define_ops(cell):
    """Define torch.ops.rnnfuse.<cell> and <cell>_backward, their fake (shape) functions
    and the forward's autograd formula."""
    n = len(_STATE_NAMES[cell])
    G = F._GATES[cell]
    fwd_schema, bwd_schema = _schemas(cell)

    def split(args):  # forward's args: x, states, weights, lengths, reverse, option, train
        x, states = args[0], args[1:1 + n]
        w_ih, w_hh, b_ih, b_hh, lengths, reverse = args[1 + n:7 + n]
        option = args[7 + n] if cell != "lstm" else None
        return x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, args[-1]

    def run_forward(x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train,
                    into=None):
        """The kernels' forward: y, finals, and ws (a tensor; with train=False empty; else
        the workspace and one more element, 0: not yet used by a backward), written into
        ``into`` if given."""
        arrays = (_np(x), [_np(s) for s in states], _np(w_ih), _np(w_hh), _np(b_ih),
                  _np(b_hh), _lengths_np(lengths), reverse)
        if not train:
            y, finals, _ = F._forward(cell, *arrays, _kernel_option(cell, option), False)
            return y, finals, x.new_empty(0)
        ws = []

        def workspace(size, dtype):
            # What the kernels leave unwritten is zeroed, not memory's garbage (an
            # operator's outputs are a function of its inputs): the summed bias without
            # biases, the packed weights' padding, with lengths the steps' scratch of
            # empty rows.
            w = _pooled_empty(size + 1, x) if into is None else into
            if lengths is not None:
                w.zero_()
            else:
                w[:w_hh.shape[0]].zero_()  # G*H
                w[size - _pack_size(cell, x.shape[2], w_hh.shape[1]):].zero_()
            ws.append(w)
            return w.numpy()[:size]

        y, finals = F._checked_forward(cell, *arrays, _kernel_option(cell, option), True,
                                       workspace)[:2]
        return y, finals, ws[0]

    def forward(*args):
        if torch.onnx.is_in_onnx_export():  # the exporter traces this call: translate it
            _register_onnx()
        y, finals, ws = run_forward(*split(args))
        return (torch.from_numpy(y), *(torch.from_numpy(f) for f in finals), ws)

    def forward_fake(*args):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = split(args)
        T, B, I = x.shape
        H = w_hh.shape[1]
        if not train:
            ws = x.new_empty(0)
        elif lengths is None:
            ws = x.new_empty(_workspace_size(cell, T, B, I, H, reverse) + 1)
        else:  # the rows that take part, and so the size, depend on the lengths' values
            ws = x.new_empty(torch.library.get_ctx().new_dynamic_size())
        return (x.new_empty(T, B, H), *(x.new_empty(B, H) for _ in range(n)), ws)

    def split_backward(args):  # dy, dfinals, forward's tensors, ws, lengths, reverse, option
        x, states = args[1 + n], args[2 + n:2 + 2 * n]
        w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse = args[2 + 2 * n:9 + 2 * n]
        option = args[9 + 2 * n] if cell != "lstm" else None
        return args[:1 + n], x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option

    def backward(*args):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option = \
            split_backward(args)
        if ws.numel() == 0 or ws[-1] != 0:
            # a forward without workspace, or one that an earlier backward consumed (over
            # a graph kept with retain_graph=True): replay the forward into it
            if ws.numel() == 0:
                raise ValueError("ws is empty: the forward ran with train=False")
            run_forward(x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, True,
                        into=ws.detach())
        wsn = ws.detach().numpy()
        wsn[-1] = 1  # the kernels overwrite the saved state: it is consumed
        xn = _np(x)
        T, B, I = xn.shape
        ctx = F.Context()
        ctx.cell, ctx.dtype, ctx.plan = cell, xn.dtype, F._plan(_lengths_np(lengths), T, B,
                                                                bool(reverse))
        ctx.ws, ctx.x, ctx.w_ih, ctx.w_hh = wsn[:-1], xn, _np(w_ih), _np(w_hh)
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.option = _kernel_option(cell, option)
        ctx.input_size, ctx.hidden_size = I, w_hh.shape[1]
        grads = F._backward(cell, _np(douts[0]), [_np(d) for d in douts[1:]], ctx,
                            keep_spare=False)
        return tuple(x.new_empty(0) if g is None else torch.from_numpy(g) for g in grads)

    def backward_fake(*args):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option = \
            split_backward(args)
        T, B, I = x.shape
        H = w_hh.shape[1]
        return (x.new_empty(T, B, I), *(x.new_empty(B, H) for _ in range(n)),
                x.new_empty(G * H, I), x.new_empty(G * H, H),
                x.new_empty(0 if b_ih is None else G * H),
                x.new_empty(0 if b_hh is None else G * H))

    fwd_op = torch.library.custom_op(f"rnnfuse::{cell}", forward, mutates_args=(),
                                     schema=fwd_schema)
    bwd_op = torch.library.custom_op(f"rnnfuse::{cell}_backward", backward,
                                     mutates_args=("ws",),
                                     schema=bwd_schema)
    fwd_op.register_fake(forward_fake)
    bwd_op.register_fake(backward_fake)
    fwd, bwd = (getattr(torch.ops.rnnfuse, name).default for name in (cell, cell + "_backward"))

    def save(ctx, inputs, output):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = split(inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(*inputs[:7 + n - 1], output[-1])  # tensors, ws
        ctx.reverse, ctx.option, ctx.train = reverse, option, train

    def gradient(ctx, *grads, own_ws=False):
        """The forwards' gradient. own_ws: the workspace is private to the caller (not an
        output anyone else sees): backward may overwrite it rather than a copy."""
        *saved, ws = ctx.saved_tensors
        if ctx.train and not own_ws:
            ws = ws.clone()  # the operator's output ws stays as it was
        x, states, (w_ih, w_hh, b_ih, b_hh, lengths) = saved[0], saved[1:1 + n], saved[1 + n:]
        opt = _option(cell, ctx.option)
        if torch.is_grad_enabled() and not _recording() or _nested_derivative():
            raise RuntimeError(_FIRST_ORDER)
        with torch.no_grad():  # torch.func's grad runs backward with create_graph=True
            if not ctx.train:  # the forward kept nothing (it ran without autograd): replay
                ws = fwd(x, *states, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, *opt,
                         True)[-1]
            out = bwd(*grads[:1 + n], x, *states, w_ih, w_hh, b_ih, b_hh, ws, lengths,
                         ctx.reverse, *opt)
        dx, dstates, (dw_ih, dw_hh, db_ih, db_hh) = out[0], out[1:1 + n], out[1 + n:]
        return (dx, *(d if s is not None else None for d, s in zip(dstates, states)),
                dw_ih, dw_hh, db_ih if b_ih is not None else None,
                db_hh if b_hh is not None else None, None, None, *(None,) * len(opt), None)

    fwd_op.register_autograd(gradient, setup_context=save)

    class OpFunction(torch.autograd.Function):
        """The forward operator as an autograd Function whose workspace output nobody
        else sees (the modules drop it), so that backward overwrites it, copying nothing;
        with setup_context, which torch.func's transforms take (they do not take an
        operator's registered autograd), and a batching rule for vmap."""

        @staticmethod
        def forward(*args):
            return fwd(*args)

        setup_context = staticmethod(save)

        @staticmethod
        def backward(ctx, *grads):
            return gradient(ctx, *grads, own_ws=True)

        @staticmethod
        def vmap(info, in_dims, *args):
            # Examples that share the weights are one call over a batch of N*B rows;
            # examples with weights of their own, one call each.
            N = info.batch_size
            x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = split(args)
            dims = split(in_dims)
            if any(d is not None for d in dims[2:6]):
                outs = [OpFunction.apply(*(a if d is None else a.select(d, k)
                                           for a, d in zip(args, in_dims)))
                        for k in range(N)]
                *outs, ws = zip(*outs)
                return ((*(torch.stack(o) for o in outs), torch.cat(ws)),
                        (0,) * len(outs) + (None,))

            def rows(a, d, at):  # a's example dim d next to its batch dim (at), merged
                if a is None:
                    return None
                a = a.unsqueeze(at).expand(*a.shape[:at], N, *a.shape[at:]) if d is None \
                    else a.movedim(d, at)
                return a.reshape(*a.shape[:at], -1, *a.shape[at + 2:])

            x1 = rows(x, dims[0], 1)
            T, NB = x1.shape[:2]
            out = OpFunction.apply(x1, *(rows(s, d, 0) for s, d in zip(states, dims[1])),
                                   w_ih, w_hh, b_ih, b_hh, rows(lengths, dims[6], 0),
                                   *args[6 + n:])
            y, *finals, ws = out
            return ((y.reshape(T, N, NB // N, -1), *(f.reshape(N, NB // N, -1) for f in finals),
                     ws), (1,) + (0,) * len(finals) + (None,))

    class CompiledFunction(torch.autograd.Function):
        """OpFunction as Dynamo traces it (ctx first in forward)."""

        @staticmethod
        def forward(ctx, *args):
            out = fwd(*args)
            save(ctx, args, out)
            return out

        backward = OpFunction.backward

    return fwd, bwd, OpFunction, CompiledFunction


_OPS = {cell: _define_ops(cell) for cell in ("lstm", "gru", "rnn")}


# ---------------------------------------------------------------- modules

def _check_tensor(name, t, dtype):
    """t on the CPU with the parameters' dtype."""
    if t.device.type != "cpu":
        raise RuntimeError(f"{name} is on {t.device}, but rnnfuse runs on the CPU: "
                           "move it with .cpu()")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the parameters' dtype), got "
                         f"{t.dtype}: convert it with .to({dtype})")


def _autocast_dtype(input, hx, dtype):
    """Under CPU autocast, when ``input`` or ``hx`` holds a floating dtype of lower
    precision than the parameters' ``dtype``: the dtype to return outputs in (``input``'s).
    Else None."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    data = input.data if isinstance(input, PackedSequence) else input
    parts = [data, *(hx if isinstance(hx, (tuple, list)) else [hx])]
    if any(isinstance(t, torch.Tensor) and t.is_floating_point()
           and t.dtype.itemsize < dtype.itemsize for t in parts):
        return data.dtype
    return None


def _cast(value, dtype):
    """A tensor, PackedSequence, or tuple of them (hx) in ``dtype``; None stays None."""
    if isinstance(value, PackedSequence):
        return value._replace(data=value.data.to(dtype))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def _check_states(hx, n_states, shape, layout, dtype):
    """hx as a list of n_states tensors of ``shape``, or of Nones (zeros)."""
    if hx is None:
        return [None] * n_states
    if n_states == 2:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a tuple (h_0, c_0) of two tensors for LSTM, got "
                            f"{type(hx).__name__}")
        parts, names = hx, ("hx[0] (h_0)", "hx[1] (c_0)")
    else:
        parts, names = (hx,), ("hx",)
    for name, s in zip(names, parts):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
        _check_tensor(name, s, dtype)
        if tuple(s.shape) != shape:
            raise RuntimeError(f"{name} must have shape {shape} = {layout}, "
                               f"got {tuple(s.shape)}")
    return list(parts)


def _repack(y, lengths, like):
    """y (T, B, D*H), padded and in the caller's batch order, as a PackedSequence laid out
    like ``like`` (its batch_sizes, sorted_indices and unsorted_indices)."""
    if like.sorted_indices is not None:
        y, lengths = y.index_select(1, like.sorted_indices), lengths[like.sorted_indices]
    data = pack_padded_sequence(y, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _twin(cls, module, config):
    """A ``cls`` configured as ``module`` (its torch.nn or rnnfuse counterpart), sharing
    its parameter objects and its training mode. config: the constructor's arguments
    besides the sizes, read from ``module``."""
    w = next(module.parameters())
    kwargs = {k: getattr(module, k) for k in config}
    # fork_rng: the twin's own initial draw, replaced below, must not move the global RNG
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # module's constructor already warned about these
        twin = cls(module.input_size, module.hidden_size, device=w.device, dtype=w.dtype,
                   **kwargs)
    for name in list(twin._parameters):
        setattr(twin, name, getattr(module, name))
    return twin.train(module.training)


def _check_sizes(input_size, hidden_size, bias, device, dtype):
    """What every constructor takes, checked with rnnfuse's messages (and what rnnfuse
    cannot run refused) before torch.nn's constructor sees it; returned normalised."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"device must be the CPU (rnnfuse's kernels run there), got {device}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dict(input_size=_check_int("input_size", input_size, 1),
                hidden_size=_check_int("hidden_size", hidden_size, 1),
                bias=_check_bool("bias", bias), device=device, dtype=dtype)


def _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                bidirectional, device, dtype):
    """_check_sizes and the stacking arguments of LSTM, GRU and RNN."""
    if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
            or not 0 <= dropout <= 1):
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    return dict(_check_sizes(input_size, hidden_size, bias, device, dtype),
                num_layers=_check_int("num_layers", num_layers, 1),
                batch_first=_check_bool("batch_first", batch_first),
                bidirectional=_check_bool("bidirectional", bidirectional),
                dropout=float(dropout))


class _Fused:
    """What rnnfuse's modules share, mixed in before their torch.nn class (which keeps the
    parameters, their names and initialisation, and the rest of torch.nn's interface): the
    twins in both directions and the checks of the parameters. A subclass names its
    autograd Function, its torch.nn twin and its constructor's arguments."""

    _function: Any = None  # the cell's autograd Function
    _cell: Any = None      # its name in rnnfuse.functional
    _n_states = 1          # and its states
    _torch_class: Any = None  # the torch.nn class this one replaces
    _config: tuple[str, ...] = ()  # the constructor's arguments besides sizes, device, dtype

    @classmethod
    def from_torch(cls: type[_M], module: torch.nn.Module) -> _M:
        """The rnnfuse module configured as ``module`` (a ``torch.nn`` module of this
        kind), *sharing* its parameters: the same ``nn.Parameter`` objects, so both see
        every update and an optimizer built on ``module.parameters()`` trains the result.
        (Copy with ``copy.deepcopy(module)`` first for an independent twin.) Its training
        mode is kept; hooks registered on ``module`` are not.

        Raises TypeError for another class (for subclasses, use ``swap_modules``), and
        the constructor's errors for what rnnfuse does not support (``proj_size > 0``, a
        device other than the CPU, a dtype other than float32/float64).
        """
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch needs a torch.nn."
                            f"{cls._torch_class.__name__}, got {type(module).__qualname__}")
        return _twin(cls, module, cls._config)

    def to_torch(self) -> torch.nn.Module:
        """The ``torch.nn`` module configured as this one, *sharing* its parameters (the
        inverse of ``from_torch``): for what runs PyTorch's own operators rather than
        rnnfuse's kernels, such as ``torch.jit.trace``, ``torch.export`` and
        ``torch.onnx.export``. Its training mode is kept; hooks are not."""
        return _twin(self._torch_class, self, self._config)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        # torch.jit.script compiles Python into TorchScript, which cannot call rnnfuse's
        # kernels: it scripts the torch.nn twin instead (same parameters, same outputs up
        # to rounding). torch.jit.script puts what this returns in the model's place.
        return self.to_torch()

    def forward(self, input: Any, hx: Any = None) -> Any:
        """torch.nn's forward, on rnnfuse's kernels (see ``_forward``)."""
        dtype = self._parameters_dtype()
        out_dtype = _autocast_dtype(input, hx, dtype)
        if out_dtype is not None:  # computed in the parameters' dtype, returned in input's
            return _cast(self._forward(_cast(input, dtype), _cast(hx, dtype), dtype), out_dtype)
        return self._forward(input, hx, dtype)

    def _forward(self, input: Any, hx: Any, dtype: torch.dtype) -> Any:
        raise NotImplementedError  # each kind of module has its own

    def _parameters_dtype(self):
        """The parameters' dtype, checked again: .to(), .half() or .cuda() can change it."""
        dtype = next(self.parameters()).dtype
        for name, p in self.named_parameters():
            if p.device.type != "cpu":
                raise RuntimeError(f"{type(self).__name__}'s parameter {name} is on {p.device}, "
                                   "but rnnfuse runs on the CPU: keep the module there")
            if p.dtype != dtype or dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{type(self).__name__}'s parameters must all be "
                                f"torch.float32 or all torch.float64, got {p.dtype} for {name}: "
                                "rnnfuse computes in those; keep the module in float32 "
                                "(.float()) and run it under torch.autocast for "
                                "lower-precision inputs")
        return dtype


class _RNNBase(_Fused):
    """The forward of torch.nn's LSTM, GRU and RNN on rnnfuse's kernels: stacking,
    directions, dropout, states and checks (``class LSTM(_RNNBase, torch.nn.LSTM)``)."""

    _config: tuple[str, ...] = ("num_layers", "bias", "batch_first", "dropout",
                                "bidirectional")

    def _init_torch(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, device, dtype, **cell_args):
        """torch.nn's constructor over the checked arguments, as torch.nn's subclass."""
        checked = _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                              bidirectional, device, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its dropout warning: ours is below
            self._torch_class.__init__(self, **checked, **cell_args)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn("dropout acts on the outputs of all but the last layer, so it does "
                          f"nothing with num_layers=1 (dropout={self.dropout})", UserWarning,
                          stacklevel=4)

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1


    @property
    def _options(self):
        """The cell's arguments after ``reverse`` in its Function."""
        return ()

    def extra_repr(self):
        # torch.nn's, with the nonlinearity that it leaves out
        relu = ", nonlinearity=relu" if getattr(self, "nonlinearity", "tanh") == "relu" else ""
        return self._torch_class.extra_repr(self) + relu

    def _weights(self, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        w = [getattr(self, n + sfx) for n in names]
        return w if self.bias else w + [None, None]


    def _check_hx(self, hx, batch, batched, dtype):
        """hx as a list of n_states tensors (L*D, B, H), or of Nones (zeros)."""
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        if batched:
            shape, layout = (LD, batch, H), "(num_layers*num_directions, batch, hidden_size)"
        else:
            shape, layout = (LD, H), ("(num_layers*num_directions, hidden_size) for "
                                      "unbatched 2-D input")
        states = _check_states(hx, self._n_states, shape, layout, dtype)
        return [s if batched or s is None else s.unsqueeze(1) for s in states]

    def _forward(self, input, hx, dtype):
        """Run the stack over ``input``, as torch.nn's forward.

        ``input``: (T, B, input_size), or (B, T, input_size) if batch_first; (T, input_size)
        unbatched; or a PackedSequence (then the output is a PackedSequence with the same
        batch_sizes, sorted_indices and unsorted_indices). ``hx``: the initial state,
        (num_layers*num_directions, B, hidden_size) ((..., hidden_size) unbatched), for
        LSTM a tuple (h_0, c_0); None for zeros; rows in the caller's batch order, also
        for packed input.

        Returns ``output, h_n`` (GRU, RNN) or ``output, (h_n, c_n)`` (LSTM): ``output``
        (T, B, D*hidden_size) ([forward | reverse] halves) in the layout of ``input``.
        """
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            _check_tensor("input", input.data, dtype)
            x, lengths = pad_packed_sequence(input)  # (T, B, I), rows in the caller's order
            batched = True
        elif isinstance(input, torch.Tensor):
            if input.dim() not in (2, 3):
                layout = "(batch, seq_len" if self.batch_first else "(seq_len, batch"
                raise ValueError(f"{name}: input must be 2-D (seq_len, input_size) unbatched "
                                 f"or 3-D {layout}, input_size), got {input.dim()}-D with "
                                 f"shape {tuple(input.shape)}")
            _check_tensor("input", input, dtype)
            batched, lengths = input.dim() == 3, None
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        else:
            raise TypeError(f"{name}: input must be a torch.Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size="
                               f"{self.input_size}, got {x.shape[-1]}")
        states = self._check_hx(hx, x.shape[1], batched, dtype)

        y, finals = self._stack(x, states, lengths)
        if isinstance(input, PackedSequence):
            y = _repack(y, lengths, input)
        elif not batched:
            y, finals = y.squeeze(1), [f.squeeze(1) for f in finals]
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, (tuple(finals) if self._n_states == 2 else finals[0])

    def _stack(self, x, states, lengths):
        """Layers and directions over time-major x: (y (T, B, D*H), [h_n(, c_n)])."""
        L, D = self.num_layers, self.num_directions
        finals = [[] for _ in states]  # per state, the L*D rows in torch.nn's order
        inp = x
        for layer in range(L):
            ys = []
            for d in range(D):
                s0 = [None if s is None else s[layer * D + d] for s in states]
                y, *fin = _run(self._cell, inp, *s0, *self._weights(layer, d), lengths,
                               d == 1, *self._options)
                ys.append(y)
                for acc, f in zip(finals, fin):
                    acc.append(f)
            inp = ys[0] if D == 1 else torch.cat(ys, dim=2)
            if self.training and self.dropout > 0 and layer < L - 1:
                inp = torch.nn.functional.dropout(inp, self.dropout, training=True)
        return inp, [torch.stack(f) for f in finals]


class LSTM(_RNNBase, torch.nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)``;
    ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``. Only ``proj_size=0`` is supported.
    """

    _function, _torch_class = LSTMFunction, torch.nn.LSTM
    _cell, _n_states = "lstm", 2
    _config = _RNNBase._config + ("proj_size",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if proj_size != 0:
            raise ValueError(f"proj_size={proj_size!r} is not supported: rnnfuse.torch.LSTM "
                             "has no projection (proj_size must be 0; keep torch.nn.LSTM "
                             "for proj_size > 0)")
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)


class GRU(_RNNBase, torch.nn.GRU):
    """Drop-in ``torch.nn.GRU`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``output, h_n = gru(input, h_0)``.
    """

    _function, _torch_class = GRUFunction, torch.nn.GRU
    _cell, _n_states = "gru", 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)

    @property
    def _options(self):
        return (True,)  # linear_before_reset: PyTorch's GRU


class RNN(_RNNBase, torch.nn.RNN):
    """Drop-in ``torch.nn.RNN`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``output, h_n = rnn(input, h_0)``.
    """

    _function, _torch_class = RNNFunction, torch.nn.RNN
    _cell, _n_states = "rnn", 1
    _config = _RNNBase._config + ("nonlinearity",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, nonlinearity=nonlinearity)

    @property
    def _options(self):
        return (self.nonlinearity,)


# ---------------------------------------------------------------- cells

class _CellBase(_Fused):
    """The forward of torch.nn's LSTMCell, GRUCell and RNNCell on rnnfuse's kernels: one
    fused step (``class LSTMCell(_CellBase, torch.nn.LSTMCell)``)."""

    _config: tuple[str, ...] = ("bias",)

    def _init_torch(self, input_size, hidden_size, bias, device, dtype, **cell_args):
        self._torch_class.__init__(self, **_check_sizes(input_size, hidden_size, bias, device,
                                                        dtype), **cell_args)

    _options = _RNNBase._options

    def _forward(self, input, hx, dtype):
        """One step, as torch.nn's forward. ``input``: (B, input_size), or (input_size,)
        unbatched. ``hx``: (B, hidden_size) ((hidden_size,) unbatched), for LSTMCell a tuple
        (h, c); None for zeros. Returns h' (LSTMCell: (h', c')) in the layout of input."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: input must be 1-D (input_size) unbatched or 2-D (batch, "
                             f"input_size), got {input.dim()}-D with shape {tuple(input.shape)}")
        _check_tensor("input", input, dtype)
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size="
                               f"{self.input_size}, got {input.shape[-1]}")
        batched = input.dim() == 2
        shape, layout = (((input.shape[0], self.hidden_size), "(batch, hidden_size)") if batched
                         else ((self.hidden_size,), "(hidden_size) for unbatched 1-D input"))
        states = _check_states(hx, self._n_states, shape, layout, dtype)
        x = input.reshape(1, -1, self.input_size)  # one time step
        states = [None if s is None else s.reshape(-1, self.hidden_size) for s in states]
        bias = [self.bias_ih, self.bias_hh] if self.bias else [None, None]
        _, *finals = _run(self._cell, x, *states, self.weight_ih, self.weight_hh, *bias,
                          None, False, *self._options)
        finals = [f if batched else f.view(self.hidden_size) for f in finals]
        return tuple(finals) if len(finals) == 2 else finals[0]


class LSTMCell(_CellBase, torch.nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` on the rnnfuse kernels, and a subclass of it:
    ``LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)``;
    ``h, c = cell(input, (h, c))``."""

    _function, _torch_class = LSTMFunction, torch.nn.LSTMCell
    _cell, _n_states = "lstm", 2

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, bias, device, dtype)


class GRUCell(_CellBase, torch.nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` on the rnnfuse kernels, and a subclass of it:
    ``GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None)``;
    ``h = cell(input, h)``."""

    _function, _torch_class = GRUFunction, torch.nn.GRUCell
    _cell, _n_states = "gru", 1
    _options = GRU._options

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, bias, device, dtype)


class RNNCell(_CellBase, torch.nn.RNNCell):
    """Drop-in ``torch.nn.RNNCell`` on the rnnfuse kernels, and a subclass of it:
    ``RNNCell(input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
    dtype=None)``; ``h = cell(input, h)``."""

    _function, _torch_class = RNNFunction, torch.nn.RNNCell
    _cell, _n_states = "rnn", 1
    _config = _CellBase._config + ("nonlinearity",)
    _options = RNN._options

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self._init_torch(input_size, hidden_size, bias, device, dtype, nonlinearity=nonlinearity)


# ---------------------------------------------------------------- ONNX

# torch.onnx.export (the TorchScript exporter, dynamo=False) turns each operator into one
# standard ONNX node: LSTM, GRU (linear_before_reset=1 for PyTorch's GRU) or RNN, one
# direction each, lengths as sequence_lens. ONNX orders the gate blocks differently
# (LSTM i o f c against PyTorch's i f g o; GRU z r h against r z n), so the weights are
# reordered in the graph; see rnnfuse.onnx_weights.

_ONNX_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
_ONNX_OPSET = 14


def _onnx_symbolic(cell):
    from torch.onnx import symbolic_helper as sh
    n = len(_STATE_NAMES[cell])

    def const(g, values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def reorder(g, w, H):  # PyTorch's gate blocks in ONNX's order, then a leading 1
        blocks = [g.op("Slice", w, const(g, [k * H]), const(g, [(k + 1) * H]), const(g, [0]))
                  for k in _ONNX_ORDER[cell]]
        w = blocks[0] if len(blocks) == 1 else g.op("Concat", *blocks, axis_i=0)
        return g.op("Unsqueeze", w, const(g, [0]))

    def symbolic(g, x, *args):
        states, (w_ih, w_hh, b_ih, b_hh, lengths, reverse, *rest) = args[:n], args[n:]
        H = sh._get_tensor_sizes(w_hh)[1]
        missing = sh._is_none
        inputs = [x, reorder(g, w_ih, H), reorder(g, w_hh, H)]
        if missing(b_ih) and missing(b_hh):
            inputs.append(g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor()))
        else:  # ONNX has both biases: an absent one is zeros
            b_ih, b_hh = (g.op("Mul", w, g.op("Constant", value_t=torch.tensor(0.0)))
                          if missing(b) else b
                          for b, w in ((b_ih, b_hh), (b_hh, b_ih)))
            inputs.append(g.op("Concat", reorder(g, b_ih, H), reorder(g, b_hh, H), axis_i=1))
        inputs.append(g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
                      if missing(lengths) else
                      g.op("Cast", lengths, to_i=6))  # int32
        for s in states:
            if missing(s):
                # zeros (B, H) like x's batch: ONNX takes no state as zeros as well
                inputs.append(g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor()))
            else:
                inputs.append(g.op("Unsqueeze", s, const(g, [0])))
        attrs = dict(hidden_size_i=H,
                     direction_s="reverse" if sh._maybe_get_const(reverse, "b") else "forward")
        if cell == "gru":
            attrs["linear_before_reset_i"] = int(sh._maybe_get_const(rest[0], "b"))
        elif cell == "rnn":
            attrs["activations_s"] = [sh._maybe_get_const(rest[0], "s").capitalize()]
        out = g.op(cell.upper(), *inputs, outputs=1 + n, **attrs)
        y = g.op("Squeeze", out[0], const(g, [1]))
        finals = [g.op("Squeeze", f, const(g, [0])) for f in out[1:]]
        ws = g.op("Constant", value_t=torch.zeros(0))
        return (y, *finals, ws)

    return symbolic


@functools.cache
def _register_onnx():
    for cell in _OPS:
        torch.onnx.register_custom_op_symbolic(f"rnnfuse::{cell}", _onnx_symbolic(cell),
                                               _ONNX_OPSET)


# ---------------------------------------------------------------- torch.compile

# Dynamo refuses every instance of torch.nn.RNN, GRU and LSTM (a graph break, an error with
# fullgraph=True) unless torch._dynamo.config.allow_rnn is set, and rnnfuse's modules are
# such instances. Setting allow_rnn for the whole process would make Dynamo trace
# torch.nn's own RNNs too, which Inductor then fails to run on the CPU; so it is set only
# while Dynamo takes in one of rnnfuse's modules, whose forward traces into the operators
# above. Dynamo is imported lazily (it takes a second or so), so this is installed when
# its module is first imported.

_DYNAMO_BUILDER = "torch._dynamo.variables.builder"


def _allow_rnnfuse_modules(builder):
    """Let Dynamo's VariableBuilder take rnnfuse's modules (as with allow_rnn). Where this
    PyTorch lays Dynamo out otherwise, nothing changes (the modules then run eagerly
    between compiled graphs)."""
    cls = getattr(builder, "VariableBuilder", None)
    wrap = getattr(cls, "wrap_module", None)
    config = getattr(sys.modules.get("torch._dynamo"), "config", None)
    if wrap is None or config is None or getattr(wrap, "_rnnfuse", False):
        return

    @functools.wraps(wrap)
    def wrap_module(self, value):
        if isinstance(value, _Fused) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return wrap(self, value)
        return wrap(self, value)

    wrap_module._rnnfuse = True
    cls.wrap_module = wrap_module


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` once the module ``name`` has been imported (one time)."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            try:
                self.then(module)
            except Exception:  # never break Dynamo's import: without it, a graph break
                pass

        spec.loader.exec_module = run
        return spec


if _DYNAMO_BUILDER in sys.modules:
    _allow_rnnfuse_modules(sys.modules[_DYNAMO_BUILDER])
else:
    sys.meta_path.insert(0, _AfterImport(_DYNAMO_BUILDER, _allow_rnnfuse_modules))


# ---------------------------------------------------------------- swapping

_TWINS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNN: RNN,
          torch.nn.LSTMCell: LSTMCell, torch.nn.GRUCell: GRUCell, torch.nn.RNNCell: RNNCell}


@functools.cache
def _fused_subclass(cls, twin_class):
    """``cls`` (a subclass of a torch.nn recurrent class) with rnnfuse's forward beneath its
    own methods: ``super().forward`` in ``cls`` reaches ``twin_class``'s."""
    return type(cls.__name__, (cls, twin_class),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "_swapped_class": cls, "_twin_class": twin_class,
                 "__reduce_ex__": _reduce_fused_subclass})


def _reduce_fused_subclass(module, protocol):
    # pickled as "cls with rnnfuse beneath", rebuilt through _fused_subclass
    cls = type(module)
    return _new_fused, (cls._swapped_class, cls._twin_class), module.__getstate__()


def _new_fused(cls, twin_class):
    return object.__new__(_fused_subclass(cls, twin_class))


def _moved(module, cls):
    """A ``cls`` holding ``module``'s state: the same parameters and attributes, its own
    containers (so that the two can then differ)."""
    new = object.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list)) else v
                         for k, v in module.__dict__.items()})
    return new


def _rnnfuse_twin(module):
    """The rnnfuse module in ``module``'s place (sharing its parameters), or the reason
    there is none (an exception)."""
    twin_class = next(t for k, t in _TWINS.items() if isinstance(module, k))
    try:
        twin = _twin(twin_class, module, twin_class._config)  # refuses what we can't run
    except (TypeError, ValueError) as e:
        return e
    if type(module) is twin_class._torch_class:
        return twin
    return _moved(module, _fused_subclass(type(module), twin_class))


def swap_modules(model: torch.nn.Module) -> list[str]:
    """Replace, in place, every ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell``
    and ``RNNCell`` inside ``model`` by its rnnfuse twin, which shares the original's
    parameters: outputs are unchanged up to rounding, and an optimizer built before the
    swap keeps training the model. A module reached under several names is replaced by
    one twin everywhere. A subclass of a
    torch.nn class keeps its own methods and attributes, with rnnfuse's forward beneath
    them (its ``super().forward`` runs on rnnfuse; a forward of its own that calls
    torch's operators keeps doing so).

    Returns the qualified names replaced (as ``model.named_modules()`` spells them).

    Modules that cannot be replaced are left as they are, and one ``UserWarning`` names
    each with its reason: ``proj_size > 0``, parameters not on the CPU or not
    float32/float64, and ``model`` itself when it is one (it cannot be replaced in place:
    use ``rnnfuse.torch.LSTM.from_torch(model)`` and so on). Forward hooks on the replaced
    torch.nn modules are not carried over (a subclass's are).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped, skipped, twins = [], [], {}
    if _swappable(model):
        skipped.append("the model itself: it cannot be replaced in place; use "
                       "rnnfuse.torch.LSTM/GRU/RNN.from_torch(model)")
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not _swappable(child):
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            if id(child) not in twins:
                twins[id(child)] = _rnnfuse_twin(child)
            twin = twins[id(child)]
            if isinstance(twin, Exception):
                skipped.append(f"{qualified}: {twin}")
                continue
            setattr(parent, name, twin)
            swapped.append(qualified)
    if skipped:
        warnings.warn("swap_modules left these modules as they are:\n  - "
                      + "\n  - ".join(skipped), UserWarning, stacklevel=2)
    return swapped


def _swappable(module):
    return isinstance(module, tuple(_TWINS)) and not isinstance(module, _Fused)


def unswap_modules(model: torch.nn.Module) -> list[str]:
    """Undo ``swap_modules``: replace, in place, every rnnfuse.torch module inside
    ``model`` by its ``torch.nn`` twin (``to_torch``), which shares its parameters. For
    tracing or exporting a model (``torch.jit.trace``, ``torch.export``,
    ``torch.onnx.export``), which record PyTorch's own operators. Returns the qualified
    names replaced; ``model`` itself, when it is one, is left alone (use ``to_torch``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced, twins = [], {}
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Fused):
                if id(child) not in twins:
                    twins[id(child)] = _torch_twin(child)
                setattr(parent, name, twins[id(child)])
                replaced.append(f"{prefix}.{name}" if prefix else name)
    return replaced


def _torch_twin(module):
    """The torch.nn module in an rnnfuse module's place: a swapped subclass becomes its
    own class again."""
    original = getattr(type(module), "_swapped_class", None)
    return module.to_torch() if original is None else _moved(module, original)
