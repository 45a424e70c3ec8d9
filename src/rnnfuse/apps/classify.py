"""``python -m rnnfuse classify``: sequence classification from the final hidden state.

By default scikit-learn's bundled 8x8 handwritten digits (``load_digits``, no download),
each image read row by row as 8 steps of 8 features (pixel values / 16). Or ``--npz FILE``
with ``x`` (N, T, F) numbers and ``y`` (N,) integer labels. A recurrent stack
(``--bidirectional`` optional) -> final hidden state -> Linear -> cross-entropy over
(B, C); seeded, stratified train/test split; reports test accuracy.
"""
import argparse
import json

import numpy as np

from .._checks import first_line
from ..data import PairBatches
from .common import (FinalState, InputError, add_shared_flags, check_interval,
                     check_shared_flags, fit_from_flags, progress_stream)

__all__ = ["add_parser", "run", "load_npz", "Classify"]


def load_digits():
    """(x (1797, 8, 8) float32 in [0, 1], y (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise InputError("the default digits data needs scikit-learn: "
                         "pip install 'rnnfuse[examples]' (or give --npz FILE)") from None
    d = _load()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def load_npz(path):
    """x (N, T, F) float32 and y (N,) int64 from an .npz file; InputError when unusable."""
    import zipfile

    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy: one array, no names
            raise InputError(f"{path} is a .npy file, not an .npz holding x and y")
        with f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise InputError(f"{path} lacks array(s) {', '.join(missing)}; it holds "
                                 f"{', '.join(f.files) or 'nothing'}")
            x, y = f["x"], f["y"]
    except FileNotFoundError:
        raise InputError(f"npz file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"npz path is a directory, not a file: {path}") from None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # EOF: an empty file
        raise InputError(f"{path}: not a readable .npz file ({first_line(e)})") from None
    if x.ndim != 3 or x.dtype.kind not in "iuf" or 0 in x.shape:
        raise InputError(f"{path}: x must be numbers of shape (N, T, F), none of them 0, "
                         f"got {x.dtype} {x.shape}")
    if y.shape != x.shape[:1] or y.dtype.kind not in "iu" or (y.size and y.min() < 0):
        raise InputError(f"{path}: y must be {x.shape[0]} non-negative integer labels, "
                         f"got {y.dtype} {y.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{path}: x holds NaN or infinite values")
    return x.astype(np.float32), y.astype(np.int64)


def stratified_split(y, test, seed):
    """(train indices, test indices): ``test`` of each class (at least one where the class
    has two or more), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        te.append(idx[:k])
        tr.append(idx[k:])
    return rng.permutation(np.concatenate(tr)), np.sort(np.concatenate(te))


class Classify:
    """Train on (x, y) batches; evaluate test loss and accuracy."""

    def __init__(self, model, x_train, y_train, x_test, y_test, batch_size, seed,
                 eval_batch=1024):
        self.model = model
        self.data = PairBatches(x_train, y_train, batch_size, seed)
        self.x_test, self.y_test, self.eval_batch = x_test, y_test, eval_batch

    def train_step(self, batch):
        from ..losses import cross_entropy
        x, y = batch
        logits = self.model.forward(x)
        loss, dlogits = cross_entropy(logits, y)
        self.model.backward(dlogits)
        return float(loss) * len(y), len(y)

    def evaluate(self):
        from ..losses import cross_entropy
        nll, correct = 0.0, 0
        for a in range(0, len(self.x_test), self.eval_batch):
            x = np.ascontiguousarray(self.x_test[a:a + self.eval_batch].swapaxes(0, 1))
            y = self.y_test[a:a + self.eval_batch]
            logits = self.model.forward(x)
            nll += float(cross_entropy(logits, y, reduction="sum")[0])
            correct += int((logits.argmax(axis=1) == y).sum())
        n = max(len(self.y_test), 1)
        return {"loss": nll / n, "accuracy": correct / n}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "classify", help="classify sequences (default: 8x8 digits read row by row)",
        description="Sequence classification: recurrent stack -> final hidden state -> "
        "Linear, cross-entropy; seeded stratified train/test split; reports test accuracy. "
        "Default data: scikit-learn's bundled 8x8 digits, each read as 8 rows of 8 pixels "
        "(needs scikit-learn: pip install 'rnnfuse[examples]').")
    p.add_argument("--npz", metavar="FILE", help=".npz with x (N, T, F) and integer labels "
                   "y (N,) (default: the digits)")
    p.add_argument("--test", type=float, default=0.2,
                   help="fraction of each class held out for testing (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch "
                   "(default: %(default)s)")
    p.add_argument("--bidirectional", action="store_true",
                   help="run the stack in both directions")
    add_shared_flags(p, hidden=128, layers=1, epochs=60)
    p.set_defaults(max_minutes=4.0)
    return p


def _data(args):
    """(x, y, a description of where they come from)."""
    if args.npz is not None:
        x, y = load_npz(args.npz)
        return x, y, args.npz
    x, y = load_digits()
    return x, y, "scikit-learn digits (8 rows x 8 pixels)"


def run(args: argparse.Namespace) -> int:
    """The command: train on a stratified split, print the test accuracy. Returns the exit
    status."""
    from threadpoolctl import threadpool_limits

    from .. import optim

    check_shared_flags(args)
    check_interval("--test", args.test, 0, 1)
    x, y, source = _data(args)
    classes = int(y.max()) + 1 if len(y) else 0
    tr, te = stratified_split(y, args.test, args.seed)
    if len(tr) < 1 or len(te) < 1 or classes < 2:
        raise InputError(f"{source}: too few sequences ({len(y)}) or classes ({classes}) "
                         "to train and test on")
    majority = float(np.mean(y[te] == np.bincount(y[tr], minlength=classes).argmax()))
    model = FinalState(args.cell, x.shape[2], args.hidden, args.layers, classes,
                       bidirectional=args.bidirectional, seed=args.seed)
    opt = optim.Adam(model.named_parameters(), lr=args.lr)
    task = Classify(model, x[tr], y[tr], x[te], y[te], args.batch, args.seed)
    # cosine decay over the planned steps: a steadier final accuracy than a constant rate
    sched = optim.CosineAnnealingLR(opt, T_max=args.steps or args.epochs * len(task.data),
                                    eta_min=args.lr * 0.01)
    config = {"task": "classify", "cell": args.cell, "hidden": args.hidden,
              "layers": args.layers, "bidirectional": args.bidirectional,
              "batch": args.batch, "classes": classes, "source": source}
    with progress_stream(args.quiet) as out, threadpool_limits(limits=args.threads):
        print(f"classify: {source}: {len(tr)} training / {len(te)} test sequences of "
              f"{x.shape[1]} steps x {x.shape[2]} features, {classes} classes", file=out)

        def report(rec):
            print(f"eval  epoch {rec['epoch']} step {rec['step']}: test accuracy "
                  f"{rec['accuracy']:.4f}, loss {rec['loss']:.4f}, {rec['elapsed_s']:.0f} s",
                  file=out, flush=True)

        result = fit_from_flags(task, opt, args, max_minutes=args.max_minutes,
                                scheduler=sched, unit="seq", stream=out, config=config,
                                on_eval=report)
    acc = result.last["accuracy"]
    print(f"test accuracy: {acc:.4f} ({round(acc * len(te))}/{len(te)}; majority class "
          f"{majority:.4f}) after {result.step} steps, {result.elapsed_s:.0f} s "
          f"({result.stopped})")
    if args.json:
        print(json.dumps({"command": "classify", "accuracy": acc,
                          "loss": result.last["loss"],
                          "majority_accuracy": majority, "steps": result.step,
                          "epochs": result.epoch, "stopped": result.stopped,
                          "elapsed_s": round(result.elapsed_s, 3), "train_sequences": int(len(tr)),
                          "test_sequences": int(len(te)), **config, "seed": args.seed}))
    return 0
