"""Sequences for training: padding, bucketing, seeded mini-batches, truncated BPTT.

Time-major throughout, as the kernels: a batch of variable-length sequences is
``x (T, B, ...)`` plus ``lengths (B,)`` (int64), steps ``t >= lengths[b]`` being padding::

    x, lengths = pad_sequences([s0, s1, s2])                 # each s_i (L_i, ...)
    batches = bucket_by_length(lengths_of_all, batch_size=32)  # index arrays of similar lengths
    it = BatchIterator(seqs, labels, batch_size=32, shuffle=True, seed=0)
    for x, lengths, y in it: ...                               # one epoch per `for`
    for w in tbptt_windows(docs, k=35, batch_size=16): ...     # see tbptt_windows

Truncated backpropagation through time (TBPTT) with a stateful layer::

    state = None
    for w in tbptt_windows(inputs, k, batch_size, targets=targets):
        state = reset_state(state, w.reset)          # zero the rows that start a new sequence
        y, state = layer.forward(w.x, state, lengths=w.lengths)
        loss, dy = ...(y, w.y, lengths=w.lengths)
        layer.backward(dy, dstate=None)              # nothing flows in from the next window
        opt.step(layer.grads); layer.zero_grad()     # and the returned dstate is dropped

The state is plain NumPy arrays: window i+1 starts from window i's final state as a
*value*, and no gradient crosses the window boundary, because each backward is given
``dstate=None`` for its final state and the gradient it returns for its initial state is
discarded. A row whose sequence ends inside a window idles (length shorter than the window,
state carried unchanged through the padding), and starts its next sequence at the next
window with ``reset[b] = True``.
"""
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from ._checks import check_bool as _check_bool, check_int as _check_int, make_rng as _make_rng

__all__ = ["pad_sequences", "bucket_by_length", "BatchIterator", "PairBatches", "Window",
           "tbptt_windows", "reset_state"]

Seed = Union[int, np.random.Generator, None]
# a layer's state: an array, None (zeros), or a tuple or list of those, nested
State = Union[np.ndarray, tuple, list, None]


# ---------------------------------------------------------------- argument checks

def _sequence_list(name, seqs):
    """seqs as a list of arrays of rank >= 1 sharing their trailing shape."""
    if (isinstance(seqs, (np.ndarray, str, bytes)) or not isinstance(seqs, Sequence)):
        raise TypeError(f"{name} must be a list of arrays (one per sequence), "
                        f"got {type(seqs).__name__}")
    out: list[np.ndarray] = []
    for i, s in enumerate(seqs):
        if s is None or isinstance(s, (str, bytes, Mapping)):
            raise TypeError(f"{name}[{i}] must be an array, got {type(s).__name__}")
        try:
            a = np.asarray(s)
        except ValueError:  # ragged nested lists
            a = np.empty(0, dtype=object)
        if a.dtype == object:
            raise TypeError(f"{name}[{i}] must be a numeric array, got a ragged or object array")
        if a.dtype.kind not in "biufc":
            raise TypeError(f"{name}[{i}] must be a numeric array, got dtype {a.dtype}")
        if a.ndim == 0:
            raise ValueError(f"{name}[{i}] must have a time axis (shape (L, ...)), got a scalar")
        if out and a.shape[1:] != out[0].shape[1:]:
            raise ValueError(f"{name}[{i}] must have trailing shape {out[0].shape[1:]} "
                             f"(that of {name}[0]), got {a.shape[1:]}")
        out.append(a)
    return out


def _lengths_array(name: str, lengths: Any) -> np.ndarray:
    if not isinstance(lengths, np.ndarray):
        if lengths is None or isinstance(lengths, (str, bytes, Mapping)):
            raise TypeError(f"{name} must be a 1-D integer array, got {type(lengths).__name__}")
        lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {lengths.shape}")
    if lengths.dtype.kind not in "iu" and lengths.size:
        raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {lengths.min()}")
    return lengths


def _fill(padding_value, dtype):
    """padding_value as a 0-d array of dtype; ValueError where it cannot be stored
    (NaN in an integer dtype, -1 in an unsigned one, text in a numeric one)."""
    try:
        return np.array(padding_value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"padding_value {padding_value!r} cannot be stored "
                         f"in dtype {np.dtype(dtype)}") from None


# ---------------------------------------------------------------- padding and bucketing

def pad_sequences(seqs: Sequence[npt.ArrayLike], dtype: npt.DTypeLike | None = None,
                  padding_value: Any = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length sequences time-major, padding the ends.

    seqs : non-empty list of arrays, each ``(L_i, ...)`` with the same trailing shape
    dtype : the output dtype; None: NumPy's common dtype of the sequences
    padding_value : the value at padding steps
    Returns ``(padded, lengths)``: ``padded (T, B, ...)`` with ``T = max L_i`` and
    ``padded[:L_i, i] = seqs[i]``; ``lengths (B,)`` int64.
    """
    arrays = _sequence_list("seqs", seqs)
    if not arrays:
        raise ValueError("seqs must hold at least one sequence, got an empty list")
    if dtype is None:
        dtype = np.result_type(*arrays)
    else:
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a NumPy dtype or None, got {dtype!r}") from None
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    T = int(lengths.max())
    padded = np.full((T, len(arrays)) + arrays[0].shape[1:], _fill(padding_value, dtype),
                     dtype=dtype)
    for i, a in enumerate(arrays):
        padded[:len(a), i] = a
    return padded, lengths


def bucket_by_length(lengths: npt.ArrayLike, batch_size: int, *, shuffle: bool = False,
                     seed: Seed = None, drop_last: bool = False) -> list[np.ndarray]:
    """Group indices into batches of similar length (less padding per batch).

    lengths : (N,) integers >= 0, e.g. ``[len(s) for s in seqs]``
    batch_size : int >= 1
    shuffle : False: sort by length (stable) and cut into consecutive batches, shortest
        first. True: ties are broken at random and the order of the batches is shuffled
        (each batch still holds neighbours in length).
    seed : None, an int or a numpy Generator (used only with shuffle)
    drop_last : drop the last, smaller batch
    Returns a list of int64 index arrays, each of ``batch_size`` entries (the last may be
    shorter), together covering every index once (minus the dropped ones).
    """
    lens = _lengths_array("lengths", lengths)
    batch_size = _check_int("batch_size", batch_size, 1)
    shuffle = _check_bool("shuffle", shuffle)
    drop_last = _check_bool("drop_last", drop_last)
    if shuffle:
        rng = _make_rng(seed)
        perm = rng.permutation(len(lens))
        order = perm[np.argsort(lens[perm], kind="stable")]
    else:
        order = np.argsort(lens, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ---------------------------------------------------------------- mini-batches

class BatchIterator:
    """Seeded, resumable mini-batches over variable-length sequences and their targets.

    ``BatchIterator(seqs, *fields, batch_size, shuffle=True, seed=None, drop_last=False,
    bucket=False, dtype=None, padding_value=0)``

    seqs : list of N arrays ``(L_i, ...)`` (the inputs)
    fields : optional, each either an array ``(N, ...)`` (one target per sequence, e.g.
        class labels: batched as ``(B, ...)``) or a list of N arrays with the same lengths
        as ``seqs`` (per-step targets: padded like the inputs to ``(T, B, ...)``)
    shuffle : a fresh permutation each epoch, drawn from the seeded generator
    bucket : batches of similar length (see ``bucket_by_length``) instead of contiguous slices
    dtype, padding_value : as in ``pad_sequences``, for the inputs and per-step fields

    Each ``for`` loop over the iterator runs one epoch and yields
    ``(x (T, B, ...), lengths (B,), *fields)``. A loop that stops early leaves the epoch
    open: the next ``for`` continues it. ``state_dict()`` / ``load_state_dict()`` capture
    the position and the generator, so a restored iterator yields exactly the batches the
    original would have yielded next.
    """

    def __init__(self, seqs: Sequence[npt.ArrayLike], *fields: Any, batch_size: int,
                 shuffle: bool = True, seed: Seed = None, drop_last: bool = False,
                 bucket: bool = False, dtype: npt.DTypeLike | None = None,
                 padding_value: Any = 0) -> None:
        self.seqs = _sequence_list("seqs", seqs)
        n = len(self.seqs)
        if n == 0:
            raise ValueError("seqs must hold at least one sequence, got an empty list")
        lens = np.array([len(a) for a in self.seqs], dtype=np.int64)
        self.fields = []
        for j, f in enumerate(fields):
            name = f"fields[{j}]"
            if isinstance(f, np.ndarray):
                if f.ndim == 0 or len(f) != n:
                    raise ValueError(f"{name} must have one entry per sequence ({n}), "
                                     f"got shape {f.shape}")
                self.fields.append(("stack", f))
            else:
                f = _sequence_list(name, f)
                flens = np.array([len(a) for a in f], dtype=np.int64)
                if len(f) != n or not np.array_equal(flens, lens):
                    raise ValueError(f"{name} must be {n} sequences with the lengths of seqs")
                self.fields.append(("pad", f))
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.shuffle = _check_bool("shuffle", shuffle)
        self.drop_last = _check_bool("drop_last", drop_last)
        self.bucket = _check_bool("bucket", bucket)
        self.rng = _make_rng(seed)
        self.dtype, self.padding_value = dtype, padding_value
        pad_sequences(self.seqs[:1], dtype, padding_value)  # check dtype and padding_value now
        # ... in every dtype a batch can take, not only seqs[0]'s: a batch refused mid-epoch
        # would be lost, the position having moved past it
        padded = [f for kind, f in self.fields if kind == "pad"]
        for arrays in padded if dtype is not None else [self.seqs] + padded:
            for dt in {a.dtype for a in arrays}:
                _fill(padding_value, dt)
        self._lengths = lens
        self.epoch = 0          # completed epochs
        self._batches: Any = None  # the open epoch's index arrays, or None
        self._pos = 0           # batches of the open epoch already yielded
        self._epoch_rng: Mapping[str, Any] | None = None  # generator state before the open epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.seqs), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _plan(self):
        if self.bucket:
            return bucket_by_length(self._lengths, self.batch_size, shuffle=self.shuffle,
                                    seed=self.rng, drop_last=self.drop_last)
        n = len(self.seqs)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _open_epoch(self):
        self._epoch_rng = self.rng.bit_generator.state
        self._batches, self._pos = self._plan(), 0

    def batch(self, index: npt.ArrayLike) -> tuple[np.ndarray, ...]:
        """The batch ``(x, lengths, *fields)`` of these sequence indices."""
        index = np.asarray(index)
        x, lengths = pad_sequences([self.seqs[i] for i in index], self.dtype, self.padding_value)
        out = [x, lengths]
        for kind, f in self.fields:
            if kind == "stack":
                out.append(f[index])
            else:
                out.append(pad_sequences([f[i] for i in index], None, self.padding_value)[0])
        return tuple(out)

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        if self._batches is None:
            self._open_epoch()
        while self._pos < len(self._batches):
            index = self._batches[self._pos]
            self._pos += 1
            yield self.batch(index)
        self._batches, self.epoch = None, self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "rng"}``: completed epochs, batches yielded in the open
        epoch, and the generator's state before that epoch was drawn (or now, if none is open)."""
        open_ = self._batches is not None
        return {"epoch": self.epoch, "position": self._pos if open_ else 0,
                "rng": self._epoch_rng if open_ else self.rng.bit_generator.state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue where ``state_dict()`` was taken (same data, batch size and options)."""
        epoch, pos = _epoch_and_position(state_dict, ("epoch", "position", "rng"), len(self))
        _restore_rng(self.rng, state_dict["rng"])
        self.epoch, self._batches, self._pos = epoch, None, 0
        if pos > 0:
            self._open_epoch()
            self._pos = pos


def _epoch_and_position(state_dict, keys, batches):
    """The checked ``epoch`` and ``position`` of a batcher's state_dict with exactly
    ``keys``; the position is at most ``batches`` (per epoch)."""
    if not isinstance(state_dict, Mapping) or set(state_dict) != set(keys):
        got = (sorted(state_dict) if isinstance(state_dict, Mapping)
               else type(state_dict).__name__)
        raise ValueError(f"state_dict must be a mapping with keys {sorted(keys)}, got {got}")
    epoch = _check_int("state_dict['epoch']", state_dict["epoch"], 0)
    pos = _check_int("state_dict['position']", state_dict["position"], 0)
    if pos > batches:
        raise ValueError(f"state_dict['position'] must be <= {batches} batches, got {pos}")
    return epoch, pos


def _restore_rng(rng, state):
    """Set ``rng`` to ``state`` (a ``bit_generator.state``); a ValueError, and ``rng`` left
    as it was, when the state does not fit."""
    old = rng.bit_generator.state
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:  # Overflow: an int
        rng.bit_generator.state = old                             # too big for a word
        raise ValueError(f"state_dict['rng'] is not a state of this iterator's "
                         f"{type(rng.bit_generator).__name__} generator: {e}") from None


# ---------------------------------------------------------------- truncated BPTT

Window = namedtuple("Window", "x y lengths reset seq_ids")
Window.__doc__ = """One TBPTT window of a batch of streams.

x : (T, B, ...) inputs, T <= k (the longest row of the window); padding after lengths[b]
y : (T, B, ...) targets padded the same way, or None without targets
lengths : (B,) int64 real steps of each row in this window (0: the row is idle)
reset : (B,) bool, True where the row starts a new sequence: zero its state first
seq_ids : (B,) int64 index of the sequence each row is on (-1: idle, no sequence left)
"""


def tbptt_windows(streams: Sequence[npt.ArrayLike] | np.ndarray, k: int, batch_size: int, *,
                  targets: Sequence[npt.ArrayLike] | np.ndarray | None = None,
                  padding_value: Any = 0) -> Iterator[Window]:
    """Cut long sequences into windows of ``k`` steps over ``batch_size`` parallel rows.

    streams : a list of N sequences ``(L_i, ...)`` (e.g. documents), or one array
        ``(L, ...)``: a single stream, split into ``batch_size`` contiguous parts of nearly
        equal length (``np.array_split``), one per row, as language-model training does.
    k : window length (steps of backpropagation), int >= 1
    batch_size : rows run side by side, int >= 1
    targets : None, or the same structure as ``streams`` with the same lengths (e.g.
        next-token ids: ``inputs = doc[:-1]``, ``targets = doc[1:]``)

    Each row works through sequences in order, ``k`` steps per window: row b takes the next
    unstarted sequence (in list order) when its current one is finished. Empty sequences
    are skipped. Yields ``Window(x, y, lengths, reset, seq_ids)`` until every sequence is
    consumed; the state protocol (carry the value, reset on ``reset``, pass
    ``dstate=None``, drop the returned dstate) is in this module's docstring.
    Arguments are checked at the call, not at the first window.
    """
    k = _check_int("k", k, 1)
    batch_size = _check_int("batch_size", batch_size, 1)

    def split(name, s):
        if isinstance(s, np.ndarray):
            if s.ndim == 0:
                raise ValueError(f"{name} must have a time axis (shape (L, ...)), got a scalar")
            return list(np.array_split(s, batch_size))
        return _sequence_list(name, s)

    xs = split("streams", streams)
    ys = None if targets is None else split("targets", targets)
    if ys is not None and (len(ys) != len(xs) or any(len(a) != len(b) for a, b in zip(xs, ys))):
        raise ValueError("targets must have the structure and lengths of streams, got "
                         f"{len(ys)} sequence(s) for {len(xs)}")
    if not xs:
        raise ValueError("streams must hold at least one sequence, got an empty list")
    x_fill = _fill(padding_value, np.result_type(*xs))
    y_fill = None if ys is None else _fill(padding_value, np.result_type(*ys))
    return _windows(xs, ys, k, batch_size, x_fill, y_fill)


def _windows(xs, ys, k, batch_size, x_fill, y_fill):
    """tbptt_windows' generator, over checked arguments (the fills carry the dtypes)."""
    queue = iter([i for i, a in enumerate(xs) if len(a) > 0])
    seq = np.full(batch_size, -1, dtype=np.int64)    # sequence on each row
    pos = np.zeros(batch_size, dtype=np.int64)       # next step of it
    for b in range(batch_size):
        seq[b] = next(queue, -1)
    reset = seq >= 0
    while (seq >= 0).any():
        lengths = np.where(seq >= 0, np.minimum(k, [len(xs[s]) - p for s, p in zip(seq, pos)]), 0)
        T = int(lengths.max())
        x = np.full((T, batch_size) + xs[0].shape[1:], x_fill)
        y = None if ys is None else np.full((T, batch_size) + ys[0].shape[1:], y_fill)
        for b in np.flatnonzero(lengths).tolist():
            s, p, n = seq[b], pos[b], lengths[b]
            x[:n, b] = xs[s][p:p + n]
            if y is not None:
                y[:n, b] = ys[s][p:p + n]
        yield Window(x, y, lengths.astype(np.int64), reset.copy(), seq.copy())
        # advance: a finished row takes the next sequence and must reset its state
        pos += lengths
        reset[:] = False
        for b in np.flatnonzero(seq >= 0).tolist():
            if pos[b] >= len(xs[seq[b]]):
                seq[b], pos[b] = next(queue, -1), 0
                reset[b] = seq[b] >= 0


def reset_state(state: State, reset: npt.ArrayLike, batch_axis: int = 1) -> State:
    """Zero the batch rows of ``state`` where ``reset`` is True (returns new arrays).

    state : None, an array, or a tuple or list of those, nested (LSTM's ``(h, c)``,
        Sequential's list per stateful layer); layer states are
        ``(num_layers*num_directions, B, H)`` (batch_axis=1, the default); kernel states
        ``(B, H)`` (batch_axis=0)
    reset : (B,) bool
    None entries stay None (a layer starts from zeros).
    """
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(reset_state(s, reset, batch_axis) for s in state)
    if not isinstance(state, np.ndarray):
        raise TypeError("state must be None, an array, or a tuple or list of those, "
                        f"got {type(state).__name__}")
    reset = np.asarray(reset)
    if reset.dtype != bool or reset.ndim != 1:
        raise TypeError(f"reset must be a 1-D bool array, "
                        f"got dtype {reset.dtype} shape {reset.shape}")
    if not -state.ndim <= batch_axis < state.ndim or state.shape[batch_axis] != reset.shape[0]:
        raise ValueError(f"state must have {reset.shape[0]} rows (len(reset)) on axis "
                         f"{batch_axis}, got shape {state.shape}")
    shape = [1] * state.ndim
    shape[batch_axis] = -1
    return np.where(reset.reshape(shape), state.dtype.type(0), state)


class PairBatches:
    """Seeded, resumable mini-batches of equal-length sequences with one target each, for
    ``rnnfuse.train.fit``'s data protocol (each ``for`` runs the rest of one epoch).

    ``PairBatches(x, y, batch_size, seed=None, *, rng=None, drop_last=False)``

    x : ``(N, T, ...)`` the sequences, sequence-major (a time-major array ``(T, N, ...)``
        goes in as ``x.swapaxes(0, 1)``, a view)
    y : ``(N, ...)`` one target per sequence
    seed : None, an int or a Generator: the batcher's own generator. ``state_dict()`` is
        then BatchIterator's ``{"epoch", "position", "rng"}``, the generator's state before
        the open epoch was drawn.
    rng : instead of ``seed``, a Generator that its owner saves and restores (``fit``'s
        ``rng``); ``state_dict()`` is then ``{"epoch", "position", "order"}``, the open
        epoch's drawn order (empty when none is open).
    drop_last : drop each epoch's last, smaller batch

    Each epoch opens with ``permutation(N)`` drawn from the generator and yields the
    consecutive slices of it as ``(x (T, B, ...) C-contiguous, y (B, ...))``. A restored
    batcher yields exactly the batches the original would have yielded next.
    """

    def __init__(self, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int, seed: Seed = None, *,
                 rng: np.random.Generator | None = None, drop_last: bool = False) -> None:
        self.x, self.y = np.asarray(x), np.asarray(y)
        if self.x.ndim < 2:
            raise ValueError(f"x must have shape (N, T, ...), got {self.x.shape}")
        if self.y.ndim < 1 or len(self.y) != len(self.x):
            raise ValueError(f"y must have one entry per sequence ({len(self.x)}), "
                             f"got shape {self.y.shape}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.drop_last = _check_bool("drop_last", drop_last)
        if len(self) == 0:
            raise ValueError(f"{len(self.x)} sequences make no batch of {self.batch_size}"
                             + (" (drop_last)" if self.drop_last else ""))
        if rng is not None and seed is not None:
            raise TypeError("give seed (a generator of its own) or rng (one saved "
                            "elsewhere), not both")
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self._own_rng = rng is None
        self.rng = _make_rng(seed) if rng is None else rng
        self.epoch = 0          # completed epochs
        self._order: Any = None  # the open epoch's permutation, or None
        self._pos = 0           # batches of the open (or last) epoch already yielded
        self._epoch_rng: Mapping[str, Any] | None = None  # generator state before the open epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _open_epoch(self):
        self._epoch_rng = self.rng.bit_generator.state
        self._order, self._pos = self.rng.permutation(len(self.x)), 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._order is None:
            self._open_epoch()
        b = self.batch_size
        while self._pos < len(self):
            index = self._order[self._pos * b:(self._pos + 1) * b]
            self._pos += 1
            yield np.ascontiguousarray(np.swapaxes(self.x[index], 0, 1)), self.y[index]
        self._order, self.epoch = None, self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """See the class docstring: the generator's state with a generator of its own, the
        drawn order with a shared one."""
        open_ = self._order is not None
        if self._own_rng:
            return {"epoch": self.epoch, "position": self._pos if open_ else 0,
                    "rng": self._epoch_rng if open_ else self.rng.bit_generator.state}
        return {"epoch": self.epoch, "position": self._pos,
                "order": self._order if open_ else np.zeros(0, np.int64)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue where ``state_dict()`` was taken (same data, batch size and options)."""
        keys = ("epoch", "position", "rng" if self._own_rng else "order")
        epoch, pos = _epoch_and_position(state_dict, keys, len(self))
        if self._own_rng:
            _restore_rng(self.rng, state_dict["rng"])
            self.epoch, self._order, self._pos = epoch, None, 0
            if pos > 0:
                self._open_epoch()
                self._pos = pos
            return
        order = self._checked_order(state_dict["order"])
        self.epoch, self._pos = epoch, pos
        self._order = order if order.size else None

    def _checked_order(self, order):
        n = len(self.x)
        order = np.asarray(order)
        if order.ndim != 1 or (order.size and (order.dtype.kind not in "iu" or not
                                               np.array_equal(np.sort(order), np.arange(n)))):
            raise ValueError(f"state_dict['order'] must be empty or a permutation of "
                             f"{n} indices, got {order.dtype} {order.shape}")
        return order.astype(np.int64)
