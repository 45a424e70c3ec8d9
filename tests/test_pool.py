"""Stream pools: many sessions of one unidirectional layer, any subset stepped together
(layer.stream_pool()), and batch invariance.

The oracles: the same session stepped alone (a pool of one), a stream of batch 1, and the
session's row of the layer's whole-sequence forward in eval mode over a ragged batch of all
the sessions. All three bit for bit on every kernel and thread count, as every product
rounds a row alike whatever the rows around it.
"""
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rnnfuse
from rnnfuse import _kernels
from rnnfuse.layers import GRU, LSTM, RNN

from checks import stable_seed
from sessions import (Session, alone, assert_same, check_batch_invariance, check_wide_step,
                      parts, random_state)

CELLS = [(LSTM, {}), (GRU, {"linear_before_reset": True}),
         (GRU, {"linear_before_reset": False}), (RNN, {"nonlinearity": "tanh"}),
         (RNN, {"nonlinearity": "relu"})]
CELL_IDS = ["lstm", "gru_lbr", "gru_orig", "rnn_tanh", "rnn_relu"]


def _runs(kernel):
    try:
        _kernels.set_kernel(kernel)
    except ValueError:
        return False
    finally:
        _kernels.set_kernel(None)
    return True


AVX2, AVX512 = _runs("avx2"), _runs("avx512")
MODES = ["portable", pytest.param("avx2", marks=pytest.mark.skipif(not AVX2, reason="no AVX2")),
         pytest.param("avx512", marks=pytest.mark.skipif(not AVX512, reason="no AVX-512"))]


@pytest.fixture
def mode(request):
    """The kernel a test runs on, restored afterwards."""
    _kernels.set_kernel(request.param)
    yield request.param
    _kernels.set_kernel(None)


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, opts", CELLS, ids=CELL_IDS)
def test_sessions_are_batch_invariant(cls, opts, dtype, num_layers, threads, mode):
    seed = stable_seed(cls.__name__, str(opts), np.dtype(dtype).name, num_layers)
    rng = np.random.default_rng(seed)
    I, H = int(rng.integers(1, 12)), int(rng.choice([1, 5, 20, 37, 70]))
    layer = cls(I, H, num_layers=num_layers, dtype=dtype, seed=seed, **opts).eval()
    check_batch_invariance(layer, rng, threads)


_HYP_LAYER = GRU(3, 37, num_layers=2, seed=7).eval()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.permutations(range(9)).flatmap(
    lambda p: st.integers(0, 9).map(lambda k: p[:k])), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1))
def test_any_schedule_gives_each_session_its_numbers_alone(schedule, seed):
    """Nine sessions, each step a drawn subset in a drawn order, on the default kernel."""
    rng = np.random.default_rng(seed)
    pool = _HYP_LAYER.stream_pool(9)
    sessions = {pool.open(): Session(None) for _ in range(9)}
    ids = np.array(list(sessions), np.int64)
    for rows in schedule:
        x = rng.standard_normal((len(rows), 3)).astype(np.float32)
        y = pool.step(ids[list(rows)], x)
        for i, r in enumerate(rows):
            sessions[ids[r]].xs.append(x[i])
            sessions[ids[r]].ys.append(y[i])
    for sid, s in sessions.items():
        ys, final = alone(_HYP_LAYER, s)
        assert_same(s.ys, ys)
        assert np.array_equal(pool.state(sid), final)


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_split_a_wide_step_without_changing_bits(dtype, mode):
    check_wide_step(LSTM(8, 256, num_layers=2, dtype=dtype, seed=0).eval())


@pytest.mark.skipif(not AVX2, reason="no AVX2")
def test_default_avx2_forward_rows_match_a_stream_of_one():
    _kernels.set_kernel("avx2")
    try:
        layer = LSTM(8, 64, seed=0).eval()
        x = np.random.default_rng(0).standard_normal((4, 7, 8)).astype(np.float32)
        y, _ = layer.forward(x)
        stream = layer.stream(1)
        assert np.array_equal(np.stack([stream.step(x[t, :1]) for t in range(4)]), y[:, :1])
    finally:
        _kernels.set_kernel(None)


# ---------------------------------------------------------------- the pool's interface

def snapshot(pool, ids):
    return [[a.copy() for a in parts(pool.state(sid))] for sid in ids]


def test_open_state_close_and_ids():
    layer = LSTM(3, 4, num_layers=2, seed=0).eval()
    pool = layer.stream_pool(2)
    assert isinstance(pool, rnnfuse.StreamPool) and len(pool) == 0
    assert (pool.capacity, pool.input_size, pool.hidden_size, pool.num_layers) == (2, 3, 4, 2)
    assert pool.dtype == np.float32 and "LSTM stream pool" in repr(pool)
    rng = np.random.default_rng(0)
    state = random_state(layer, rng)
    a, b = pool.open(state), pool.open()
    assert isinstance(a, int) and a != b and len(pool) == 2
    assert list(pool.sessions) == sorted([a, b])
    for got, want in zip(pool.state(a), state):
        assert got.shape == (2, 1, 4) and np.array_equal(got, want)
    for got in pool.state(b):
        assert not got.any()
    got = pool.state(a)
    got[0][...] = 7  # copies
    assert np.array_equal(pool.state(a)[0], state[0])
    pool.step([a, b], rng.standard_normal((2, 3)).astype(np.float32))
    pool.close(a)
    assert len(pool) == 1 and list(pool.sessions) == [b]
    c = pool.open()  # a reopened slot starts from zeros, under a new id
    assert c not in (a, b)
    for got in pool.state(c):
        assert not got.any()
    with pytest.raises(ValueError, match="not an open session"):
        pool.state(a)  # a closed id is never valid again


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_state_forms_of_gru_and_rnn(mode):
    for layer in (GRU(3, 4, num_layers=3, seed=0), RNN(3, 4, seed=0)):
        pool = layer.stream_pool(1)
        h = np.random.default_rng(0).standard_normal((layer.num_layers, 1, 4)).astype(np.float32)
        sid = pool.open(h)
        assert np.array_equal(pool.state(sid), h)
        y = pool.step([sid], np.ones((1, 3), np.float32))
        want_y, want_h = layer.eval().forward(np.ones((1, 1, 3), np.float32), h)
        assert pool.state(sid).shape == want_h.shape == (layer.num_layers, 1, 4)
        assert np.array_equal(y, want_y[0])  # the layer's form and numbers
        assert np.array_equal(pool.state(sid), want_h)


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def test_step_takes_ids_in_any_form_and_any_layout():
    layer = RNN(3, 5, seed=0).eval()
    pool = layer.stream_pool(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6)).astype(np.float32)[:, ::2]  # strided
    x_before = x.copy()
    results = []
    for ids_form, x_form in [(list, np.ascontiguousarray), (np.array, lambda a: a),
                             (lambda v: np.array(v, np.int32), np.asfortranarray),
                             (lambda v: np.array(v, np.uint64), read_only),
                             (tuple, np.ascontiguousarray),
                             (lambda v: [np.int64(v[0]), v[1]], np.ascontiguousarray),
                             (lambda v: np.array([v[0], 0, v[1]], np.int64)[::2],
                              np.ascontiguousarray),
                             (lambda v: np.array(v, ">i8"), np.ascontiguousarray)]:
        ids = [pool.open(), pool.open()]
        results.append(pool.step(ids_form(ids), x_form(x)))
        for sid in ids:
            pool.close(sid)
    assert np.array_equal(x, x_before)
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    empty = pool.step([], np.empty((0, 3), np.float32))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("ids, x, exc, match", [
    ("unknown", None, ValueError, r"ids\[1\]: 999 is not an open session"),
    ("negative", None, ValueError, r"ids\[0\]: -1 is not an open session"),
    ("closed", None, ValueError, r"ids\[2\]: .* is not an open session"),
    ("repeated", None, ValueError, r"ids\[2\]: session .* appears more than once"),
    ("floats", None, TypeError, r"ids must be integers"),
    ("list with a float", None, TypeError, r"ids must be integers"),
    ("beyond int64", None, ValueError, r"ids: 9223372036854775808 is not an open session"),
    ("2-D", None, ValueError, r"ids must be 1-D"),
    ("ok", np.ones((2, 3), np.float32), ValueError, r"x must have shape \(3, 3\) \(len\(ids\)"),
    ("ok", np.ones((3, 2), np.float32), ValueError, r"x must have shape \(3, 3\)"),
    ("ok", np.ones((3, 3), np.float64), TypeError, r"x must have dtype float32 \(the pool's"),
    ("ok", None, TypeError, r"x must have dtype float32 .* got object"),
])
def test_step_refuses_bad_arguments_and_changes_nothing(ids, x, exc, match):
    layer = LSTM(3, 4, num_layers=2, seed=0).eval()
    pool = layer.stream_pool(5)
    rng = np.random.default_rng(0)
    open_ids = [pool.open(random_state(layer, rng)) for _ in range(4)]
    closed = open_ids.pop()
    pool.close(closed)
    ids = {"unknown": [open_ids[0], 999], "negative": [-1], "closed": open_ids[:2] + [closed],
           "repeated": [open_ids[0], open_ids[1], open_ids[0]],
           "floats": np.array(open_ids, float), "2-D": np.array([open_ids]),
           "list with a float": [open_ids[0], 1.5], "beyond int64": [2**63],
           "ok": open_ids}[ids]
    if match.startswith("ids"):
        x = np.ones((len(ids), 3), np.float32)
    before = snapshot(pool, open_ids)
    with pytest.raises(exc, match=match):
        pool.step(ids, x)
    for got, want in zip(snapshot(pool, open_ids), before):
        assert_same(got, want)
    assert len(pool) == 3
    y = pool.step(open_ids, np.ones((3, 3), np.float32))  # still usable
    assert y.shape == (3, 4)


def test_open_close_and_state_refuse_bad_arguments():
    layer = LSTM(3, 4, num_layers=2, seed=0).eval()
    pool = layer.stream_pool(1)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        pool.open(np.zeros((2, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 1, 4\) \(num_layers, 1"):
        pool.open((np.zeros((2, 4), np.float32), None))
    with pytest.raises(TypeError, match=r"c must have dtype float32"):
        pool.open((None, np.zeros((2, 1, 4))))
    assert len(pool) == 0
    sid = pool.open()
    with pytest.raises(RuntimeError, match="capacity=1"):
        pool.open()
    for bad, exc in [(sid + 1, ValueError), (-3, ValueError), (2**70, ValueError),
                     ("0", TypeError), (True, TypeError), (1.0, TypeError)]:
        with pytest.raises(exc, match="sid"):
            pool.state(bad)
        with pytest.raises(exc, match="sid"):
            pool.close(bad)
    assert len(pool) == 1 and list(pool.sessions) == [sid]
    with pytest.raises(TypeError, match="state must have dtype float64"):
        GRU(3, 4, dtype=np.float64).stream_pool(1).open(np.zeros((1, 1, 4), np.float32))


def test_stream_pool_refuses_bad_construction():
    with pytest.raises(ValueError, match="bidirectional layer cannot be streamed"):
        LSTM(3, 4, bidirectional=True).stream_pool(2)
    with pytest.raises(ValueError, match="capacity"):
        LSTM(3, 4).stream_pool(0)
    with pytest.raises(TypeError, match="capacity"):
        LSTM(3, 4).stream_pool(1.5)
    with pytest.raises(ValueError, match="use layer.stream_pool"):
        rnnfuse.StreamPool("lstm", False, np.float32, 0, [])


def test_pool_keeps_its_weights_and_runs_in_eval_mode():
    layer = LSTM(3, 4, num_layers=2, dropout=0.5, seed=0)  # left in training mode
    x = np.random.default_rng(0).standard_normal((5, 1, 3)).astype(np.float32)
    want, _ = layer.eval().forward(x)
    pool = layer.train().stream_pool(1)
    for p in layer.parameters():
        p += 1.0  # an optimizer step after the pool was made
    sid = pool.open()
    assert np.array_equal(np.stack([pool.step([sid], x[t]) for t in range(5)]), want)


def test_concurrent_calls_on_one_pool_are_refused_not_corrupting():
    """A call that overlaps another raises RuntimeError; the steps that ran are exactly a
    serial run's."""
    layer = LSTM(64, 256, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    pool = layer.stream_pool(2)
    ids = [pool.open(), pool.open()]
    done, refused = [], []

    def work():
        for _ in range(150):
            try:
                pool.step(ids, x)
                done.append(1)
            except RuntimeError as e:
                assert "another thread" in str(e)
                refused.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serial = layer.stream_pool(2)
    serial_ids = [serial.open(), serial.open()]
    for _ in range(len(done)):
        serial.step(serial_ids, x)
    for a, b in zip(ids, serial_ids):
        for got, want in zip(pool.state(a), serial.state(b)):
            assert np.array_equal(got, want)
