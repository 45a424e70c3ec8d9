"""Optimizers, gradient clipping and learning-rate schedules over plain dicts of arrays.

An optimizer is built over a model's parameters, ``name -> np.ndarray`` (float32 or
float64), and updates those arrays IN PLACE, so the model sees every step::

    opt = Adam(model.named_parameters(), lr=1e-3)
    sched = LinearWarmup(opt, warmup_steps=100, after=CosineAnnealingLR(opt, T_max=900))
    for batch in batches:
        ...forward, loss, backward into model.grads...
        norm = clip_grad_norm(model.grads, max_norm=1.0)   # pre-clip global norm
        opt.step(model.grads)
        model.zero_grad()
        sched.step()

``step(grads)`` takes ``name -> gradient`` with the parameters' names, shapes and dtypes;
a missing name or a None gradient leaves that parameter (and its optimizer state) alone,
as PyTorch does for a parameter whose ``.grad`` is None. Gradients are never modified.
Every input is checked before any parameter changes.

The update formulas are PyTorch's (torch.optim.SGD, Adam, AdamW with foreach=False, one
parameter group): same defaults, same order of operations, same per-parameter step count.

Optimizers and schedules have ``state_dict()`` / ``load_state_dict(sd)``: plain nested
dicts of numbers, strings and arrays (what ``rnnfuse.checkpoint`` stores), restoring the
hyperparameters (lr included) and every buffer, so a run resumes exactly.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ._checks import check_int as _check_int

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm",
           "LRSchedule", "StepLR", "CosineAnnealingLR", "LinearWarmup"]


# ---------------------------------------------------------------- argument checks

def _check_float(name: str, value: Any, low: float = 0.0, high: float | None = None,
                 high_open: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(f"{name} must be a finite number, got {value}") from None
    if not (value >= low) or (high is not None and (value >= high if high_open else value > high)):
        bound = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_mapping(name: str, value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of {what}, got {type(value).__name__}")
    return value


def _check_params(params: Any) -> dict[str, NDArray[Any]]:
    """name -> live float array; the same array twice, or a read-only one, is refused."""
    if not isinstance(params, Mapping):
        hint = " (pass model.named_parameters())" if hasattr(params, "named_parameters") else ""
        raise TypeError(f"params must be a mapping of name -> np.ndarray{hint}, "
                        f"got {type(params).__name__}")
    if not params:
        raise ValueError("params must not be empty, got an empty mapping")
    seen: dict[int, str] = {}
    for k, p in params.items():
        if not isinstance(k, str):
            raise TypeError(f"params keys must be str, got {type(k).__name__} {k!r}")
        if not isinstance(p, np.ndarray):
            raise TypeError(f"params[{k!r}] must be an np.ndarray (updated in place), "
                            f"got {type(p).__name__}")
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{k!r}] must have dtype float32 or float64, got {p.dtype}")
        if not p.flags.writeable:
            raise ValueError(f"params[{k!r}] must be writeable (it is updated in place)")
        if id(p) in seen:
            raise ValueError(f"params[{k!r}] is the same array as params[{seen[id(p)]!r}]")
        seen[id(p)] = k
    return dict(params)


def _check_grads(grads: Any, params: Mapping[str, NDArray[Any]],
                 ) -> list[tuple[str, NDArray[Any], NDArray[Any]]]:
    """The (name, grad) pairs to apply, in params order; every problem raised up front."""
    if not isinstance(grads, Mapping):
        raise TypeError("grads must be a mapping of name -> np.ndarray, "
                        f"got {type(grads).__name__}")
    extra = [k for k in grads if k not in params]
    if extra:
        raise ValueError(f"grads has name(s) that are not parameters: {extra!r}")
    out = []
    for k, p in params.items():
        g = grads.get(k)
        if g is None:
            continue
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{k!r}] must be an np.ndarray, got {type(g).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{k!r}] must have shape {p.shape} (the parameter's), "
                             f"got {g.shape}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{k!r}] must have dtype {p.dtype} (the parameter's), "
                            f"got {g.dtype}")
        out.append((k, p, g))
    return out


# ---------------------------------------------------------------- optimizers

class Optimizer:
    """Base class: the parameters, per-parameter state, hyperparameters, state dicts.

    A subclass's ``__init__`` calls ``super().__init__(params, **hyperparameters)`` and the
    subclass defines ``_set_hyper(**hyperparameters)`` (checks and sets them), ``_hyper()``
    (returns them), ``_buffers`` (names of its per-parameter arrays) and
    ``_update(p, g, state)`` (one in-place step of one parameter; ``state["step"]`` is
    already incremented).
    """

    _buffers: tuple[str, ...] = ()
    _set_hyper: Callable[..., None]
    _hyper: Callable[[], dict[str, Any]]
    _update: Callable[[NDArray[Any], NDArray[Any], dict[str, Any]], None]

    def __init__(self, params: Mapping[str, NDArray[Any]], **hyper: Any) -> None:
        self.params = _check_params(params)
        self._set_hyper(**hyper)
        # name -> {"step": int, buffer name -> array}, filled at first step
        self.state: dict[str, dict[str, Any]] = {}

    @property
    def lr(self) -> float:
        """The learning rate; schedules set it before each step."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_float("lr", value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return f"{type(self).__name__}({len(self.params)} params, {args})"

    def step(self, grads: Mapping[str, NDArray[Any] | None]) -> None:
        """Update (in place) every parameter that has a gradient in ``grads``.

        grads : mapping name -> array of the parameter's shape and dtype; a missing name
        or None skips that parameter. Everything is checked before anything changes.
        """
        for name, p, g in _check_grads(grads, self.params):
            state = self.state.setdefault(name, {"step": 0})
            state["step"] += 1
            self._update(p, g, state)

    # -- state dicts
    def state_dict(self) -> dict[str, Any]:
        """``{"type": class name, "hyper": {...}, "state": {name: {"step": int, buffer: array}}}``,
        with copies of the buffers."""
        return {"type": type(self).__name__,
                "hyper": self._hyper(),
                "state": {k: {b: (v.copy() if isinstance(v, np.ndarray) else v)
                              for b, v in s.items()}
                          for k, s in self.state.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore hyperparameters (lr included) and buffers from ``state_dict()``'s output.

        Everything is checked first: on error a ValueError/TypeError says what is wrong and
        the optimizer is unchanged.
        """
        sd = _check_mapping("state_dict", state_dict, "optimizer state")
        if set(sd) != {"type", "hyper", "state"}:
            raise ValueError("optimizer state_dict must have keys ['hyper', 'state', 'type'], "
                             f"got {sorted(sd)}")
        if sd["type"] != type(self).__name__:
            raise ValueError(f"optimizer state_dict is for {sd['type']!r}, "
                             f"this optimizer is {type(self).__name__!r}")
        hyper = dict(_check_mapping("state_dict['hyper']", sd["hyper"], "hyperparameters"))
        if set(hyper) != set(self._hyper()):
            raise ValueError(f"optimizer state_dict['hyper'] must have keys "
                             f"{sorted(self._hyper())}, got {sorted(hyper)}")
        object.__new__(type(self))._set_hyper(**hyper)  # the constructor's checks, on a scratch
        states = _check_mapping("state_dict['state']", sd["state"], "name -> buffers")
        new_state = {}
        for k, s in states.items():
            if k not in self.params:
                raise ValueError(f"optimizer state_dict has state for {k!r}, "
                                 "which is not one of the parameters")
            s = _check_mapping(f"state_dict['state'][{k!r}]", s, "buffers")
            if set(s) not in ({"step"}, {"step", *self._buffers}):
                raise ValueError(f"optimizer state for {k!r} must have keys "
                                 f"{sorted({'step', *self._buffers})}, got {sorted(s)}")
            new = {"step": _check_int(f"state[{k!r}]['step']", s["step"], 0)}
            p = self.params[k]
            for b in sorted(set(s) - {"step"}):
                a = s[b]
                if not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype:
                    got = (f"a {a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray)
                           else type(a).__name__)
                    raise ValueError(f"optimizer state[{k!r}][{b!r}] must be a {p.dtype} array "
                                     f"of shape {p.shape}, got {got}")
                new[b] = a.copy()
            new_state[k] = new
        self._set_hyper(**hyper)
        self.state = new_state


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

    As torch.optim.SGD: ``g = grad + weight_decay * p``; with momentum,
    ``buf = g`` at the first step, then ``buf = momentum * buf + (1 - dampening) * g``,
    and ``g = g + momentum * buf`` (Nesterov) or ``g = buf``; finally ``p -= lr * g``.
    """

    _buffers = ("momentum_buffer",)

    def __init__(self, params: Mapping[str, NDArray[Any]], lr: float = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    def _set_hyper(self, lr: float, momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool) -> None:
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
        momentum = _check_float("momentum", momentum)
        dampening = _check_float("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={momentum}, dampening={dampening}")
        self.lr = lr
        self.momentum, self.dampening, self.nesterov = momentum, dampening, bool(nesterov)
        self.weight_decay = _check_float("weight_decay", weight_decay)

    def _hyper(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _update(self, p: NDArray[Any], g: NDArray[Any], state: dict[str, Any]) -> None:
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:  # np.array, not g.copy(): for a 0-d p, g may be a NumPy scalar
                buf = state["momentum_buffer"] = np.array(g, dtype=p.dtype)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight decay as an L2 term in the gradient.

    As torch.optim.Adam, at the parameter's step t: ``g = grad + weight_decay * p``;
    ``m += (1 - beta1) * (g - m)``; ``v = beta2 * v + (1 - beta2) * g * g``;
    ``p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    """

    _buffers = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, params: Mapping[str, NDArray[Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _set_hyper(self, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = (_check_float("betas[0]", betas[0], 0.0, 1.0, high_open=True),
                 _check_float("betas[1]", betas[1], 0.0, 1.0, high_open=True))
        eps = _check_float("eps", eps)
        weight_decay = _check_float("weight_decay", weight_decay)
        self.lr = lr
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _hyper(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, p: NDArray[Any], g: NDArray[Any], state: dict[str, Any]) -> None:
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            if self._decoupled:
                p *= 1 - self.lr * self.weight_decay        # AdamW: decay the weights directly
            else:
                g = g + self.weight_decay * p               # Adam: L2 term in the gradient
        if "exp_avg" not in state:
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m += (1 - beta1) * (g - m)                          # torch: exp_avg.lerp_(g, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * (g * g)
        step_size = self.lr / (1 - beta1 ** t)
        denom = np.sqrt(v) / math.sqrt(1 - beta2 ** t) + self.eps
        p -= step_size * m / denom                          # torch: addcdiv_(m, denom, -step_size)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:
    ``p *= 1 - lr * weight_decay`` before the Adam step. Default weight_decay 1e-2."""

    _decoupled = True

    def __init__(self, params: Mapping[str, NDArray[Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


# ---------------------------------------------------------------- gradient clipping

def clip_grad_norm(grads: Mapping[str, NDArray[Any] | None], max_norm: float,
                   norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale ``grads`` (in place) so that their global norm is at most ``max_norm``.

    grads : mapping name -> float array (None values are skipped)
    max_norm : float >= 0
    norm_type : 2.0 (default) or ``float("inf")``
    Returns the global norm before clipping, a float. As torch.nn.utils.clip_grad_norm_,
    the scale is ``max_norm / (norm + 1e-6)``, applied only when it is below 1; a NaN or
    inf norm scales the gradients into NaN unless ``error_if_nonfinite`` raises instead.
    """
    grads = _check_mapping("grads", grads, "name -> np.ndarray")
    max_norm = _check_float("max_norm", max_norm)
    if norm_type not in (2, 2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    arrays: list[NDArray[Any]] = []
    seen: dict[int, str] = {}
    for k, g in grads.items():
        if g is None:
            continue
        if not isinstance(g, np.ndarray) or g.dtype not in (np.float32, np.float64):
            got = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
            raise TypeError(f"grads[{k!r}] must be a float32 or float64 array, got {got}")
        if not g.flags.writeable:
            raise ValueError(f"grads[{k!r}] must be writeable (it is scaled in place)")
        if id(g) in seen:  # it would count twice in the norm and be scaled twice
            raise ValueError(f"grads[{k!r}] is the same array as grads[{seen[id(g)]!r}]")
        seen[id(g)] = k
        arrays.append(g)
    if not arrays:
        return 0.0
    if norm_type == math.inf:
        norm = max(float(np.max(np.abs(g), initial=0.0)) for g in arrays)
    else:
        norm = math.sqrt(sum(float(np.vdot(g.ravel(), g.ravel()).real) for g in arrays))
    if error_if_nonfinite and not math.isfinite(norm):
        raise ValueError(f"the total norm of the gradients is {norm}: cannot clip "
                         "(pass error_if_nonfinite=False to scale anyway)")
    coef = max_norm / (norm + 1e-6)
    if not coef >= 1.0:  # NaN too, as PyTorch
        for g in arrays:
            g *= coef
    return norm


# ---------------------------------------------------------------- learning-rate schedules

class _HasLR(Protocol):
    """What a schedule drives: an optimizer's learning rate."""

    @property
    def lr(self) -> float: ...
    @lr.setter
    def lr(self, value: float) -> None: ...


class LRSchedule:
    """Base class: sets ``optimizer.lr = lr_at(last_step)``; closed-form, so exactly resumable.

    ``base_lr`` is the optimizer's lr at construction. Call ``step()`` once after each
    ``optimizer.step()``; ``get_lr()`` is the lr the next optimizer step will use.
    Subclasses define ``lr_at(step) -> float`` with ``lr_at(0) == base_lr`` and list
    their hyperparameters in ``_fields``.
    """

    _fields: tuple[str, ...] = ()
    _set_fields: Callable[..., None]

    def __init__(self, optimizer: _HasLR) -> None:
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"optimizer must have an lr attribute, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_step = 0

    def _start(self) -> None:
        self.optimizer.lr = self.get_lr()

    def lr_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> float:
        """The learning rate at the current step."""
        return self.lr_at(self.last_step)

    def step(self) -> float:
        """Advance one step and set the optimizer's lr; returns the new lr."""
        self.last_step += 1
        lr = self.get_lr()
        self.optimizer.lr = lr
        return lr

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args}, base_lr={self.base_lr}, last_step={self.last_step})"

    def state_dict(self) -> dict[str, Any]:
        """``{"type", "base_lr", "last_step", <hyperparameters>}``."""
        sd = {"type": type(self).__name__, "base_lr": self.base_lr, "last_step": self.last_step}
        sd.update({f: getattr(self, f) for f in self._fields})
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the schedule and set the optimizer's lr; checked first, unchanged on error."""
        sd = self._checked_state(state_dict)
        self._restore(sd)
        self.optimizer.lr = self.get_lr()

    def _checked_state(self, state_dict: Any) -> Any:
        sd = self._check_type(state_dict)
        want = {"type", "base_lr", "last_step", *self._fields}
        if set(sd) != want:
            raise ValueError(f"schedule state_dict must have keys {sorted(want)}, got {sorted(sd)}")
        _check_float("state_dict['base_lr']", sd["base_lr"])
        _check_int("state_dict['last_step']", sd["last_step"], 0)
        scratch = type(self).__new__(type(self))
        scratch._set_fields(**{f: sd[f] for f in self._fields})  # the constructor's checks
        return sd

    def _check_type(self, state_dict: Any) -> Any:
        sd = _check_mapping("state_dict", state_dict, "schedule state")
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"schedule state_dict is for {sd.get('type')!r}, "
                             f"this schedule is {type(self).__name__!r}")
        return sd

    def _restore(self, sd: Mapping[str, Any]) -> None:
        self._set_fields(**{f: sd[f] for f in self._fields})
        self.base_lr = float(sd["base_lr"])
        self.last_step = int(sd["last_step"])


class StepLR(LRSchedule):
    """``lr = base_lr * gamma ** (step // step_size)`` (torch.optim.lr_scheduler.StepLR)."""

    _fields = ("step_size", "gamma")

    def __init__(self, optimizer: _HasLR, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        self._set_fields(step_size, gamma)
        self._start()

    def _set_fields(self, step_size: int, gamma: float) -> None:
        self.step_size = _check_int("step_size", step_size, 1)
        self.gamma = _check_float("gamma", gamma)

    def lr_at(self, step: int) -> float:
        try:
            return self.base_lr * self.gamma ** (step // self.step_size)
        except OverflowError:  # gamma > 1 over many steps: past the float range, as torch's inf
            return math.inf if self.base_lr > 0 else 0.0


class CosineAnnealingLR(LRSchedule):
    """Half a cosine from ``base_lr`` down to ``eta_min`` over ``T_max`` steps, then flat:
    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * min(step, T_max) / T_max)) / 2``.
    (torch's closed form, except that it stays at eta_min after T_max instead of rising.)"""

    _fields = ("T_max", "eta_min")

    def __init__(self, optimizer: _HasLR, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__(optimizer)
        self._set_fields(T_max, eta_min)
        self._start()

    def _set_fields(self, T_max: int, eta_min: float) -> None:
        self.T_max = _check_int("T_max", T_max, 1)
        self.eta_min = _check_float("eta_min", eta_min)

    def lr_at(self, step: int) -> float:
        t = min(step, self.T_max)
        cos = math.cos(math.pi * t / self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + cos) / 2


class LinearWarmup(LRSchedule):
    """Linear warmup, then another schedule (or a constant lr).

    For ``step < warmup_steps``:
    ``lr = base_lr * (start_factor + (1 - start_factor) * step / warmup_steps)``;
    from then on ``after.lr_at(step - warmup_steps)``, or ``base_lr`` when ``after`` is None.
    ``after`` is a schedule built on the same optimizer (before this one, so that both read
    the same base lr); the warmup drives it: call only the warmup's ``step()``.
    """

    _fields = ("warmup_steps", "start_factor")

    def __init__(self, optimizer: _HasLR, warmup_steps: int, after: LRSchedule | None = None,
                 start_factor: float = 0.0) -> None:
        if after is not None:
            if not isinstance(after, LRSchedule):
                raise TypeError(f"after must be None or an LRSchedule, got {type(after).__name__}")
            if after.optimizer is not optimizer:
                raise ValueError("after must be a schedule of the same optimizer")
        super().__init__(optimizer)
        self.after = after
        if after is not None:
            self.base_lr = after.base_lr
        self._set_fields(warmup_steps, start_factor)
        self._start()

    def _set_fields(self, warmup_steps: int, start_factor: float) -> None:
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.start_factor = _check_float("start_factor", start_factor, 0.0, 1.0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (self.start_factor
                                   + (1 - self.start_factor) * step / self.warmup_steps)
        if self.after is None:
            return self.base_lr
        return self.after.lr_at(step - self.warmup_steps)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["after"] = None if self.after is None else self.after.state_dict()
        return sd

    def _checked_state(self, state_dict: Any) -> Any:
        sd = self._check_type(state_dict)
        if "after" not in sd:
            raise ValueError("LinearWarmup state_dict must have key 'after'")
        if (sd["after"] is None) != (self.after is None):
            raise ValueError("LinearWarmup state_dict 'after' does not match this schedule's "
                             f"(saved {type(sd['after']).__name__}, "
                             f"have {type(self.after).__name__})")
        if self.after is not None:
            self.after._checked_state(sd["after"])
        return super()._checked_state({k: v for k, v in sd.items() if k != "after"}) | {
            "after": sd["after"]}

    def _restore(self, sd: Mapping[str, Any]) -> None:
        super()._restore(sd)
        if self.after is not None:
            self.after._restore(sd["after"])
