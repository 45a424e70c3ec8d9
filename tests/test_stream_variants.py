"""Streams and stream pools of the variants whose weights or state differ from the plain
cells': the layer-normalized LSTM and GRU (layer_norm=True) and the LSTM with a
projection (proj_size; h and the outputs P wide, c H wide).

The promise is batch invariance: a session's outputs and state are bitwise the same
stepped alone in a stream, in a pool with other sessions in any order, and as one row of
the layer's whole-sequence forward in eval mode over a ragged batch of all the sessions,
on every code path and thread count. The forward is itself tested against the reference
and finite differences (test_layer_norm.py, test_proj.py).
"""
import numpy as np
import pytest

import rnnfuse
from rnnfuse.layers import GRU, LSTM

from checks import kernel, stable_seed  # noqa: F401 (kernel: a fixture)
from sessions import check_batch_invariance, check_wide_step, parts, random_state

VARIANTS = [(LSTM, {"layer_norm": True}),
            (GRU, {"layer_norm": True}),
            (LSTM, {"layer_norm": True, "zoneout": 0.3}),  # eval's zoneout: the expectation
            (GRU, {"layer_norm": True, "zoneout": 0.3}),
            (LSTM, {"proj_size": True}),
            (LSTM, {"proj_size": True, "peepholes": True})]
VARIANT_IDS = ["lstm_ln", "gru_ln", "lstm_ln_zoneout", "gru_ln_zoneout", "lstm_proj",
               "lstm_proj_peep"]


def make_layer(cls, opts, I, H, num_layers, dtype, seed):
    """An eval-mode layer with every parameter random (the gains, the cell bias and the
    peepholes too, which start at 1 or 0); proj_size True: about H/3."""
    opts = dict(opts)
    if opts.get("proj_size"):
        opts["proj_size"] = max(1, H // 3)
    layer = cls(I, H, num_layers=num_layers, dtype=dtype, seed=seed, **opts).eval()
    rng = np.random.default_rng(seed)
    for p in layer.parameters():
        p[...] = rng.uniform(-0.6, 0.6, p.shape)
    return layer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, opts", VARIANTS, ids=VARIANT_IDS)
def test_sessions_are_batch_invariant(cls, opts, dtype, num_layers, threads, kernel):
    seed = stable_seed(cls.__name__, str(opts), np.dtype(dtype).name, num_layers)
    rng = np.random.default_rng(seed)
    I, H = int(rng.integers(1, 12)), int(rng.choice([2, 5, 20, 37, 70]))
    layer = make_layer(cls, opts, I, H, num_layers, dtype, seed)
    sessions = check_batch_invariance(layer, rng, threads)
    assert any(len(s.xs) > 1 for s in sessions)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, opts", [(LSTM, {"layer_norm": True}), (GRU, {"layer_norm": True}),
                                       (LSTM, {"proj_size": True})],
                         ids=["lstm_ln", "gru_ln", "lstm_proj"])
def test_threads_split_a_wide_step_without_changing_bits(cls, opts, dtype, kernel):
    check_wide_step(make_layer(cls, opts, 8, 256, 2, dtype, seed=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, opts", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("T, B, I, H, L, bias", [
    (1, 1, 1, 2, 1, True), (25, 1, 5, 7, 2, True), (12, 2, 33, 130, 2, False),
    (7, 0, 4, 5, 2, True), (0, 2, 3, 4, 1, True),
    # past the inference chunk (1024 rows), B not a multiple of the 6-row tile
    (150, 7, 65, 17, 1, True),
    # wide inputs: the forward projects them in several blocks of rows
    (20, 13, 700, 9, 1, True)])
def test_stream_of_a_batch_matches_the_forward(cls, opts, dtype, T, B, I, H, L, bias, kernel):
    """A stream of batch B against the forward over the whole sequences, whose input
    product runs over every step at once: bit for bit."""
    rng = np.random.default_rng(T * 100 + H)
    layer = make_layer(cls, {**opts, "bias": bias}, I, H, L, dtype, seed=T + B)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(layer, rng, B)
    y, final = layer.forward(x, state)
    stream = layer.stream(B, state)
    assert stream.proj_size == layer.proj_size
    ys = [stream.step(x[t]) for t in range(T)]
    if T:
        np.testing.assert_array_equal(np.stack(ys), y)
    for got, want in zip(parts(stream.state), parts(final)):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == dtype


def test_projected_shapes_and_state_refusals_name_proj_size():
    layer = LSTM(3, 6, num_layers=2, proj_size=2, seed=0).eval()
    stream = layer.stream(2)
    assert stream.step(np.ones((2, 3), np.float32)).shape == (2, 2)
    assert [s.shape for s in stream.state] == [(2, 2, 2), (2, 2, 6)]
    with pytest.raises(ValueError, match=r"h must have shape \(2, 2, 2\) \(num_layers, "
                                         r"batch_size, proj_size\)"):
        stream.reset((np.zeros((2, 2, 6), np.float32), None))
    with pytest.raises(ValueError, match=r"c must have shape \(2, 2, 6\) \(num_layers, "
                                         r"batch_size, hidden_size\)"):
        stream.reset((None, np.zeros((2, 2, 2), np.float32)))
    pool = layer.stream_pool(2)
    sid = pool.open()
    assert pool.step([sid], np.ones((1, 3), np.float32)).shape == (1, 2)
    assert [s.shape for s in pool.state(sid)] == [(2, 1, 2), (2, 1, 6)]
    with pytest.raises(ValueError, match=r"h must have shape \(2, 1, 2\) \(num_layers, 1, "
                                         r"proj_size\)"):
        pool.open((np.zeros((2, 1, 6), np.float32), None))
    assert "proj_size=2" in repr(layer) and len(pool) == 1  # the refused open took no slot


def test_streams_keep_their_weights():
    """Later updates of the layer (the gains, W_hr) leave a stream and a pool as made."""
    for layer in (LSTM(3, 5, layer_norm=True, seed=0), LSTM(3, 5, proj_size=2, seed=0)):
        x = np.random.default_rng(0).standard_normal((4, 1, 3)).astype(np.float32)
        want, _ = layer.eval().forward(x)
        stream, pool = layer.stream(), layer.stream_pool(1)
        for p in layer.parameters():
            p += 0.5
        sid = pool.open()
        np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(4)]), want)
        np.testing.assert_array_equal(np.stack([pool.step([sid], x[t]) for t in range(4)]),
                                      want)


def test_bidirectional_variants_are_refused():
    for layer in (LSTM(3, 4, layer_norm=True, bidirectional=True),
                  LSTM(3, 4, proj_size=2, bidirectional=True)):
        with pytest.raises(ValueError, match="bidirectional layer cannot be streamed"):
            layer.stream()
        with pytest.raises(ValueError, match="bidirectional layer cannot be streamed"):
            layer.stream_pool(2)


def _weights(G, H, I, *extra, P=0):
    rng = np.random.default_rng(0)
    return [[rng.standard_normal((G * H, I)).astype(np.float32),
             rng.standard_normal((G * H, P or H)).astype(np.float32), None, None,
             *[np.ones(n, np.float32) for n in extra]]]


@pytest.mark.parametrize("make, match", [
    (lambda cls: cls("gru", False, np.float32, 1, _weights(3, 4, 2, 12, 12), layer_norm=True),
     "layer_norm runs the LSTM and the GRU with linear_before_reset only"),
    (lambda cls: cls("rnn", False, np.float32, 1, _weights(1, 4, 2, 4, 4), layer_norm=True),
     "layer_norm runs the LSTM and the GRU with linear_before_reset only"),
    (lambda cls: cls("lstm", False, np.float32, 1, _weights(4, 4, 2, 16, 16), layer_norm=True),
     r"weights have 6 parts \(with layer_norm 8"),
    (lambda cls: cls("lstm", False, np.float32, 1, _weights(4, 4, 2, 16, 16, 4, 3),
                     layer_norm=True), r"layer_norm b_c must have shape \(4,\)"),
    (lambda cls: cls("lstm", False, np.float32, 1, _weights(4, 4, 2, P=2), proj_size=2),
     "weights lack w_hr"),
    (lambda cls: cls("gru", True, np.float32, 1, _weights(3, 4, 2), proj_size=2),
     "proj_size runs the LSTM without layer_norm only"),
    (lambda cls: cls("lstm", False, np.float32, 1, _weights(4, 4, 2, 16, 16, 4, 4),
                     layer_norm=True, proj_size=2),
     "proj_size runs the LSTM without layer_norm only"),
])
@pytest.mark.parametrize("cls", [rnnfuse.Stream, rnnfuse.StreamPool])
def test_direct_construction_checks_the_variants(cls, make, match):
    """Made by hand with parts that do not fit, a stream or a pool raises instead of
    letting C read outside them."""
    with pytest.raises(ValueError, match=match):
        make(cls)


@pytest.mark.parametrize("cls", [rnnfuse.Stream, rnnfuse.StreamPool])
def test_direct_construction_checks_the_projection(cls):
    rng = np.random.default_rng(0)
    H, P, I = 4, 2, 3
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    good = [[w(4 * H, I), w(4 * H, P), None, None, w(P, H)]]
    cls("lstm", False, np.float32, 1, good, proj_size=P)
    for damage, match in (("w_hr", "w_ih, w_hh and w_hr must be"),
                          ("w_hh", "w_hh must be a C-contiguous, aligned ndarray of 32 elements"),
                          ("zoneout", "zoneout is not supported with proj_size")):
        layers = [list(good[0])]
        kwargs = {"proj_size": P}
        if damage == "w_hr":
            layers[0][4] = w(P, H - 1)
        elif damage == "w_hh":
            layers[0][1] = w(4 * H, H)
        else:
            kwargs["zoneout"] = 0.1
        with pytest.raises(ValueError, match=match):
            cls("lstm", False, np.float32, 1, layers, **kwargs)
