"""ONNX: torch.onnx.export (the TorchScript exporter, dynamo=False) turns each operator
into one standard ONNX node: LSTM, GRU (linear_before_reset=1 for PyTorch's GRU) or RNN,
one direction each, lengths as sequence_lens. ONNX orders the gate blocks differently
(see rnnfuse.onnx_weights), so the weights are reordered in the graph."""
from __future__ import annotations

import functools

import torch

from ..onnx_weights import _ONNX_FROM_TORCH
from ._common import _STATE_NAMES

_ONNX_OPSET = 14


def _onnx_symbolic(cell):
    from torch.onnx import symbolic_helper as sh
    n = len(_STATE_NAMES[cell])

    def const(g, values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def reorder(g, w, H):  # PyTorch's gate blocks in ONNX's order, then a leading 1
        blocks = [g.op("Slice", w, const(g, [k * H]), const(g, [(k + 1) * H]), const(g, [0]))
                  for k in _ONNX_FROM_TORCH[cell]]
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
    for cell in _STATE_NAMES:
        torch.onnx.register_custom_op_symbolic(f"rnnfuse::{cell}", _onnx_symbolic(cell),
                                               _ONNX_OPSET)

