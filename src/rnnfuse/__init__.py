"""rnnfuse: fast fused C kernels for Elman RNN, LSTM and GRU on the CPU."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import functional, reference
from ._config import show_config

try:
    __version__ = _version("rnnfuse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["functional", "reference", "show_config", "__version__"]
