"""Swapping: torch.nn's recurrent modules inside a model for rnnfuse's twins, and back."""
from __future__ import annotations

import copy
import functools
import warnings

import torch

from ._modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, _Fused, _twin


_TWINS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNN: RNN,
          torch.nn.LSTMCell: LSTMCell, torch.nn.GRUCell: GRUCell, torch.nn.RNNCell: RNNCell}


@functools.cache
def _fused_subclass(cls, twin_class):
    """``cls`` (a subclass of a torch.nn recurrent class) with rnnfuse's forward beneath its
    own methods: ``super().forward`` in ``cls`` reaches ``twin_class``'s."""
    return type(cls.__name__, (cls, twin_class),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "_swapped_class": cls, "_twin_class": twin_class,
                 "__reduce_ex__": _reduce_fused_subclass})


def _reduce_fused_subclass(module, protocol):
    # pickled as "cls with rnnfuse beneath", rebuilt through _fused_subclass
    cls = type(module)
    return _new_fused, (cls._swapped_class, cls._twin_class), module.__getstate__()


def _new_fused(cls, twin_class):
    return object.__new__(_fused_subclass(cls, twin_class))


def _moved(module, cls):
    """A ``cls`` holding ``module``'s state: the same parameters and attributes, its own
    containers (so that the two can then differ)."""
    new = object.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list)) else v
                         for k, v in module.__dict__.items()})
    return new


def _rnnfuse_twin(module):
    """The rnnfuse module in ``module``'s place (sharing its parameters), or the reason
    there is none (an exception)."""
    twin_class = next(t for k, t in _TWINS.items() if isinstance(module, k))
    try:
        twin = _twin(twin_class, module, twin_class._config)  # refuses what we can't run
    except (TypeError, ValueError) as e:
        return e
    if type(module) is twin_class._torch_class:
        return twin
    return _moved(module, _fused_subclass(type(module), twin_class))


def swap_modules(model: torch.nn.Module) -> list[str]:
    """Replace, in place, every ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell``
    and ``RNNCell`` inside ``model`` by its rnnfuse twin, which shares the original's
    parameters: outputs are unchanged up to rounding, and an optimizer built before the
    swap keeps training the model. A module reached under several names is replaced by
    one twin everywhere. A subclass of a
    torch.nn class keeps its own methods and attributes, with rnnfuse's forward beneath
    them (its ``super().forward`` runs on rnnfuse; a forward of its own that calls
    torch's operators keeps doing so).

    Returns the qualified names replaced (as ``model.named_modules()`` spells them).

    Modules that cannot be replaced are left as they are, and one ``UserWarning`` names
    each with its reason: parameters not on the CPU or not
    float32/float64, and ``model`` itself when it is one (it cannot be replaced in place:
    use ``rnnfuse.torch.LSTM.from_torch(model)`` and so on). Forward hooks on the replaced
    torch.nn modules are not carried over (a subclass's are).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped, skipped, twins = [], [], {}
    if _swappable(model):
        skipped.append("the model itself: it cannot be replaced in place; use "
                       "rnnfuse.torch.LSTM/GRU/RNN.from_torch(model)")
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not _swappable(child):
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            if id(child) not in twins:
                twins[id(child)] = _rnnfuse_twin(child)
            twin = twins[id(child)]
            if isinstance(twin, Exception):
                skipped.append(f"{qualified}: {twin}")
                continue
            setattr(parent, name, twin)
            swapped.append(qualified)
    if skipped:
        warnings.warn("swap_modules left these modules as they are:\n  - "
                      + "\n  - ".join(skipped), UserWarning, stacklevel=2)
    return swapped


def _swappable(module):
    return isinstance(module, tuple(_TWINS)) and not isinstance(module, _Fused)


def unswap_modules(model: torch.nn.Module) -> list[str]:
    """Undo ``swap_modules``: replace, in place, every rnnfuse.torch module inside
    ``model`` by its ``torch.nn`` twin (``to_torch``), which shares its parameters. For
    tracing or exporting a model (``torch.jit.trace``, ``torch.export``,
    ``torch.onnx.export``), which record PyTorch's own operators. Returns the qualified
    names replaced; ``model`` itself, when it is one, is left alone (use ``to_torch``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced, twins = [], {}
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Fused):
                if id(child) not in twins:
                    twins[id(child)] = _torch_twin(child)
                setattr(parent, name, twins[id(child)])
                replaced.append(f"{prefix}.{name}" if prefix else name)
    return replaced


def _torch_twin(module):
    """The torch.nn module in an rnnfuse module's place: a swapped subclass becomes its
    own class again."""
    original = getattr(type(module), "_swapped_class", None)
    return module.to_torch() if original is None else _moved(module, original)
