"""rnnfuse: fast fused C kernels for Elman RNN, LSTM and GRU on the CPU."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import functional, onnx_weights
from ._config import show_config
from .layers import GRU, LSTM, RNN, Embedding, Linear, Module, Sequential


def __getattr__(name):
    # The NumPy reference is the tests' oracle and the benchmarks' baseline, never part of
    # the fast path: imported only when asked for.
    if name == "reference":
        import importlib
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = _version("rnnfuse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["LSTM", "GRU", "RNN", "Embedding", "Linear", "Sequential", "Module",
           "functional", "reference", "onnx_weights", "show_config", "__version__"]
