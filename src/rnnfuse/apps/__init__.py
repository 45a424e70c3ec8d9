"""The command-line applications, ``python -m rnnfuse <command>``: one module per command,
each with ``add_parser(subparsers)`` and ``run(args) -> exit status``; what they share is
in ``common``.

charlm      character-level language model (truncated BPTT), held-out bits per character
forecast    next value of a time series, beside persistence and a linear autoregression
classify    sequences classified from the final hidden state
memory      the adding problem: LSTM vs GRU vs tanh RNN
autoencode  sequence autoencoder on random token sequences
"""
import importlib

COMMANDS = ("charlm", "forecast", "classify", "memory", "autoencode")


def command(name):
    """The module of command ``name`` (imported on first use)."""
    if name not in COMMANDS:
        raise ValueError(f"no command {name!r}; the commands are {', '.join(COMMANDS)}")
    return importlib.import_module(f".{name}", __name__)
