"""``python -m rnnfuse charlm``: a character-level language model.

Embedding -> LSTM/GRU/RNN stack -> Linear, trained with truncated backpropagation through
time on one text (a file, or by default a seeded selection of the Python standard
library's own ``.py`` sources, read at run time); reports held-out bits per character
beside the unigram baseline and prints a sample.
"""
import argparse
import json
import math
import os
import sys
import sysconfig

import numpy as np

from ..layers import Embedding, Linear, Sequential
from ..losses import cross_entropy
from .common import (CELLS, InputError, add_shared_flags, check_flag, check_flags,
                     check_interval, check_shared_flags, fit_from_flags, progress_stream)

__all__ = ["add_parser", "run", "read_text", "stdlib_corpus", "Vocab", "unigram_bits",
           "StreamWindows", "char_model", "CharLM"]

LN2 = math.log(2.0)


# ---------------------------------------------------------------- corpora

def read_text(path):
    """The UTF-8 text of ``path``; InputError if it is missing, unreadable, empty or not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"text path is a directory, not a file: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read text file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"text file is not valid UTF-8: {path} (byte {e.start}: "
                         f"{raw[e.start:e.start + 1]!r})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if len(text) < 3:
        raise InputError(f"text file is empty or too short to train on "
                         f"({len(text)} characters): {path}")
    return text


def stdlib_corpus(max_chars=3_000_000, seed=0):
    """A deterministic, seeded selection of the standard library's ``.py`` files.

    Files under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded), sorted by
    relative path, shuffled with ``seed``, taken in that order while the total stays
    within ``max_chars``. Returns ``(list of texts, list of relative paths)``.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages",
                                                       "__pycache__"))
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise InputError(f"no .py files found under the standard library at {root}; "
                         "give a text file with --text")
    order = np.random.default_rng(seed).permutation(len(files))
    texts, names, total = [], [], 0
    for i in order:
        try:
            with open(os.path.join(root, files[i]), "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text or total + len(text) > max_chars:
            continue
        texts.append(text)
        names.append(files[i])
        total += len(text)
        if total >= max_chars * 0.99:
            break
    return texts, names


class Vocab:
    """Characters <-> ids: the characters of the training text seen at least ``min_count``
    times, plus id 0 for every other character (unknown)."""

    def __init__(self, text, min_count=1):
        chars, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32),
                                  return_counts=True)
        keep = chars[counts >= min_count]
        self.codes = keep                                   # code points of ids 1..
        self.size = len(keep) + 1

    def encode(self, text):
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        idx = np.searchsorted(self.codes, cps)
        idx = np.minimum(idx, len(self.codes) - 1)
        return np.where(self.codes[idx] == cps, idx + 1, 0).astype(np.int64)

    def decode(self, ids):
        return "".join("\ufffd" if i == 0 else chr(int(self.codes[i - 1])) for i in ids)

    def state_dict(self):
        return {"codes": self.codes.astype(np.int64)}


def unigram_bits(train_ids, heldout_ids, size):
    """(entropy of the training character distribution, its cross-entropy on the held-out
    ids), both in bits per character; add-one smoothing so every id has a probability."""
    counts = np.bincount(train_ids, minlength=size).astype(np.float64)
    p_train = counts / counts.sum()
    nz = p_train > 0
    entropy = float(-(p_train[nz] * np.log2(p_train[nz])).sum())
    smooth = (counts + 1) / (counts.sum() + size)
    cross = float(-np.log2(smooth[heldout_ids]).mean())
    return entropy, cross


# ---------------------------------------------------------------- data

class StreamWindows:
    """TBPTT windows over one id stream, BatchIterator's epoch protocol.

    The stream is cut into ``batch_size`` contiguous rows (the tail that does not fill a
    row is dropped); window i is steps ``[i*k, (i+1)*k)`` of every row, as
    ``(x (k, B) int64, y (k, B) int64)`` with y the next character. Each epoch starts at a
    random offset in ``[0, k)`` (drawn from ``rng``), so window boundaries move between
    epochs. ``state_dict()`` holds the epoch, position and the offset of the open epoch.
    """

    def __init__(self, ids, k, batch_size, rng):
        self.ids, self.k, self.batch_size, self.rng = ids, int(k), int(batch_size), rng
        self.row = (len(ids) - 1) // self.batch_size
        if self.row < 2:
            raise InputError(f"the training text is too short for batch size {batch_size} "
                             f"({len(ids)} characters); give a longer text or a smaller --batch")
        self.epoch, self._pos, self._offset = 0, 0, None

    def __len__(self):
        return max(1, -(-(self.row - self.k) // self.k))  # windows per epoch (worst offset)

    def _rows(self, offset):
        n = (self.row - offset) if self.row - offset >= 2 else self.row
        off = offset if self.row - offset >= 2 else 0
        starts = np.arange(self.batch_size) * self.row + off
        return starts, n

    def __iter__(self):
        if self._offset is None:
            self._offset = int(self.rng.integers(0, min(self.k, self.row - 1)))
            self._pos = 0
        starts, n = self._rows(self._offset)
        nwin = -(-(n - 1) // self.k)
        while self._pos < nwin:
            a = self._pos * self.k
            t = min(self.k, n - 1 - a)
            idx = starts[None, :] + a + np.arange(t)[:, None]
            self._pos += 1
            yield self.ids[idx], self.ids[idx + 1]
        self._offset, self.epoch = None, self.epoch + 1

    def state_dict(self):
        return {"epoch": self.epoch, "position": self._pos,
                "offset": -1 if self._offset is None else self._offset}

    def load_state_dict(self, sd):
        if not isinstance(sd, dict) or set(sd) != {"epoch", "position", "offset"}:
            raise ValueError("data state must have keys ['epoch', 'offset', 'position']")
        self.epoch, self._pos = int(sd["epoch"]), int(sd["position"])
        self._offset = None if sd["offset"] < 0 else int(sd["offset"])


# ---------------------------------------------------------------- the model and task

def char_model(vocab_size, cell="lstm", hidden=256, layers=1, embed=64, seed=0,
               dtype=np.float32):
    ss = np.random.SeedSequence(seed).spawn(3)
    rngs = [np.random.default_rng(s) for s in ss]
    return Sequential(Embedding(vocab_size, embed, dtype=dtype, seed=rngs[0]),
                      CELLS[cell](embed, hidden, num_layers=layers, dtype=dtype, seed=rngs[1]),
                      Linear(hidden, vocab_size, dtype=dtype, seed=rngs[2]))


class CharLM:
    """The charlm task: train on ``train_ids`` with carried state, evaluate bits per char
    on ``heldout_ids`` (forward only, state carried over windows of ``eval_k`` steps).
    ``model`` is ``char_model``'s Sequential(Embedding, recurrent stack, Linear)."""

    def __init__(self, model, train_ids, heldout_ids, k, batch_size, rng, eval_batch=64,
                 eval_k=256):
        self.model = model
        self.data = StreamWindows(train_ids, k, batch_size, rng)
        self.heldout = heldout_ids
        self.eval_batch, self.eval_k = eval_batch, eval_k
        self.state = None

    def start_epoch(self):
        self.state = None

    def train_step(self, batch):
        x, y = batch
        logits, self.state = self.model.forward(x, self.state)
        loss, dlogits = cross_entropy(logits, y)
        self.model.backward(dlogits)  # no gradient crosses the window boundary
        return float(loss) * y.size, y.size

    def evaluate(self):
        ids = self.heldout
        B = max(1, min(self.eval_batch, (len(ids) - 1) // 8))
        row = (len(ids) - 1) // B
        starts = np.arange(B) * row
        state, nll, n = None, 0.0, 0
        for a in range(0, row, self.eval_k):
            t = min(self.eval_k, row - a)
            idx = starts[None, :] + a + np.arange(t)[:, None]
            logits, state = self.model.forward(ids[idx], state)
            loss, _ = cross_entropy(logits, ids[idx + 1], reduction="sum")
            nll += float(loss)
            n += idx.size
        loss = nll / max(n, 1)
        return {"loss": loss, "bpc": loss / LN2, "heldout_chars": n}

    def quantized_bpc(self):
        """Held-out bits per char in eval mode: (float32, with the recurrent stack's
        weights in int8 (layer.quantized())). The model is left in the mode it was in."""
        embed, rnn, head = self.model.layers
        model, was_training = self.model, self.model.training
        try:
            model.eval()
            float32 = self.evaluate()["bpc"]
            self.model = Sequential(embed, rnn.quantized(), head).eval()
            int8 = self.evaluate()["bpc"]
        finally:
            self.model = model
            model.train(was_training)
        return float32, int8

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, sd):
        self.state = None if not isinstance(sd, dict) else sd.get("state")
        if isinstance(self.state, list):
            self.state = [tuple(s) if isinstance(s, list) else s for s in self.state]

    def sample(self, vocab, prime="", length=300, temperature=1.0, rng=None):
        """Generated text: ``prime`` then ``length`` characters drawn at ``temperature``
        (0: greedy). The prime runs through the model in eval mode; then each character
        is one step of a stream of the recurrent stack (its state kept between steps).
        The model is left in the mode it was in."""
        rng = np.random.default_rng() if rng is None else rng
        embed, rnn, head = self.model.layers
        was_training = self.model.training
        self.model.eval()
        try:
            ids = vocab.encode(prime) if prime else np.array([vocab.encode("\n")[0]])
            logits, (state,) = self.model.forward(ids[:, None], None)
            stream, out = rnn.stream(1, state), []
            while len(out) < length:
                if out:  # a forward over one step, in its shapes (1, 1, ...): its numbers
                    logits = head.forward(stream.step(embed.forward(np.array([out[-1]])))[None])
                out.append(_draw(logits[-1, 0].astype(np.float64), temperature, rng))
        finally:
            self.model.train(was_training)
        return prime + vocab.decode(out)


def _draw(logits, temperature, rng):
    """The next id: drawn from softmax(logits / temperature), or the argmax."""
    with np.errstate(over="ignore"):
        z = logits / temperature if temperature > 0 else logits
    if temperature <= 0 or not np.isfinite(z).all():  # greedy: the limit of a tiny
        # temperature (whose z overflows), and the only choice with NaN logits
        return int(np.argmax(logits))
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


# ---------------------------------------------------------------- the command

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    c = sub.add_parser("charlm", help="train a character-level language model",
                       description="Character-level language model (Embedding -> recurrent "
                       "stack -> Linear) trained with truncated BPTT; reports held-out bits "
                       "per character beside the unigram baseline and prints a sample. "
                       "Without --text it trains on a seeded selection of the Python "
                       "standard library's .py sources.")
    c.add_argument("--text", metavar="FILE", help="UTF-8 training text (default: the Python "
                   "standard library's sources)")
    c.add_argument("--max-chars", type=int, default=3_000_000,
                   help="cap on the default corpus (default: %(default)s)")
    c.add_argument("--heldout", type=float, default=0.05,
                   help="fraction held out for evaluation (default: %(default)s)")
    c.add_argument("--bptt", type=int, default=64, help="TBPTT window k (default: %(default)s)")
    c.add_argument("--batch", type=int, default=64, help="rows per batch (default: %(default)s)")
    c.add_argument("--embed", type=int, default=64, help="embedding size (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 for greedy (default: %(default)s)")
    c.add_argument("--sample", type=int, default=300, metavar="N",
                   help="characters to generate after training, 0 for none (default: %(default)s)")
    c.add_argument("--prime", default="def ", help="text the sample starts from")
    c.add_argument("--quantize", action="store_true",
                   help="after training, also report held-out bits/char with the recurrent "
                        "weights in int8 (layer.quantized())")
    add_shared_flags(c, hidden=256, layers=1, epochs=20)
    c.set_defaults(max_minutes=4.0, eval_every=500)
    return c


def _check(args):
    check_shared_flags(args)
    check_flags(args, "bptt", "embed", "max_chars")
    check_flag("--sample", args.sample, 0)
    if not args.temperature >= 0:  # NaN fails too
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    check_interval("--heldout", args.heldout, 0, 0.5)


def _corpus(args):
    """(training text, held-out text, a description of the source): the held-out text is
    the last documents of the default corpus, or the tail of --text."""
    if args.text is not None:
        text = read_text(args.text)
        cut = int(len(text) * (1 - args.heldout))
        train_text, held_text, source = text[:cut], text[cut:], args.text
    else:
        docs, _ = stdlib_corpus(args.max_chars, seed=0)
        total, acc, cut = sum(map(len, docs)), 0, len(docs)
        for i, d in enumerate(docs):
            acc += len(d)
            if acc > total * (1 - args.heldout):
                cut = max(1, i)
                break
        train_text, held_text = "\n".join(docs[:cut]), "\n".join(docs[cut:])
        source = f"Python {sys.version.split()[0]} standard library ({len(docs)} files)"
    if len(held_text) < 2:
        raise InputError("the text is too short to hold out any of it for evaluation")
    return train_text, held_text, source


def run(args: argparse.Namespace) -> int:
    """The command: train, print held-out bits per character and a sample. Returns the exit
    status."""
    from threadpoolctl import threadpool_limits

    from .. import optim

    _check(args)
    with progress_stream(args.quiet) as out:
        train_text, held_text, source = _corpus(args)
        vocab = Vocab(train_text, min_count=1)
        train_ids, held_ids = vocab.encode(train_text), vocab.encode(held_text)
        entropy, unigram = unigram_bits(train_ids, held_ids, vocab.size)
        print(f"charlm: {source}: {len(train_ids):,} training / {len(held_ids):,} held-out "
              f"chars, vocabulary {vocab.size}", file=out)
        rng = np.random.default_rng(args.seed)
        model = char_model(vocab.size, args.cell, args.hidden, args.layers, args.embed,
                           seed=args.seed)
        opt = optim.Adam(model.named_parameters(), lr=args.lr)
        task = CharLM(model, train_ids, held_ids, args.bptt, args.batch, rng)
        config = {"task": "charlm", "cell": args.cell, "hidden": args.hidden,
                  "layers": args.layers, "embed": args.embed, "vocab": vocab.size,
                  "bptt": args.bptt, "batch": args.batch}

        def report(rec):
            print(f"eval  epoch {rec['epoch']} step {rec['step']}: held-out {rec['bpc']:.3f} "
                  f"bits/char (unigram {unigram:.3f}), {rec['tok_per_s']:,.0f} chars/s, "
                  f"{rec['elapsed_s']:.0f} s", file=out, flush=True)

        with threadpool_limits(limits=args.threads):
            result = fit_from_flags(task, opt, args, max_minutes=args.max_minutes, rng=rng,
                                    unit="tok", stream=out, config=config, on_eval=report)
            sample = (task.sample(vocab, args.prime, args.sample, args.temperature,
                                  np.random.default_rng(args.seed))
                      if args.sample > 0 else "")
            quantized = task.quantized_bpc() if args.quantize else None
    _print_result(args, result, sample, quantized, {
        "unigram_bpc": unigram, "train_entropy_bits": entropy,
        "train_chars": int(len(train_ids)), "heldout_chars": int(len(held_ids)),
        "vocab": vocab.size}, config)
    return 0


def _print_result(args, result, sample, quantized, data, config):
    last = result.last
    print(f"held-out bits/char: {last['bpc']:.4f} (unigram baseline {data['unigram_bpc']:.4f}; "
          f"training-text entropy {data['train_entropy_bits']:.4f}) after {result.step} "
          f"steps, {result.elapsed_s:.0f} s ({result.stopped})")
    if quantized:
        print(f"held-out bits/char, eval mode: float32 {quantized[0]:.4f}, int8 weights "
              f"{quantized[1]:.4f} (difference {quantized[1] - quantized[0]:+.4f})")
    if sample:
        print(f"--- sample (temperature {args.temperature}) ---")
        print(sample)
        print("---")
    if args.json:
        print(json.dumps({"command": "charlm", "bpc": last["bpc"], "best_bpc": result.best["bpc"],
                          "unigram_bpc": data["unigram_bpc"],
                          "train_entropy_bits": data["train_entropy_bits"],
                          "steps": result.step, "epochs": result.epoch,
                          "stopped": result.stopped, "elapsed_s": round(result.elapsed_s, 3),
                          "chars_per_s": last["tok_per_s"], "train_chars": data["train_chars"],
                          "heldout_chars": data["heldout_chars"], "vocab": data["vocab"],
                          **config, "cell": args.cell, "seed": args.seed,
                          **({"eval_bpc": quantized[0], "int8_bpc": quantized[1]}
                             if quantized else {})}))
