"""``python -m rnnfuse memory``: the adding problem (Hochreiter & Schmidhuber 1997).

Each sequence is (T, 2): a value channel uniform in [0, 1] and a marker channel that is 1
at exactly two steps, one in each half. The target is the sum of the two marked values,
predicted from the recurrent stack's final hidden state through a Linear (MSE loss).
Predicting 1.0 always scores MSE 1/6 ~ 0.167; a model that carries the first marked
value across ~T/2 steps does far better. The command trains LSTM, GRU and the tanh RNN
with the same hidden size, steps and optimizer and reports each one's held-out MSE, to
show the plain RNN's vanishing gradient. ``--cell`` given explicitly trains that cell only.

With several cells, the --save/--resume/--metrics/--plot paths get the cell name inserted
before their extension (``ck.rnnf`` -> ``ck.lstm.rnnf``); ``--max-minutes`` is the total
budget, split evenly across the cells; ``--steps`` (default 3000) applies to each cell.
"""
import argparse
import json
import os

import numpy as np

from ..data import PairBatches
from ..layers import Linear, Sequential
from ..losses import mse_loss
from .common import (CELLS, add_shared_flags, check_flags, check_shared_flags,
                     check_train_size, fit_from_flags, once_per_step, progress_stream)

__all__ = ["add_parser", "run", "adding_problem", "AddingTask"]

BASELINE = 1.0  # the trivial prediction; its expected MSE is Var(u1 + u2) = 1/6


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("memory", help="the adding problem: LSTM vs GRU vs tanh RNN",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--length", type=int, default=100,
                   help="sequence length T (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch "
                   "(default: %(default)s)")
    p.add_argument("--train-size", type=int, default=64_000,
                   help="training sequences (default: %(default)s)")
    p.add_argument("--heldout-size", type=int, default=2000,
                   help="held-out sequences (default: %(default)s)")
    add_shared_flags(p, hidden=64, layers=1, epochs=100)
    # cell None: all three; steps is per cell, max_minutes the total
    p.set_defaults(cell=None, steps=3000, max_minutes=5.0, eval_every=500, lr=2e-3)
    return p


def adding_problem(n, length, rng, dtype=np.float32):
    """``(x (length, n, 2), y (n, 1))``: values, markers (one in each half) and their sums."""
    half = length // 2
    x = np.zeros((length, n, 2), dtype)
    x[:, :, 0] = rng.random((length, n))
    a = rng.integers(0, half, n)
    b = rng.integers(half, length, n)
    cols = np.arange(n)
    x[a, cols, 1] = 1
    x[b, cols, 1] = 1
    y = (x[a, cols, 0] + x[b, cols, 0]).astype(dtype)[:, None]
    return x, y


class AddingTask:
    """Recurrent stack -> final hidden state -> Linear(hidden, 1); MSE.

    ``train`` and ``heldout`` are ``adding_problem``'s ``(x (T, N, 2), y (N, 1))``; the
    training batches are drawn from ``rng`` (train.fit saves and restores it)."""

    def __init__(self, cell, hidden, layers, train, heldout, batch, rng, seed=0):
        r1, r2 = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        self.rnn = CELLS[cell](2, hidden, num_layers=layers, seed=r1)
        self.head = Linear(hidden, 1, seed=r2)
        self.model = Sequential(self.rnn, self.head)  # the parameter container
        x, y = train
        self.data = PairBatches(x.swapaxes(0, 1), y, batch, rng=rng, drop_last=True)
        self.heldout = heldout

    def predict(self, x):
        y, _ = self.rnn.forward(x)
        return self.head.forward(y[-1])  # the top layer's last hidden state

    def train_step(self, batch):
        x, target = batch
        pred = self.predict(x)
        loss, dpred = mse_loss(pred, target)
        dy = np.zeros((x.shape[0],) + pred.shape[:1] + (self.rnn.hidden_size,), pred.dtype)
        dy[-1] = self.head.backward(dpred)
        self.rnn.backward(dy)
        return float(loss) * len(target), len(target)

    def evaluate(self):
        x, target = self.heldout
        sq = 0.0
        for i in range(0, x.shape[1], 500):
            sq += float(np.square(self.predict(x[:, i:i + 500]).astype(np.float64)
                                  - target[i:i + 500]).sum())
        mse = sq / len(target)
        return {"loss": mse, "mse": mse}


def _suffixed(path, cell, many):
    if path is None or not many or os.path.isdir(path):  # a directory: fit() refuses it
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{cell}{ext}"


def _check(args):
    check_shared_flags(args)
    check_flags(args, "length", minimum=2)
    check_train_size(args)
    check_flags(args, "heldout_size")


def _train_cell(cell, args, train_set, heldout, baseline, out, n_cells):
    """Train one of ``n_cells`` cells as the flags say; its results for the report."""
    from .. import optim

    rng = np.random.default_rng(args.seed)
    task = AddingTask(cell, args.hidden, args.layers, train_set, heldout, args.batch, rng,
                      seed=args.seed)
    opt = optim.Adam(task.model.named_parameters(), lr=args.lr)
    config = {"task": "memory", "cell": cell, "hidden": args.hidden, "layers": args.layers,
              "length": args.length, "batch": args.batch, "train_size": args.train_size}

    def report(rec):
        print(f"eval  {cell:4s} step {rec['step']}: held-out MSE {rec['mse']:.5f} "
              f"(baseline {baseline:.4f}), {rec['seq_per_s']:,.0f} seq/s, "
              f"{rec['elapsed_s']:.0f} s", file=out, flush=True)

    share = None if args.max_minutes is None else args.max_minutes / n_cells
    many = n_cells > 1
    res = fit_from_flags(task, opt, args, max_minutes=share,
                         paths=lambda path: _suffixed(path, cell, many), rng=rng, unit="seq",
                         stream=out, config=config, on_eval=once_per_step(report))
    return {"mse": res.last["mse"], "best_mse": res.best["mse"], "steps": res.step,
            "stopped": res.stopped, "elapsed_s": round(res.elapsed_s, 3)}


def run(args: argparse.Namespace) -> int:
    """The command: train the cells, print their held-out MSE. Returns the exit status."""
    from threadpoolctl import threadpool_limits

    _check(args)
    cells = tuple(CELLS) if args.cell is None else (args.cell,)
    data_rng = np.random.default_rng([args.seed, 1])
    train_set = adding_problem(args.train_size, args.length, data_rng)
    heldout = adding_problem(args.heldout_size, args.length, data_rng)
    baseline = float(np.mean(np.square(heldout[1].astype(np.float64) - BASELINE)))
    with progress_stream(args.quiet) as out, threadpool_limits(limits=args.threads):
        print(f"memory: adding problem, length {args.length}, {args.train_size:,} training / "
              f"{args.heldout_size:,} held-out sequences; baseline (always {BASELINE}) MSE "
              f"{baseline:.4f}", file=out)
        results = {cell: _train_cell(cell, args, train_set, heldout, baseline, out,
                                     len(cells)) for cell in cells}

    parts = ", ".join(f"{c.upper()} {r['mse']:.4f}" for c, r in results.items())
    print(f"held-out MSE at length {args.length}: {parts} (baseline {baseline:.4f}); "
          + ", ".join(f"{c} {r['steps']} steps {r['elapsed_s']:.0f} s"
                      for c, r in results.items()))
    if args.json:
        print(json.dumps({"command": "memory", "length": args.length, "baseline_mse": baseline,
                          "cells": results, "hidden": args.hidden, "layers": args.layers,
                          "batch": args.batch, "lr": args.lr, "seed": args.seed}))
    return 0
