"""Tasks for ``rnnfuse.train.fit``: data, model and step of each command-line job.

charlm: a character-level language model (Embedding -> LSTM/GRU/RNN stack -> Linear)
trained with truncated backpropagation through time on one text (a file, or by default a
seeded selection of the Python standard library's own ``.py`` sources, read at run time).
"""
import math
import os
import sysconfig

import numpy as np

from .layers import GRU, LSTM, RNN, Embedding, Linear, Sequential
from .losses import cross_entropy

__all__ = ["InputError", "check_flag", "check_shared_flags", "read_text", "stdlib_corpus",
           "Vocab", "StreamWindows", "CharLM"]

LN2 = math.log(2.0)


class InputError(ValueError):
    """Bad user input (a missing, empty or undecodable text); the message is one line."""


# ---------------------------------------------------------------- corpora

def check_flag(name, value, minimum=1):
    """A command-line number that must be at least ``minimum`` (None: not given)."""
    if value is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")


# The most any integer flag may be (the seed excepted): far past what fits in memory, and
# short of sizes NumPy cannot even express as a shape.
MAX_INT_FLAG = 2**31 - 1


def check_shared_flags(args):
    """The flags every training command takes (``rnnfuse.__main__._add_shared``, and
    --batch, which each defines), and the upper bound on all its integer flags; each
    command checks its own. --max-minutes 0 (or less) becomes None: no limit."""
    for name, value in vars(args).items():
        if type(value) is int and name != "seed" and value > MAX_INT_FLAG:
            raise InputError(f"--{name.replace('_', '-')} must be <= {MAX_INT_FLAG}, got {value}")
    for name in ("hidden", "layers", "epochs", "batch", "threads", "steps", "patience",
                 "eval_every"):
        check_flag(f"--{name.replace('_', '-')}", getattr(args, name))
    check_flag("--seed", args.seed, 0)
    for name in ("lr", "clip"):
        if not 0 <= getattr(args, name) < math.inf:  # NaN fails too
            raise InputError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if args.max_minutes is not None and math.isnan(args.max_minutes):
        raise InputError("--max-minutes must be a number (0 for no limit), got nan")
    if args.max_minutes is not None and args.max_minutes <= 0:
        args.max_minutes = None


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

_CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def char_model(vocab_size, cell="lstm", hidden=256, layers=1, embed=64, seed=0,
               dtype=np.float32):
    ss = np.random.SeedSequence(seed).spawn(3)
    rngs = [np.random.default_rng(s) for s in ss]
    return Sequential(Embedding(vocab_size, embed, dtype=dtype, seed=rngs[0]),
                      _CELLS[cell](embed, hidden, num_layers=layers, dtype=dtype, seed=rngs[1]),
                      Linear(hidden, vocab_size, dtype=dtype, seed=rngs[2]))


class CharLM:
    """The charlm task: train on ``train_ids`` with carried state, evaluate bits per char
    on ``heldout_ids`` (forward only, state carried over windows of ``eval_k`` steps)."""

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

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, sd):
        self.state = None if not isinstance(sd, dict) else sd.get("state")
        if isinstance(self.state, list):
            self.state = [tuple(s) if isinstance(s, list) else s for s in self.state]

    def sample(self, vocab, prime="", length=300, temperature=1.0, rng=None):
        """Generated text: ``prime`` then ``length`` characters drawn at ``temperature``
        (0: greedy)."""
        rng = np.random.default_rng() if rng is None else rng
        self.model.eval()
        ids = vocab.encode(prime) if prime else np.array([vocab.encode("\n")[0]])
        logits, state = self.model.forward(ids[:, None], None)
        out = []
        last = logits[-1, 0].astype(np.float64)
        for _ in range(length):
            with np.errstate(over="ignore"):
                z = last / temperature if temperature > 0 else last
            if temperature <= 0 or not np.isfinite(z).all():  # greedy: the limit of a tiny
                # temperature (whose z overflows), and the only choice with NaN logits
                nxt = int(np.argmax(last))
            else:
                p = np.exp(z - z.max())
                p /= p.sum()
                nxt = int(rng.choice(len(p), p=p))
            out.append(nxt)
            logits, state = self.model.forward(np.array([[nxt]]), state)
            last = logits[-1, 0].astype(np.float64)
        self.model.train()
        return prime + vocab.decode(out)
