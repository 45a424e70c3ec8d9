"""What the commands share: the input error, the shared flags and their checks, the cell
table, the progress stream, the final-state readout, and fit() driven by the flags."""
import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import numpy as np

from ..layers import GRU, LSTM, RNN, Linear, Sequential

__all__ = ["InputError", "CELLS", "add_shared_flags", "check_flag", "check_flags",
           "check_shared_flags", "check_interval", "check_train_size", "progress_stream",
           "once_per_step", "fit_from_flags", "FinalState"]

# Cell name (the --cell values) -> layer class.
CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}

# The most any integer flag may be (the seed excepted): far past what fits in memory, and
# short of sizes NumPy cannot even express as a shape.
MAX_INT_FLAG = 2**31 - 1


class InputError(ValueError):
    """Bad user input (a flag out of range, a missing, empty or undecodable file); the
    message is one line."""


# ---------------------------------------------------------------- flags

def add_shared_flags(p: argparse.ArgumentParser, *, hidden: int, layers: int,
                     epochs: int) -> None:
    """The flags every training command takes, with the command's default sizes."""
    g = p.add_argument_group("model and training")
    g.add_argument("--cell", choices=tuple(CELLS), default="lstm",
                   help="recurrent cell (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=hidden, help="hidden size (default: %(default)s)")
    g.add_argument("--layers", type=int, default=layers,
                   help="stacked recurrent layers (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training data "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice "
                   "(default: %(default)s)")
    g.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (threadpoolctl "
                   "limit; default: %(default)s, the fastest for these sizes on 2 cores)")
    g.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="max global gradient norm, 0 for none (default: %(default)s)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many evaluations without improvement")
    g.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                   help="also evaluate every STEPS steps (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="stop after this many steps in all")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes, 0 for no limit "
                   "(default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--save", metavar="PATH", help="checkpoint written (atomically) every epoch")
    o.add_argument("--resume", metavar="PATH", help="continue from a checkpoint of --save")
    o.add_argument("--metrics", metavar="PATH", help="append one JSON line per evaluation")
    o.add_argument("--plot", metavar="PNG", help="loss curve (needs matplotlib)")
    o.add_argument("--json", action="store_true",
                   help="print a final machine-readable JSON line with the metrics")
    o.add_argument("--quiet", action="store_true",
                   help="no progress display and no evaluation lines on stderr")


def check_flag(name: str, value: float | None, minimum: float = 1) -> None:
    """A command-line number that must be at least ``minimum`` (None: not given)."""
    if value is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")


def check_flags(args: argparse.Namespace, *names: str, minimum: float = 1) -> None:
    """check_flag for each attribute of ``args`` in ``names`` (``eval_every`` is
    ``--eval-every``)."""
    for name in names:
        check_flag(f"--{name.replace('_', '-')}", getattr(args, name), minimum)


def check_interval(name: str, value: float, low: float, high: float) -> None:
    """A command-line number strictly between ``low`` and ``high`` (NaN fails too)."""
    if not low < value < high:
        raise InputError(f"{name} must lie in ({low:g}, {high:g}), got {value}")


def check_shared_flags(args: argparse.Namespace) -> None:
    """The flags of ``add_shared_flags`` and --batch (which each command defines), and the
    upper bound on every integer flag; each command checks its own. --max-minutes 0 (or
    less) becomes None: no limit."""
    for name, value in vars(args).items():
        if type(value) is int and name != "seed" and value > MAX_INT_FLAG:
            raise InputError(f"--{name.replace('_', '-')} must be <= {MAX_INT_FLAG}, got {value}")
    check_flags(args, "hidden", "layers", "epochs", "batch", "threads", "steps", "patience",
                "eval_every")
    check_flag("--seed", args.seed, 0)
    for name in ("lr", "clip"):
        if not 0 <= getattr(args, name) < math.inf:  # NaN fails too
            raise InputError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if args.max_minutes is not None and math.isnan(args.max_minutes):
        raise InputError("--max-minutes must be a number (0 for no limit), got nan")
    if args.max_minutes is not None and args.max_minutes <= 0:
        args.max_minutes = None


def check_train_size(args: argparse.Namespace) -> None:
    """--train-size holds at least one --batch (the commands that generate their data)."""
    if args.train_size < args.batch:
        raise InputError(f"--train-size ({args.train_size}) must be >= --batch ({args.batch})")


# ---------------------------------------------------------------- running

@contextlib.contextmanager
def progress_stream(quiet: bool) -> Iterator[TextIO]:
    """Where progress and evaluation lines go: stderr, or with --quiet the null device
    (opened here and closed on the way out)."""
    if not quiet:
        yield sys.stderr
        return
    with open(os.devnull, "w") as null:
        yield null


def once_per_step(report: Callable[[dict], Any]) -> Callable[[dict], None]:
    """``report(record)`` at most once per step: an epoch that ends on an --eval-every
    step is evaluated twice there."""
    seen = set()

    def report_once(record):
        if record["step"] not in seen:
            seen.add(record["step"])
            report(record)
    return report_once


def fit_from_flags(task: Any, optimizer: Any, args: argparse.Namespace, *,
                   max_minutes: float | None,
                   paths: Callable[[Any], Any] = lambda path: path, **kw: Any) -> Any:
    """``rnnfuse.train.fit`` driven by the shared flags: epochs, clip, patience, eval_every,
    steps, save/resume/metrics/plot (each passed through ``paths``, e.g. to give each of
    several models its own file) and quiet; ``max_minutes`` is the command's resolved time
    budget (None: no limit). Other fit() arguments in ``kw``."""
    from ..train import fit
    return fit(task, optimizer, epochs=args.epochs, clip=args.clip or None,
               patience=args.patience, eval_every=args.eval_every, max_steps=args.steps,
               max_seconds=None if max_minutes is None else max_minutes * 60,
               metrics=paths(args.metrics), save=paths(args.save), resume=paths(args.resume),
               plot=paths(args.plot), progress=not args.quiet, **kw)


# ---------------------------------------------------------------- the final-state readout

class FinalState(Sequential):
    """A recurrent stack whose final hidden state (of the top layer; forward and reverse
    directions concatenated when bidirectional) feeds a Linear head.

    ``forward(x (T, B, F)) -> (B, out)``; ``backward(dout)`` adds the parameter gradients.
    Parameters are named as in ``Sequential(rnn, linear)``."""

    stateful = False

    def __init__(self, cell, input_size, hidden, layers, out, bidirectional=False,
                 dropout=0.0, seed=0, dtype=np.float32):
        ss = np.random.SeedSequence(seed).spawn(2)
        rnn = CELLS[cell](input_size, hidden, num_layers=layers, bidirectional=bidirectional,
                          dropout=dropout, dtype=dtype, seed=np.random.default_rng(ss[0]))
        head = Linear(rnn.num_directions * hidden, out, dtype=dtype,
                      seed=np.random.default_rng(ss[1]))
        super().__init__(rnn, head)

    def forward(self, x):
        rnn, head = self.layers
        y, _ = rnn.forward(x)
        H = rnn.hidden_size
        feat = y[-1, :, :H]
        if rnn.bidirectional:  # the reverse direction ends at t = 0
            feat = np.concatenate([feat, y[0, :, H:]], axis=1)
        self._shape = y.shape
        return head.forward(np.ascontiguousarray(feat))

    def backward(self, dout):
        rnn, head = self.layers
        dfeat = head.backward(dout)
        H = rnn.hidden_size
        dy = np.zeros(self._shape, dtype=dfeat.dtype)
        dy[-1, :, :H] = dfeat[:, :H]
        if rnn.bidirectional:
            dy[0, :, H:] = dfeat[:, H:]
        rnn.backward(dy)
