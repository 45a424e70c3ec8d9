"""Streams: a unidirectional layer advanced one timestep at a time (layer.stream()).

The oracle is the layer's own whole-sequence forward in eval mode, itself tested against
the reference and finite differences in test_layers.py. The two agree bit for bit: the
input projection rounds each row alike however many rows one call projects (all steps in a
forward, one step in a stream; see rf_project), on either micro-kernel.
"""
import threading

import numpy as np
import pytest

import rnnfuse
from rnnfuse.layers import GRU, LSTM, RNN

CELLS = [(LSTM, {}), (GRU, {"linear_before_reset": True}),
         (GRU, {"linear_before_reset": False}), (RNN, {"nonlinearity": "tanh"}),
         (RNN, {"nonlinearity": "relu"})]
CELL_IDS = ["lstm", "gru_lbr", "gru_orig", "rnn_tanh", "rnn_relu"]
def parts(state):
    return list(state) if isinstance(state, tuple) else [state]


def random_state(layer, B, rng):
    shape = (layer.num_layers, B, layer.hidden_size)
    arrays = [rng.standard_normal(shape).astype(layer.dtype) for _ in parts(layer_state(layer))]
    return tuple(arrays) if isinstance(layer, LSTM) else arrays[0]


def layer_state(layer):
    return (None, None) if isinstance(layer, LSTM) else None


def run_stream(stream, x):
    return np.stack([stream.step(x[t]) for t in range(x.shape[0])]) if len(x) else \
        np.empty((0,) + (stream.batch_size, stream.hidden_size), stream.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("T, B, I, H, L, bias", [
    (1, 1, 1, 1, 1, True), (25, 1, 5, 7, 1, True), (30, 3, 40, 33, 3, True),
    (12, 2, 33, 130, 2, False), (7, 0, 4, 5, 2, True), (0, 2, 3, 4, 1, True),
    # past the inference chunk (1024 rows) and B not a multiple of the 6-row tile
    (150, 7, 65, 17, 1, True),
    # wide inputs: the projection runs in several blocks of rows
    (20, 13, 700, 9, 1, True)])
def test_stream_matches_whole_sequence_forward_exactly(cls, opts, dtype, T, B, I, H, L, bias):
    rng = np.random.default_rng(T * 100 + H)
    layer = cls(I, H, num_layers=L, bias=bias, dtype=dtype, seed=1, **opts).eval()
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(layer, B, rng)
    y, final = layer.forward(x, state)

    stream = layer.stream(B, state)
    ys = run_stream(stream, x)
    assert np.array_equal(ys, y)
    for got, want in zip(parts(stream.state), parts(final)):
        assert np.array_equal(got, want)
    assert ys.dtype == dtype and all(s.dtype == dtype for s in parts(stream.state))


def test_state_carries_across_calls_and_chunks():
    """Stepping a sequence in two chunks, or forward over it in two chunks with the state
    carried, or all at once: the same."""
    layer = LSTM(6, 10, num_layers=2, seed=0).eval()
    x = np.random.default_rng(1).standard_normal((20, 2, 6)).astype(np.float32)
    y, (h, c) = layer.forward(x)
    stream = layer.stream(2)
    first = run_stream(stream, x[:8])
    mid = stream.state
    y1, st1 = layer.forward(x[:8])
    for got, want in zip(mid, st1):
        assert np.array_equal(got, want)
    second = run_stream(stream, x[8:])
    assert np.array_equal(np.concatenate([first, second]), y)
    assert np.array_equal(stream.state[0], h)
    assert np.array_equal(stream.state[1], c)


def test_reset_and_state_are_copies():
    layer = GRU(3, 4, num_layers=2, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((5, 1, 3)).astype(np.float32)
    stream = layer.stream()
    first = run_stream(stream, x)
    snapshot = stream.state
    snapshot[...] = 123.0  # a copy: the stream's state is untouched
    assert not np.array_equal(stream.state, snapshot)
    stream.reset()
    assert np.array_equal(stream.state, np.zeros((2, 1, 4), np.float32))
    assert np.array_equal(run_stream(stream, x), first)  # zeros again: the same outputs
    h0 = np.random.default_rng(2).standard_normal((2, 1, 4)).astype(np.float32)
    stream.reset(h0)
    h0[...] = 0.0  # reset copied it
    assert not np.array_equal(stream.state, h0)


def test_stream_keeps_the_weights_it_was_made_with():
    layer = RNN(3, 5, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    want, _ = layer.forward(x)
    stream = layer.stream(2)
    for p in layer.parameters():
        p += 1.0  # an optimizer step after the stream was made
    assert np.array_equal(run_stream(stream, x), want)


def test_eval_semantics_without_dropout():
    layer = LSTM(3, 4, num_layers=2, dropout=0.5, seed=0)  # left in training mode
    x = np.random.default_rng(0).standard_normal((6, 1, 3)).astype(np.float32)
    want, _ = layer.eval().forward(x)
    assert np.array_equal(run_stream(layer.train().stream(), x), want)


def test_step_accepts_any_layout_and_leaves_x_alone():
    layer = LSTM(3, 4, seed=0).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6)).astype(np.float32)[:, ::2]  # strided view
    x_before = x.copy()
    want = layer.stream(2).step(np.ascontiguousarray(x))
    assert np.array_equal(layer.stream(2).step(x), want)
    assert np.array_equal(layer.stream(2).step(np.asfortranarray(x)), want)
    assert np.array_equal(x, x_before)
    ro = np.ascontiguousarray(x)
    ro.flags.writeable = False
    assert np.array_equal(layer.stream(2).step(ro), want)


def test_step_returns_new_arrays():
    stream = RNN(2, 3, seed=0).eval().stream()
    x = np.ones((1, 2), np.float32)
    a = stream.step(x)
    b = stream.step(x)
    assert a is not b and not np.shares_memory(a, b)


@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((2, 3), np.float64), TypeError, r"x must have dtype float32"),
    (np.ones((3, 3), np.float32), ValueError, r"x must have shape \(2, 3\)"),
    (np.ones((2, 4), np.float32), ValueError, r"x must have shape \(2, 3\)"),
    (np.ones((1, 2, 3), np.float32), ValueError, r"x must have shape \(2, 3\)"),
    (np.ones(3, np.float32), ValueError, r"x must have shape \(2, 3\)"),
    ([[1, 2, 3], [4, 5, 6]], TypeError, r"x must have dtype float32 \(the stream's dtype\), got int64"),
    (None, TypeError, r"x must have dtype float32 \(the stream's dtype\), got object"),
])
def test_step_refuses_bad_input(bad, exc, match):
    stream = LSTM(3, 4, seed=0).eval().stream(2)
    before = stream.state
    with pytest.raises(exc, match=match):
        stream.step(bad)
    for got, want in zip(stream.state, before):  # a refused step changes nothing
        assert np.array_equal(got, want)


def test_stream_refuses_bad_construction():
    with pytest.raises(ValueError, match="bidirectional layer cannot be streamed"):
        LSTM(3, 4, bidirectional=True).stream()
    with pytest.raises(ValueError, match="batch_size"):
        LSTM(3, 4).stream(-1)
    with pytest.raises(TypeError, match="batch_size"):
        LSTM(3, 4).stream(1.5)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        LSTM(3, 4).stream(1, np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"h must have shape \(1, 2, 4\)"):
        LSTM(3, 4).stream(2, (np.zeros((1, 1, 4), np.float32), None))
    with pytest.raises(TypeError, match="state must have dtype float64"):
        GRU(3, 4, dtype=np.float64).stream(1, np.zeros((1, 1, 4), np.float32))


def test_concurrent_steps_on_one_stream_are_refused_not_corrupting():
    """One stream is stateful: a step that overlaps another raises RuntimeError; the
    steps that ran are exactly a serial run's (each one whole)."""
    layer = LSTM(64, 256, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    stream = layer.stream()
    done, refused = [], []

    def work():
        for _ in range(200):
            try:
                stream.step(x)
                done.append(1)
            except RuntimeError as e:
                assert "another thread" in str(e)
                refused.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serial = layer.stream()
    for _ in range(len(done)):
        serial.step(x)
    for got, want in zip(stream.state, serial.state):
        assert np.array_equal(got, want)


def test_separate_streams_in_threads_match_serial():
    layer = GRU(8, 32, num_layers=2, seed=0).eval()
    xs = np.random.default_rng(0).standard_normal((4, 50, 3, 8)).astype(np.float32)
    want = [run_stream(layer.stream(3), x) for x in xs]
    got = [None] * 4

    def work(i):
        got[i] = run_stream(layer.stream(3), xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_public_names():
    stream = rnnfuse.LSTM(2, 3).stream()
    assert isinstance(stream, rnnfuse.Stream)
    assert (stream.batch_size, stream.input_size, stream.hidden_size, stream.num_layers) == \
        (1, 2, 3, 1)
    assert "LSTM stream" in repr(stream)


@pytest.mark.parametrize("damage", ["short w_hh", "wrong dtype", "strided w_ih",
                                    "layer sizes", "no layers", "bad cell"])
def test_direct_construction_checks_the_buffers(damage):
    """rnnfuse.Stream is public: made by hand with arrays that do not fit, it raises
    instead of letting C read outside them."""
    H, I = 4, 3
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    layers = [[w(4 * H, I), w(4 * H, H), w(4 * H), None], [w(4 * H, H), w(4 * H, H), None, None]]
    cell = "lstm"
    rnnfuse.Stream(cell, False, np.float32, 2, layers).step(np.ones((2, I), np.float32))
    if damage == "short w_hh":
        layers[1][1] = w(4 * H, H - 1)
    elif damage == "wrong dtype":
        layers[0][2] = layers[0][2].astype(np.float64)
    elif damage == "strided w_ih":
        layers[0][0] = w(4 * H, 2 * I)[:, ::2]
    elif damage == "layer sizes":
        layers[1][0] = w(4 * H, H + 1)
    elif damage == "no layers":
        layers = []
    else:
        cell = "lstm2"
    with pytest.raises(ValueError):
        rnnfuse.Stream(cell, False, np.float32, 2, layers)


@pytest.mark.parametrize("w_ih, w_hh, G, exc, match", [
    ([[1.0]], np.ones((4, 1), np.float32), 4, TypeError, "w_ih must be a float32 or float64"),
    (np.ones((4, 2), np.float32), np.ones((4, 2), np.float32), 4, ValueError, "w_ih and w_hh"),
    (np.ones((8, 2), np.float32), np.ones((8, 2), np.float32), 2, ValueError, "G in"),
    (np.ones((4, 2), np.float64), np.ones((4, 1), np.float32), 4, ValueError, "w_ih must be a C"),
    (np.ones((4, 4), np.float32)[:, ::2], np.ones((4, 1), np.float32), 4, ValueError, "w_ih"),
])
def test_pack_weights_refuses_what_it_cannot_pack(w_ih, w_hh, G, exc, match):
    from rnnfuse import _kernels
    with pytest.raises(exc, match=match):
        _kernels.pack_weights(w_ih, w_hh, G, False)
