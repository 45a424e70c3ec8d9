"""A recurrent layer's parameters to and from ONNX's LSTM / GRU / RNN operator inputs.

ONNX stores one (possibly bidirectional) layer per operator, all directions stacked on
the first axis, D = 1 ("forward") or 2 ("bidirectional")::

    W (D, G*H, input)   R (D, G*H, H)   B (D, 2*G*H) = [W biases | R biases]   (B optional)

with its own gate orders: LSTM i, o, f, c (PyTorch: i, f, g, o) and GRU z, r, h (PyTorch:
r, z, n). ``to_onnx(layer)`` gives one dict per stacked layer::

    {"W": W, "R": R, "B": B or None,
     "attributes": {"hidden_size": H, "direction": "forward" | "bidirectional",
                    "linear_before_reset": 0 | 1 (GRU only),
                    "activations": per direction, ONNX's defaults (LSTM Sigmoid, Tanh,
                    Tanh; GRU Sigmoid, Tanh; RNN Tanh) or RNN's "Relu"}}

An LSTM built with ``peepholes=True`` adds ``"P": P (D, 3H)``, ONNX's peepholes in its
order i, o, f (the order of the layer's ``weight_peep`` parameters).
``from_onnx(layer, weights)`` loads such a list (its "attributes" optional, but checked
against the layer when given: the same weights under another linear_before_reset or
activation compute something else; "P" optional, zeros when absent, and refused, unless
zero, by a layer without peepholes). Clip, input_forget and other activations have no
counterpart in rnnfuse and are refused. dtypes are kept, not cast.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .layers import GRU, LSTM, RNN

__all__ = ["to_onnx", "from_onnx"]

# ONNX gate block k holds PyTorch gate block _ONNX_FROM_TORCH[cell][k].
_ONNX_FROM_TORCH = {"lstm": [0, 3, 1, 2],   # i, o, f, c <- i, f, g, o
                    "gru": [1, 0, 2],       # z, r, h <- r, z, n
                    "rnn": [0]}


def _cell_of(layer: object) -> str:
    if getattr(layer, "layer_norm", False):
        raise ValueError("ONNX's LSTM and GRU have no layer normalization: a layer with "
                         "layer_norm cannot be converted")
    if getattr(layer, "proj_size", 0):
        raise ValueError("ONNX's LSTM has no projection: a layer with proj_size cannot be "
                         "converted")
    for cls, cell in ((LSTM, "lstm"), (GRU, "gru"), (RNN, "rnn")):
        if isinstance(layer, cls):
            return cell
    raise TypeError(f"layer must be an rnnfuse LSTM, GRU or RNN, got {type(layer).__name__}")


def _reorder(a: NDArray[Any], order: Sequence[int] | NDArray[np.integer[Any]]) -> NDArray[Any]:
    """Permute the gate blocks (of H rows each) along axis 0: block k <- block order[k]."""
    H = a.shape[0] // len(order)
    return np.concatenate([a[j * H:(j + 1) * H] for j in order])


def _attributes(layer: LSTM | GRU | RNN, cell: str) -> dict[str, Any]:
    D = layer.num_directions
    attrs: dict[str, Any] = {"hidden_size": layer.hidden_size,
                             "direction": "bidirectional" if D == 2 else "forward"}
    if isinstance(layer, GRU):  # cell == "gru"
        attrs["linear_before_reset"] = int(layer.linear_before_reset)
    acts = {"lstm": ["Sigmoid", "Tanh", "Tanh"], "gru": ["Sigmoid", "Tanh"],
            "rnn": [getattr(layer, "nonlinearity", "").capitalize()]}
    attrs["activations"] = acts[cell] * D  # ONNX's defaults, except RNN's Relu
    return attrs


def to_onnx(layer: LSTM | GRU | RNN) -> list[dict[str, Any]]:
    """The layer's parameters as ONNX operator inputs: a list, one dict per stacked layer."""
    cell = _cell_of(layer)
    order, sd = _ONNX_FROM_TORCH[cell], layer.state_dict()
    out = []
    for lay in range(layer.num_layers):
        names = [layer._names(lay, d) for d in range(layer.num_directions)]
        W = np.stack([_reorder(sd[n[0]], order) for n in names])
        R = np.stack([_reorder(sd[n[1]], order) for n in names])
        B = (np.stack([np.concatenate([_reorder(sd[n[2]], order), _reorder(sd[n[3]], order)])
                       for n in names]) if layer.bias else None)
        out.append({"W": W, "R": R, "B": B, "attributes": _attributes(layer, cell)})
        if getattr(layer, "peepholes", False):
            out[-1]["P"] = np.stack([sd[n[-1]] for n in names])
    return out


def from_onnx(layer: LSTM | GRU | RNN,
              weights: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
    """Load ONNX operator inputs (``to_onnx``'s form; a single dict for num_layers=1)
    into ``layer``, through ``load_state_dict``: all or nothing."""
    cell = _cell_of(layer)
    if isinstance(weights, Mapping):
        weights = [weights]
    if not isinstance(weights, (list, tuple)) or len(weights) != layer.num_layers:
        raise ValueError(f"weights must be a list of {layer.num_layers} dict(s) (one per "
                         f"stacked layer), got {type(weights).__name__}"
                         + (f" of length {len(weights)}" if isinstance(weights, (list, tuple))
                            else ""))
    back = np.argsort(_ONNX_FROM_TORCH[cell])  # PyTorch block j <- ONNX block back[j]
    D, GH, H = layer.num_directions, layer._gates * layer.hidden_size, layer.hidden_size
    sd = {}
    for lay, w in enumerate(weights):
        where = f"weights[{lay}]"
        if not isinstance(w, Mapping):
            raise TypeError(f"{where} must be a dict with W, R and optionally B, "
                            f"got {type(w).__name__}")
        unknown = sorted(set(w) - {"W", "R", "B", "P", "attributes"})
        if unknown or "W" not in w or "R" not in w:
            raise ValueError(f"{where} must have keys W, R and optionally B, P, attributes; "
                             f"got {sorted(w)}")
        _check_attributes(where, w.get("attributes"), _attributes(layer, cell))
        n_in = layer.input_size if lay == 0 else D * H
        W, R = np.asarray(w["W"]), np.asarray(w["R"])
        for name, a, shape in (("W", W, (D, GH, n_in)), ("R", R, (D, GH, H))):
            if a.shape != shape:
                raise ValueError(f"{where}['{name}'] must have shape {shape}, got {a.shape}")
        B: Any = w.get("B")
        if B is not None:
            B = np.asarray(B)
            if B.shape != (D, 2 * GH):
                raise ValueError(f"{where}['B'] must have shape {(D, 2 * GH)}, got {B.shape}")
            if not layer.bias and np.any(B != 0):
                raise ValueError(f"{where}['B'] has nonzero biases, but the layer was built "
                                 "with bias=False")
        elif layer.bias:
            B = np.zeros((D, 2 * GH), layer.dtype)  # ONNX: an absent B is zeros
        P = _peepholes(where, layer, w.get("P"))
        for d in range(D):
            names = layer._names(lay, d)
            sd[names[0]], sd[names[1]] = _reorder(W[d], back), _reorder(R[d], back)
            if layer.bias:
                sd[names[2]], sd[names[3]] = _reorder(B[d, :GH], back), _reorder(B[d, GH:], back)
            if P is not None:
                sd[names[-1]] = P[d]
    layer.load_state_dict(sd)


def _peepholes(where: str, layer: LSTM | GRU | RNN, P: Any) -> NDArray[Any] | None:
    """ONNX's P (D, 3H) for the layer's weight_peep parameters (zeros when absent), or
    None for a layer without peepholes (which then accepts only an absent or zero P)."""
    D, H = layer.num_directions, layer.hidden_size
    has = getattr(layer, "peepholes", False)
    if P is None:
        return np.zeros((D, 3 * H), layer.dtype) if has else None
    P = np.asarray(P)
    if P.shape != (D, 3 * H):
        raise ValueError(f"{where}['P'] must have shape {(D, 3 * H)}, got {P.shape}")
    if not has and np.any(P != 0):
        raise ValueError(f"{where}['P'] has nonzero peepholes, but the layer was built "
                         "without them (LSTM(..., peepholes=True) has them)")
    return P if has else None


def _check_attributes(where: str, given: Any, expected: Mapping[str, Any]) -> None:
    if given is None:
        return
    if not isinstance(given, Mapping):
        raise TypeError(f"{where}['attributes'] must be a dict, got {type(given).__name__}")
    for k, v in given.items():
        if k not in expected:
            raise ValueError(f"{where}: ONNX attribute {k!r} is not supported by rnnfuse")
        want = expected[k]
        same = list(v) == want if isinstance(want, list) else v == want
        if not same:
            raise ValueError(f"{where}: attribute {k}={v!r} does not match the layer's "
                             f"{k}={want!r}")
