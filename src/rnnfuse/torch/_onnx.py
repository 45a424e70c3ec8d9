"""ONNX: what torch.onnx.export writes for rnnfuse.torch's modules and operators.

The modules (``export_forward``) give one standard ONNX node per layer: LSTM, GRU (with
linear_before_reset=1, PyTorch's GRU) or RNN, both directions in one node with
direction="bidirectional". The TorchScript exporter (dynamo=False) gets torch.nn's forward,
whose operators it translates (a PackedSequence's lengths become sequence_lens); the
torch.export-based one (dynamo=True) gets the nodes themselves (torch.onnx.ops), with
the length and batch symbolic. An LSTM with peepholes gives its nodes the input P under
either exporter (its own nodes; rnnfuse's peepholes are in ONNX's order, i, o, f); the
other cell variants are refused. The operators, called directly, become one node per
direction under the TorchScript exporter. ONNX orders the gate blocks differently (see
rnnfuse.onnx_weights), so the weights are reordered in the graph."""
from __future__ import annotations

import functools

import torch
from torch.nn.utils.rnn import PackedSequence

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



def export_forward(module, input, hx):
    """A module's forward while torch.onnx.export traces it."""
    if getattr(module, "proj_size", 0):
        raise RuntimeError(f"{type(module).__name__} with proj_size={module.proj_size} cannot "
                           "be exported to ONNX: ONNX's LSTM has no projection")
    layered = hasattr(module, "num_layers")  # a module, not a cell
    variants = [v for v in getattr(module, "_active_variants", lambda: [])()
                if not (layered and v == "peepholes=True")]  # ONNX LSTM's input P
    if variants:
        raise RuntimeError(f"{type(module).__name__} with {', '.join(variants)} cannot be "
                           "exported to ONNX: rnnfuse.torch exports the plain cells and "
                           "the LSTM's peepholes (these are rnnfuse extensions)")
    peepholes = layered and getattr(module, "peepholes", False)
    if peepholes and isinstance(input, PackedSequence):
        raise RuntimeError(f"{type(module).__name__} with peepholes=True exports to ONNX "
                           "over a padded tensor, not a PackedSequence")
    dynamo = torch._C._get_tracing_state() is None
    if not peepholes and (not dynamo or not layered or isinstance(input, PackedSequence)):
        # torch.nn's operators: the TorchScript exporter translates them (packed lengths
        # as sequence_lens), the dynamo-based one torch.nn's cells
        return module._torch_class.forward(module, input, hx)
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    n = module._n_states
    states = [None] * n if hx is None else list(hx) if n == 2 else [hx]
    states = [s if s is None or batched else s.unsqueeze(1) for s in states]
    finals = [[] for _ in range(n)]
    for layer in range(module.num_layers):
        x, layer_finals = _layer_node(module, layer, x, states)
        for acc, f in zip(finals, layer_finals):
            acc.append(f)
        if module.training and module.dropout > 0 and layer < module.num_layers - 1:
            x = torch.nn.functional.dropout(x, module.dropout, training=True)
    finals = [torch.cat(f) if batched else torch.cat(f).squeeze(1) for f in finals]
    y = x.transpose(0, 1) if batched and module.batch_first else x if batched else x.squeeze(1)
    return y, (tuple(finals) if n == 2 else finals[0])


def _layer_node(module, layer, x, states):
    """One layer of ``module`` over x (T, B, input) as one ONNX node (both directions):
    (y (T, B, D*H), its final states (D, B, H) each)."""
    cell, D, H = module._cell, module.num_directions, module.hidden_size
    n = len(states)
    params = [module._weights(layer, d) for d in range(D)]

    def stacked(k):  # parameter k of every direction, gate blocks in ONNX's order
        return torch.stack([_onnx_gate_order(cell, p[k], H) for p in params])

    bias = None if params[0][2] is None else torch.cat([stacked(2), stacked(3)], dim=1)
    rows = slice(layer * D, (layer + 1) * D)
    attrs = dict(hidden_size=H, direction="bidirectional" if D == 2 else "forward")
    if cell == "gru":
        attrs["linear_before_reset"] = 1
    elif cell == "rnn":
        attrs["activations"] = [module.nonlinearity.capitalize()] * D
    T, B = x.shape[0], x.shape[1]
    inputs = [x, stacked(0), stacked(1), bias, None,
              *(None if s is None else s[rows] for s in states)]
    if module.peepholes:  # rnnfuse's peepholes are in ONNX's order (i, o, f) already
        inputs.append(torch.stack([getattr(module, "weight_peep" + module._suffix(layer, d))
                                   for d in range(D)]))
    if torch._C._get_tracing_state() is not None:  # the TorchScript exporter
        y, *finals = _LSTMNode.apply(attrs["direction"], *inputs)
    else:
        y, *finals = torch.onnx.ops.symbolic_multi_out(
            cell.upper(), inputs, attrs, dtypes=[x.dtype] * (1 + n),
            shapes=[(T, D, B, H)] + [(D, B, H)] * n, version=_ONNX_OPSET)
    return y.permute(0, 2, 1, 3).reshape(T, B, D * H), finals


class _LSTMNode(torch.autograd.Function):
    """An ONNX LSTM node for the TorchScript exporter, which translates torch.nn's
    operators but has none for the peepholes: its inputs (x, W, R, B, sequence_lens,
    initial_h, initial_c, P) in ONNX's layout. Like torch.onnx.ops' nodes, forward gives
    the outputs' shapes and dtype (zeros), not their values; ``symbolic`` writes the
    node."""

    @staticmethod
    def forward(ctx, direction, x, w, r, b, lengths, h0, c0, p):
        T, B, D, H = x.shape[0], x.shape[1], w.shape[0], r.shape[2]
        return x.new_zeros(T, D, B, H), x.new_zeros(D, B, H), x.new_zeros(D, B, H)

    @staticmethod
    def symbolic(g, direction, x, w, r, b, lengths, h0, c0, p):
        from torch.onnx import symbolic_helper as sh
        H = sh._get_tensor_sizes(r)[2]
        absent = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        inputs = [absent if v is None or sh._is_none(v) else v
                  for v in (x, w, r, b, lengths, h0, c0, p)]
        return g.op("LSTM", *inputs, hidden_size_i=H, direction_s=direction, outputs=3)


def _onnx_gate_order(cell, w, H):
    """w's gate blocks (H rows each) in ONNX's order."""
    order = _ONNX_FROM_TORCH[cell]
    return w if len(order) == 1 else torch.cat([w[k * H:(k + 1) * H] for k in order])
