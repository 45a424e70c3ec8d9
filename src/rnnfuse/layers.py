"""Layers on the kernels: LSTM, GRU, RNN (stacked, bidirectional, dropout), Embedding,
Linear and Sequential, in the shape of PyTorch's ``torch.nn`` modules.

Every layer keeps its parameters as NumPy arrays under PyTorch's names, accumulates
gradients into ``layer.grads`` (same names, same shapes) and has::

    y = layer.forward(x) / layer(x)       dx = layer.backward(dy)
    layer.parameters()  layer.named_parameters()  layer.grads  layer.zero_grad()
    layer.state_dict()  layer.load_state_dict(sd)  layer.train()  layer.eval()

Recurrent layers are *stateful*: ``forward(x, state=None, lengths=None)`` returns
``(y, state)`` and ``backward(dy, dstate=None)`` returns ``(dx, dstate)``; ``state`` is
``(h, c)`` for LSTM and ``h`` for GRU and RNN, each ``(num_layers*num_directions, B, H)``.
Every forward is matched by at most one backward, which uses what that forward saved.

Notation: T steps, B batch rows, I input features, H hidden units, L = num_layers,
D = num_directions (1 or 2), G gate blocks per cell (LSTM 4, GRU 3, RNN 1).
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _kernels, functional as F
from ._typing import FloatArray, State
from ._checks import (check_bool as _check_bool, check_int as _check_int,
                      check_nonlinearity as _check_nonlinearity, make_rng as _make_rng)

__all__ = ["Module", "LSTM", "GRU", "RNN", "Stream", "StreamPool", "Embedding", "Linear", "Sequential"]


# ---------------------------------------------------------------- argument checks

def _check_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def _check_array(name: str, a: Any, dtype: np.dtype[Any], shape: Sequence[int] | None = None,
                 what: str = "") -> NDArray[Any]:
    """a as an ndarray of this dtype (and shape, if given); ``what`` explains the shape."""
    if not isinstance(a, np.ndarray):
        if a is None or isinstance(a, (tuple, Mapping)):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        a = np.asarray(a)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the layer's dtype), got {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{what}, got {a.shape}")
    return a


_M = TypeVar("_M", bound="Module")
_S = TypeVar("_S", bound="Sequential")
_NO_FORWARD, _USED = object(), object()  # states of a layer's tape besides "saved"


# ---------------------------------------------------------------- base class

class Module:
    """Parameters, gradients, state dicts, train/eval, and the forward/backward tape.

    Subclasses fill ``self._params`` (name -> array, in state-dict order) and call
    ``self._add_param`` so that ``self._grads`` gets a zero array of the same shape.
    """

    stateful = False  # True: forward(x, state, lengths) -> (y, state); see Sequential
    _no_forward_hint = ""
    forward: Callable[..., Any]  # each layer's own, with its own arguments
    backward: Callable[..., Any]

    def __init__(self) -> None:
        self.training = True
        self._params: dict[str, NDArray[Any]] = {}
        self._grads: dict[str, NDArray[Any]] = {}
        self._tape: Any = _NO_FORWARD

    def _add_param(self, name: str, value: NDArray[Any]) -> None:
        self._params[name] = value
        self._grads[name] = np.zeros_like(value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- the tape: what forward saved for its one backward
    def _save(self, tape: Any) -> None:
        self._tape = tape

    def _peek(self) -> Any:
        """What the last forward saved; a clear error if there is none (or it was used)."""
        name = type(self).__name__
        if self._tape is _NO_FORWARD:
            raise RuntimeError(f"{name}.backward called without a matching forward: run "
                               f"forward first{self._no_forward_hint}")
        if self._tape is _USED:
            raise RuntimeError(f"{name}.backward called twice for one forward; run forward "
                               "again (each forward allows one backward)")
        return self._tape

    def _take(self) -> Any:
        """_peek, and mark the tape used: call it once the upstream gradients are checked."""
        tape, self._tape = self._peek(), _USED
        return tape

    # -- parameters and gradients
    def named_parameters(self) -> dict[str, NDArray[Any]]:
        """name -> parameter array (the live arrays: updating them updates the layer)."""
        return dict(self._params)

    def parameters(self) -> list[NDArray[Any]]:
        """The parameter arrays (live), in state-dict order."""
        return list(self.named_parameters().values())

    def modules(self) -> Iterator[Module]:
        """This module and every module inside it, in order (as ``torch.nn.Module.modules``)."""
        yield self

    @property
    def grads(self) -> dict[str, NDArray[Any]]:
        """name -> accumulated gradient, the same names and shapes as the parameters
        (a fresh dict of the live arrays: backward adds into them in place)."""
        return dict(self._grads)

    def zero_grad(self) -> None:
        """Reset every accumulated gradient to zero (in place)."""
        for g in self.grads.values():
            g.fill(0)

    def train(self: _M, mode: bool = True) -> _M:
        """Training mode (dropout on; forward keeps what backward needs). Returns self."""
        self.training = _check_bool("mode", mode)
        return self

    def eval(self: _M) -> _M:
        """Inference mode: no dropout, and forward keeps nothing for backward."""
        return self.train(False)

    # -- state dicts
    def state_dict(self) -> dict[str, NDArray[Any]]:
        """name -> a copy of each parameter, with PyTorch's names and shapes."""
        return {k: v.copy() for k, v in self.named_parameters().items()}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Copy parameters in from ``state_dict`` (arrays, or anything np.asarray takes).

        Keys, shapes and dtypes must match ``state_dict()`` exactly; otherwise a
        ValueError lists every problem and the layer is left unchanged.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of name -> array, "
                            f"got {type(state_dict).__name__}")
        params = self.named_parameters()
        problems = [f"missing key {k!r}" for k in params if k not in state_dict]
        problems += [f"unexpected key {k!r}" for k in state_dict if k not in params]
        arrays = {}
        for k, p in params.items():
            if k not in state_dict:
                continue
            try:
                a = np.asarray(state_dict[k])
            except Exception as e:  # e.g. a tensor that requires grad
                problems.append(f"{k!r}: cannot be read as an array ({e})")
                continue
            if a.shape != p.shape:
                problems.append(f"{k!r}: expected shape {p.shape}, got {a.shape}")
            if a.dtype != p.dtype:
                problems.append(f"{k!r}: expected dtype {p.dtype}, got {a.dtype}")
            arrays[k] = a
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict refused (nothing was "
                             f"loaded), {len(problems)} problem(s):\n  - "
                             + "\n  - ".join(problems))
        for k, a in arrays.items():
            params[k][...] = a  # in place: parameters() handed out earlier stay valid


# ---------------------------------------------------------------- recurrent layers

class _RNNBase(Module):
    """One implementation of stacking, directions, dropout and the state for all cells.

    A cell subclass gives ``_gates``, ``_n_states`` (2 for LSTM's (h, c)) and
    ``_run``/``_back``, its single-direction call into rnnfuse.functional.
    """

    stateful = True
    _no_forward_hint = " (in eval mode, forward(..., need_grad=True))"
    _gates: int  # G, gate blocks per cell
    dtype: np.dtype[Any]
    dropout: float
    _rng: np.random.Generator
    _param_names: list[list[str]]
    _n_states = 1  # arrays in the state: 1 (h) or 2 (h, c)
    _cell: str  # the cell's name in rnnfuse.functional
    _peepholes = False  # the LSTM's peepholes: a (3H,) weight_peep per layer and direction
    proj_size = 0  # the LSTM's projection: h = W_hr (o tanh(c)) is proj_size wide (0: none)
    _layer_norm = False  # the LSTM's and GRU's layer normalization: gains (and b_c) per layer
    zoneout = 0.0  # each unit of a new state keeps its previous value with this probability
    weight_drop = 0.0  # in training each element of W_hh drops out with this probability
    recurrent_dropout = 0.0  # in training each unit of h_{t-1} drops out of the product

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size must be < hidden_size={self.hidden_size}, "
                             f"got {self.proj_size}")
        if self._gates * self.hidden_size >= 2**31 or self.input_size >= 2**31:
            raise ValueError(f"{self._gates}*hidden_size and input_size must be below 2**31 "
                             f"(the BLAS's 32-bit sizes), got hidden_size={self.hidden_size}, "
                             f"input_size={self.input_size}")
        self.bias = _check_bool("bias", bias)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__} {dropout!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
        self.dropout = float(dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn("dropout acts between stacked layers (on the outputs of all but "
                          f"the last), so it does nothing with num_layers=1 (dropout="
                          f"{self.dropout})", UserWarning,
                          stacklevel=2 if type(self).__init__ is _RNNBase.__init__ else 3)
        self.dtype = _check_dtype(dtype)
        self._rng = _make_rng(seed)  # draws the initial weights, then the dropout,
        # weight drop, recurrent dropout and zoneout masks

        # PyTorch's names and order; every parameter ~ uniform(-1/sqrt(H), 1/sqrt(H)),
        # but peepholes, which start at zero: the layer starts as the plain LSTM of the
        # same seed (the same draws), and backward trains them from there.
        kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        kinds += ["weight_hr"] if self.proj_size else []
        kinds += ["weight_peep"] if self._peepholes else []
        kinds += self._layer_norm_kinds()
        self._param_names = [[kind + f"_l{layer}" + ("_reverse" if d == 1 else "")
                              for kind in kinds]
                             for layer in range(self.num_layers)
                             for d in range(self.num_directions)]
        H, G, k = self.hidden_size, self._gates, 1.0 / math.sqrt(self.hidden_size)
        R = self._out_size
        for layer in range(self.num_layers):
            n_in = self.input_size if layer == 0 else self.num_directions * R
            for d in range(self.num_directions):
                shapes = [(G * H, n_in), (G * H, R)] + [(G * H,)] * (2 if self.bias else 0)
                shapes += [(R, H)] if self.proj_size else []
                for name, shape in zip(self._names(layer, d), shapes):
                    self._add_param(name, self._rng.uniform(-k, k, shape).astype(self.dtype))
                if self._peepholes:
                    self._add_param(self._names(layer, d)[-1], np.zeros(3 * H, self.dtype))
                if self._layer_norm:
                    kinds_ln = self._layer_norm_kinds()
                    for name, kind in zip(self._names(layer, d)[-len(kinds_ln):], kinds_ln):
                        self._add_param(name, self._layer_norm_init(kind))

    def _layer_norm_kinds(self) -> list[str]:
        """Layer normalization's parameters, gains of the input and recurrent gate
        pre-activations, and for the LSTM the cell's gain and bias."""
        if not self._layer_norm:
            return []
        return ["ln_weight_ih", "ln_weight_hh"] + (["ln_weight_c", "ln_bias_c"]
                                                   if self._n_states == 2 else [])

    def _layer_norm_init(self, kind: str) -> NDArray[Any]:
        """Gains start at 1, the cell bias at 0."""
        size = self.hidden_size * (1 if kind.endswith("_c") else self._gates)
        return np.full(size, 0.0 if kind == "ln_bias_c" else 1.0, self.dtype)

    def _check_layer_norm(self, layer_norm: bool) -> None:
        """Set layer_norm, where this cell has it."""
        self._layer_norm = _check_bool("layer_norm", layer_norm)
        if self._layer_norm and self._peepholes:
            raise ValueError("layer_norm and peepholes cannot be combined")

    @property
    def layer_norm(self) -> bool:
        return self._layer_norm

    @property
    def _option(self) -> bool:
        """The cell's option for rnnfuse.functional (GRU: linear_before_reset; RNN: relu)."""
        return False

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self) -> int:
        """The width of h and of each direction's y: proj_size, or hidden_size."""
        return self.proj_size or self.hidden_size

    def _state_sizes(self) -> list[int]:
        """The width of each array of the state: h's, then the LSTM's c (hidden_size)."""
        return [self._out_size, self.hidden_size][:self._n_states]

    def _set_variants(self, zoneout: float, weight_drop: float,
                      recurrent_dropout: float) -> None:
        """Check and set the variants' probabilities, each in [0, 1)."""
        for name, p in (("zoneout", zoneout), ("weight_drop", weight_drop),
                        ("recurrent_dropout", recurrent_dropout)):
            if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
                raise TypeError(f"{name} must be a float, got {type(p).__name__} {p!r}")
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p}")
            setattr(self, name, float(p))

    def _dropped_weights(self, layer: int, d: int) -> tuple[list[Any], Any]:
        """The weights one direction of one layer runs with, and weight drop's mask of
        W_hh (None outside training or without weight drop): in training W_hh * mask, a
        fresh inverted-dropout mask over W_hh's elements per forward."""
        w = self._weights(layer, d)
        if not self.training or self.weight_drop == 0:
            return w, None
        mask = self._dropout_mask(w[1].shape, self.weight_drop)
        return [w[0], w[1] * mask, *w[2:]], mask

    def _recurrent_dropout_arg(self, shape: tuple[int, int]) -> Any:
        """functional's recurrent_dropout for one direction of one layer: in training a
        fresh (B, H) inverted-dropout mask per forward, else None."""
        if not self.training or self.recurrent_dropout == 0:
            return None
        return self._dropout_mask(shape, self.recurrent_dropout)

    def _zoneout_arg(self, shape: tuple[int, int, int]) -> Any:
        """functional's zoneout for one direction of one layer: in training fresh masks
        (1: keep the previous value) per step, row and unit, for h and the LSTM's c; in
        eval the probability itself (each unit keeps that much of its previous value)."""
        p = self.zoneout
        if p == 0:
            return None
        if not self.training:
            return p
        masks = [(self._rng.random(shape) < p).astype(self.dtype)
                 for _ in range(self._n_states)]
        return tuple(masks) if self._n_states == 2 else masks[0]

    def _run(self, x: NDArray[Any], s0: Sequence[Any], w: Sequence[Any],
             lengths: ArrayLike | None, reverse: bool, need_ctx: bool,
             zoneout: Any = None,
             recurrent_dropout: Any = None) -> tuple[FloatArray, tuple[FloatArray, ...], Any]:
        """One direction of one layer: functional's forward of this cell (y, finals, ctx)."""
        w_ih, w_hh, b_ih, b_hh, *extra = w
        ln = tuple(extra) if self._layer_norm else None
        peep = extra[0] if extra and not self._layer_norm else None
        y, finals, ctx = F._forward(self._cell, x, s0, w_ih, w_hh, b_ih, b_hh, lengths,
                                    reverse, self._option, need_ctx, peep=peep,
                                    zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                                    layer_norm=ln)
        return y, tuple(finals), ctx

    def _back(self, dy: Any, dfin: Sequence[Any],
              ctx: Any) -> tuple[FloatArray, tuple[FloatArray, ...], list[Any]]:
        """Its backward: dx, the initial states' gradients, the weights' gradients (in the
        order of _names: absent biases have none)."""
        dx, *grads = F._backward(self._cell, dy, dfin, ctx)
        return dx, tuple(grads[:len(dfin)]), [g for g in grads[len(dfin):] if g is not None]

    def _names(self, layer: int, d: int) -> list[str]:
        """Parameter names of one layer and direction: weight_ih_l0, ..., bias_hh_l1_reverse
        (made once: every forward and backward reads them)."""
        return self._param_names[layer * self.num_directions + d]

    def _weights(self, layer: int, d: int) -> list[Any]:
        """w_ih, w_hh, b_ih, b_hh (None without bias), then w_hr, the peepholes and layer
        normalization's parameters, where the layer has them."""
        w: list[Any] = [self._params[n] for n in self._names(layer, d)]
        return w if self.bias else w[:2] + [None, None] + w[2:]

    def __repr__(self) -> str:
        args = [str(self.input_size), str(self.hidden_size)]
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False, **self._extra_defaults(), "zoneout": 0.0,
                    "weight_drop": 0.0, "recurrent_dropout": 0.0}
        args += [f"{k}={getattr(self, k)!r}" for k, v in defaults.items()
                 if getattr(self, k) != v]
        if self.dtype != np.float32:
            args.append(f"dtype={self.dtype}")
        return f"{type(self).__name__}({', '.join(args)})"

    def _extra_defaults(self) -> dict[str, Any]:
        return {}

    # -- inputs
    def _check_x(self, x: ArrayLike) -> NDArray[Any]:
        """x (T, B, I), or (B, T, I) if batch_first; returned time-major (a view)."""
        x = _check_array("x", x, self.dtype)
        layout = "(B, T, input_size), batch_first" if self.batch_first else "(T, B, input_size)"
        if x.ndim != 3:
            raise ValueError(f"x must be 3-D {layout}, got {x.ndim}-D with shape {x.shape}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have input_size={self.input_size} features on its last "
                             f"axis, got shape {x.shape}")
        return x.transpose(1, 0, 2) if self.batch_first else x

    def _check_state(self, name: str, state: Any, B: int) -> list[NDArray[Any] | None]:
        """state as a list of _n_states arrays (L*D, B, H) or None (zeros)."""
        if state is None:
            return [None] * self._n_states
        names = ("h", "c")[:self._n_states]
        if self._n_states == 2:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} must be a tuple ({names[0]}, {names[1]}) for "
                                f"{type(self).__name__}, got {type(state).__name__}")
            parts = list(state)
        else:
            parts = [state]
        LD, sizes = self.num_layers * self.num_directions, self._state_sizes()
        widths = ["proj_size" if self.proj_size else "hidden_size", "hidden_size"]
        return [None if s is None else
                _check_array(f"{name}[{n}]" if self._n_states == 2 else name, s, self.dtype,
                             (LD, B, size), f" (num_layers*num_directions, batch, {width})")
                for n, s, size, width in zip(names, parts, sizes, widths)]

    def _pack_state(self, parts: Sequence[Any]) -> Any:
        return tuple(parts) if self._n_states == 2 else parts[0]

    def _dropout_mask(self, shape: tuple[int, ...], p: float | None = None) -> NDArray[Any]:
        """Inverted dropout: keep with probability 1-p (p: self.dropout unless given),
        scaled by 1/(1-p)."""
        p = self.dropout if p is None else p
        keep = self._rng.random(shape) >= p
        return keep.astype(self.dtype) * self.dtype.type(0.0 if p == 1 else 1.0 / (1.0 - p))

    # -- forward and backward
    def forward(self, x: ArrayLike, state: State | None = None,
                lengths: ArrayLike | None = None, *,
                need_grad: bool | None = None) -> tuple[FloatArray, Any]:
        """Run the stack over x. Returns ``(y, state)``: y (T, B, D*H) (or (B, T, D*H) if
        batch_first), the final state (h_n, or (h_n, c_n) for LSTM) each (L*D, B, H)
        (with the LSTM's proj_size P: y (T, B, D*P) and h_n (L*D, B, P)).

        ``state``: the initial state in the same form, or None for zeros. ``lengths`` (B,)
        integers in [0, T]: steps t >= lengths[b] are padding (y is zero there and the
        final state is the last valid one); the reverse direction runs over each row's
        valid prefix. ``need_grad`` (default: ``self.training``) keeps what backward needs;
        eval mode therefore runs inference only, unless need_grad=True.
        """
        self._tape = _NO_FORWARD  # a failing forward leaves nothing for backward
        xt = self._check_x(x)
        T, B, _ = xt.shape
        init = self._check_state("state", state, B)
        need_grad = self.training if need_grad is None else _check_bool("need_grad", need_grad)
        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        finals = [np.empty((L * D, B, n), self.dtype) for n in self._state_sizes()]
        tape, inp = [], xt
        for layer in range(L):
            ys, ctxs = [], []
            for d in range(D):
                k = layer * D + d  # index in h_n, as PyTorch orders it
                s0 = [None if s is None else s[k] for s in init]
                w, w_mask = self._dropped_weights(layer, d)
                r_mask = self._recurrent_dropout_arg((B, H))
                y, fin, ctx = self._run(inp, s0, w, lengths, d == 1, need_grad,
                                        self._zoneout_arg((T, B, H)), r_mask)
                for all_, f in zip(finals, fin):
                    all_[k] = f
                ys.append(y)
                ctxs.append((ctx, w_mask))
            out = ys[0] if D == 1 else np.concatenate(ys, axis=2)  # [forward | reverse]
            mask = None
            if self.training and self.dropout > 0 and layer < L - 1:
                mask = self._dropout_mask(out.shape)
                out = out * mask
            tape.append((ctxs, mask))
            inp = out
        if need_grad:
            self._save((T, B, tape))
        y = np.ascontiguousarray(inp.transpose(1, 0, 2)) if self.batch_first else inp
        return y, self._pack_state(finals)

    def backward(self, dy: ArrayLike | None,
                 dstate: State | None = None) -> tuple[FloatArray, Any]:
        """Backpropagate through the last forward. ``dy`` is the gradient of y (its shape;
        None for zeros), ``dstate`` of the final state (its form; None for zeros).

        Returns ``(dx, dstate0)``: the gradients of x and of the initial state, and adds
        the parameter gradients into ``self.grads``.
        """
        T, B, tape = self._peek()
        L, D, H = self.num_layers, self.num_directions, self._out_size
        if dy is not None:
            shape = (B, T, D * H) if self.batch_first else (T, B, D * H)
            dy = _check_array("dy", dy, self.dtype, shape, " (the shape of y)")
            dy = dy.transpose(1, 0, 2) if self.batch_first else dy
        dfinal = self._check_state("dstate", dstate, B)
        self._take()

        dinit = [np.empty((L * D, B, n), self.dtype) for n in self._state_sizes()]
        g: Any = dy  # gradient of the current layer's (dropped-out) output
        for layer in reversed(range(L)):
            ctxs, _ = tape[layer]
            dinp = None
            for d in range(D):
                k = layer * D + d
                gd = None if g is None else g[:, :, d * H:(d + 1) * H]
                ctx, w_mask = ctxs[d]
                dx, dh0, dws = self._back(gd, [None if s is None else s[k] for s in dfinal],
                                          ctx)
                for all_, s in zip(dinit, dh0):
                    all_[k] = s
                if w_mask is not None:  # the kernels saw W_hh * mask
                    dws[1] = dws[1] * w_mask
                for name, dw in zip(self._names(layer, d), dws):
                    self._grads[name] += dw
                dinp = dx if dinp is None else dinp + dx  # both directions read the input
            mask = tape[layer - 1][1] if layer > 0 else None
            g = dinp * mask if mask is not None else dinp  # through the dropout below
        dx = np.ascontiguousarray(g.transpose(1, 0, 2)) if self.batch_first else g
        return dx, self._pack_state(dinit)

    def stream(self, batch_size: int = 1, state: State | None = None) -> _kernels.Stream:
        """A :class:`Stream` that runs this layer one timestep at a time (for generation
        and online inference), starting from ``state`` (the layer's form, with
        batch_size rows; None for zeros). Each ``stream.step(x_t)``, x_t (batch_size,
        input_size), returns y_t (batch_size, hidden_size): the numbers of ``forward``
        over the whole sequence in eval mode, bit for bit. The stream copies the weights
        as they are now; only unidirectional layers can be streamed.
        """
        B = _check_int("batch_size", batch_size, 0)
        s = _kernels.Stream(self._cell, self._option, self.dtype, B, self._stream_weights(),
                            zoneout=self.zoneout, layer_norm=self._layer_norm,
                            proj_size=self.proj_size)
        s.reset(state)
        return s

    def stream_pool(self, capacity: int) -> _kernels.StreamPool:
        """A :class:`StreamPool` of up to ``capacity`` sessions of this layer, each with
        its own state, any subset of them stepped together by one kernel call per layer
        (for serving many streams at once): ``sid = pool.open(state=None)``,
        ``y = pool.step(ids, x)``, ``pool.state(sid)``, ``pool.close(sid)``. States are
        in the layer's form for batch 1, (num_layers, 1, hidden_size). A session's
        outputs do not depend on which sessions step with it (see StreamPool). The pool
        copies the weights as they are now and runs as in eval mode; only unidirectional
        layers can be pooled.
        """
        C = _check_int("capacity", capacity, 1)
        return _kernels.StreamPool(self._cell, self._option, self.dtype, C,
                                   self._stream_weights(), zoneout=self.zoneout,
                                   layer_norm=self._layer_norm, proj_size=self.proj_size)

    def quantized(self) -> Any:
        """An eval-only copy of this float32 layer with int8 W_ih and W_hh (and the
        LSTM's projection W_hr), the same API (forward with lengths, streams, stream
        pools): see rnnfuse.quantized. Not with layer_norm."""
        from .quantized import quantize  # (it builds on this module)
        if self._layer_norm:
            raise ValueError("quantized() does not take a layer with layer_norm: normalizing "
                             "the int8 products scales their rounding up to the gates' "
                             "scale, too far from float32")
        return quantize(self)

    def _stream_weights(self) -> list[list[Any]]:
        """Per layer, copies of (w_ih, w_hh, b_ih, b_hh), then those of w_hr, the
        peepholes and layer normalization's parameters where the layer has them, for a
        stream or a pool."""
        if self.bidirectional:
            raise ValueError("a bidirectional layer cannot be streamed: its reverse "
                             "direction needs the whole sequence")
        G, H, R = self._gates, self.hidden_size, self._out_size
        weights = []
        for layer in range(self.num_layers):
            I = self.input_size if layer == 0 else R
            # the kernels' own checks; copies, so that later updates of the layer (an
            # optimizer step) cannot leave the stream's packed weights out of date
            w_ih, w_hh, b_ih, b_hh, *extra = self._weights(layer, 0)
            if self.proj_size:  # (w_hh is (G*H, P))
                w = [F._check(n, a, shape, self.dtype, optional=n[0] == "b")
                     for n, a, shape in (("w_ih", w_ih, (G * H, I)),
                                         ("w_hh", w_hh, (G * H, R)),
                                         ("b_ih", b_ih, (G * H,)), ("b_hh", b_hh, (G * H,)))]
            else:
                _, *w = F._check_weights(self._cell, self.dtype, w_ih, w_hh, b_ih, b_hh,
                                         (1, 1, I))
            names = self._names(layer, 0)[len(self._names(layer, 0)) - len(extra):]
            w += [F._check(n, a, self._params[n].shape, self.dtype)
                  for n, a in zip(names, extra)]
            weights.append([None if a is None else a.copy() for a in w])
        return weights


Stream = _kernels.Stream
StreamPool = _kernels.StreamPool


class LSTM(_RNNBase):
    """Long short-term memory, as ``torch.nn.LSTM``: gates i, f, g, o;
    c' = f*c + i*g, h' = o*tanh(c'). State ``(h, c)``.

    ``y, (h_n, c_n) = lstm(x, state=None, lengths=None)``;
    ``dx, (dh0, dc0) = lstm.backward(dy, (dh_n, dc_n))``.

    ``zoneout=p`` (all three cells): in training each unit of h and c keeps its previous
    value with probability p (masks from the layer's rng, fresh per step, row and unit), in
    eval p of it: h_t = p h_{t-1} + (1-p) h~_t. y_t is h_t.
    ``weight_drop=p`` (all three cells; AWD-LSTM's weight drop): in training each forward
    runs every layer and direction with W_hh * mask, a fresh inverted-dropout mask over
    W_hh's elements (keep with probability 1-p, scaled by 1/(1-p)) from the layer's rng;
    eval, streams and pools run the raw weights.
    ``recurrent_dropout=p`` (all three cells; Gal and Ghahramani's variational dropout): in
    training each forward draws per layer and direction one (B, H) inverted-dropout mask
    that multiplies h_{t-1} where it enters the recurrent product, the same at every step;
    a no-op in eval, streams and pools.
    ``peepholes=True`` adds ONNX's peepholes: per layer and direction a parameter
    ``weight_peep_l{k}[_reverse]`` (3H,), in ONNX's order i, o, f, starting at zero; i and f
    add P_i*c and P_f*c (the previous cell) to their pre-activations, o adds P_o*c'.
    ``layer_norm=True`` (LSTM, and GRU with linear_before_reset; haste's form): gates =
    LN(W_ih x; g_ih) + LN(W_hh h; g_hh) + b_ih + b_hh and h' = o*tanh(LN(c'; g_c) + b_c),
    LN over a row's gate units (see rnnfuse.functional.lstm_forward); per layer and direction
    parameters ``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}`` (4H,), ``ln_weight_c_l{k}``,
    ``ln_bias_c_l{k}`` (H,) (each ``_reverse`` for the second direction), gains starting at
    1, the cell bias at 0. Not with peepholes; no quantized() yet.
    ``proj_size=P`` (0 < P < hidden_size; PyTorch's LSTMP): h' = W_hr (o*tanh(c')), with
    per layer and direction ``weight_hr_l{k}[_reverse]`` (P, hidden_size), weight_hh
    (4*hidden_size, P) and layers after the first taking D*P inputs, as torch.nn.LSTM:
    y is (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, hidden_size), and a torch.nn.LSTM
    state dict with proj_size loads as it is. It combines with peepholes, weight_drop and
    quantized() (W_hr int8 too), not with zoneout, recurrent_dropout or layer_norm.
    """

    _gates, _n_states = 4, 2
    _cell = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None, *,
                 proj_size: int = 0, peepholes: bool = False, zoneout: float = 0.0,
                 weight_drop: float = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        self.proj_size = _check_int("proj_size", proj_size, 0)
        self._peepholes = _check_bool("peepholes", peepholes)
        self._check_layer_norm(layer_norm)
        self._set_variants(zoneout, weight_drop, recurrent_dropout)
        self._check_projection_variants()
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype, seed)

    def _check_projection_variants(self) -> None:
        """Refuse the variants that proj_size does not combine with."""
        for name, on in (("zoneout", self.zoneout), ("layer_norm", self._layer_norm),
                         ("recurrent_dropout", self.recurrent_dropout)):
            if self.proj_size and on:
                raise ValueError(f"{name} is not supported with proj_size; turn {name} off "
                                 "or pass proj_size=0")

    def _run(self, x: NDArray[Any], s0: Sequence[Any], w: Sequence[Any],
             lengths: ArrayLike | None, reverse: bool, need_ctx: bool,
             zoneout: Any = None,
             recurrent_dropout: Any = None) -> tuple[FloatArray, tuple[FloatArray, ...], Any]:
        if not self.proj_size:
            return super()._run(x, s0, w, lengths, reverse, need_ctx, zoneout,
                                recurrent_dropout)
        w_ih, w_hh, b_ih, b_hh, w_hr, *peep = w
        y, h_n, c_n, ctx = F.lstm_forward(x, s0[0], s0[1], w_ih, w_hh, b_ih, b_hh, lengths,
                                          reverse, need_ctx=need_ctx, w_hr=w_hr,
                                          peepholes=peep[0] if peep else None)
        return y, (h_n, c_n), ctx

    @property
    def peepholes(self) -> bool:
        return self._peepholes

    def _extra_defaults(self) -> dict[str, Any]:
        return {"proj_size": 0, "peepholes": False, "layer_norm": False}



def _refuse_projection(cell: str, proj_size: Any) -> None:
    """proj_size, which torch.nn's GRU and RNN take too, must be 0 (only the LSTM has it)."""
    if _check_int("proj_size", proj_size, 0):
        raise ValueError(f"proj_size is an LSTM option; {cell} has no projection, "
                         f"got proj_size={proj_size}")


class GRU(_RNNBase):
    """Gated recurrent unit, as ``torch.nn.GRU``: gates r, z, n; h' = (1-z)*n + z*h.

    ``linear_before_reset=True`` (PyTorch's GRU): n = tanh(W_in x + b_in + r*(W_hn h + b_hn));
    False (the original GRU, ONNX's default): n = tanh(W_in x + b_in + W_hn (r*h) + b_hn).
    ``y, h_n = gru(x, state=None, lengths=None)``; ``dx, dh0 = gru.backward(dy, dh_n)``.
    ``layer_norm=True`` (with linear_before_reset): the layer-normalized GRU (see
    rnnfuse.functional.gru_forward), parameters ``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}``
    (3H,) per layer and direction, starting at 1.
    """

    _gates, _cell = 3, "gru"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None, *,
                 linear_before_reset: bool = True, zoneout: float = 0.0,
                 weight_drop: float = 0.0, recurrent_dropout: float = 0.0,
                 layer_norm: bool = False, proj_size: int = 0) -> None:
        _refuse_projection("GRU", proj_size)
        self.linear_before_reset = _check_bool("linear_before_reset", linear_before_reset)
        self._check_layer_norm(layer_norm)
        if self._layer_norm and not self.linear_before_reset:
            raise ValueError("layer_norm needs linear_before_reset=True (the GRU with "
                             "linear_before_reset=False has no layer norm)")
        self._set_variants(zoneout, weight_drop, recurrent_dropout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype, seed)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"linear_before_reset": True, "layer_norm": False}

    @property
    def _option(self) -> bool:
        return self.linear_before_reset



class RNN(_RNNBase):
    """Elman RNN, as ``torch.nn.RNN``: h' = act(W_ih x + b_ih + W_hh h + b_hh), act
    ``nonlinearity`` "tanh" or "relu". ``y, h_n = rnn(x)``; ``dx, dh0 = rnn.backward(dy)``.
    """

    _gates, _cell = 1, "rnn"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: Literal["tanh", "relu"] = "tanh", bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None, *,
                 zoneout: float = 0.0, weight_drop: float = 0.0,
                 recurrent_dropout: float = 0.0, proj_size: int = 0) -> None:
        _refuse_projection("RNN", proj_size)
        # nonlinearity in 4th place, as torch.nn.RNN(input_size, hidden_size, num_layers,
        # nonlinearity, bias, ...) has it.
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        self._set_variants(zoneout, weight_drop, recurrent_dropout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype, seed)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"nonlinearity": "tanh"}

    @property
    def _option(self) -> bool:
        return self.nonlinearity == "relu"



# ---------------------------------------------------------------- small layers

class Embedding(Module):
    """Token ids to vectors, as ``torch.nn.Embedding``: y = weight[ids].

    ``weight (num_embeddings, embedding_dim)`` ~ N(0, 1); the row ``padding_idx`` (if
    given) starts at zero and gets no gradient. ``forward(ids)`` takes integer ids of any
    shape and returns ``ids.shape + (embedding_dim,)``; ``backward(dy)`` adds the rows of
    dy into ``grads["weight"]`` and returns None (ids have no gradient).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.num_embeddings = _check_int("num_embeddings", num_embeddings, 1)
        self.embedding_dim = _check_int("embedding_dim", embedding_dim, 1)
        if padding_idx is not None:
            padding_idx = _check_int("padding_idx", padding_idx, -self.num_embeddings)
            if padding_idx >= self.num_embeddings:
                raise ValueError(f"padding_idx must be < num_embeddings={num_embeddings}, "
                                 f"got {padding_idx}")
            padding_idx %= self.num_embeddings  # negative counts from the end, as in PyTorch
        self.padding_idx = padding_idx
        self.dtype = _check_dtype(dtype)
        weight = _make_rng(seed).standard_normal((self.num_embeddings, self.embedding_dim))
        if padding_idx is not None:
            weight[padding_idx] = 0
        self._add_param("weight", weight.astype(self.dtype))

    def __repr__(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}{pad})"

    def forward(self, ids: ArrayLike) -> FloatArray:
        self._tape = _NO_FORWARD
        ids = np.asarray(ids)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.num_embeddings)
        if bad.any():
            raise ValueError(f"ids must lie in [0, num_embeddings={self.num_embeddings}), "
                             f"got {np.unique(ids[bad]).tolist()[:10]}")
        self._save(ids)
        return self._params["weight"][ids]

    def backward(self, dy: ArrayLike) -> None:
        ids = self._peek()
        dy = _check_array("dy", dy, self.dtype, ids.shape + (self.embedding_dim,),
                          " (the shape of y)")
        self._take()
        keep = ids != self.padding_idx if self.padding_idx is not None else slice(None)
        np.add.at(self._grads["weight"], ids[keep], dy[keep])  # dW[id] += dy at each use
        return None


class Linear(Module):
    """y = x W^T + b over the last axis, so (T, B, in_features) -> (T, B, out_features):
    the same map at every timestep. As ``torch.nn.Linear``: weight (out, in), bias (out,),
    both ~ uniform(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1)
        self.out_features = _check_int("out_features", out_features, 1)
        self.bias = _check_bool("bias", bias)
        self.dtype = _check_dtype(dtype)
        rng, k = _make_rng(seed), 1.0 / np.sqrt(self.in_features)
        shape = (self.out_features, self.in_features)
        self._add_param("weight", rng.uniform(-k, k, shape).astype(self.dtype))
        if self.bias:
            self._add_param("bias", rng.uniform(-k, k, self.out_features).astype(self.dtype))

    def __repr__(self) -> str:
        b = "" if self.bias else ", bias=False"
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}{b})"

    def forward(self, x: ArrayLike) -> FloatArray:
        self._tape = _NO_FORWARD
        x = _check_array("x", x, self.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features={self.in_features} on its last axis, "
                             f"got shape {x.shape}")
        self._save(x)
        y = x @ self._params["weight"].T
        return y + self._params["bias"] if self.bias else y

    def backward(self, dy: ArrayLike) -> FloatArray:
        x = self._peek()
        dy = _check_array("dy", dy, self.dtype, x.shape[:-1] + (self.out_features,),
                          " (the shape of y)")
        self._take()
        x2, dy2 = x.reshape(-1, self.in_features), dy.reshape(-1, self.out_features)
        self._grads["weight"] += dy2.T @ x2  # dW = sum over rows of dy x^T
        if self.bias:
            self._grads["bias"] += dy2.sum(axis=0)
        return dy @ self._params["weight"]  # dx = dy W


class Sequential(Module):
    """Layers applied in order; its parameters are theirs, named ``"<index>.<name>"``
    as in ``torch.nn.Sequential`` (``"1.weight_ih_l0"``).

    The convention: a *stateful* layer (LSTM, GRU, RNN, a nested Sequential; any Module
    with ``stateful = True``) takes ``forward(x, state, lengths=lengths)`` and returns
    ``(y, state)``; every other layer maps ``forward(x) -> y`` and ``backward(dy) -> dx``.
    Sequential is stateful itself: its ``state`` is a list with one entry per stateful
    layer in order (None entries mean zeros)::

        y, states = model.forward(x, state=None, lengths=None)
        dx, dstates0 = model.backward(dy, dstate=None)

    ``lengths`` goes to every stateful layer; other layers see padded steps like any
    other (a Linear writes its bias there), so mask the loss at padding. dx is None when
    the first layer is an Embedding.
    """

    stateful = True

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, m in enumerate(layers):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential takes rnnfuse layers (Module instances); "
                                f"argument {i} is {type(m).__name__}")
        self.layers = list(layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {m!r}" for i, m in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def named_parameters(self) -> dict[str, NDArray[Any]]:
        return {f"{i}.{k}": v for i, m in enumerate(self.layers)
                for k, v in m.named_parameters().items()}

    def modules(self) -> Iterator[Module]:
        yield self
        for m in self.layers:
            yield from m.modules()

    @property
    def grads(self) -> dict[str, NDArray[Any]]:
        return {f"{i}.{k}": v for i, m in enumerate(self.layers) for k, v in m.grads.items()}

    def train(self: _S, mode: bool = True) -> _S:
        super().train(mode)
        for m in self.layers:
            m.train(mode)
        return self

    def _states(self, name: str, state: Sequence[Any] | None) -> list[Any]:
        n = sum(m.stateful for m in self.layers)
        if state is None:
            return [None] * n
        if not isinstance(state, (list, tuple)) or len(state) != n:
            raise ValueError(f"{name} must be None or a list with one entry per stateful "
                             f"layer ({n}), got {type(state).__name__}"
                             + (f" of length {len(state)}"
                                if isinstance(state, (list, tuple)) else ""))
        return list(state)

    def forward(self, x: ArrayLike, state: Sequence[Any] | None = None,
                lengths: ArrayLike | None = None) -> tuple[Any, list[Any]]:
        """Returns ``(y, states)``: the last layer's output and the final state of each
        stateful layer, in order."""
        self._tape = _NO_FORWARD
        states, out = iter(self._states("state", state)), []
        for m in self.layers:
            if m.stateful:
                x, s = m.forward(x, next(states), lengths=lengths)
                out.append(s)
            else:
                x = m.forward(x)
        self._save(True)
        return x, out

    def backward(self, dy: ArrayLike | None,
                 dstate: Sequence[Any] | None = None) -> tuple[Any, list[Any]]:
        """Returns ``(dx, dstates0)``: the gradient of x and of each stateful layer's
        initial state, in order; parameter gradients go into the layers' grads."""
        self._peek()
        dstates = self._states("dstate", dstate)
        out = []
        for m in reversed(self.layers):  # each layer checks its dy before using its tape
            if m.stateful:
                dy, ds = m.backward(dy, dstates.pop())
                out.append(ds)
            else:
                dy = m.backward(dy)
        self._take()
        return dy, out[::-1]
