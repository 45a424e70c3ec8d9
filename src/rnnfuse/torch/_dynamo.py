"""torch.compile: Dynamo refuses every instance of torch.nn.RNN, GRU and LSTM (a graph
break, an error with fullgraph=True) unless torch._dynamo.config.allow_rnn is set, and
rnnfuse's modules are such instances. Setting allow_rnn for the whole process would make
Dynamo trace torch.nn's own RNNs too, which Inductor then fails to run on the CPU; so it
is set only while Dynamo takes in one of rnnfuse's modules, whose forward traces into
the operators. Dynamo is imported lazily (it takes a second or so), so this is installed
when its module is first imported."""
from __future__ import annotations

import functools
import importlib.abc
import sys
import warnings

from ._modules import _Fused

_DYNAMO_BUILDER = "torch._dynamo.variables.builder"


def _allow_rnnfuse_modules(builder):
    """Let Dynamo's VariableBuilder take rnnfuse's modules (as with allow_rnn)."""
    cls = getattr(builder, "VariableBuilder", None)
    wrap = getattr(cls, "wrap_module", None)
    config = getattr(sys.modules.get("torch._dynamo"), "config", None)
    if wrap is None or config is None:
        raise RuntimeError(f"{builder.__name__} has no VariableBuilder.wrap_module or "
                           "torch._dynamo has no config")
    if getattr(wrap, "_rnnfuse", False):
        return

    @functools.wraps(wrap)
    def wrap_module(self, value):
        if isinstance(value, _Fused) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return wrap(self, value)
        return wrap(self, value)

    wrap_module._rnnfuse = True
    cls.wrap_module = wrap_module


def _allow_or_warn(builder):
    """_allow_rnnfuse_modules, with a warning where it fails (Dynamo's import goes on:
    rnnfuse's modules then run eagerly between compiled graphs)."""
    try:
        _allow_rnnfuse_modules(builder)
    except Exception as e:
        warnings.warn(f"rnnfuse.torch could not let torch.compile take its modules whole "
                      f"({type(e).__name__}: {e}); under torch.compile they break the graph "
                      "(an error with fullgraph=True)", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` once, after the module ``name`` is executed by an import. A
    probe that only looks for the module (``importlib.util.find_spec``) runs nothing."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = self._others_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            if self in sys.meta_path:  # (the first import to get this far)
                sys.meta_path.remove(self)
                self.then(module)

        spec.loader.exec_module = run  # this spec's own loader
        return spec

    def _others_spec(self, fullname, path, target):
        """The spec the finders after this one give."""
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is not self and find is not None:
                spec = find(fullname, path, target)
                if spec is not None:
                    return spec
        return None


def install():
    """Let Dynamo take rnnfuse's modules now if it is imported, else once it is."""
    if _DYNAMO_BUILDER in sys.modules:
        _allow_or_warn(sys.modules[_DYNAMO_BUILDER])
    elif not any(isinstance(f, _AfterImport) and f.name == _DYNAMO_BUILDER
                 for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_DYNAMO_BUILDER, _allow_or_warn))
