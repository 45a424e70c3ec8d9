"""Which path a module's call takes: the autograd Function (eager, recording or not) or
the operator (under tracing, or for tensor subclasses)."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import functional as F
from ._common import _N_STATES, _NO_ONNX, _PLAIN, _recording
from ._functions import _FUNCTIONS, VariantFunction, _kernel_forward, _variant_forward
from ._ops import _OPS


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


def _run_op(cell, args, train, variants=()):
    """A cell's Function's arguments through its operator, with the operator's variant
    arguments: (y, finals...)."""
    if torch.onnx.is_in_onnx_export():
        if torch._C._get_tracing_state() is None:  # the dynamo exporter: no translation
            raise RuntimeError(_NO_ONNX)
    n = _N_STATES[cell] + 5
    tensors, (lengths, reverse, *options) = args[:n], args[n:]
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.int64)
    if torch._C._are_functorch_transforms_active():
        return _OPS[cell][2].apply(*tensors, lengths, reverse, *options, train,
                                   *variants)[:-1]
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        # (an exported program keeps the operator itself, with its registered autograd)
        return _OPS[cell][3].apply(*tensors, lengths, reverse, *options, train,
                                   *variants)[:-1]
    return _OPS[cell][0](*tensors, lengths, reverse, *options, train, *variants)[:-1]



def pad_packed(packed):
    """pad_packed_sequence(packed): (x (T, B, *), lengths (B,)), rows in the caller's
    order; under torch.compile through the operators, which it traces."""
    if not torch.compiler.is_compiling():
        return pad_packed_sequence(packed)
    x, lengths = torch.ops.rnnfuse.unpack(packed.data, packed.batch_sizes)
    if packed.unsorted_indices is not None:
        x, lengths = x.index_select(1, packed.unsorted_indices), \
            lengths[packed.unsorted_indices]
    return x, lengths


def pack_sorted(y, lengths, rows):
    """The packed data of y (T, B, *) with lengths sorted in decreasing order (rows of
    them in all), as pack_padded_sequence's."""
    if not torch.compiler.is_compiling():
        return pack_padded_sequence(y, lengths, enforce_sorted=True).data
    return torch.ops.rnnfuse.pack(y, lengths, rows)


def _run_variants(spec, *tensors):
    """VariantFunction.apply(spec, *tensors) where autograd records this call, else its
    kernel alone (need_ctx=False). Under tracing, or for tensor subclasses, the cell's
    operator with the variants as its trailing arguments instead."""
    masks = spec.zoneout if isinstance(spec.zoneout, tuple) else (spec.zoneout,)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if _recording() or any(isinstance(t, torch.Tensor) and type(t) not in _PLAIN
                           for t in (*tensors, *masks, spec.recurrent_dropout)):
        return _run_variant_op(spec, tensors, grad and not torch.jit.is_tracing())
    if grad:
        return VariantFunction.apply(spec, *tensors)
    y, finals, _ = _variant_forward(spec, tensors, need_ctx=False)
    return (y, *finals)


def _run_variant_op(spec, tensors, train):
    """VariantFunction's arguments through the cell's operator: (y, finals...)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peep, *ln = tensors
    lstm = spec.cell == "lstm"
    states = (h0, c0) if lstm else (h0,)
    options = () if lstm else (spec.option,)
    p = spec.zoneout if isinstance(spec.zoneout, float) else 0.0  # eval's, else masks
    z = None if isinstance(spec.zoneout, float) else spec.zoneout
    masks = (*(z or (None, None)), spec.recurrent_dropout) if lstm else \
        (z, spec.recurrent_dropout)
    ln += [None] * (len(F._LN_NAMES.get(spec.cell, ())) - len(ln))
    parameters = (w_hr, peep, *ln) if lstm else tuple(ln)
    return _run_op(spec.cell, (x, *states, w_ih, w_hh, b_ih, b_hh, spec.lengths, spec.reverse,
                               *options), train, (*parameters, *masks, p))
