"""The modules: subclasses of torch.nn's LSTM, GRU, RNN and their cells whose forward
runs on rnnfuse's kernels."""
from __future__ import annotations

import numbers
import warnings
import weakref
from typing import Any, TypeVar

import torch
from torch.nn.utils.rnn import PackedSequence

from .. import _kernels
from .._checks import check_bool as _check_bool, check_int as _check_int, check_nonlinearity
from ._common import _np
from ._dispatch import _run, pack_sorted, pad_packed
from ._onnx import export_forward

_M = TypeVar("_M", bound="_Fused")


def _check_tensor(name, t, dtype):
    """t on the CPU with the parameters' dtype."""
    if t.device.type != "cpu":
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


def _check_states(hx, n_states, shape, layout, dtype):
    """hx as a list of n_states tensors of ``shape``, or of Nones (zeros)."""
    if hx is None:
        return [None] * n_states
    if n_states == 2:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a tuple (h_0, c_0) of two tensors for LSTM, got "
                            f"{type(hx).__name__}")
        parts, names = hx, ("hx[0] (h_0)", "hx[1] (c_0)")
    else:
        parts, names = (hx,), ("hx",)
    for name, s in zip(names, parts):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
        _check_tensor(name, s, dtype)
        if tuple(s.shape) != shape:
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
        the constructor's errors for what rnnfuse does not support (``proj_size > 0``, a
        device other than the CPU, a dtype other than float32/float64).
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

    def _init_torch(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, device, dtype, **cell_args):
        """torch.nn's constructor over the checked arguments, as torch.nn's subclass."""
        checked = _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                              bidirectional, device, dtype)
        self._torch_class.__init__(self, **_quiet_dropout(checked), **cell_args)
        self.dropout = checked["dropout"]
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn("dropout acts on the outputs of all but the last layer, so it does "
                          f"nothing with num_layers=1 (dropout={self.dropout})", UserWarning,
                          stacklevel=4)

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1


    @property
    def _options(self):
        """The cell's arguments after ``reverse`` in its Function."""
        return ()

    def extra_repr(self):
        # torch.nn's, with the nonlinearity that it leaves out
        relu = ", nonlinearity=relu" if getattr(self, "nonlinearity", "tanh") == "relu" else ""
        return self._torch_class.extra_repr(self) + relu

    def _weights(self, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        w = [getattr(self, n + sfx) for n in names]
        return w if self.bias else w + [None, None]


    def _check_hx(self, hx, batch, batched, dtype):
        """hx as a list of n_states tensors (L*D, B, H), or of Nones (zeros)."""
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        if batched:
            shape, layout = (LD, batch, H), "(num_layers*num_directions, batch, hidden_size)"
        else:
            shape, layout = (LD, H), ("(num_layers*num_directions, hidden_size) for "
                                      "unbatched 2-D input")
        states = _check_states(hx, self._n_states, shape, layout, dtype)
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
                y, *fin = _run(self._cell, inp, *s0, *self._weights(layer, d), lengths,
                               d == 1, *self._options)
                ys.append(y)
                for acc, f in zip(finals, fin):
                    acc.append(f)
            inp = ys[0] if D == 1 else torch.cat(ys, dim=2)
            if self.training and self.dropout > 0 and layer < L - 1:
                inp = torch.nn.functional.dropout(inp, self.dropout, training=True)
        return inp, [torch.stack(f) for f in finals]


class LSTM(_RNNBase, torch.nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)``;
    ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``. Only ``proj_size=0`` is supported.
    """

    _torch_class = torch.nn.LSTM
    _cell, _n_states = "lstm", 2
    _config = _RNNBase._config + ("proj_size",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if proj_size != 0:
            raise ValueError(f"proj_size={proj_size!r} is not supported: rnnfuse.torch.LSTM "
                             "has no projection (proj_size must be 0; keep torch.nn.LSTM "
                             "for proj_size > 0)")
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)


class GRU(_RNNBase, torch.nn.GRU):
    """Drop-in ``torch.nn.GRU`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``output, h_n = gru(input, h_0)``.
    """

    _torch_class = torch.nn.GRU
    _cell, _n_states = "gru", 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype)

    @property
    def _options(self):
        return (True,)  # linear_before_reset: PyTorch's GRU


class RNN(_RNNBase, torch.nn.RNN):
    """Drop-in ``torch.nn.RNN`` on the rnnfuse kernels (CPU; float32 or float64), and a
    subclass of it.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``output, h_n = rnn(input, h_0)``.
    """

    _torch_class = torch.nn.RNN
    _cell, _n_states = "rnn", 1
    _config = _RNNBase._config + ("nonlinearity",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        check_nonlinearity(nonlinearity)
        self._init_torch(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, nonlinearity=nonlinearity)

    @property
    def _options(self):
        return (self.nonlinearity,)


# ---------------------------------------------------------------- cells

class _CellBase(_Fused):
    """The forward of torch.nn's LSTMCell, GRUCell and RNNCell on rnnfuse's kernels: one
    fused step (``class LSTMCell(_CellBase, torch.nn.LSTMCell)``)."""

    _config: tuple[str, ...] = ("bias",)

    def _init_torch(self, input_size, hidden_size, bias, device, dtype, **cell_args):
        self._torch_class.__init__(self, **_check_sizes(input_size, hidden_size, bias, device,
                                                        dtype), **cell_args)

    _options = _RNNBase._options

    def _forward(self, input, hx, dtype):
        """One step, as torch.nn's forward. ``input``: (B, input_size), or (input_size,)
        unbatched. ``hx``: (B, hidden_size) ((hidden_size,) unbatched), for LSTMCell a tuple
        (h, c); None for zeros. Returns h' (LSTMCell: (h', c')) in the layout of input."""
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
        states = _check_states(hx, self._n_states, shape, layout, dtype)
        x = input.reshape(1, -1, size[-1])  # one time step
        states = [None if s is None else s.reshape(-1, H) for s in states]
        p = self._parameters  # (torch.nn's __getattr__ costs a microsecond a name)
        w_ih, w_hh = p["weight_ih"], p["weight_hh"]
        _, *finals = _run(self._cell, x, *states, w_ih, w_hh, p["bias_ih"], p["bias_hh"],
                          None, False, *self._options, pack=lambda: _packed(self, w_ih, w_hh))
        finals = [f if batched else f.view(H) for f in finals]
        return tuple(finals) if len(finals) == 2 else finals[0]


# Each cell's weights as the kernels pack them, kept from call to call (a cell runs one
# step per call, where packing would cost as much as the step): packed at the second call
# that sees the same weights (a training step's single call packs in the kernel, as
# before), and reused while the code path and the weights are the same, tensors with the
# same storage and version counter. An optimizer's step, load_state_dict, .to() or any
# in-place change (under no_grad too) makes them new; a change through .data, which
# autograd does not see either, does not.
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed(module, w_ih, w_hh):
    """w_ih and w_hh of ``module`` (a cell) packed for the kernels, from _PACKS if there;
    None at the first call with these weights."""
    key = (id(w_ih), id(w_hh), w_ih.data_ptr(), w_hh.data_ptr(), w_ih._version,
           w_hh._version, _kernels.kernel())
    kept = _PACKS.get(module)
    if kept is None or kept[0] != key:
        _PACKS[module] = (key, None)  # seen once (were the key another's: packed anew)
        return None
    if kept[1] is not None:
        return kept[1]
    arrays = _np(w_ih), _np(w_hh)
    packed = _kernels.pack_weights(*arrays, w_hh.shape[0] // w_hh.shape[1],
                                   module._cell == "gru")  # (linear_before_reset)
    # the tensors and their storage stay alive with the key: their ids and addresses
    # cannot be another's while it is kept
    _PACKS[module] = (key, packed, (w_ih, w_hh, arrays))
    return packed


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

