"""The modules: subclasses of torch.nn's LSTM, GRU, RNN and their cells whose forward
runs on rnnfuse's kernels."""
from __future__ import annotations

import numbers
import sys
import warnings
import weakref
from types import SimpleNamespace
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

from .. import _kernels, functional as F, layers
from .._checks import check_bool as _check_bool, check_int as _check_int, check_nonlinearity
from ._common import (_FIRST_ORDER, _PLAIN, _kernel_option, _numpy_contiguous,
                      _on_torch_threads, _recording)
from ._dispatch import _run, _run_variants, pack_sorted, pad_packed
from ._functions import Variants
from ._onnx import export_forward

_M = TypeVar("_M", bound="_Fused")


def _check_tensor(name, t, dtype):
    """t on the CPU with the parameters' dtype."""
    if not t.is_cpu:
        raise RuntimeError(f"{name} is on {t.device}, but rnnfuse runs on the CPU: "
                           "move it with .cpu()")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the parameters' dtype), got "
                         f"{t.dtype}: convert it with .to({dtype})")


def _autocast_dtype(input, hx, dtype):
    """Under CPU autocast, when ``input`` or ``hx`` holds a floating dtype of lower
    precision than the parameters' ``dtype``: the dtype to return outputs in (``input``'s).
    Else None."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    data = input.data if isinstance(input, PackedSequence) else input
    parts = [data, *(hx if isinstance(hx, (tuple, list)) else [hx])]
    if any(isinstance(t, torch.Tensor) and t.is_floating_point()
           and t.dtype.itemsize < dtype.itemsize for t in parts):
        return data.dtype
    return None


def _cast(value, dtype):
    """A tensor, PackedSequence, or tuple of them (hx) in ``dtype``; None stays None."""
    if isinstance(value, PackedSequence):
        return value._replace(data=value.data.to(dtype))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def _check_states(hx, n_states, shapes, layouts, dtype):
    """hx as a list of n_states tensors of ``shapes`` (``layouts`` in words), or of Nones
    (zeros)."""
    if hx is None:
        return [None] * n_states
    if n_states == 2:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a tuple (h_0, c_0) of two tensors for LSTM, got "
                            f"{type(hx).__name__}")
        parts, names = hx, ("hx[0] (h_0)", "hx[1] (c_0)")
    else:
        parts, names = (hx,), ("hx",)
    for name, s, shape, layout in zip(names, parts, shapes, layouts):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
        _check_tensor(name, s, dtype)
        if s.shape != shape:
            raise RuntimeError(f"{name} must have shape {shape} = {layout}, "
                               f"got {tuple(s.shape)}")
    return list(parts)


def _repack(y, lengths, like):
    """y (T, B, D*H), padded and in the caller's batch order, as a PackedSequence laid out
    like ``like`` (its batch_sizes, sorted_indices and unsorted_indices)."""
    if like.sorted_indices is not None:
        y, lengths = y.index_select(1, like.sorted_indices), lengths[like.sorted_indices]
    data = pack_sorted(y, lengths, like.data.shape[0])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _twin(cls, module, config):
    """A ``cls`` configured as ``module`` (its torch.nn or rnnfuse counterpart), sharing
    its parameter objects and its training mode. config: the constructor's arguments
    besides the sizes, read from ``module``."""
    on = getattr(module, "_variant_args", lambda: [])()
    if on:
        raise ValueError(f"{type(module).__name__} with {', '.join(on)} has no torch.nn "
                         f"counterpart: torch.nn.{module._torch_class.__name__} has no "
                         "such option (it is an rnnfuse extension); run the module itself")
    w = next(module.parameters())
    kwargs = {k: getattr(module, k) for k in config}
    # fork_rng: the twin's own initial draw, replaced below, must not move the global RNG
    with torch.random.fork_rng(devices=[]):
        twin = cls(module.input_size, module.hidden_size, device=w.device, dtype=w.dtype,
                   **_quiet_dropout(kwargs))
    if "dropout" in kwargs:  # module's constructor already warned about it
        twin.dropout = kwargs["dropout"]
    for name in list(twin._parameters):
        setattr(twin, name, getattr(module, name))
    return twin.train(module.training)


def _quiet_dropout(kwargs):
    """A constructor's kwargs with a dropout that torch.nn's constructor does not warn
    about (it has no effect with one layer); the caller sets the real one after."""
    if kwargs.get("num_layers", 1) == 1 and kwargs.get("dropout", 0) > 0:
        return dict(kwargs, dropout=0.0)
    return kwargs


def _check_sizes(input_size, hidden_size, bias, device, dtype):
    """What every constructor takes, checked with rnnfuse's messages (and what rnnfuse
    cannot run refused) before torch.nn's constructor sees it; returned normalised."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"device must be the CPU (rnnfuse's kernels run there), got {device}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dict(input_size=_check_int("input_size", input_size, 1),
                hidden_size=_check_int("hidden_size", hidden_size, 1),
                bias=_check_bool("bias", bias), device=device, dtype=dtype)


def _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                bidirectional, device, dtype):
    """_check_sizes and the stacking arguments of LSTM, GRU and RNN."""
    if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
            or not 0 <= dropout <= 1):
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    return dict(_check_sizes(input_size, hidden_size, bias, device, dtype),
                num_layers=_check_int("num_layers", num_layers, 1),
                batch_first=_check_bool("batch_first", batch_first),
                bidirectional=_check_bool("bidirectional", bidirectional),
                dropout=float(dropout))


def _check_variants(cell, proj_size=0, peepholes=False, layer_norm=False, **probabilities):
    """The cell variants' keyword arguments (rnnfuse extensions), checked as rnnfuse's
    layers check them (with their messages): the variants' attributes, by name."""
    v = SimpleNamespace(proj_size=proj_size, _peepholes=_check_bool("peepholes", peepholes))
    if cell != "rnn":
        layers._RNNBase._check_layer_norm(v, layer_norm)
    layers._RNNBase._set_variants(v, **probabilities)
    if cell == "lstm":
        layers.LSTM._check_projection_variants(v)
    return dict(peepholes=v._peepholes, layer_norm=getattr(v, "_layer_norm", False),
                zoneout=v.zoneout, weight_drop=v.weight_drop,
                recurrent_dropout=v.recurrent_dropout)


class _Fused:
    """What rnnfuse's modules share, mixed in before their torch.nn class (which keeps the
    parameters, their names and initialisation, and the rest of torch.nn's interface): the
    twins in both directions and the checks of the parameters. A subclass names its
    cell, its torch.nn twin and its constructor's arguments."""

    _cell: Any = None      # its name in rnnfuse.functional
    _n_states = 1          # and its states
    _torch_class: Any = None  # the torch.nn class this one replaces
    _config: tuple[str, ...] = ()  # the constructor's arguments besides sizes, device, dtype

    @classmethod
    def from_torch(cls: type[_M], module: torch.nn.Module) -> _M:
        """The rnnfuse module configured as ``module`` (a ``torch.nn`` module of this
        kind), *sharing* its parameters: the same ``nn.Parameter`` objects, so both see
        every update and an optimizer built on ``module.parameters()`` trains the result.
        (Copy with ``copy.deepcopy(module)`` first for an independent twin.) Its training
        mode is kept; hooks registered on ``module`` are not.

        Raises TypeError for another class (for subclasses, use ``swap_modules``), and
        the constructor's errors for what rnnfuse does not support (a device other than
        the CPU, a dtype other than float32/float64).
        """
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch needs a torch.nn."
                            f"{cls._torch_class.__name__}, got {type(module).__qualname__}")
        return _twin(cls, module, cls._config)

    def to_torch(self) -> torch.nn.Module:
        """The ``torch.nn`` module configured as this one, *sharing* its parameters (the
        inverse of ``from_torch``): for what runs PyTorch's own operators rather than
        rnnfuse's kernels, such as ``torch.jit.trace``, ``torch.export`` and
        ``torch.onnx.export``. Its training mode is kept; hooks are not."""
        return _twin(self._torch_class, self, self._config)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        # torch.jit.script compiles Python into TorchScript, which cannot call rnnfuse's
        # kernels: it scripts the torch.nn twin instead (same parameters, same outputs up
        # to rounding). torch.jit.script puts what this returns in the model's place.
        return self.to_torch()

    def forward(self, input: Any, hx: Any = None) -> Any:
        """torch.nn's forward, on rnnfuse's kernels (see ``_forward``)."""
        if torch.onnx.is_in_onnx_export():
            return export_forward(self, input, hx)
        dtype = self._parameters_dtype()
        out_dtype = _autocast_dtype(input, hx, dtype)
        if out_dtype is not None:  # computed in the parameters' dtype, returned in input's
            return _cast(self._forward(_cast(input, dtype), _cast(hx, dtype), dtype), out_dtype)
        return self._forward(input, hx, dtype)

    def _forward(self, input: Any, hx: Any, dtype: torch.dtype) -> Any:
        raise NotImplementedError  # each kind of module has its own

    def _parameters_dtype(self):
        """The parameters' dtype, checked again: .to(), .half() or .cuda() can change it."""
        own = [(name, p) for name, p in self._parameters.items() if p is not None]
        dtype = own[0][1].dtype
        for name, p in own:  # (its own: torch.nn's walk over submodules costs more)
            if not p.is_cpu:
                raise RuntimeError(f"{type(self).__name__}'s parameter {name} is on {p.device}, "
                                   "but rnnfuse runs on the CPU: keep the module there")
            if p.dtype != dtype or dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{type(self).__name__}'s parameters must all be "
                                f"torch.float32 or all torch.float64, got {p.dtype} for {name}: "
                                "rnnfuse computes in those; keep the module in float32 "
                                "(.float()) and run it under torch.autocast for "
                                "lower-precision inputs")
        return dtype


class _RNNBase(_Fused):
    """The forward of torch.nn's LSTM, GRU and RNN on rnnfuse's kernels: stacking,
    directions, dropout, states and checks (``class LSTM(_RNNBase, torch.nn.LSTM)``)."""

    _config: tuple[str, ...] = ("num_layers", "bias", "batch_first", "dropout",
                                "bidirectional")
    # rnnfuse's cell variants (see LSTM), off unless the constructor turns them on
    peepholes = layer_norm = _has_variants = False
    zoneout = weight_drop = recurrent_dropout = 0.0
    _VARIANT_DEFAULTS = dict(peepholes=False, layer_norm=False, zoneout=0.0, weight_drop=0.0,
                             recurrent_dropout=0.0)

    def _init_torch(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, device, dtype, variants=None, **cell_args):
        """torch.nn's constructor over the checked arguments, as torch.nn's subclass;
        variants: _check_variants's."""
        checked = _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                              bidirectional, device, dtype)
        self._torch_class.__init__(self, **_quiet_dropout(checked), **cell_args)
        self.dropout = checked["dropout"]
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn("dropout acts on the outputs of all but the last layer, so it does "
                          f"nothing with num_layers=1 (dropout={self.dropout})", UserWarning,
                          stacklevel=4)
        if variants and variants != self._VARIANT_DEFAULTS:
            self._add_variants(variants)

    def _add_variants(self, variants):
        """Set the variants and register their parameters, initialised as rnnfuse's layers
        do theirs: per layer and direction the peepholes (3H,) at 0; layer norm's gains at
        1 and the LSTM's cell bias at 0. (torch.nn's own are drawn first, as without.)"""
        for name, value in variants.items():
            setattr(self, name, value)
        self._has_variants = True
        H, G = self.hidden_size, _kernels.GATES[self._cell]
        kinds = [("weight_peep", 3 * H, 0.0)] if self.peepholes else []
        if self.layer_norm:
            kinds += [("ln_weight_ih", G * H, 1.0), ("ln_weight_hh", G * H, 1.0)]
            kinds += [("ln_weight_c", H, 1.0), ("ln_bias_c", H, 0.0)] if G == 4 else []
        w = self.weight_ih_l0
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                for kind, size, value in kinds:
                    self.register_parameter(
                        kind + self._suffix(layer, d),
                        torch.nn.Parameter(torch.full((size,), value, dtype=w.dtype,
                                                      device=w.device)))

    def _active_variants(self, kernel_only=False):
        """_variant_args, less what does nothing in eval mode (weight_drop,
        recurrent_dropout) when the module is in it; kernel_only: less weight_drop too,
        which runs as torch's operators (W_hh * mask)."""
        idle = ("weight_drop",) if kernel_only else ()
        idle += () if self.training else ("weight_drop", "recurrent_dropout")
        return [a for a in self._variant_args() if a.split("=")[0] not in idle]

    def _variant_args(self):
        """The variants turned on, as their constructor arguments ("zoneout=0.1")."""
        return [f"{k}={getattr(self, k)!r}" for k, v in self._VARIANT_DEFAULTS.items()
                if getattr(self, k) != v]

    @staticmethod
    def _suffix(layer, d):
        return f"_l{layer}" + ("_reverse" if d == 1 else "")

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1


    @property
    def _options(self):
        """The cell's arguments after ``reverse`` in its Function."""
        return ()

    def extra_repr(self):
        # torch.nn's, with the nonlinearity that it leaves out, and the variants
        relu = ", nonlinearity=relu" if getattr(self, "nonlinearity", "tanh") == "relu" else ""
        variants = "".join(", " + a for a in self._variant_args())
        return self._torch_class.extra_repr(self) + relu + variants

    def _weights(self, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        w = [getattr(self, n + sfx) for n in names]
        return w if self.bias else w + [None, None]


    def _state_widths(self):
        """Each state's width and its name: h (and c) hidden_size; an LSTM's h proj_size
        with a projection."""
        h = (self.proj_size, "proj_size") if self.proj_size else (self.hidden_size,
                                                                  "hidden_size")
        return [h, (self.hidden_size, "hidden_size")][:self._n_states]

    def _check_hx(self, hx, batch, batched, dtype):
        """hx as a list of n_states tensors (L*D, B, H) (h: (L*D, B, P) with a
        projection), or of Nones (zeros)."""
        LD, widths = self.num_layers * self.num_directions, self._state_widths()
        if batched:
            shapes = [(LD, batch, w) for w, _ in widths]
            layouts = [f"(num_layers*num_directions, batch, {n})" for _, n in widths]
        else:
            shapes = [(LD, w) for w, _ in widths]
            layouts = [f"(num_layers*num_directions, {n}) for unbatched 2-D input"
                       for _, n in widths]
        states = _check_states(hx, self._n_states, shapes, layouts, dtype)
        return [s if batched or s is None else s.unsqueeze(1) for s in states]

    def _forward(self, input, hx, dtype):
        """Run the stack over ``input``, as torch.nn's forward.

        ``input``: (T, B, input_size), or (B, T, input_size) if batch_first; (T, input_size)
        unbatched; or a PackedSequence (then the output is a PackedSequence with the same
        batch_sizes, sorted_indices and unsorted_indices). ``hx``: the initial state,
        (num_layers*num_directions, B, hidden_size) ((..., hidden_size) unbatched), for
        LSTM a tuple (h_0, c_0); None for zeros; rows in the caller's batch order, also
        for packed input.

        Returns ``output, h_n`` (GRU, RNN) or ``output, (h_n, c_n)`` (LSTM): ``output``
        (T, B, D*hidden_size) ([forward | reverse] halves) in the layout of ``input``.
        """
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            _check_tensor("input", input.data, dtype)
            x, lengths = pad_packed(input)  # (T, B, I), rows in the caller's order
            batched = True
        elif isinstance(input, torch.Tensor):
            if input.dim() not in (2, 3):
                layout = "(batch, seq_len" if self.batch_first else "(seq_len, batch"
                raise ValueError(f"{name}: input must be 2-D (seq_len, input_size) unbatched "
                                 f"or 3-D {layout}, input_size), got {input.dim()}-D with "
                                 f"shape {tuple(input.shape)}")
            _check_tensor("input", input, dtype)
            batched, lengths = input.dim() == 3, None
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        else:
            raise TypeError(f"{name}: input must be a torch.Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size="
                               f"{self.input_size}, got {x.shape[-1]}")
        states = self._check_hx(hx, x.shape[1], batched, dtype)

        y, finals = self._stack(x, states, lengths)
        if isinstance(input, PackedSequence):
            y = _repack(y, lengths, input)
        elif not batched:
            y, finals = y.squeeze(1), [f.squeeze(1) for f in finals]
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, (tuple(finals) if self._n_states == 2 else finals[0])

    def _stack(self, x, states, lengths):
        """Layers and directions over time-major x: (y (T, B, D*H), [h_n(, c_n)])."""
        L, D = self.num_layers, self.num_directions
        finals = [[] for _ in states]  # per state, the L*D rows in torch.nn's order
        inp = x
        for layer in range(L):
            ys = []
            for d in range(D):
                s0 = [None if s is None else s[layer * D + d] for s in states]
                if self._has_variants or self.proj_size:
                    y, *fin = self._run_variants(layer, d, inp, s0, lengths)
                else:
                    y, *fin = _run(self._cell, inp, *s0, *self._weights(layer, d), lengths,
                                   d == 1, *self._options)
                ys.append(y)
                for acc, f in zip(finals, fin):
                    acc.append(f)
            inp = ys[0] if D == 1 else torch.cat(ys, dim=2)
            if self.training and self.dropout > 0 and layer < L - 1:
                inp = torch.nn.functional.dropout(inp, self.dropout, training=True)
        return inp, [torch.stack(f) for f in finals]

    def _run_variants(self, layer, d, x, s0, lengths):
        """One direction of one layer with the variants or a projection: (y, finals...).
        Its masks are drawn from torch's RNG in rnnfuse's layers' order: weight drop's,
        recurrent dropout's, then zoneout's."""
        kernel_only = self._active_variants(kernel_only=True)
        sfx, w = self._suffix(layer, d), self._weights(layer, d)
        w_hr = getattr(self, "weight_hr" + sfx) if self.proj_size else None
        if self.training and self.weight_drop:  # W_hh * mask, through autograd
            w[1] = w[1] * self._dropout_mask(w[1].shape, self.weight_drop)
        T, B = x.shape[:2]
        rdrop = None
        if self.training and self.recurrent_dropout:
            rdrop = self._dropout_mask((B, self.hidden_size), self.recurrent_dropout)
        zoneout = None
        if self.zoneout:
            zoneout = (self._zoneout_masks((T, B, self.hidden_size)) if self.training
                       else self.zoneout)
        peep = getattr(self, "weight_peep" + sfx) if self.peepholes else None
        kinds = self._LAYER_NORM[self._n_states] if self.layer_norm else ()
        ln = [getattr(self, kind + sfx) for kind in kinds]
        if not (kernel_only or self.proj_size):  # weight drop alone, or eval's no-ops
            return _run(self._cell, x, *s0, *w, lengths, d == 1, *self._options)
        c0 = s0[1] if self._n_states == 2 else None
        spec = Variants(self._cell, self._options[0] if self._options else None, lengths,
                        d == 1, zoneout, rdrop)
        return _run_variants(spec, x, s0[0], c0, *w, w_hr, peep, *ln)

    _LAYER_NORM = {1: ("ln_weight_ih", "ln_weight_hh"),
                   2: ("ln_weight_ih", "ln_weight_hh", "ln_weight_c", "ln_bias_c")}

    def _dropout_mask(self, shape, p):
        """Inverted dropout's mask from torch's RNG: 1/(1-p) with probability 1-p, else 0."""
        dtype = self.weight_ih_l0.dtype
        keep = torch.rand(shape, dtype=dtype) >= p
        return keep.to(dtype) * (1.0 / (1.0 - p))

    def _zoneout_masks(self, shape):
        """Zoneout's masks from torch's RNG, 1 (keep the previous value) with probability
        p per step, row and unit: h's, or for the LSTM the pair (h's, c's)."""
        dtype = self.weight_ih_l0.dtype
        masks = [(torch.rand(shape, dtype=dtype) < self.zoneout).to(dtype)
                 for _ in range(self._n_states)]
        return tuple(masks) if self._n_states == 2 else masks[0]

    def stream(self, batch_size: int = 1, state: Any = None) -> Stream:
        """A :class:`Stream` that runs this module one timestep at a time (generation,
        online inference), starting from ``state`` (the module's form, with batch_size
        rows; None for zeros). Each ``stream.step(x_t)``, x_t (batch_size, input_size),
        returns y_t (batch_size, hidden_size; proj_size with a projection): the numbers of
        the forward over the whole sequence in eval mode, bit for bit. The stream copies
        the weights as they are now; the module must be in eval mode and
        unidirectional."""
        return Stream(self, batch_size, state)


class LSTM(_RNNBase, torch.nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
    peepholes=False, zoneout=0.0, weight_drop=0.0, recurrent_dropout=0.0,
    layer_norm=False)``; ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``. With
    ``proj_size`` P > 0 (an LSTM with projections, as torch.nn's: parameters
    ``weight_hr_l{k}[_reverse]``, h and the output P wide) it runs eagerly, under
    torch.compile, torch.export, torch.jit.trace and torch.func, and in ``stream()``; ONNX
    export refuses it (``to_torch()`` gives the torch.nn.LSTM for that).

    The keyword-only arguments are rnnfuse extensions, rnnfuse.LSTM's cell variants with
    its parameter names, initialisation and meaning (see there): ``peepholes=True``
    (``weight_peep_l{k}[_reverse]`` (3H,), ONNX's order i, o, f, starting at 0),
    ``layer_norm=True`` (``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}`` (4H,),
    ``ln_weight_c_l{k}``, ``ln_bias_c_l{k}`` (H,)), and the probabilities ``zoneout``,
    ``weight_drop``, ``recurrent_dropout`` in [0, 1), whose masks come from torch's RNG
    (``torch.manual_seed`` repeats a run) in training; in eval zoneout keeps p of the
    previous state and the other two do nothing. A state dict loads both ways with
    rnnfuse.LSTM of the same options. They run in eager mode (autocast, packed, stacked and
    bidirectional as without) and under torch.compile (fullgraph), torch.export (dynamic
    length and batch; in training the masks are drawn in the graph), torch.jit.trace and
    torch.func, with eager's bits (inductor's own random numbers aside:
    ``torch._inductor.config.fallback_random`` draws torch's); ONNX export takes
    peepholes (ONNX LSTM's input P; padded input, not a PackedSequence) and refuses the
    others (weight_drop and recurrent_dropout do nothing in eval); ``to_torch()`` and
    swapping back to torch.nn refuse them; ``stream()`` takes them all.
    """

    _torch_class = torch.nn.LSTM
    _cell, _n_states = "lstm", 2
    _config = _RNNBase._config + ("proj_size",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, peepholes: bool = False,
                 zoneout: float = 0.0, weight_drop: float = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        proj_size = _check_int("proj_size", proj_size, 0)
        if proj_size and proj_size >= _check_int("hidden_size", hidden_size, 1):
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size} "
                             f"(0 for no projection), got {proj_size}")
        variants = _check_variants("lstm", proj_size, peepholes=peepholes,
                                   layer_norm=layer_norm, zoneout=zoneout,
                                   weight_drop=weight_drop,
                                   recurrent_dropout=recurrent_dropout)
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, variants, proj_size=proj_size)


class GRU(_RNNBase, torch.nn.GRU):
    """Drop-in ``torch.nn.GRU`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None, *, zoneout=0.0,
    weight_drop=0.0, recurrent_dropout=0.0, layer_norm=False)``;
    ``output, h_n = gru(input, h_0)``. The keyword-only arguments are rnnfuse extensions,
    rnnfuse.GRU's cell variants, as in ``LSTM`` (``layer_norm``: ``ln_weight_ih_l{k}``,
    ``ln_weight_hh_l{k}`` (3H,)).
    """

    _torch_class = torch.nn.GRU
    _cell, _n_states = "gru", 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, zoneout: float = 0.0,
                 weight_drop: float = 0.0, recurrent_dropout: float = 0.0,
                 layer_norm: bool = False) -> None:
        variants = _check_variants("gru", layer_norm=layer_norm, zoneout=zoneout,
                                   weight_drop=weight_drop,
                                   recurrent_dropout=recurrent_dropout)
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, variants)

    @property
    def _options(self):
        return (True,)  # linear_before_reset: PyTorch's GRU


class RNN(_RNNBase, torch.nn.RNN):
    """Drop-in ``torch.nn.RNN`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
    zoneout=0.0, weight_drop=0.0, recurrent_dropout=0.0)``; ``output, h_n = rnn(input,
    h_0)``. The keyword-only arguments are rnnfuse extensions, rnnfuse.RNN's cell
    variants, as in ``LSTM``.
    """

    _torch_class = torch.nn.RNN
    _cell, _n_states = "rnn", 1
    _config = _RNNBase._config + ("nonlinearity",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, zoneout: float = 0.0,
                 weight_drop: float = 0.0, recurrent_dropout: float = 0.0) -> None:
        check_nonlinearity(nonlinearity)
        variants = _check_variants("rnn", zoneout=zoneout, weight_drop=weight_drop,
                                   recurrent_dropout=recurrent_dropout)
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, variants, nonlinearity=nonlinearity)

    @property
    def _options(self):
        return (self.nonlinearity,)


# ---------------------------------------------------------------- streams

class Stream:
    """A unidirectional LSTM, GRU or RNN stepped one timestep at a time, its state kept
    between calls (generation, online inference); ``rnnfuse.Stream`` for tensors.

    Made by ``module.stream(batch_size=1, state=None)`` of a module in eval mode.
    ``stream.step(x)`` takes one step's input ``(batch_size, input_size)`` and returns the
    top layer's output ``(batch_size, hidden_size)`` (proj_size wide with a projection; a
    new tensor): the matching row of ``module(input)`` over the whole sequence in eval
    mode, bit for bit. All layers step in one call of the kernels. ``stream.state`` is the
    current state in the module's form, ``(h, c)`` for an LSTM, ``h`` for a GRU or RNN,
    each (num_layers, batch_size, hidden_size) (h proj_size wide with a projection;
    copies); ``stream.reset(state=None)`` sets it (None: zeros).

    The stream keeps its own copy of the module's weights as they were when it was made
    and computes no gradients. One stream is stepped by one thread at a time.
    """

    def __init__(self, module: Any, batch_size: int, state: Any = None) -> None:
        name = type(module).__name__  # module: an _RNNBase (torch's classes are Any here)
        if module.training:
            raise RuntimeError(f"{name}.stream() runs the module as in eval mode (no "
                               "dropout, no gradients): call module.eval() first")
        if module.bidirectional:
            raise ValueError(f"a bidirectional {name} cannot be streamed: its reverse "
                             "direction needs the whole sequence")
        self.dtype = module._parameters_dtype()
        proj_size = getattr(module, "proj_size", 0)
        weights: list[list[Any]] = [
            [None if w is None else w.detach().numpy().copy()
             for w in module._weights(layer, 0) + _extra_weights(module, layer)]
            for layer in range(module.num_layers)]
        self._stream = _kernels.Stream(module._cell, bool(_kernel_option(module._cell,
                                                                         *module._options)),
                                       weights[0][0].dtype, _check_int("batch_size",
                                                                       batch_size, 0), weights,
                                       zoneout=module.zoneout, layer_norm=module.layer_norm,
                                       proj_size=proj_size)
        self._shape = (self.batch_size, self.input_size)
        self._lstm = module._n_states == 2
        self.reset(state)

    batch_size = property(lambda self: self._stream.batch_size)
    input_size = property(lambda self: self._stream.input_size)
    hidden_size = property(lambda self: self._stream.hidden_size)
    num_layers = property(lambda self: self._stream.num_layers)
    proj_size = property(lambda self: self._stream.proj_size)

    def __repr__(self):
        return repr(self._stream).replace("rnnfuse", "rnnfuse.torch", 1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Advance every layer by one timestep: x (batch_size, input_size) -> y
        (batch_size, hidden_size, or proj_size with a projection), the top layer's
        output."""
        if not (type(x) is torch.Tensor and x.dtype == self.dtype and x.is_cpu
                and x.shape == self._shape):
            _check_tensor("x", _plain("x", x), self.dtype)
            raise ValueError(f"x must have shape {self._shape} (batch_size, input_size), "
                             f"got {tuple(x.shape)}")
        if x.requires_grad:
            if torch.is_grad_enabled():
                raise RuntimeError("x requires grad, but a stream computes no gradients: "
                                   "step under torch.no_grad() (or pass x.detach()); train "
                                   "with the module's forward")
            x = x.detach()
        previous = _kernels.set_threads(torch.get_num_threads())
        try:
            return torch.from_numpy(self._stream.step(x.numpy()))
        finally:
            _kernels.set_threads(previous)

    @property
    def state(self) -> Any:
        """The current state, in the module's form: ``(h, c)`` for an LSTM, ``h`` for a
        GRU or RNN, each (num_layers, batch_size, hidden_size) (h proj_size wide with a
        projection; copies)."""
        state = self._stream.state
        if self._lstm:
            return tuple(torch.from_numpy(s) for s in state)
        return torch.from_numpy(state)

    def reset(self, state: Any = None) -> None:
        """Set the state: None for zeros, else in the module's form (see ``state``)."""
        if state is None:
            self._stream.reset(None)
            return
        if self._lstm:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError("state must be a tuple (h, c) for an LSTM stream, got "
                                f"{type(state).__name__}")
            parts: Any = state
            names: tuple[str, ...] = ("state[0] (h)", "state[1] (c)")
        else:
            parts, names = (state,), ("state",)
        widths = [(self.proj_size, "proj_size")] if self.proj_size else []
        widths += [(self.hidden_size, "hidden_size")] * 2  # h (without projection), c
        arrays = []
        for name, s, (width, what) in zip(names, parts, widths):
            _check_tensor(name, _plain(name, s), self.dtype)
            shape = (self.num_layers, self.batch_size, width)
            if s.shape != shape:
                raise ValueError(f"{name} must have shape {shape} (num_layers, batch_size, "
                                 f"{what}), got {tuple(s.shape)}")
            arrays.append(s.detach().numpy())
        self._stream.reset(tuple(arrays) if self._lstm else arrays[0])


def _extra_weights(module, layer):
    """The parameters of one layer of a stream after (w_ih, w_hh, b_ih, b_hh), in the
    order of rnnfuse's layers' (and _kernels.Stream's): w_hr, the peepholes, layer
    normalization's gains (and the LSTM's cell bias), where the module has them."""
    kinds = ["weight_hr"] if getattr(module, "proj_size", 0) else []
    kinds += ["weight_peep"] if module.peepholes else []
    kinds += module._LAYER_NORM[module._n_states] if module.layer_norm else []
    return [getattr(module, kind + f"_l{layer}") for kind in kinds]


def _plain(name, t):
    """t, a plain torch.Tensor (a stream runs outside PyTorch's dispatcher: no tracer or
    tensor subclass can see it)."""
    if type(t) is not torch.Tensor:
        raise TypeError(f"{name} must be a plain torch.Tensor, got {type(t).__name__}: a "
                        "stream runs the kernels outside PyTorch's dispatcher")
    return t


# ---------------------------------------------------------------- cells

class _CellBase(_Fused):
    """The forward of torch.nn's LSTMCell, GRUCell and RNNCell on rnnfuse's kernels: one
    fused step (``class LSTMCell(_CellBase, torch.nn.LSTMCell)``)."""

    _config: tuple[str, ...] = ("bias",)

    def _init_torch(self, input_size, hidden_size, bias, device, dtype, **cell_args):
        self._torch_class.__init__(self, **_check_sizes(input_size, hidden_size, bias, device,
                                                        dtype), **cell_args)

    _options = _RNNBase._options

    def forward(self, input: Any, hx: Any = None) -> Any:
        """torch.nn's forward, on rnnfuse's kernels (see ``_forward``)."""
        if _recording() or torch.is_autocast_enabled("cpu"):
            return _Fused.forward(self, input, hx)  # the operators; autocast's casts
        weights = _cell_weights(self)
        return self._forward(input, hx, weights.dtype, weights)

    def _forward(self, input, hx, dtype, weights=None):
        """One step, as torch.nn's forward. ``input``: (B, input_size), or (input_size,)
        unbatched. ``hx``: (B, hidden_size) ((hidden_size,) unbatched), for LSTMCell a tuple
        (h, c); None for zeros. Returns h' (LSTMCell: (h', c')) in the layout of input.
        weights: the parameters as ``_cell_weights`` keeps them, where nothing records
        this call (then the step runs the kernels directly)."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
        dim, size, H = input.dim(), input.shape, self.hidden_size
        if dim not in (1, 2):
            raise ValueError(f"{name}: input must be 1-D (input_size) unbatched or 2-D (batch, "
                             f"input_size), got {dim}-D with shape {tuple(size)}")
        _check_tensor("input", input, dtype)
        if size[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size="
                               f"{self.input_size}, got {size[-1]}")
        batched = dim == 2
        shape, layout = (((size[0], H), "(batch, hidden_size)") if batched
                         else ((H,), "(hidden_size) for unbatched 1-D input"))
        states = _check_states(hx, self._n_states, [shape] * self._n_states,
                               [layout] * self._n_states, dtype)
        x = input if batched else input.view(1, -1)
        if not batched:
            states = [None if s is None else s.view(1, H) for s in states]
        finals = None
        if weights is not None and weights.arrays is not None:
            finals = _step(self, x, states, weights)
        if finals is None:  # the operators (recording, tensor subclasses), or autocast's casts
            p = self._parameters
            finals = _run(self._cell, x.unsqueeze(0), *states, p["weight_ih"],
                          p["weight_hh"], p["bias_ih"], p["bias_hh"], None, False,
                          *self._options)[1:]
        if not batched:
            finals = [f.view(H) for f in finals]
        return tuple(finals) if len(finals) == 2 else finals[0]


# ---------------------------------------------------------------- a cell's step

class _Weights(NamedTuple):
    """A cell's parameters as its steps read them, kept from call to call while they are
    the same (see _cell_weights)."""
    key: Any            # what makes them the same: each one's identity, storage, version
    dtype: torch.dtype  # theirs, checked
    arrays: Any         # (w_ih, w_hh, b_ih, b_hh) as NumPy views; None: a tensor subclass
    tensors: tuple      # the parameters (kept alive with the key: ids and storages)


# Each cell's _Weights, kept from call to call: a cell runs one step per call, where
# checking its parameters and making NumPy views of them would cost a good part of the
# step. Views of the parameters' own storage (never copies, and never packed weights,
# which a change through .data, unseen by the version counter, would leave stale), kept
# while the parameters are the same tensors with the same storage and version counter.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cell_weights(module):
    """module's (a cell's) _Weights: kept in _KEPT, made anew (its parameters checked) when
    they are not the same as at the last call."""
    p = module._parameters
    w_ih, w_hh, b_ih, b_hh = tensors = (p["weight_ih"], p["weight_hh"], p["bias_ih"],
                                        p["bias_hh"])
    try:
        key = (_stamp(w_ih), _stamp(w_hh), _stamp(b_ih), _stamp(b_hh))
    except RuntimeError:  # inference tensors have no version counter: keep nothing
        key = None
    kept = _KEPT.get(module)
    if kept is not None and key is not None and kept.key == key:
        return kept
    kept = _new_weights(module, key, tensors)
    if key is not None and kept.arrays is not None and all(
            t is None or t.is_contiguous() for t in tensors):  # views, not copies
        _KEPT[module] = kept
    return kept


def _stamp(t):
    return None if t is None else (id(t), t.data_ptr(), t._version)


def _new_weights(module, key, tensors):
    dtype = module._parameters_dtype()  # refuses another device or dtype
    arrays = None
    if all(t is None or type(t) in _PLAIN for t in tensors):
        arrays = tuple(None if t is None else t.detach().contiguous().numpy()
                       for t in tensors)
    return _Weights(key, dtype, arrays, tensors)


def _view(t):
    """A NumPy view of a plain CPU tensor, or None (a copy if not contiguous)."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return _numpy_contiguous(t)


_OPTION = {"lstm": None, "gru": True}  # (the RNN's, its nonlinearity, is read each call)


def _step(module, x, states, weights):
    """One step of a cell over plain tensors, x (B, I), states (B, H) or None: the final
    states (tensors), recorded for autograd by _CellStep where it needs them. None for a
    tensor subclass (the operators' case)."""
    h0 = states[0]
    c0 = states[1] if len(states) == 2 else None
    if not (type(x) is torch.Tensor and (h0 is None or type(h0) is torch.Tensor)
            and (c0 is None or type(c0) is torch.Tensor)):
        return None
    cell = module._cell
    option = _kernel_option(cell, *module._options) if cell == "rnn" else _OPTION[cell]
    w_ih, w_hh, b_ih, b_hh = weights.tensors
    if torch.is_grad_enabled() and (
            x.requires_grad or w_ih.requires_grad or w_hh.requires_grad
            or h0 is not None and h0.requires_grad or c0 is not None and c0.requires_grad
            or b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad)):
        return _CellStep.apply((cell, option, weights), x, h0, c0, *weights.tensors)
    finals, _ = _kernel_step(cell, option, weights, x, h0, c0, False)
    return [torch.from_numpy(f) for f in finals]


def _kernel_step(cell, option, weights, x, h0, c0, need_ctx):
    """One step of the kernels on PyTorch's thread count (a forward's products call no
    BLAS): (final states as arrays, the kernels' ctx or None)."""
    w_ih, w_hh, b_ih, b_hh = weights.arrays
    x, h0, c0 = _view(x), _view(h0), _view(c0)
    x = x.reshape(1, *x.shape)
    previous = _kernels.set_threads(torch.get_num_threads())
    try:
        if not need_ctx:  # functional's fast path, less what only larger calls need
            small = _kernels.forward_small(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, False,
                                           False, option, F._full_plan)
            if small is not None:
                return small[1:3] if cell == "lstm" else small[1:2], None
        _, finals, kctx = F._forward(cell, x, [h0, c0], w_ih, w_hh, b_ih, b_hh, None, False,
                                     option, need_ctx)
        return finals, kctx
    finally:
        _kernels.set_threads(previous)


class _CellStep(torch.autograd.Function):
    """A cell's step for autograd: ``_CellStep.apply((cell, option, weights), x, h0, c0,
    w_ih, w_hh, b_ih, b_hh)`` -> (h', c') or (h',); c0 None but for the LSTM."""

    @staticmethod
    def forward(ctx, spec, x, h0, c0, *params):
        cell, option, weights = spec
        finals, kctx = _kernel_step(cell, option, weights, x, h0, c0, True)
        ctx.set_materialize_grads(False)  # an unused output's gradient reaches it as None
        # saved through autograd, so that torch refuses if an input is changed in place
        # before backward (the kernel's ctx reads x and the weights through NumPy views)
        ctx.save_for_backward(x, h0, c0, *params)
        ctx.spec, ctx.kernel = spec, kctx
        return tuple(torch.from_numpy(f) for f in finals)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(_FIRST_ORDER)
        # torch refuses here if the graph was freed or an input changed in place
        x, h0, c0 = ctx.saved_tensors[:3]
        cell, option, weights = ctx.spec
        kctx, ctx.kernel = ctx.kernel, None
        if kctx is None:  # a second backward (retain_graph=True): replay the forward
            kctx = _kernel_step(cell, option, weights, x, h0, c0, True)[1]
        need = ctx.needs_input_grad[1:]  # x, h0, c0, the parameters
        w_ih, w_hh = weights.arrays[:2]
        # the gradients nothing wants are not computed: dx spares reading W_ih, dh0 W_hh
        out = list(_cell_backward(cell, None, [None if g is None else _view(g)
                                                 for g in grads], kctx,
                                    inputs=need[0], states=need[1] or need[2],
                                    weight_grads=(_recycled(w_ih), _recycled(w_hh), None,
                                                  None)))
        if cell != "lstm":
            out.insert(2, None)  # dc0
        if out[0] is not None:
            out[0] = out[0].reshape(x.shape)
        return (None, *(torch.from_numpy(g) if wanted and g is not None else None
                        for g, wanted in zip(out, need)))


_cell_backward = _on_torch_threads(F._backward)


# The weight gradients' arrays of the cells' backwards, by shape and dtype, kept for reuse
# once nothing else holds them (torch let their tensors go: zero_grad, or a sum into
# .grad): a new array's pages cost more than the product that fills them (the kernel
# maps and zeroes each on first touch). At most _RECYCLE_MAX of each are kept.
_RECYCLED: dict = {}
_RECYCLE_MAX = 4


def _recycled(like):
    """An array of like's shape and dtype for a backward to write a gradient into: a kept
    one that nothing else holds now, else a new one (kept if there is room)."""
    kept = _RECYCLED.setdefault((like.shape, like.dtype), [])
    for _ in range(len(kept)):
        try:
            a = kept.pop(0)  # (one thread at a time can take an array: pop is atomic)
        except IndexError:  # another thread took the rest
            break
        kept.append(a)
        if sys.getrefcount(a) == 3:  # kept, this name, getrefcount's argument: free
            return a
    a = np.empty_like(like)
    if len(kept) < _RECYCLE_MAX:
        kept.append(a)
    return a


class LSTMCell(_CellBase, torch.nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` on the rnnfuse kernels, and a subclass of it:
    ``LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)``;
    ``h, c = cell(input, (h, c))``."""

    _torch_class = torch.nn.LSTMCell
    _cell, _n_states = "lstm", 2

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, bias, device, dtype)


class GRUCell(_CellBase, torch.nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` on the rnnfuse kernels, and a subclass of it:
    ``GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None)``;
    ``h = cell(input, h)``."""

    _torch_class = torch.nn.GRUCell
    _cell, _n_states = "gru", 1
    _options = GRU._options

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, bias, device, dtype)


class RNNCell(_CellBase, torch.nn.RNNCell):
    """Drop-in ``torch.nn.RNNCell`` on the rnnfuse kernels, and a subclass of it:
    ``RNNCell(input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
    dtype=None)``; ``h = cell(input, h)``."""

    _torch_class = torch.nn.RNNCell
    _cell, _n_states = "rnn", 1
    _config = _CellBase._config + ("nonlinearity",)
    _options = RNN._options

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        check_nonlinearity(nonlinearity)
        self._init_torch(input_size, hidden_size, bias, device, dtype, nonlinearity=nonlinearity)

