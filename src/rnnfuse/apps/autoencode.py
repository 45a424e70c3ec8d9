"""``python -m rnnfuse autoencode``: a sequence autoencoder on random token sequences.

An encoder (LSTM/GRU/RNN stack over one-hot tokens) reads a random sequence; its final
state is the only thing the decoder (a stack of the same cell and size) starts from. The
decoder's input at step t is the previous token (a start token at t = 0): the true one
while training (teacher forcing), its own greedy prediction at evaluation. A Linear maps
the decoder's output to the token logits (cross-entropy). The command reports the
held-out token accuracy of greedy reconstruction (chance: 1/vocab) and the fraction of
sequences reconstructed exactly.
"""
import argparse
import json

import numpy as np

from ..data import PairBatches
from ..layers import Linear, Sequential
from ..losses import cross_entropy
from .common import (CELLS, add_shared_flags, check_flags, check_shared_flags,
                     check_train_size, fit_from_flags, once_per_step, progress_stream)

__all__ = ["add_parser", "run", "AutoencodeTask"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("autoencode", help="sequence autoencoder on random token sequences",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--length", type=int, default=10,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=10, help="distinct tokens (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch "
                   "(default: %(default)s)")
    p.add_argument("--train-size", type=int, default=200_000,
                   help="training sequences (default: %(default)s)")
    p.add_argument("--heldout-size", type=int, default=2000,
                   help="held-out sequences (default: %(default)s)")
    add_shared_flags(p, hidden=128, layers=1, epochs=100)
    p.set_defaults(steps=5000, max_minutes=4.0, eval_every=500)
    return p


def _onehot(ids, n, dtype=np.float32):
    out = np.zeros(ids.shape + (n,), dtype)
    np.put_along_axis(out, ids[..., None], 1, axis=-1)
    return out


class AutoencodeTask:
    """Encoder -> final state -> decoder (teacher forcing) -> Linear; token cross-entropy.

    ``train_ids`` and ``heldout_ids`` are ``(T, N)`` token ids in ``[0, vocab)``; the
    training batches are drawn from ``rng`` (train.fit saves and restores it)."""

    def __init__(self, cell, hidden, layers, vocab, train_ids, heldout_ids, batch, rng, seed=0):
        r = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
        self.vocab = vocab
        self.enc = CELLS[cell](vocab, hidden, num_layers=layers, seed=r[0])
        self.dec = CELLS[cell](vocab + 1, hidden, num_layers=layers, seed=r[1])
        self.head = Linear(hidden, vocab, seed=r[2])
        self.model = Sequential(self.enc, self.dec, self.head)  # the parameter container
        # batches (x (T, B), target): an autoencoder's target is its input
        self.data = PairBatches(train_ids.T, train_ids.T, batch, rng=rng, drop_last=True)
        self.heldout = heldout_ids

    def _decoder_input(self, ids):
        start = np.full((1, ids.shape[1]), self.vocab, ids.dtype)  # the start token
        return _onehot(np.concatenate([start, ids[:-1]]), self.vocab + 1)

    def train_step(self, batch):
        x, _ = batch
        _, state = self.enc.forward(_onehot(x, self.vocab))
        y, _ = self.dec.forward(self._decoder_input(x), state)
        loss, dlogits = cross_entropy(self.head.forward(y), x)
        _, dstate = self.dec.backward(self.head.backward(dlogits))
        self.enc.backward(None, dstate)
        return float(loss) * x.size, x.size

    def reconstruct(self, x):
        """Greedy decoding of ``x`` (T, B) from the encoder's final state: the decoder
        stepped as a stream (its state kept between steps), fed its own last token."""
        _, state = self.enc.forward(_onehot(x, self.vocab))
        decoder = self.dec.stream(x.shape[1], state)
        tok = np.full(x.shape[1], self.vocab, np.int64)
        out = np.empty_like(x)
        for t in range(x.shape[0]):
            y = decoder.step(_onehot(tok, self.vocab + 1))
            tok = np.argmax(self.head.forward(y), axis=-1)
            out[t] = tok
        return out

    def evaluate(self):
        x = self.heldout
        _, state = self.enc.forward(_onehot(x, self.vocab))
        y, _ = self.dec.forward(self._decoder_input(x), state)
        loss, _ = cross_entropy(self.head.forward(y), x)  # teacher-forced
        ok = self.reconstruct(x) == x
        return {"loss": float(loss), "token_accuracy": float(ok.mean()),
                "sequence_accuracy": float(ok.all(axis=0).mean())}


def _check(args):
    check_shared_flags(args)
    check_flags(args, "length", "heldout_size")
    check_flags(args, "vocab", minimum=2)
    check_train_size(args)


def _report(out):
    def report(rec):
        print(f"eval  step {rec['step']}: held-out token accuracy {rec['token_accuracy']:.4f}, "
              f"sequences {rec['sequence_accuracy']:.4f}, loss {rec['loss']:.4f}, "
              f"{rec['tok_per_s']:,.0f} tok/s, {rec['elapsed_s']:.0f} s", file=out, flush=True)
    return once_per_step(report)


def run(args: argparse.Namespace) -> int:
    """The command: train the autoencoder, print its held-out greedy reconstruction.
    Returns the exit status."""
    from threadpoolctl import threadpool_limits

    from .. import optim

    _check(args)
    data_rng = np.random.default_rng([args.seed, 2])
    train_ids = data_rng.integers(0, args.vocab, (args.length, args.train_size))
    heldout = data_rng.integers(0, args.vocab, (args.length, args.heldout_size))
    chance = 1.0 / args.vocab
    rng = np.random.default_rng(args.seed)
    task = AutoencodeTask(args.cell, args.hidden, args.layers, args.vocab, train_ids, heldout,
                          args.batch, rng, seed=args.seed)
    opt = optim.Adam(task.model.named_parameters(), lr=args.lr)
    config = {"task": "autoencode", "cell": args.cell, "hidden": args.hidden,
              "layers": args.layers, "length": args.length, "vocab": args.vocab,
              "batch": args.batch, "train_size": args.train_size}
    with progress_stream(args.quiet) as out, threadpool_limits(limits=args.threads):
        print(f"autoencode: {args.cell}, length {args.length}, vocabulary {args.vocab}, "
              f"{args.train_size:,} training / {args.heldout_size:,} held-out sequences; "
              f"chance accuracy {chance:.3f}", file=out)
        res = fit_from_flags(task, opt, args, max_minutes=args.max_minutes, rng=rng,
                             unit="tok", stream=out, config=config, on_eval=_report(out))
    last = res.last
    print(f"held-out greedy reconstruction: token accuracy {last['token_accuracy']:.4f} "
          f"(chance {chance:.3f}), sequences exact {last['sequence_accuracy']:.4f}, "
          f"after {res.step} steps, {res.elapsed_s:.0f} s ({res.stopped})")
    if args.json:
        print(json.dumps({"command": "autoencode", "token_accuracy": last["token_accuracy"],
                          "sequence_accuracy": last["sequence_accuracy"],
                          "loss": last["loss"], "chance_accuracy": chance,
                          "steps": res.step, "epochs": res.epoch, "stopped": res.stopped,
                          "elapsed_s": round(res.elapsed_s, 3), **config, "lr": args.lr,
                          "seed": args.seed}))
    return 0
