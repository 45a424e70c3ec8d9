"""Losses with their gradients: softmax cross-entropy and mean squared error.

Each function returns ``(loss, grad)``: ``loss`` a NumPy scalar of the input's dtype and
``grad`` the gradient of ``loss`` with respect to the first argument, an array of its shape
and dtype, ready to hand to a layer's ``backward``::

    loss, dlogits = cross_entropy(logits, targets, lengths=None)   # (T, B, V) or (B, C)
    loss, dpred = mse_loss(pred, target, lengths=None)             # (T, B, ...) or any shape

Notation: T steps, B batch rows, V (or C) classes. Sequences are time-major, as in the
kernels; ``lengths`` (B,) marks steps ``t >= lengths[b]`` as padding, which contributes
nothing to the loss and gets a zero gradient. ``reduction="mean"`` divides by the number of
real elements (tokens for cross-entropy, scalar entries for MSE); ``"sum"`` does not divide.
When there are no real elements at all (every length 0, or an empty batch) the loss is 0
and the gradient is zero, for both reductions.

Everything is computed in the input's dtype (float32 or float64); the softmax is
stabilised with log-sum-exp. NaN and inf in the inputs propagate as in NumPy.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._typing import FloatArray

__all__ = ["cross_entropy", "mse_loss"]


# ---------------------------------------------------------------- argument checks

def _as_array(name: str, a: Any) -> NDArray[Any]:
    try:
        return np.asarray(a)
    except ValueError:  # a ragged nested list: NumPy's message names no argument
        raise ValueError(f"{name} must be an array, got a ragged nested sequence") from None


def _float_array(name: str, a: Any) -> FloatArray:
    if not isinstance(a, np.ndarray):
        if a is None or isinstance(a, (str, bytes, dict)):
            raise TypeError(f"{name} must be a float32 or float64 array, got {type(a).__name__}")
        a = _as_array(name, a)
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    return a


def _int_array(name: str, a: Any, shape: tuple[int, ...], what: str) -> NDArray[np.int64]:
    if not isinstance(a, np.ndarray):
        if a is None or isinstance(a, (str, bytes, dict)):
            raise TypeError(f"{name} must be an integer array, got {type(a).__name__}")
        a = _as_array(name, a)
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype == np.float64):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}{what}, got {a.shape}")
    return a.astype(np.int64, copy=False)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


@overload
def _mask(lengths: None, T: int, B: int) -> None: ...


@overload
def _mask(lengths: ArrayLike, T: int, B: int) -> NDArray[np.bool_]: ...


def _mask(lengths: ArrayLike | None, T: int, B: int) -> NDArray[np.bool_] | None:
    """(T, B) bool mask of the real steps, or None when every step is real."""
    if lengths is None:
        return None
    lengths = _int_array("lengths", lengths, (B,), " (one length per batch row)")
    if lengths.size and (lengths.min() < 0 or lengths.max() > T):
        bad = lengths[(lengths < 0) | (lengths > T)][0]
        raise ValueError(f"lengths must lie in [0, T={T}], got {bad}")
    return np.arange(T)[:, None] < lengths[None, :]


# ---------------------------------------------------------------- cross-entropy

def cross_entropy(logits: ArrayLike, targets: ArrayLike, lengths: ArrayLike | None = None, *,
                  reduction: Literal["mean", "sum"] = "mean",
                  ) -> tuple[np.floating[Any], FloatArray]:
    """Softmax cross-entropy over the last axis, with its gradient.

    Parameters
    ----------
    logits : (T, B, V) or (B, C) float32/float64 array
        Unnormalised scores: a sequence of per-token scores (language models, taggers)
        or one score vector per row (sequence classification).
    targets : (T, B) or (B,) integer array
        Class ids in [0, V). At padding steps (``t >= lengths[b]``) the value is ignored.
    lengths : None or (B,) integers in [0, T]
        Only for (T, B, V) logits: the real steps of each row. None: all steps are real.
    reduction : "mean" (default, over real tokens) or "sum"

    Returns
    -------
    loss : scalar of the logits' dtype
    dlogits : array like ``logits``, ``d loss / d logits`` (zero at padding steps)
    """
    logits = _float_array("logits", logits)
    _check_reduction(reduction)
    targets, mask, n = _checked_targets(logits, targets, lengths)
    if n == 0:
        return logits.dtype.type(0), np.zeros_like(logits)
    return _softmax_nll(logits, targets, mask, n, reduction)


def _checked_targets(logits: FloatArray, targets: ArrayLike, lengths: ArrayLike | None,
                     ) -> tuple[NDArray[np.int64], NDArray[np.bool_] | None, int]:
    """cross_entropy's targets as int64, the (T, B) mask of real steps (None: all real) and
    the number of real tokens, after checking shapes, lengths and class ids."""
    if logits.ndim not in (2, 3):
        raise ValueError("logits must have shape (T, B, V) or (B, C), "
                         f"got {logits.ndim} dimension(s) {logits.shape}")
    V = logits.shape[-1]
    what = (" (T, B) for logits (T, B, V)" if logits.ndim == 3 else " (B,) for logits (B, C)")
    targets = _int_array("targets", targets, logits.shape[:-1], what)
    if logits.ndim == 2:
        if lengths is not None:
            raise ValueError("lengths applies only to (T, B, V) logits, got (B, C) logits "
                             f"{logits.shape}; pass lengths=None")
        mask = None
    else:
        mask = _mask(lengths, logits.shape[0], logits.shape[1])
    if V == 0:
        raise ValueError(f"logits must have at least one class, got shape {logits.shape}")

    real = targets if mask is None else targets[mask]
    if real.size and (real.min() < 0 or real.max() >= V):
        bad = real[(real < 0) | (real >= V)][0]
        raise ValueError(f"targets must be class ids in [0, {V}), got {bad}")
    return targets, mask, real.size


def _softmax_nll(logits: FloatArray, targets: NDArray[np.int64], mask: NDArray[np.bool_] | None,
                 n: int, reduction: str) -> tuple[np.floating[Any], FloatArray]:
    """The loss and its gradient over n > 0 real tokens (checked by _checked_targets)."""
    dtype = logits.dtype
    # log_softmax = z - max - log(sum(exp(z - max))): exp never overflows
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    sumexp = exp.sum(axis=-1, keepdims=True)
    safe_t = np.where(mask, targets, 0) if mask is not None else targets
    picked = np.take_along_axis(shifted, safe_t[..., None], axis=-1)[..., 0]
    nll = np.log(sumexp[..., 0]) - picked            # -log p[target], shape targets.shape
    scale = dtype.type(1) / dtype.type(n) if reduction == "mean" else dtype.type(1)

    # d(-log p_y)/dz = softmax(z) - onehot(y)
    grad = exp / sumexp
    np.put_along_axis(grad, safe_t[..., None],
                      np.take_along_axis(grad, safe_t[..., None], axis=-1) - 1, axis=-1)
    if mask is not None:
        nll = np.where(mask, nll, 0)           # np.where, not *: padding may hold inf/NaN
        grad = np.where(mask[..., None], grad, dtype.type(0))
    grad *= scale
    return dtype.type(nll.sum(dtype=dtype) * scale), grad


# ---------------------------------------------------------------- mean squared error

def mse_loss(pred: ArrayLike, target: ArrayLike, lengths: ArrayLike | None = None, *,
             reduction: Literal["mean", "sum"] = "mean") -> tuple[np.floating[Any], FloatArray]:
    """Mean squared error ``sum((pred - target)**2) / n`` with its gradient.

    Parameters
    ----------
    pred : float32/float64 array, (T, B, ...) when ``lengths`` is given, else any shape
    target : array of ``pred``'s shape (any real dtype; converted to ``pred``'s dtype)
        Values at padding steps are ignored.
    lengths : None or (B,) integers in [0, T]
        Real steps of each row along axis 0 (time), batch along axis 1.
    reduction : "mean" (default; n = number of real scalar entries) or "sum" (n = 1)

    Returns
    -------
    loss : scalar of ``pred``'s dtype
    dpred : array like ``pred``, ``2 (pred - target) / n`` (zero at padding steps)
    """
    pred = _float_array("pred", pred)
    _check_reduction(reduction)
    if not isinstance(target, np.ndarray):
        if target is None or isinstance(target, (str, bytes, dict)):
            raise TypeError(f"target must be an array, got {type(target).__name__}")
        target = _as_array("target", target)
    if target.dtype.kind not in "biuf":
        raise TypeError(f"target must be a real numeric array, got dtype {target.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {pred.shape}, got {target.shape}")
    dtype = pred.dtype
    diff = pred - target.astype(dtype, copy=False)
    if lengths is None:
        n = diff.size
    else:
        if pred.ndim < 2:
            raise ValueError("with lengths, pred must have shape (T, B, ...), "
                             f"got {pred.ndim} dimension(s) {pred.shape}")
        mask = _mask(lengths, pred.shape[0], pred.shape[1])
        mask = mask.reshape(mask.shape + (1,) * (pred.ndim - 2))
        diff = np.where(mask, diff, dtype.type(0))
        n = int(mask.sum()) * int(np.prod(pred.shape[2:], dtype=np.int64))
    if n == 0:
        return dtype.type(0), np.zeros_like(pred)
    scale = dtype.type(1) / dtype.type(n) if reduction == "mean" else dtype.type(1)
    loss = np.square(diff).sum(dtype=dtype) * scale
    return dtype.type(loss), diff * (dtype.type(2) * scale)
