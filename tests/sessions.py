"""Sessions of a stream pool, and the oracles of batch invariance, shared by the pools'
tests (test_pool.py, test_stream_variants.py): a session's outputs and state are bitwise
the same stepped in a pool with any others, alone (a pool of one), in a stream of batch 1,
and as one row of the layer's whole-sequence forward in eval mode over a ragged batch."""
import numpy as np
from threadpoolctl import threadpool_limits

from rnnfuse.layers import LSTM


def widths(layer):
    """The widths of the state's arrays: h (proj_size or hidden_size), the LSTM's c."""
    H = layer.hidden_size
    return [getattr(layer, "proj_size", 0) or H, H] if isinstance(layer, LSTM) else [H]


def pack(layer, arrays):
    """A list of state arrays in the layer's form (a tuple for the LSTM)."""
    return tuple(arrays) if isinstance(layer, LSTM) else arrays[0]


def parts(state):
    return list(state) if isinstance(state, tuple) else [state]


def random_state(layer, rng, batch=1):
    return pack(layer, [rng.standard_normal((layer.num_layers, batch, n)).astype(layer.dtype)
                        for n in widths(layer)])


def zeros_state(layer, batch=1):
    return pack(layer, [np.zeros((layer.num_layers, batch, n), layer.dtype)
                        for n in widths(layer)])


def row_of(layer, state, b):
    """Row b of a batch's state, as a one-session state."""
    return pack(layer, [p[:, b:b + 1] for p in parts(state)])


class Session:
    def __init__(self, state):
        self.state, self.xs, self.ys, self.final = state, [], [], None


def workload(layer, rng, capacity, rounds):
    """Sessions opened (from zeros or a random state), closed and stepped in random subsets
    and orders through one pool: each session's inputs, outputs and final state."""
    pool = layer.stream_pool(capacity)
    live, done = {}, []
    for _ in range(rounds):
        for _ in range(int(rng.integers(0, 3))):
            if len(live) < capacity:
                state = random_state(layer, rng) if rng.random() < 0.5 else None
                live[pool.open(state)] = Session(state)
        for sid in list(live):
            if rng.random() < 0.1:
                live[sid].final = pool.state(sid)
                pool.close(sid)
                done.append(live.pop(sid))
        if live:
            ids = rng.permutation(np.array(list(live), np.int64))
            ids = ids[:int(rng.integers(0, len(ids) + 1))]
            x = rng.standard_normal((len(ids), layer.input_size)).astype(layer.dtype)
            y = pool.step(ids, x)
            assert y.shape == (len(ids), widths(layer)[0]) and y.dtype == layer.dtype
            for i, sid in enumerate(ids):
                live[sid].xs.append(x[i])
                live[sid].ys.append(y[i])
    for sid, s in live.items():
        s.final = pool.state(sid)
    return done + list(live.values())


def alone(layer, s):
    """Session s stepped alone, in a pool of one."""
    pool = layer.stream_pool(1)
    sid = pool.open(s.state)
    return [pool.step([sid], x[None])[0] for x in s.xs], pool.state(sid)


def streamed(layer, s):
    stream = layer.stream(1, s.state)
    return [stream.step(x[None])[0] for x in s.xs], stream.state


def whole_sequences(layer, sessions):
    """Every session as one row of a ragged forward in eval mode: (y, final state)."""
    T = max([len(s.xs) for s in sessions] + [1])
    x = np.zeros((T, len(sessions), layer.input_size), layer.dtype)
    init = zeros_state(layer, len(sessions))
    for b, s in enumerate(sessions):
        if s.xs:
            x[:len(s.xs), b] = np.stack(s.xs)
        if s.state is not None:
            for full, part in zip(parts(init), parts(s.state)):
                full[:, b] = part[:, 0]
    return layer.forward(x, init, lengths=np.array([len(s.xs) for s in sessions]))


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def check_batch_invariance(layer, rng, threads):
    """A random pool workload at this thread count, each session against the three
    oracles; returns the sessions."""
    with threadpool_limits(threads):
        sessions = workload(layer, rng, capacity=int(rng.integers(1, 14)), rounds=30)
        for s in sessions:  # the pool's promise: whoever shares a session's steps
            ys, final = alone(layer, s)
            assert_same(s.ys, ys)
            assert_same(parts(s.final), parts(final))
        for s in sessions:  # and a stream's
            ys, final = streamed(layer, s)
            assert_same(s.ys, ys)
            assert_same(parts(s.final), parts(final))
        y, final = whole_sequences(layer, sessions)  # and a forward's rows
    for b, s in enumerate(sessions):
        assert_same(s.ys, list(y[:len(s.xs), b]))
        assert_same(parts(s.final), [f[:, b:b + 1] for f in parts(final)])
    return sessions


def check_wide_step(layer):
    """Enough sessions that a step is shared among threads (whole tiles each): the same
    bits at 1 and 2 threads, as each session alone, and as the forward's rows."""
    rng = np.random.default_rng(0)
    n = 41  # six whole tiles and a row left over
    x = rng.standard_normal((3, n, layer.input_size)).astype(layer.dtype)
    state = random_state(layer, rng, n)
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            pool = layer.stream_pool(n + 3)
            ids = np.array([pool.open(row_of(layer, state, b)) for b in range(n)])
            order = rng.permutation(n)
            results.append(np.stack([pool.step(ids[order], x[t, order])[np.argsort(order)]
                                     for t in range(3)]))
    np.testing.assert_array_equal(results[0], results[1])
    for b in (0, 5, 40):
        s = Session(row_of(layer, state, b))
        s.xs = list(x[:, b])
        ys, _ = alone(layer, s)
        np.testing.assert_array_equal(np.stack(ys), results[0][:, b])
    with threadpool_limits(2):  # a forward long enough to be shared among threads
        y, _ = layer.forward(x, state)
    np.testing.assert_array_equal(y, results[0])
