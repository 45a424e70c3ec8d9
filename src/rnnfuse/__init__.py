"""rnnfuse: fast fused C kernels for Elman RNN, LSTM and GRU on the CPU."""
from typing import TYPE_CHECKING

from . import checkpoint, data, functional, losses, onnx_weights, optim
from ._config import show_config
from ._version import __version__
from .checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from .data import BatchIterator, bucket_by_length, pad_sequences, reset_state, tbptt_windows
from .layers import GRU, LSTM, RNN, Embedding, Linear, Module, Sequential, Stream, StreamPool
from .losses import cross_entropy, mse_loss
from .optim import SGD, Adam, AdamW, CosineAnnealingLR, LinearWarmup, StepLR, clip_grad_norm


if TYPE_CHECKING:
    from . import reference
else:
    def __getattr__(name):
        # The NumPy reference is the tests' oracle and the benchmarks' baseline, never part
        # of the fast path: imported only when asked for (so not in __all__ either).
        if name == "reference":
            import importlib
            return importlib.import_module(".reference", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LSTM", "GRU", "RNN", "Stream", "StreamPool", "Embedding", "Linear", "Sequential", "Module",
           "cross_entropy", "mse_loss",
           "SGD", "Adam", "AdamW", "clip_grad_norm", "StepLR", "CosineAnnealingLR", "LinearWarmup",
           "pad_sequences", "bucket_by_length", "BatchIterator", "tbptt_windows", "reset_state",
           "save_checkpoint", "load_checkpoint", "restore_checkpoint", "CheckpointError",
           "functional", "losses", "optim", "data", "checkpoint", "onnx_weights",
           "show_config", "__version__"]
