"""The kernel API: validate, allocate, call the C kernels.

Six functions, the contract of docs/design.md (``rnnfuse.reference`` has the same six in
plain NumPy)::

    y, h_n, c_n, ctx = lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = lstm_backward(dy, dh_n, dc_n, ctx)
    y, h_n, ctx = gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                              linear_before_reset=True)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = gru_backward(dy, dh_n, ctx)
    y, h_n, ctx = rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                              nonlinearity="tanh")
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = rnn_backward(dy, dh_n, ctx)

Time-major ``x (T, B, I)``, ``y (T, B, H)``, states ``(B, H)``; weights in PyTorch's layout
``w_ih (G*H, I)``, ``w_hh (G*H, H)``, biases ``(G*H,)`` (G = 4, 3, 1). ``h0``, ``c0``,
biases, ``dy``, ``dh_n``, ``dc_n`` may be None (zeros / no bias; the gradient of an absent
bias is None). ``lengths`` (B,) integers in [0, T] mark steps t >= lengths[b] as padding.
float32 or float64, one dtype per call. Inputs are never modified; non-contiguous inputs
are copied once.

Every forward also takes ``zoneout`` (keyword only, default None): each unit of the new
state keeps its previous value with weight k, h_t = k h_{t-1} + (1-k) h~_t (the LSTM's c
likewise; y_t is h_t). A float p in [0, 1) is eval's zoneout, k = p everywhere; for
training, weights (T, B, H) per step, row and unit (a 0/1 mask), for the LSTM a pair
(z_h, z_c) (either may be None). ``lstm_forward`` also takes ``peepholes`` and ``w_hr``
(a projection, PyTorch's proj_size; see there).

Every forward also takes ``recurrent_dropout`` (keyword only, default None): variational
recurrent dropout's (B, H) mask m, already scaled (e.g. 0 or 1/(1-p)), finite and >= 0,
the same at every step. h_{t-1} enters the recurrent product as h_{t-1} m (all gates; the
GRU without linear_before_reset takes r (h_{t-1} m)); the state itself is not masked.

``lstm_forward`` and ``gru_forward`` also take ``layer_norm`` (keyword only, default None):
the layer-normalized cell (see there), whose backward returns the gradients of its arrays
as the last elements.

Every forward also takes ``need_ctx`` (keyword only, default True): with False it runs
inference only, keeps no state for backward (its workspace does not grow with T) and
returns ``ctx=None``. The ctx keeps references to ``x``, ``w_ih`` and ``w_hh``: modifying
them in place before backward changes the gradients. backward consumes its ctx.

``Prepacked(cell, w_ih, w_hh, b_ih, b_hh)`` is an inference forward whose weights are copied
and packed once (as an ONNX Runtime session packs them when it is created), for many calls
on the same weights; see there.

Each thread keeps the last large workspace (1 MiB or more) a call finished with, for its
next call of a similar size; ``release_workspace()`` frees it.
"""
from __future__ import annotations

import functools
import numbers
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _kernels
from ._checks import check_nonlinearity
from ._typing import CellGrads, FloatArray, LSTMGrads

__all__ = ["lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "rnn_forward", "rnn_backward", "release_workspace", "Prepacked"]

_GATES = _kernels.GATES  # from the C cell table
_USED = ("ctx was already used by a backward call; run forward again "
         "(backward overwrites the saved state)")
_TAKE = threading.Lock()
_INT_MAX = 2**31 - 1  # SciPy's BLAS takes 32-bit dimensions


class Context:
    """What backward needs from forward; opaque, and consumed by one backward call."""

    __slots__ = ("cell", "dtype", "plan", "ws", "x", "w_ih", "w_hh", "has_bias",
                 "option", "input_size", "hidden_size", "peep", "zoneout",
                 "recurrent_dropout", "layer_norm", "w_hr")
    cell: str
    dtype: np.dtype[Any]
    plan: _kernels.Plan
    ws: FloatArray | None
    x: FloatArray
    w_ih: FloatArray
    w_hh: FloatArray
    has_bias: tuple[bool, bool]
    option: bool | None
    input_size: int
    hidden_size: int
    peep: FloatArray | None  # the LSTM's peepholes, or None
    zoneout: tuple[Any, Any, bool] | None  # (z_h, z_c, shared), or None
    recurrent_dropout: FloatArray | None  # the (B, H) mask, or None
    layer_norm: tuple[FloatArray, ...] | None  # the gains (and the LSTM's b_c), or None
    w_hr: FloatArray | None  # the LSTM's projection (P, H), or None

    def __init__(self) -> None:
        self.peep = self.zoneout = self.recurrent_dropout = self.layer_norm = None
        self.w_hr = None

    def __repr__(self) -> str:
        state = "used" if self.ws is None else "ready"
        return f"<rnnfuse {self.cell} ctx, {self.dtype}, {state}>"

    def take(self) -> FloatArray:
        """The saved state, once: backward overwrites it."""
        with _TAKE:  # two threads must not both run backward over one saved state
            ws, self.ws = self.ws, None
        if ws is None:
            raise ValueError(_USED)
        return ws


# ---------------------------------------------------------------- validation helpers

def _dtype_of(x: ArrayLike) -> np.dtype[Any]:
    x = _array("x", x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
    return x.dtype


def _array(name: str, a: Any) -> NDArray[Any]:
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(a, np.ndarray):
        return a
    try:
        arr = np.asarray(a)
    except ValueError as e:  # e.g. a ragged nested list
        raise ValueError(f"{name} could not be made an array: {e}") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(a).__name__}")
    return arr


def _c_array(a: NDArray[Any]) -> NDArray[Any]:
    """a itself if a C-contiguous, aligned ndarray (the C code may assume both; a subclass
    is viewed as one), else a copy."""
    if type(a) is not np.ndarray:
        a = a.view(np.ndarray)
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, order="C")


def _check(name: str, a: ArrayLike | None, shape: tuple[int, ...], dtype: np.dtype[Any],
           optional: bool = False) -> Any:
    """a as a C-contiguous array of this shape and dtype (None stays None if optional)."""
    if a is None and optional:
        return None
    if type(a) is not np.ndarray:
        a = _array(name, a)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of x), got {a.dtype}")
    if a.shape != shape:
        if a.ndim != len(shape):
            raise ValueError(f"{name} must be {len(shape)}-D with shape {shape}, "
                             f"got {a.ndim}-D with shape {a.shape}")
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return _c_array(a)


def _check_x(x: ArrayLike) -> FloatArray:
    x = _array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D (T, B, input_size), got {x.ndim}-D with shape {x.shape}")
    return _c_array(x)


# Each thread keeps the last large workspace its kernels finished with, for its next call:
# a fresh one of tens of MB costs page faults and zeroing on every call, the more so when
# other NumPy work in between takes and returns memory.
_SPARE = threading.local()
_SPARE_MIN_BYTES = _kernels.SMALL_BYTES


def _workspace(n: int, dtype: np.dtype[Any]) -> FloatArray:
    """A workspace of n elements: the thread's spare where it fits without keeping more than
    twice the memory alive, else a new array."""
    spare = getattr(_SPARE, "ws", None)
    if spare is not None and spare.dtype == dtype and n <= spare.size <= 2 * n:
        _SPARE.ws = None
        return spare[:n]
    return _kernels.aligned_empty(n, dtype)


def _keep_spare(ws: FloatArray) -> None:
    """ws is no longer used by anything: keep it as the thread's spare if large, from its
    start (a cache line) to the end of its memory."""
    whole = ws if ws.base is None else ws.base
    if whole.nbytes >= _SPARE_MIN_BYTES:
        start = ws.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
        _SPARE.ws = whole[start // ws.itemsize:]


def release_workspace() -> None:
    """Free the workspace the calling thread keeps between calls (the largest part of a
    training step's memory, kept so that the next call skips allocating it anew)."""
    _SPARE.ws = None


@functools.lru_cache(maxsize=32)
def _full_length_plan(T: int, B: int, reverse: bool) -> _kernels.Plan:
    """The plan of a batch without padding; plans are read-only, so one serves every call."""
    lengths = np.full(B, T, dtype=np.int64)
    lengths.flags.writeable = False
    return _kernels.Plan(lengths, T, reverse)


def _full_plan(T: int, B: int, reverse: bool) -> _kernels.Plan:
    # short sequences are where a plan's cost shows: those are cached
    return _full_length_plan(T, B, reverse) if T <= 4096 else \
        _full_length_plan.__wrapped__(T, B, reverse)


def _plan(lengths: ArrayLike | None, T: int, B: int, reverse: bool) -> _kernels.Plan:
    """The batch plan (order by length, rows per step) after checking lengths."""
    if lengths is None:
        return _full_plan(T, B, reverse)
    lengths = _array("lengths", lengths)
    if lengths.size == 0 and lengths.shape == (B,):
        lengths = lengths.astype(np.int64)  # [] for an empty batch
    if lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (one per batch row), got {lengths.shape}")
    if B and (lengths.min() < 0 or lengths.max() > T):
        bad = lengths[(lengths < 0) | (lengths > T)]
        raise ValueError(f"lengths must lie in [0, T={T}], got {bad.tolist()[:5]}")
    # A private, read-only copy: backward indexes time by these lengths again, so a caller
    # who changes their array after forward must not be able to move those indices.
    lengths = np.array(lengths, dtype=np.int64, order="C")
    lengths.flags.writeable = False
    return _kernels.Plan(lengths, T, reverse)


def _check_weights(cell: str, dtype: np.dtype[Any], w_ih: ArrayLike, w_hh: ArrayLike,
                   b_ih: ArrayLike | None, b_hh: ArrayLike | None, x_shape: Sequence[int],
                   ) -> tuple[int, FloatArray, FloatArray, FloatArray | None, FloatArray | None]:
    G = _GATES[cell]
    w_hh = _array("w_hh", w_hh)
    if w_hh.ndim != 2 or w_hh.shape[0] != G * w_hh.shape[1] or w_hh.shape[1] == 0:
        raise ValueError(f"w_hh must have shape ({G}*hidden_size, hidden_size) with "
                         f"hidden_size > 0, got {w_hh.shape}")
    H, I = w_hh.shape[1], x_shape[2]
    if I == 0:
        raise ValueError("x must have input_size > 0, got x of shape "
                         f"{tuple(x_shape)}")
    if G * H > _INT_MAX or I > _INT_MAX:
        raise ValueError(f"{G}*hidden_size and input_size must be below 2**31, "
                         f"got hidden_size={H}, input_size={I}")
    return (H,
            _check("w_ih", w_ih, (G * H, I), dtype),
            _check("w_hh", w_hh, (G * H, H), dtype),
            _check("b_ih", b_ih, (G * H,), dtype, optional=True),
            _check("b_hh", b_hh, (G * H,), dtype, optional=True))


def _forward(cell: str, x: Any, states: Sequence[ArrayLike | None], w_ih: Any, w_hh: Any,
             b_ih: ArrayLike | None, b_hh: ArrayLike | None, lengths: ArrayLike | None,
             reverse: bool, option: bool | None, need_ctx: bool, peep: Any = None,
             zoneout: Any = None, recurrent_dropout: Any = None,
             packed: FloatArray | None = None, layer_norm: Any = None,
             ) -> tuple[FloatArray, list[Any], Context | None]:
    """packed: None, or w_ih and w_hh as _kernels.pack_weights packed them (for this cell
    and option, on any code path), which the kernels then read rather than packing them
    anew."""
    lstm = cell == "lstm"
    small = None
    if (lengths is None and peep is None and zoneout is None and recurrent_dropout is None
            and layer_norm is None):
        small = _kernels.forward_small(cell, x, states[0], states[1] if lstm else None, w_ih,
                                       w_hh, b_ih, b_hh, reverse, need_ctx, option,
                                       _full_plan, packed)
    if small is not None:
        y, h_n, c_n, ws, plan = small
        finals = [h_n, c_n] if lstm else [h_n]
    else:
        y, finals, ws, plan, x, w_ih, w_hh, peep, zoneout, recurrent_dropout, layer_norm = (
            _checked_forward(cell, x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                             option, need_ctx, peep=peep, zoneout=zoneout,
                             recurrent_dropout=recurrent_dropout, packed=packed,
                             layer_norm=layer_norm))
    dtype, I, H = x.dtype, x.shape[2], w_hh.shape[1]

    ctx = None
    if not need_ctx:
        _keep_spare(ws)
    else:
        ctx = Context()
        ctx.cell, ctx.dtype, ctx.plan, ctx.ws = cell, dtype, plan, ws
        ctx.x, ctx.w_ih, ctx.w_hh = x, w_ih, w_hh
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.option, ctx.input_size, ctx.hidden_size = option, I, H
        ctx.peep, ctx.zoneout = peep, zoneout
        ctx.recurrent_dropout = recurrent_dropout
        ctx.layer_norm = layer_norm
    return y, finals, ctx


def _checked_forward(cell: str, x: Any, states: Any, w_ih: Any, w_hh: Any, b_ih: Any,
                     b_hh: Any, lengths: ArrayLike | None, reverse: bool,
                     option: bool | None, need_ctx: bool,
                     workspace: Callable[[int, np.dtype[Any]], FloatArray] | None = None,
                     peep: Any = None, zoneout: Any = None,
                     recurrent_dropout: Any = None,
                     packed: FloatArray | None = None,
                     layer_norm: Any = None) -> tuple[Any, ...]:
    """A forward with every argument checked, and converted where needed: y, the final
    states, the workspace, the plan and the x, w_ih, w_hh, peepholes, zoneout, recurrent
    dropout's mask and layer norm's arrays the kernels read.
    workspace(n, dtype): the workspace's allocator, if not the thread's spare. packed: as
    _forward's."""
    dtype = _dtype_of(x)
    x = _check_x(x)
    T, B, I = x.shape
    H, w_ih, w_hh, b_ih, b_hh = _check_weights(cell, dtype, w_ih, w_hh, b_ih, b_hh, x.shape)
    names = ("h0", "c0")
    states = [_check(n, s, (B, H), dtype, optional=True) for n, s in zip(names, states)]
    if peep is not None:
        if cell != "lstm":
            raise ValueError(f"peepholes are an LSTM option; {cell} has none")
        peep = _check("peepholes", peep, (3 * H,), dtype)
    zoneout = _check_zoneout(cell, zoneout, (T, B, H), dtype)
    recurrent_dropout = _check_recurrent_dropout(recurrent_dropout, (B, H), dtype)
    layer_norm = _check_layer_norm(cell, option, layer_norm, H, dtype, peep is not None)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    plan = _plan(lengths, T, B, bool(reverse))

    n = _kernels.workspace_size(cell, plan, I, H, bool(need_ctx), layer_norm is not None)
    ws = (_workspace if workspace is None else workspace)(n, dtype)
    lstm = cell == "lstm"
    y, h_n, c_n = _kernels.forward(cell, x, states[0], states[1] if lstm else None, w_ih,
                                   w_hh, b_ih, b_hh, plan, ws, I, H, bool(need_ctx), option,
                                   peep, zoneout, recurrent_dropout, packed, layer_norm)
    return (y, [h_n, c_n] if lstm else [h_n], ws, plan, x, w_ih, w_hh, peep, zoneout,
            recurrent_dropout, layer_norm)


_LN_NAMES = {"lstm": ("g_ih", "g_hh", "g_c", "b_c"), "gru": ("g_ih", "g_hh")}


def _check_layer_norm(cell: str, option: bool | None, layer_norm: Any, H: int,
                      dtype: np.dtype[Any], peepholes: bool) -> tuple[FloatArray, ...] | None:
    """layer_norm for the kernels: None, or its arrays as a tuple in _LN_NAMES' order, from
    a tuple or a dict of those names."""
    if layer_norm is None:
        return None
    if cell == "rnn" or (cell == "gru" and not option):
        what = "the RNN" if cell == "rnn" else "the GRU with linear_before_reset=False"
        raise ValueError(f"layer_norm is for the LSTM and the GRU with "
                         f"linear_before_reset=True; {what} has none")
    if peepholes:
        raise ValueError("layer_norm and peepholes cannot be combined")
    names = _LN_NAMES[cell]
    form = f"({', '.join(names)})"
    if isinstance(layer_norm, dict):
        if set(layer_norm) != set(names):
            raise ValueError(f"layer_norm must have the keys {form}, got "
                             f"{tuple(layer_norm)}")
        layer_norm = tuple(layer_norm[n] for n in names)
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != len(names):
        raise TypeError(f"layer_norm must be a tuple {form} of arrays or a dict of those "
                        f"keys, got {type(layer_norm).__name__}"
                        + (f" of length {len(layer_norm)}"
                           if isinstance(layer_norm, (tuple, list)) else ""))
    G = _GATES[cell]
    sizes = {"g_ih": G * H, "g_hh": G * H, "g_c": H, "b_c": H}
    return tuple(_check(f"layer_norm {n}", a, (sizes[n],), dtype)
                 for n, a in zip(names, layer_norm))


def _check_recurrent_dropout(mask: Any, shape: tuple[int, int],
                             dtype: np.dtype[Any]) -> FloatArray | None:
    """recurrent_dropout for the kernels: None, or the (B, H) mask, finite and >= 0."""
    if mask is None:
        return None
    if isinstance(mask, (numbers.Number, np.bool_)):
        raise TypeError("recurrent_dropout must be a (B, H) mask array (already scaled, "
                        f"e.g. 0 or 1/(1-p)), got {type(mask).__name__} {mask!r}")
    mask = _check("recurrent_dropout", mask, shape, dtype)
    if not np.all(np.isfinite(mask) & (mask >= 0)):
        raise ValueError("recurrent_dropout must hold finite values >= 0 (a mask, e.g. 0 "
                         "or 1/(1-p)), got some negative, NaN or infinite")
    return mask


def _check_zoneout(cell: str, zoneout: Any, shape: tuple[int, int, int],
                   dtype: np.dtype[Any]) -> tuple[Any, Any, bool] | None:
    """zoneout for the kernels: None, or (z_h, z_c, shared): the weights with which h and
    the LSTM's c keep their previous values, each None or an array of `shape` (a mask per
    step, row and unit), or with shared one (H,) row, every unit p."""
    if zoneout is None:
        return None
    lstm = cell == "lstm"
    if isinstance(zoneout, numbers.Real) and not isinstance(zoneout, (bool, np.bool_)):
        p = float(zoneout)
        if not 0 <= p < 1:
            raise ValueError(f"zoneout must be a probability in [0, 1), got {zoneout}")
        row = np.full(shape[2], p, dtype)
        return row, row if lstm else None, True
    if lstm:
        if not isinstance(zoneout, (tuple, list)) or len(zoneout) != 2:
            raise TypeError("zoneout must be a float in [0, 1) or, for the LSTM, a pair "
                            f"(z_h, z_c) of arrays or None, got {type(zoneout).__name__}")
        z_h, z_c = (_check(f"zoneout[{k}]", z, shape, dtype, optional=True)
                    for k, z in enumerate(zoneout))
        return (z_h, z_c, False) if z_h is not None or z_c is not None else None
    if isinstance(zoneout, bool):
        raise TypeError("zoneout must be a float in [0, 1) or an array, got bool")
    return _check("zoneout", zoneout, shape, dtype), None, False


def _backward(cell: str, dy: ArrayLike | None, finals: Sequence[ArrayLike | None],
              ctx: Context, keep_spare: bool = True, out: Any = None, inputs: bool = True,
              states: bool = True, weight_grads: Any = None) -> tuple[Any, ...]:
    """keep_spare=False: ctx.ws is not this module's to keep (rnnfuse.torch's operators
    hand in a tensor's memory). out: None, or an array of ctx.ws's size that the kernels
    write into, leaving ctx.ws as it was (_kernels.backward's out; plain cells only).
    inputs=False: dx is None, not computed; states=False: dh0 and dc0 are (the kernels then
    skip the products that only they need). weight_grads: as _kernels.backward's (arrays to
    write dw_ih, dw_hh, db_ih, db_hh into)."""
    if not isinstance(ctx, Context) or not hasattr(ctx, "ws"):
        raise TypeError(f"ctx must be the ctx returned by rnnfuse.functional.{cell}_forward, "
                        f"got {type(ctx).__name__}")
    if ctx.cell != cell:
        raise ValueError(f"ctx comes from {ctx.cell}_forward, but this is {cell}_backward")
    if ctx.w_hr is not None:
        return _lstmp_backward(dy, finals, ctx, keep_spare)
    lstm = cell == "lstm"
    dh_n, dc_n = finals if lstm else (finals[0], None)
    wanted = (out, inputs, states, weight_grads)
    grads: Any = _kernels.backward(cell, dy, dh_n, dc_n, ctx, *wanted)
    if grads is None:  # not yet what the kernels take: check, explain or convert
        T, B, H = ctx.plan.T, ctx.plan.B, ctx.hidden_size
        dy = _check("dy", dy, (T, B, H), ctx.dtype, optional=True)
        dh_n = _check("dh_n", dh_n, (B, H), ctx.dtype, optional=True)
        if lstm:
            dc_n = _check("dc_n", dc_n, (B, H), ctx.dtype, optional=True)
        grads = _kernels.backward(cell, dy, dh_n, dc_n, ctx, *wanted)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeep, dln, ws = grads
    if keep_spare:
        _keep_spare(ws)
    if dln is not None:
        return (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, *dln) if lstm else \
            (dx, dh0, dw_ih, dw_hh, db_ih, db_hh, *dln)
    if dpeep is not None:
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeep
    if lstm:
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


# ---------------------------------------------------------------- the projected LSTM

def _check_projection(dtype: np.dtype[Any], x_shape: tuple[int, ...], w_ih: Any, w_hh: Any,
                      w_hr: Any) -> tuple[int, int, FloatArray, FloatArray, FloatArray]:
    """H, P and the weights of an LSTM with projection w_hr (P, H), 0 < P < H."""
    w_hr = _array("w_hr", w_hr)
    if w_hr.ndim != 2 or not 0 < w_hr.shape[0] < w_hr.shape[1]:
        raise ValueError("w_hr must have shape (proj_size, hidden_size) with "
                         f"0 < proj_size < hidden_size, got {w_hr.shape}")
    P, H, I = w_hr.shape[0], w_hr.shape[1], x_shape[2]
    if I == 0:
        raise ValueError(f"x must have input_size > 0, got x of shape {tuple(x_shape)}")
    if 4 * H > _INT_MAX or I > _INT_MAX:
        raise ValueError(f"4*hidden_size and input_size must be below 2**31, "
                         f"got hidden_size={H}, input_size={I}")
    return (H, P, _check("w_ih", w_ih, (4 * H, I), dtype),
            _check("w_hh", w_hh, (4 * H, P), dtype), _check("w_hr", w_hr, (P, H), dtype))


def _check_projection_variants(zoneout: Any, recurrent_dropout: Any, layer_norm: Any) -> None:
    """Refuse the variants that the projected LSTM does not take."""
    for name, value in (("zoneout", zoneout), ("recurrent_dropout", recurrent_dropout),
                        ("layer_norm", layer_norm)):
        if value is not None:
            raise ValueError(f"{name} is not supported with a projection (w_hr); "
                             f"pass {name}=None")


def _lstmp_forward(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, w_hr: Any, b_ih: Any,
                   b_hh: Any, lengths: ArrayLike | None, reverse: bool, need_ctx: bool,
                   peep: Any, zoneout: Any, recurrent_dropout: Any, layer_norm: Any,
                   workspace: Callable[[int, np.dtype[Any]], FloatArray] | None = None,
                   ) -> tuple[FloatArray, FloatArray, FloatArray, Context | None]:
    """lstm_forward with a projection w_hr (lstmp.c); workspace: as _checked_forward's."""
    _check_projection_variants(zoneout, recurrent_dropout, layer_norm)
    dtype = _dtype_of(x)
    x = _check_x(x)
    T, B, I = x.shape
    H, P, w_ih, w_hh, w_hr = _check_projection(dtype, x.shape, w_ih, w_hh, w_hr)
    b_ih = _check("b_ih", b_ih, (4 * H,), dtype, optional=True)
    b_hh = _check("b_hh", b_hh, (4 * H,), dtype, optional=True)
    h0 = _check("h0", h0, (B, P), dtype, optional=True)
    c0 = _check("c0", c0, (B, H), dtype, optional=True)
    peep = _check("peepholes", peep, (3 * H,), dtype, optional=True)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    plan = _plan(lengths, T, B, bool(reverse))
    ws = (_workspace if workspace is None else workspace)(
        _kernels.lstmp_workspace_size(plan, I, H, P, bool(need_ctx)), dtype)
    y, h_n, c_n = _kernels.lstmp_forward(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, peep,
                                         plan, ws, I, H, P, bool(need_ctx))
    if not need_ctx:
        _keep_spare(ws)
        return y, h_n, c_n, None
    ctx = Context()
    ctx.cell, ctx.dtype, ctx.plan, ctx.ws = "lstm", dtype, plan, ws
    ctx.x, ctx.w_ih, ctx.w_hh, ctx.w_hr, ctx.peep = x, w_ih, w_hh, w_hr, peep
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.option, ctx.input_size, ctx.hidden_size = None, I, H
    return y, h_n, c_n, ctx


def _lstmp_backward(dy: Any, finals: Sequence[Any], ctx: Context,
                    keep_spare: bool) -> tuple[Any, ...]:
    """lstm_backward of an _lstmp_forward's ctx."""
    assert ctx.w_hr is not None
    T, B, H, P = ctx.plan.T, ctx.plan.B, ctx.hidden_size, ctx.w_hr.shape[0]
    dy = _check("dy", dy, (T, B, P), ctx.dtype, optional=True)
    dh_n = _check("dh_n", finals[0], (B, P), ctx.dtype, optional=True)
    dc_n = _check("dc_n", finals[1], (B, H), ctx.dtype, optional=True)
    ws = ctx.take()
    has_ih, has_hh = ctx.has_bias
    try:
        out = _kernels.lstmp_backward(dy, dh_n, dc_n, ws, ctx.x, ctx.w_ih, ctx.w_hh,
                                      ctx.w_hr, ctx.peep, ctx.plan, ctx.input_size, H, P,
                                      has_ih, has_hh)
    except BaseException:
        ctx.ws = ws
        raise
    if keep_spare:
        _keep_spare(ws)
    dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db_ih, db_hh, dpeep = out
    grads = (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)
    return grads if dpeep is None else grads + (dpeep,)


# ---------------------------------------------------------------- the contract

def lstm_forward(x: ArrayLike, h0: ArrayLike | None, c0: ArrayLike | None, w_ih: ArrayLike,
                 w_hh: ArrayLike, b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                 lengths: ArrayLike | None = None, reverse: bool = False, *,
                 need_ctx: bool = True, peepholes: ArrayLike | None = None,
                 zoneout: Any = None, recurrent_dropout: Any = None, layer_norm: Any = None,
                 w_hr: ArrayLike | None = None,
                 ) -> tuple[FloatArray, FloatArray, FloatArray, Context | None]:
    """LSTM over a whole sequence. Returns ``y (T,B,H), h_n (B,H), c_n (B,H), ctx``.

    Gates i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of W_ih x + b_ih + W_hh h + b_hh;
    c' = f c + i g; h' = o tanh(c').

    ``peepholes``: None, or a (3H,) array P in ONNX's order i, o, f (an ONNX LSTM's P row
    as it is): i and f then also add P_i c and P_f c (the previous cell) to their
    pre-activations, and o adds P_o c' (the new cell). lstm_backward then returns the
    peepholes' gradient as an eighth element.

    ``layer_norm``: None, or ``(g_ih, g_hh, g_c, b_c)`` (a tuple, or a dict of those keys),
    gains g_ih, g_hh (4H,), g_c (H,) and the cell bias b_c (H,): the layer-normalized LSTM
    (haste's form), gates = LN(W_ih x; g_ih) + LN(W_hh h; g_hh) + b_ih + b_hh and
    h' = o tanh(LN(c'; g_c) + b_c), c' itself unnormalized, where LN(v; g) = g (v - mean(v))
    / sqrt(var(v) + 1e-5) over a row's 4H gate units (H for the cell). lstm_backward then
    returns dg_ih, dg_hh, dg_c, db_c after the seven gradients. Not with peepholes.

    ``w_hr``: None, or a projection (P, H) with 0 < P < H (PyTorch's proj_size, "LSTMP"):
    m = o tanh(c') is projected, h' = W_hr m, so the state h0, h_n and y are P wide
    ((B,P), (T,B,P)), w_hh is (4H, P), while c0, c_n stay (B,H). lstm_backward then returns
    dw_hr (P, H) as an eighth element, before dpeepholes where both are given. Not with
    zoneout, recurrent_dropout or layer_norm.
    """
    if w_hr is not None:
        return _lstmp_forward(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, lengths, reverse,
                              need_ctx, peepholes, zoneout, recurrent_dropout, layer_norm)
    y, (h_n, c_n), ctx = _forward("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths,
                                  reverse, None, need_ctx, peepholes, zoneout,
                                  recurrent_dropout, layer_norm=layer_norm)
    return y, h_n, c_n, ctx


def lstm_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, dc_n: ArrayLike | None,
                  ctx: Context) -> LSTMGrads:
    """Gradients ``dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh`` (None for absent biases),
    then ``dw_hr`` (P, H) where the forward had ``w_hr``, then ``dpeepholes`` (3H, i o f)
    where it had peepholes, or ``dg_ih, dg_hh, dg_c, db_c`` where it had layer_norm.
    With ``w_hr``, dy is (T,B,P) and dh_n (B,P)."""
    return _backward("lstm", dy, (dh_n, dc_n), ctx)


def gru_forward(x: ArrayLike, h0: ArrayLike | None, w_ih: ArrayLike, w_hh: ArrayLike,
                b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                lengths: ArrayLike | None = None, reverse: bool = False,
                linear_before_reset: bool = True, *, need_ctx: bool = True,
                zoneout: Any = None, recurrent_dropout: Any = None,
                layer_norm: Any = None) -> tuple[FloatArray, FloatArray, Context | None]:
    """GRU over a whole sequence. Returns ``y (T,B,H), h_n (B,H), ctx``.

    r, z = sigmoid(...); n = tanh(W_in x + b_in + r (W_hn h + b_hn)) with
    ``linear_before_reset`` (PyTorch), else tanh(W_in x + b_in + W_hn (r h) + b_hn);
    h' = (1 - z) n + z h.

    ``layer_norm``: None, or gains ``(g_ih, g_hh)`` (a tuple, or a dict of those keys), each
    (3H,): the layer-normalized GRU (haste's form; linear_before_reset only), with
    a = LN(W_ih x; g_ih) and b = LN(W_hh h; g_hh) in place of W_ih x and W_hh h:
    r, z = sigmoid(a + b + b_ih + b_hh), n = tanh(a_n + b_in + r (b_n + b_hn)), LN(v; g) =
    g (v - mean(v)) / sqrt(var(v) + 1e-5) over a row's 3H gate units. gru_backward then
    returns dg_ih, dg_hh after the six gradients.
    """
    if not isinstance(linear_before_reset, (bool, np.bool_)):
        raise TypeError("linear_before_reset must be a bool, got "
                        f"{type(linear_before_reset).__name__}")
    y, (h_n,), ctx = _forward("gru", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                              bool(linear_before_reset), need_ctx, zoneout=zoneout,
                              recurrent_dropout=recurrent_dropout, layer_norm=layer_norm)
    return y, h_n, ctx


def gru_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, ctx: Context) -> CellGrads:
    """Gradients ``dx, dh0, dw_ih, dw_hh, db_ih, db_hh`` (None for absent biases), and
    ``dg_ih, dg_hh`` after them where the forward had layer_norm."""
    return _backward("gru", dy, (dh_n,), ctx)


def rnn_forward(x: ArrayLike, h0: ArrayLike | None, w_ih: ArrayLike, w_hh: ArrayLike,
                b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                lengths: ArrayLike | None = None, reverse: bool = False,
                nonlinearity: Literal["tanh", "relu"] = "tanh", *, need_ctx: bool = True,
                zoneout: Any = None, recurrent_dropout: Any = None,
                layer_norm: Any = None) -> tuple[FloatArray, FloatArray, Context | None]:
    """Elman RNN over a whole sequence: h' = act(W_ih x + b_ih + W_hh h + b_hh), act
    ``"tanh"`` or ``"relu"``. Returns ``y (T,B,H), h_n (B,H), ctx``. (``layer_norm``: the
    RNN has none; anything but None is refused.)"""
    check_nonlinearity(nonlinearity)
    y, (h_n,), ctx = _forward("rnn", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                              nonlinearity == "relu", need_ctx, zoneout=zoneout,
                              recurrent_dropout=recurrent_dropout, layer_norm=layer_norm)
    return y, h_n, ctx


def rnn_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, ctx: Context) -> CellGrads:
    """Gradients ``dx, dh0, dw_ih, dw_hh, db_ih, db_hh`` (None for absent biases)."""
    return _backward("rnn", dy, (dh_n,), ctx)


# ---------------------------------------------------------------- prepacked inference

class Prepacked:
    """An inference forward on weights copied and packed once, for many calls.

    ``f = Prepacked(cell, w_ih, w_hh, b_ih=None, b_hh=None, *, linear_before_reset=True,
    nonlinearity="tanh", peepholes=None)``, then ``y, h_n, c_n = f(x, h0=None, c0=None, *,
    lengths=None, reverse=False)`` for the LSTM, ``y, h_n = f(x, h0=None, *, lengths=None,
    reverse=False)`` for the GRU and the RNN: the outputs of ``{cell}_forward(...,
    need_ctx=False)`` on the same weights, bit for bit, without packing ``w_ih`` and
    ``w_hh`` on every call (as ONNX Runtime packs them once, when its session is made).

    A snapshot: it keeps private, read-only copies of the weights and their packing, so
    changing the arrays it was made from, in place or by an optimizer's step, does not
    reach it; make a new one after an update. Its calls may run from several threads at
    once. The packed layout is the same on every kernel path (``_kernels.set_kernel``).
    """

    __slots__ = ("cell", "dtype", "input_size", "hidden_size", "option", "_w_ih", "_w_hh",
                 "_b_ih", "_b_hh", "_peep", "_packed")
    cell: str
    dtype: np.dtype[Any]
    input_size: int
    hidden_size: int
    option: bool | None
    _w_ih: FloatArray  # private read-only copies, which the kernels' checks see
    _w_hh: FloatArray
    _b_ih: FloatArray | None
    _b_hh: FloatArray | None
    _peep: FloatArray | None
    _packed: FloatArray  # what the kernels read: w_ih and w_hh packed

    def __init__(self, cell: Literal["lstm", "gru", "rnn"], w_ih: ArrayLike, w_hh: ArrayLike,
                 b_ih: ArrayLike | None = None, b_hh: ArrayLike | None = None, *,
                 linear_before_reset: bool = True,
                 nonlinearity: Literal["tanh", "relu"] = "tanh",
                 peepholes: ArrayLike | None = None) -> None:
        if cell not in _GATES:
            raise ValueError(f"cell must be one of {tuple(_GATES)}, got {cell!r}")
        if not isinstance(linear_before_reset, (bool, np.bool_)):
            raise TypeError("linear_before_reset must be a bool, got "
                            f"{type(linear_before_reset).__name__}")
        check_nonlinearity(nonlinearity)
        w_ih = _array("w_ih", w_ih)
        if w_ih.ndim != 2:
            raise ValueError(f"w_ih must be 2-D (G*hidden_size, input_size), got "
                             f"{w_ih.ndim}-D with shape {w_ih.shape}")
        dtype = w_ih.dtype
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"w_ih must have dtype float32 or float64, got {dtype}")
        H, w_ih, w_hh, b_ih, b_hh = _check_weights(cell, dtype, w_ih, w_hh, b_ih, b_hh,
                                                   (1, 1, w_ih.shape[1]))
        if peepholes is not None and cell != "lstm":
            raise ValueError(f"peepholes are an LSTM option; {cell} has none")
        peep = _check("peepholes", peepholes, (3 * H,), dtype, optional=True)
        self.cell, self.dtype, self.input_size, self.hidden_size = cell, dtype, w_ih.shape[1], H
        self.option = {"lstm": None, "gru": bool(linear_before_reset),
                       "rnn": nonlinearity == "relu"}[cell]
        self._w_ih, self._w_hh = _read_only_copy(w_ih), _read_only_copy(w_hh)
        self._b_ih, self._b_hh, self._peep = (None if a is None else _read_only_copy(a)
                                              for a in (b_ih, b_hh, peep))
        self._packed = _kernels.pack_weights(self._w_ih, self._w_hh, _GATES[cell],
                                             bool(self.option))

    def __call__(self, x: ArrayLike, h0: ArrayLike | None = None, c0: ArrayLike | None = None,
                 *, lengths: ArrayLike | None = None, reverse: bool = False) -> Any:
        if c0 is not None and self.cell != "lstm":
            raise ValueError(f"c0 is the LSTM's cell state; a {self.cell} has none "
                             "(pass x and h0)")
        if _dtype_of(x) != self.dtype:
            raise TypeError(f"x must have dtype {self.dtype} (the weights'), got "
                            f"{_array('x', x).dtype}")
        x = _check_x(x)
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have input_size {self.input_size} (the weights'), got "
                             f"x of shape {x.shape}")
        y, finals, _ = _forward(self.cell, x, (h0, c0), self._w_ih, self._w_hh, self._b_ih,
                                self._b_hh, lengths, reverse, self.option, False,
                                peep=self._peep, packed=self._packed)
        return (y, *finals)

    def __repr__(self) -> str:
        return (f"<rnnfuse prepacked {self.cell}, {self.dtype}, input_size={self.input_size}, "
                f"hidden_size={self.hidden_size}>")


def _read_only_copy(a: FloatArray) -> FloatArray:
    """A private C-contiguous copy that nothing can write to by mistake."""
    a = np.array(a, order="C")
    a.flags.writeable = False
    return a
