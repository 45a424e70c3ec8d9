"""The autograd Functions: one direction of one layer over rnnfuse.functional, for the
eager path (the kernels run outside PyTorch's dispatcher, which costs less per call)."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import functional as F
from ._common import _FIRST_ORDER, _N_STATES, _np, _on_torch_threads


_N_OPTIONS = {"lstm": 0, "gru": 1, "rnn": 1}


def _split(function, args):
    """A Function's arguments as (x, states..., w_ih, w_hh, b_ih, b_hh) and (lengths,
    reverse, options...)."""
    n = _N_STATES[function.cell] + 5
    return args[:n], args[n:n + 2 + _N_OPTIONS[function.cell]]


@_on_torch_threads
def _kernel_forward(function, args, need_ctx):
    """Run the kernel of ``function``'s cell on its arguments: (y, finals, kernel ctx)."""
    tensors, (lengths, reverse, *options) = _split(function, args)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.numpy()
    forward = getattr(F, function.cell + "_forward")
    y, *finals, kctx = forward(*map(_np, tensors), lengths, reverse, *options,
                               need_ctx=need_ctx)
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


class _CellFunction(torch.autograd.Function):
    """The backward shared by the three cells (their forwards differ only in arguments)."""

    cell: Any = None

    @staticmethod
    @_on_torch_threads
    def backward(ctx, *grads):
        out = _kernel_backward(ctx, ctx.function.cell, grads, lambda saved: _kernel_forward(
            ctx.function, (*saved, *ctx.rest), need_ctx=True)[2], ctx.needs_input_grad)
        out = list(out) + [None] * (len(ctx.needs_input_grad) - len(out))  # lengths, reverse, ...
        return tuple(torch.from_numpy(g) if need and g is not None else None
                     for g, need in zip(out, ctx.needs_input_grad))


def _kernel_backward(ctx, cell, grads, replay, needs):
    """The kernel's backward of a Function's call: functional's gradients, dx and dh0 (and
    dc0) None unless needs (x's and the states' needs_input_grad, then the rest's) asks
    for them. replay(saved tensors) runs the forward again for a kernel ctx when a
    backward used it already."""
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
        kctx = replay(saved)
    dy, *finals = (None if g is None else _np(g) for g in grads)
    # what nothing wants is not computed: no dx spares reading W_ih, no dh0 (after one
    # step) W_hh
    return F._backward(cell, dy, finals, kctx, inputs=needs[0],
                       states=any(needs[1:1 + _N_STATES[cell]]))


class LSTMFunction(_CellFunction):
    """One direction of one LSTM layer, as an autograd Function::

        y, h_n, c_n = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)

    Arguments as ``rnnfuse.functional.lstm_forward``: time-major ``x (T, B, I)``, states
    ``(B, H)``, weights in PyTorch's layout; ``h0``, ``c0``, the biases and ``lengths`` (B,)
    may be None. Padding steps (t >= lengths[b]) give y = 0 and no gradient.
    """

    cell = "lstm"

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


class Variants(NamedTuple):
    """What VariantFunction's call holds fixed besides its tensors: the cell, its option
    (GRU: linear_before_reset; RNN: the nonlinearity; LSTM: None), lengths (a tensor or
    None), reverse, and functional's ``zoneout`` and ``recurrent_dropout`` arguments as
    tensors (the masks; a pair for the LSTM's zoneout), eval's zoneout as a float, or
    None."""
    cell: str
    option: Any
    lengths: Any
    reverse: bool
    zoneout: Any = None
    recurrent_dropout: Any = None


@_on_torch_threads
def _variant_forward(spec, tensors, need_ctx):
    """The kernel of VariantFunction's arguments: (y, finals, kernel ctx)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peep, *ln = map(_np, tensors)
    zoneout = spec.zoneout
    if isinstance(zoneout, (tuple, torch.Tensor)):
        zoneout = tuple(map(_np, zoneout)) if isinstance(zoneout, tuple) else _np(zoneout)
    keywords = dict(need_ctx=need_ctx, zoneout=zoneout,
                    recurrent_dropout=_np(spec.recurrent_dropout),
                    layer_norm=tuple(ln) if ln else None)
    lengths = _np(spec.lengths)
    if spec.cell == "lstm":
        y, *finals, kctx = F.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
                                          spec.reverse, peepholes=peep, w_hr=w_hr, **keywords)
    else:
        forward = getattr(F, spec.cell + "_forward")
        y, *finals, kctx = forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, spec.reverse,
                                   spec.option, **keywords)
    return torch.from_numpy(y), [torch.from_numpy(f) for f in finals], kctx


class VariantFunction(torch.autograd.Function):
    """One direction of one layer with rnnfuse's cell variants, as an autograd Function::

        y, h_n(, c_n) = VariantFunction.apply(spec, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                              w_hr, peepholes, *layer_norm)

    spec: ``Variants`` (the cell, its option, lengths, reverse, zoneout's and recurrent
    dropout's arguments). The tensors as ``rnnfuse.functional``'s forwards take them, None
    where absent: c0 (GRU, RNN), w_hr and peepholes (LSTM only), and layer_norm's
    gains (and the LSTM's cell bias) or nothing. Gradients follow the arguments' order.
    """

    @staticmethod
    def forward(ctx, spec, *tensors):
        need = any(ctx.needs_input_grad)
        y, finals, kctx = _variant_forward(spec, tensors, need_ctx=need)
        if need:
            ctx.set_materialize_grads(False)  # an unused output's gradient reaches it as None
            ctx.save_for_backward(*tensors)  # torch refuses if one is changed in place
            ctx.spec = spec
        ctx.kernel = kctx
        return (y, *finals)

    @staticmethod
    @_on_torch_threads
    def backward(ctx, *grads):
        spec = ctx.spec
        out = list(_kernel_backward(ctx, spec.cell, grads, lambda saved: _variant_forward(
            spec, saved, need_ctx=True)[2], ctx.needs_input_grad[1:]))
        if spec.cell != "lstm":
            out.insert(2, None)  # dc0
        w_hr, peep = ctx.saved_tensors[7], ctx.saved_tensors[8]
        extra = out[7:]  # dw_hr, dpeepholes, layer norm's: those given, in that order
        d_hr = extra.pop(0) if w_hr is not None else None
        d_peep = extra.pop(0) if peep is not None else None
        out = out[:7] + [d_hr, d_peep] + extra
        return (None, *(torch.from_numpy(g) if need and g is not None else None
                        for g, need in zip(out, ctx.needs_input_grad[1:])))
