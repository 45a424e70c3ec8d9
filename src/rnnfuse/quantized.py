"""int8 inference: ``layer.quantized()`` for LSTM, GRU and RNN layers.

A quantized layer has the API of its float32 layer in eval mode (``forward`` with
``state`` and ``lengths``, directions, stacking, streams and stream pools) but holds W_ih
and W_hh (and an LSTM's projection W_hr, with proj_size) as int8 with a float32 scale per
output row, ``w ~= scale * q`` with ``q = round(w * 63 / max|w_row|)`` (round half to
even, in [-63, 63]: 7 bits). At run time each row of the products' left operand (an
input, a hidden state, or the projected LSTM's o * tanh(c)) is quantized the same way,
``q = round(a * 63 / max|a_row|)`` (7 bits too, so that AVX2's vpmaddubsw takes a + 64
unsigned, with no sign instructions, and two of its results add in int16 without
saturating), the products are summed exactly in int32 and rescaled to float32, ``acc * (scale_a * scale_w)``, for
the float32 gate math (biases, the LSTM's peepholes and eval's zoneout stay float32).
Every row is computed alone, so a row's numbers do not depend on the other rows of the
call or on the thread count; the int8 sums are exact and the same on every code path
(VNNI, AVX2, portable), while the gate math's activations differ between the vector and
portable paths as in float32 layers.

Quantized layers are inference only (no backward, no training mode) and float32 only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _kernels
from . import functional as F
from ._checks import check_int as _check_int
from .layers import GRU, LSTM, RNN, _RNNBase

__all__ = ["quantize", "QuantizedLSTM", "QuantizedGRU", "QuantizedRNN"]

_INT8 = ("weight_ih", "weight_hh", "weight_hr")  # the parameters held as int8


def _is_int8(name: str) -> bool:
    return name.startswith(_INT8)


class _Quantized(_RNNBase):
    """What the quantized layers share: the float layer's forward, on int8 weights."""

    _no_forward_hint = " (a quantized layer is inference only)"
    _packed: list[NDArray[np.uint8]]  # per layer and direction, q8_pack_weights' arrays

    @classmethod
    def _from(cls, layer: _RNNBase) -> _Quantized:
        if layer.dtype != np.float32:
            raise TypeError(f"only float32 layers can be quantized, got dtype {layer.dtype}")
        q = cls.__new__(cls)
        q.__dict__.update({k: v for k, v in vars(layer).items()
                           if k not in ("_params", "_grads", "_tape")})
        super(_RNNBase, q).__init__()  # Module's empty parameters and tape
        q.training = False
        lbr = q._option if q._cell == "gru" else False
        q._packed = []
        for names in q._param_names:
            # w_ih, w_hh and the projection's w_hr, in this order, as int8
            w = [np.ascontiguousarray(layer._params[n]) for n in names if _is_int8(n)]
            q._packed.append(_kernels.q8_pack_weights(w[0], w[1], q._gates, lbr, *w[2:]))
            for n in names:  # the biases and peepholes stay float32 (copies)
                if not _is_int8(n):
                    q._add_param(n, layer._params[n].copy())
        return q

    def train(self, mode: bool = True) -> Any:
        if mode:
            raise ValueError(f"{type(self).__name__} is inference only: it cannot be put "
                             "in training mode")
        return self

    def _weights(self, layer: int, d: int) -> list[Any]:
        """packed, None (in w_hh's place), b_ih, b_hh (None without bias), then the
        peepholes if any."""
        rest: list[Any] = [self._params[n] for n in self._names(layer, d) if not _is_int8(n)]
        rest = rest if self.bias else [None, None, *rest]
        return [self._packed[layer * self.num_directions + d], None, *rest]

    def _run(self, x: NDArray[Any], s0: Any, w: Any, lengths: ArrayLike | None,
             reverse: bool, need_ctx: bool, zoneout: Any = None,
             recurrent_dropout: Any = None) -> tuple[Any, tuple[Any, ...], Any]:
        # zoneout: eval's p (or None); recurrent_dropout: None, as in any inference
        if need_ctx:
            raise ValueError(f"{type(self).__name__} is inference only: forward needs "
                             "need_grad=False")
        packed, _, b_ih, b_hh, *peep = w
        x = F._check_x(x)
        T, B, I = x.shape
        H, P, lstm = self.hidden_size, self.proj_size, self._cell == "lstm"
        states = [F._check(n, s, (B, width), self.dtype, optional=True)
                  for n, s, width in zip(("h0", "c0"), s0, self._state_sizes())]
        plan = F._plan(lengths, T, B, reverse)
        size = _kernels.lstmp_workspace_size(plan, I, H, P, False) if P else \
            _kernels.workspace_size(self._cell, plan, I, H, False)
        ws = F._workspace(size, self.dtype)
        y, h_n, c_n = _kernels.q8_forward(self._cell, x, states[0],
                                          states[1] if lstm else None, packed, b_ih, b_hh,
                                          plan, ws, I, H, self._option,
                                          peep[0] if peep else None,
                                          F._check_zoneout(self._cell, zoneout, (T, B, H),
                                                           self.dtype), P)
        F._keep_spare(ws)
        return y, (h_n, c_n) if lstm else (h_n,), None

    def stream(self, batch_size: int = 1, state: Any = None) -> _kernels.Stream:
        """A Stream of this layer (see LSTM.stream), on its int8 weights: its steps give
        this layer's forward, bit for bit."""
        B = _check_int("batch_size", batch_size, 0)
        s = _kernels.Stream(self._cell, self._option, self.dtype, B, self._stream_weights(),
                            int8=True, zoneout=self.zoneout, proj_size=self.proj_size)
        s.reset(state)
        return s

    def stream_pool(self, capacity: int) -> _kernels.StreamPool:
        """A StreamPool of this layer (see LSTM.stream_pool), on its int8 weights."""
        C = _check_int("capacity", capacity, 1)
        return _kernels.StreamPool(self._cell, self._option, self.dtype, C,
                                   self._stream_weights(), int8=True, zoneout=self.zoneout,
                                   proj_size=self.proj_size)

    def _stream_weights(self) -> list[list[Any]]:
        """Per layer, (packed int8 weights, input size, b_ih, b_hh[, peepholes]) for a
        stream or a pool (the layer's own arrays: a quantized layer's weights never
        change)."""
        if self.bidirectional:
            raise ValueError("a bidirectional layer cannot be streamed: its reverse "
                             "direction needs the whole sequence")
        return [[self._packed[layer], self.input_size if layer == 0 else self._out_size,
                 *self._weights(layer, 0)[2:]] for layer in range(self.num_layers)]

    def backward(self, dy: Any, dstate: Any = None) -> Any:
        raise RuntimeError(f"{type(self).__name__} is inference only: it has no backward")

    def load_state_dict(self, state_dict: Any) -> None:
        raise RuntimeError(f"{type(self).__name__}'s weights are fixed: load the float "
                           "layer's state and quantize it again")


class QuantizedLSTM(_Quantized, LSTM):
    """An LSTM's int8 inference twin (``LSTM.quantized()``)."""


class QuantizedGRU(_Quantized, GRU):
    """A GRU's int8 inference twin (``GRU.quantized()``)."""


class QuantizedRNN(_Quantized, RNN):
    """An RNN's int8 inference twin (``RNN.quantized()``)."""


_QUANTIZED: dict[type[_RNNBase], type[_Quantized]] = {
    LSTM: QuantizedLSTM, GRU: QuantizedGRU, RNN: QuantizedRNN}


def quantize(layer: _RNNBase) -> _Quantized:
    """The int8 inference layer of a float32 LSTM, GRU or RNN layer (see the module's
    docstring); the layer itself is left as it is."""
    for kind, quantized in _QUANTIZED.items():
        if isinstance(layer, kind) and not isinstance(layer, _Quantized):
            return quantized._from(layer)
    raise TypeError(f"quantize takes an LSTM, GRU or RNN layer, got {type(layer).__name__}")
