"""rnnfuse.data: padding, bucketing, the seeded resumable batch iterator, TBPTT windows
(checked against whole-sequence runs of the reference RNN) and bad input."""
import numpy as np
import pytest

from rnnfuse import reference as ref
from rnnfuse.data import (BatchIterator, PairBatches, bucket_by_length, pad_sequences,
                          reset_state, tbptt_windows)


def _seqs(rng, lengths, tail=(2,), dtype=np.float64):
    return [rng.normal(size=(n,) + tail).astype(dtype) for n in lengths]


# ---------------------------------------------------------------- padding

def test_pad_sequences_layout():
    rng = np.random.default_rng(0)
    seqs = _seqs(rng, [3, 0, 5, 1])
    x, lengths = pad_sequences(seqs, padding_value=-7)
    assert x.shape == (5, 4, 2) and x.dtype == np.float64
    assert lengths.dtype == np.int64 and lengths.tolist() == [3, 0, 5, 1]
    for b, s in enumerate(seqs):
        np.testing.assert_array_equal(x[:len(s), b], s)
        assert np.all(x[len(s):, b] == -7)


def test_pad_sequences_dtypes_and_token_ids():
    x, lengths = pad_sequences([[1, 2, 3], np.array([4], np.int32)])
    assert x.dtype == np.int64 and x.tolist() == [[1, 4], [2, 0], [3, 0]]
    x, _ = pad_sequences([[1, 2]], dtype=np.float32)
    assert x.dtype == np.float32 and x.shape == (2, 1)
    x, lengths = pad_sequences([[], []])
    assert x.shape == (0, 2) and lengths.tolist() == [0, 0]


@pytest.mark.parametrize("args, kwargs, err, msg", [
    (([],), {}, ValueError, "seqs must hold at least one sequence, got an empty list"),
    ((np.zeros((3, 2)),), {}, TypeError, "seqs must be a list of arrays .one per sequence., got ndarray"),
    (([np.zeros((2, 3)), np.zeros((2, 4))],), {}, ValueError, r"seqs\[1\] must have trailing shape \(3,\) \(that of seqs\[0\]\), got \(4,\)"),
    (([np.zeros(2), 5.0],), {}, ValueError, r"seqs\[1\] must have a time axis"),
    (([np.zeros(2), None],), {}, TypeError, r"seqs\[1\] must be an array, got NoneType"),
    (([[1, [2, 3]]],), {}, TypeError, r"seqs\[0\] must be a numeric array, got a ragged or object array"),
    (([[1, 2]],), {"dtype": "nonsense"}, TypeError, "dtype must be a NumPy dtype or None, got 'nonsense'"),
    (([[1, 2]],), {"dtype": np.uint8, "padding_value": -1}, ValueError, "padding_value -1 cannot be stored in dtype uint8"),
])
def test_pad_sequences_bad_input(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        pad_sequences(*args, **kwargs)


# ---------------------------------------------------------------- bucketing

def test_bucket_by_length_sorted_and_shuffled():
    lengths = np.array([5, 1, 4, 1, 9, 3, 2, 8, 7])
    batches = bucket_by_length(lengths, 4)
    assert [lengths[b].tolist() for b in batches] == [[1, 1, 2, 3], [4, 5, 7, 8], [9]]
    assert bucket_by_length(lengths, 4, drop_last=True)[-1].tolist() == batches[1].tolist()
    a = bucket_by_length(lengths, 2, shuffle=True, seed=3)
    b = bucket_by_length(lengths, 2, shuffle=True, seed=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]           # seeded
    assert sorted(np.concatenate(a).tolist()) == list(range(9))        # every index once
    spreads = [np.ptp(lengths[x]) for x in a]
    assert max(spreads) <= 2                                            # neighbours in length
    c = bucket_by_length(lengths, 2, shuffle=True, seed=4)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


@pytest.mark.parametrize("args, kwargs, err, msg", [
    (([1, 2], 0), {}, ValueError, "batch_size must be >= 1, got 0"),
    (([1, 2], 2.0), {}, TypeError, "batch_size must be an int, got float"),
    (([1, -2], 2), {}, ValueError, "lengths must be >= 0, got -2"),
    (([1.5, 2], 2), {}, TypeError, "lengths must be integers, got dtype float64"),
    (([[1, 2]], 2), {}, ValueError, r"lengths must be 1-D, got shape \(1, 2\)"),
    (([1, 2], 2), {"shuffle": True, "seed": -1}, ValueError, "seed must be >= 0, got -1"),
    (([1, 2], 2), {"shuffle": True, "seed": "a"}, TypeError, "seed must be None, an int or a numpy.random.Generator"),
    (([1, 2], 2), {"shuffle": 1}, TypeError, "shuffle must be a bool, got int"),
])
def test_bucket_by_length_bad_input(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        bucket_by_length(*args, **kwargs)


# ---------------------------------------------------------------- batch iterator

def _epoch_ids(it):
    return [tuple(y.tolist()) for _, _, y in it]


def test_batch_iterator_epochs_cover_everything_and_are_seeded():
    rng = np.random.default_rng(1)
    seqs = _seqs(rng, rng.integers(1, 6, size=10))
    ids = np.arange(10)
    it = BatchIterator(seqs, ids, batch_size=3, shuffle=True, seed=7)
    assert len(it) == 4
    e1, e2 = _epoch_ids(it), _epoch_ids(it)
    assert sorted(sum(e1, ())) == list(range(10)) and e1 != e2 and it.epoch == 2
    again = BatchIterator(seqs, ids, batch_size=3, shuffle=True, seed=7)
    assert _epoch_ids(again) == e1 and _epoch_ids(again) == e2
    for x, lengths, y in BatchIterator(seqs, ids, batch_size=3, seed=7):
        for b, i in enumerate(y):
            np.testing.assert_array_equal(x[:lengths[b], b], seqs[i])
    plain = BatchIterator(seqs, ids, batch_size=4, shuffle=False, drop_last=True)
    assert len(plain) == 2 and _epoch_ids(plain) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_batch_iterator_per_step_targets_and_bucketing():
    rng = np.random.default_rng(2)
    lens = [4, 1, 7, 2, 6, 3]
    seqs = [rng.integers(0, 9, size=n) for n in lens]
    tags = [s * 10 for s in seqs]
    it = BatchIterator(seqs, tags, batch_size=2, bucket=True, seed=0, padding_value=-1)
    seen = []
    for x, lengths, t in it:
        assert x.shape == t.shape and np.ptp(lengths) <= 2
        mask = np.arange(x.shape[0])[:, None] < lengths
        np.testing.assert_array_equal(t[mask], x[mask] * 10)
        assert np.all(x[~mask] == -1) and np.all(t[~mask] == -1)
        seen += lengths.tolist()
    assert sorted(seen) == sorted(lens)


def test_batch_iterator_resumes_mid_epoch_exactly():
    rng = np.random.default_rng(3)
    seqs = _seqs(rng, rng.integers(1, 6, size=11))
    make = lambda: BatchIterator(seqs, np.arange(11), batch_size=2, seed=5)  # noqa: E731
    full = make()
    want = _epoch_ids(full) + _epoch_ids(full)
    it = make()
    got = []
    for batch in it:                     # stop after 3 batches of the first epoch
        got.append(tuple(batch[2].tolist()))
        if len(got) == 3:
            break
    sd = it.state_dict()
    assert sd["epoch"] == 0 and sd["position"] == 3
    resumed = make()
    resumed.load_state_dict(sd)
    got += _epoch_ids(resumed) + _epoch_ids(resumed)
    assert got == want
    # a broken-off loop on the same iterator continues its epoch too
    it2 = make()
    first = next(iter(it2))
    assert [tuple(first[2].tolist())] + _epoch_ids(it2) == want[:len(it2)]


def test_batch_iterator_bad_input():
    seqs = [np.zeros(3), np.zeros(2)]
    with pytest.raises(ValueError, match=r"fields\[0\] must have one entry per sequence \(2\), got shape \(3,\)"):
        BatchIterator(seqs, np.arange(3), batch_size=1)
    with pytest.raises(ValueError, match=r"fields\[0\] must be 2 sequences with the lengths of seqs"):
        BatchIterator(seqs, [np.zeros(3), np.zeros(3)], batch_size=1)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        BatchIterator(seqs, batch_size=None)
    with pytest.raises(ValueError, match="seqs must hold at least one sequence"):
        BatchIterator([], batch_size=1)
    it = BatchIterator(seqs, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"state_dict\['position'\] must be <= 2 batches, got 9"):
        it.load_state_dict({"epoch": 0, "position": 9, "rng": it.rng.bit_generator.state})
    with pytest.raises(ValueError, match=r"state_dict\['rng'\] is not a state of this iterator's PCG64"):
        it.load_state_dict({"epoch": 0, "position": 1, "rng": {"bit_generator": "MT19937"}})
    with pytest.raises(ValueError, match="state_dict must be a mapping with keys"):
        it.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------- fixed-length pairs

def _former_shared_batches(x_tm, y, batch, rng, epochs):
    """The batches the memory and autoencode commands drew before PairBatches served them:
    each epoch a permutation from the shared generator, x indexed on its time-major batch
    axis, the last partial batch dropped."""
    out = []
    for _ in range(epochs):
        order = rng.permutation(x_tm.shape[1])
        for p in range(x_tm.shape[1] // batch):
            i = order[p * batch:(p + 1) * batch]
            out.append((x_tm[:, i], y[i]))
    return out


def _same_batches(got, want):
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == wx.dtype and gy.dtype == wy.dtype
        assert np.array_equal(gx, wx) and np.array_equal(gy, wy)
        assert gx.flags.c_contiguous


def test_pair_batches_with_its_own_seed_are_batch_iterators_batches():
    """forecast and classify: PairBatches(x (N, T, F), y, batch, seed), formerly a
    BatchIterator over list(x): the same batches (without the lengths) and the same state."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, 23)
    pairs, it = PairBatches(x, y, 5, 7), BatchIterator(list(x), y, batch_size=5, seed=7)
    assert len(pairs) == len(it) == 5
    for _ in range(3):
        _same_batches(list(pairs), [(b[0], b[2]) for b in it])
        sd, want = pairs.state_dict(), it.state_dict()
        assert sd["epoch"] == want["epoch"] and sd["position"] == want["position"] == 0
        assert sd["rng"] == want["rng"]
    next(iter(pairs)), next(iter(it))
    sd, want = pairs.state_dict(), it.state_dict()
    assert set(sd) == {"epoch", "position", "rng"} and sd["position"] == want["position"] == 1
    assert sd["rng"] == want["rng"]


def test_pair_batches_with_a_shared_generator_are_the_former_memory_batches():
    """memory: x (T, N, 2) given as x.swapaxes(0, 1), the generator shared with fit,
    drop_last: the batches, and the generator's draws, of the former batcher."""
    rng = np.random.default_rng(1)
    x = rng.random((9, 37, 2)).astype(np.float32)
    y = rng.random((37, 1)).astype(np.float32)
    mine, theirs = np.random.default_rng(5), np.random.default_rng(5)
    pairs = PairBatches(x.swapaxes(0, 1), y, 8, rng=mine, drop_last=True)
    assert len(pairs) == 4
    got = list(pairs) + list(pairs) + list(pairs)
    _same_batches(got, _former_shared_batches(x, y, 8, theirs, 3))
    assert mine.bit_generator.state == theirs.bit_generator.state
    sd = pairs.state_dict()
    assert set(sd) == {"epoch", "position", "order"} and sd["epoch"] == 3
    assert sd["order"].dtype == np.int64 and sd["order"].size == 0


def test_pair_batches_of_token_ids_are_the_former_autoencode_batches():
    """autoencode: ids (T, N) given as ids.T with themselves as the target."""
    ids = np.random.default_rng(2).integers(0, 5, (4, 30))
    mine, theirs = np.random.default_rng(3), np.random.default_rng(3)
    pairs = PairBatches(ids.T, ids.T, 7, rng=mine, drop_last=True)
    got = list(pairs) + list(pairs)
    _same_batches(got, _former_shared_batches(ids, ids.T, 7, theirs, 2))
    assert got[0][0].shape == (4, 7) and got[0][0].dtype == ids.dtype


@pytest.mark.parametrize("shared", [False, True])
def test_pair_batches_resume_mid_epoch_exactly(shared):
    x = np.random.default_rng(4).normal(size=(17, 3, 1))
    y = np.arange(17)

    def make(seed):
        g = np.random.default_rng(seed)
        b = (PairBatches(x, y, 4, rng=g, drop_last=True) if shared else PairBatches(x, y, 4, g))
        return b, g

    full, _ = make(9)
    want = list(full) + list(full)
    first, g1 = make(9)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 3:
            break
    sd, g_state = first.state_dict(), g1.bit_generator.state
    again, g2 = make(123)
    if shared:  # the generator's owner restores it
        g2.bit_generator.state = g_state
    again.load_state_dict(sd)
    _same_batches(head + list(again) + list(again), want)


def test_pair_batches_bad_input_and_bad_state():
    x, y = np.zeros((6, 2, 1)), np.zeros(6)
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, ...\)"):
        PairBatches(np.zeros(6), y, 2)
    with pytest.raises(ValueError, match=r"y must have one entry per sequence \(6\)"):
        PairBatches(x, np.zeros(5), 2)
    with pytest.raises(ValueError, match="6 sequences make no batch of 7"):
        PairBatches(x, y, 7, drop_last=True)
    with pytest.raises(TypeError, match="not both"):
        PairBatches(x, y, 2, 0, rng=np.random.default_rng())
    with pytest.raises(TypeError, match="batch_size must be an int"):
        PairBatches(x, y, 2.0)
    own = PairBatches(x, y, 4, 0)
    assert len(own) == 2
    with pytest.raises(ValueError, match="state_dict must be a mapping with keys"):
        own.load_state_dict({"epoch": 0, "position": 0, "order": np.arange(6)})
    shared = PairBatches(x, y, 4, rng=np.random.default_rng(0), drop_last=True)
    assert len(shared) == 1
    before = shared.state_dict()
    for order, needle in [(np.arange(5), "permutation of 6"), (np.zeros(6, int), "permutation"),
                          (np.arange(6.0), "permutation"), (np.zeros((2, 3), int), "permutation")]:
        with pytest.raises(ValueError, match=needle):
            shared.load_state_dict({"epoch": 0, "position": 0, "order": order})
    with pytest.raises(ValueError, match=r"state_dict\['position'\] must be <= 1 batches"):
        shared.load_state_dict({"epoch": 0, "position": 2, "order": np.arange(6)})
    assert all(np.array_equal(shared.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------- truncated BPTT

def test_tbptt_windows_layout():
    docs = [np.arange(5), np.arange(100, 103), np.arange(200, 207), np.arange(0)]
    wins = list(tbptt_windows(docs, k=2, batch_size=2, targets=[d + 1 for d in docs]))
    # row 0 runs doc0 (2+2+1 steps); row 1 runs doc1 (2+1), then takes doc2 (2+2+2+1)
    assert [w.seq_ids.tolist() for w in wins] == [[0, 1], [0, 1], [0, 2], [-1, 2], [-1, 2], [-1, 2]]
    assert [w.lengths.tolist() for w in wins] == [[2, 2], [2, 1], [1, 2], [0, 2], [0, 2], [0, 1]]
    assert [w.reset.tolist() for w in wins] == [[True, True], [False, False], [False, True],
                                                [False, False], [False, False], [False, False]]
    for d in range(3):  # each document comes back whole, in order, with its targets
        xs = [w.x[:w.lengths[b], b] for w in wins for b in range(2) if w.seq_ids[b] == d]
        ys = [w.y[:w.lengths[b], b] for w in wins for b in range(2) if w.seq_ids[b] == d]
        np.testing.assert_array_equal(np.concatenate(xs), docs[d])
        np.testing.assert_array_equal(np.concatenate(ys), docs[d] + 1)
    assert all(w.x.shape[0] == w.lengths.max() <= 2 for w in wins)


def test_tbptt_single_stream_splits_into_rows():
    stream = np.arange(23)
    wins = list(tbptt_windows(stream, k=4, batch_size=3))
    assert wins[0].reset.all() and not any(w.reset.any() for w in wins[1:])
    rows = [np.concatenate([w.x[:w.lengths[b], b] for w in wins]) for b in range(3)]
    np.testing.assert_array_equal(np.concatenate(rows), stream)
    assert [len(r) for r in rows] == [8, 8, 7]
    assert wins[0].y is None


def test_tbptt_carry_and_reset_reproduce_whole_sequences():
    """Windows run with the documented protocol (reset, then carry the final state as a
    value) give exactly the forward of each whole sequence run alone from zeros."""
    rng = np.random.default_rng(4)
    I, H = 3, 4
    w_ih, w_hh = rng.normal(scale=0.5, size=(H, I)), rng.normal(scale=0.5, size=(H, H))
    b_ih, b_hh = rng.normal(size=H), rng.normal(size=H)
    docs = _seqs(rng, [7, 2, 5, 4, 1], tail=(I,))
    outputs = {d: [] for d in range(len(docs))}
    state = rng.normal(size=(2, H))  # garbage: every row is reset before its first window
    for w in tbptt_windows(docs, k=3, batch_size=2):
        state = reset_state(state, w.reset, batch_axis=0)
        y, state, ctx = ref.rnn_forward(w.x, state, w_ih, w_hh, b_ih, b_hh, lengths=w.lengths)
        ref.rnn_backward(rng.normal(size=y.shape), None, ctx)  # dstate=None: truncated here
        for b in range(2):
            if w.seq_ids[b] >= 0:
                outputs[w.seq_ids[b]].append(y[:w.lengths[b], b])
    for d, doc in enumerate(docs):
        whole, _, _ = ref.rnn_forward(doc[:, None], None, w_ih, w_hh, b_ih, b_hh)
        np.testing.assert_allclose(np.concatenate(outputs[d]), whole[:, 0], rtol=1e-12, atol=1e-14)


def test_reset_state_shapes():
    h = np.ones((2, 3, 4))
    c = np.full((2, 3, 4), 2.0)
    reset = np.array([True, False, True])
    h2, c2 = reset_state((h, c), reset)
    assert np.all(h2[:, [0, 2]] == 0) and np.all(h2[:, 1] == 1) and np.all(c2[:, 1] == 2)
    assert np.all(h == 1)  # not in place
    assert reset_state(None, reset) is None
    np.testing.assert_array_equal(reset_state(np.ones((3, 2)), reset, batch_axis=0)[:, 0], [0, 1, 0])
    with pytest.raises(ValueError, match=r"state must have 3 rows \(len\(reset\)\) on axis 1, got shape \(2, 4, 4\)"):
        reset_state(np.ones((2, 4, 4)), reset)
    with pytest.raises(TypeError, match="reset must be a 1-D bool array, got dtype int64"):
        reset_state(h, np.array([1, 0, 1]))
    s0, s1, _ = reset_state([None, (h, c), h], reset)  # Sequential's list of states
    assert s0 is None and np.all(s1[1][:, 0] == 0) and np.all(s1[1][:, 1] == 2)
    with pytest.raises(TypeError, match="state must be None, an array, or a tuple or list "
                                        "of those, got dict"):
        reset_state({"h": h}, reset)


@pytest.mark.parametrize("args, kwargs, err, msg", [
    (([np.zeros(3)], 0, 2), {}, ValueError, "k must be >= 1, got 0"),
    (([np.zeros(3)], 2, 0), {}, ValueError, "batch_size must be >= 1, got 0"),
    (([], 2, 2), {}, ValueError, "streams must hold at least one sequence"),
    ((np.array(3.0), 2, 2), {}, ValueError, "streams must have a time axis"),
    (([np.zeros(3)], 2, 2), {"targets": [np.zeros(2)]}, ValueError, "targets must have the structure and lengths of streams"),
    (("abc", 2, 2), {}, TypeError, "streams must be a list of arrays"),
])
def test_tbptt_bad_input(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        list(tbptt_windows(*args, **kwargs))
