"""Dropout variants of the recurrent layers: weight drop (DropConnect on W_hh, AWD-LSTM).

- eval mode computes the plain layer bitwise; p=0 draws nothing;
- a training forward is the plain kernels run on W_hh * mask, the mask reproduced from
  the layer's generator; masks are seeded and fresh per forward;
- float64 finite differences of every parameter with the masks held fixed (the layer's
  generator reseeded per evaluation): stacked, bidirectional, ragged;
- bad values are refused, naming the argument.
"""
import numpy as np
import pytest

from rnnfuse import GRU, LSTM, RNN
from rnnfuse import functional as F

CELLS = [LSTM, GRU, RNN]


def _x(T=5, B=3, I=2, dtype=np.float32, seed=40):
    return np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)


def _states(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("cls", CELLS)
def test_weight_drop_option_is_checked(cls):
    with pytest.raises(ValueError, match=r"weight_drop must be a probability in \[0, 1\), "
                                         r"got 1"):
        cls(2, 3, weight_drop=1)
    with pytest.raises(ValueError, match=r"weight_drop must be a probability in \[0, 1\), "
                                         r"got -0.1"):
        cls(2, 3, weight_drop=-0.1)
    with pytest.raises(TypeError, match="weight_drop must be a float, got bool"):
        cls(2, 3, weight_drop=True)
    with pytest.raises(TypeError, match="weight_drop must be a float, got str"):
        cls(2, 3, weight_drop="0.5")
    assert repr(cls(2, 3, weight_drop=0.25)).endswith("weight_drop=0.25)")
    assert "weight_drop" not in repr(cls(2, 3))


@pytest.mark.parametrize("cls", CELLS)
def test_weight_drop_eval_is_the_plain_layer_bitwise(cls):
    x = _x()
    plain = cls(2, 4, num_layers=2, bidirectional=True, seed=41).eval()
    dropped = cls(2, 4, num_layers=2, bidirectional=True, seed=41, weight_drop=0.5).eval()
    y0, s0 = plain(x, lengths=[5, 2, 0])
    y1, s1 = dropped(x, lengths=[5, 2, 0])
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(_states(s0), _states(s1)):
        np.testing.assert_array_equal(a, b)
    # training with p=0 draws nothing: the same numbers and the same generator state
    plain.train(), dropped.train()
    dropped.weight_drop = 0.0
    np.testing.assert_array_equal(plain(x)[0], dropped(x)[0])
    assert plain._rng.random() == dropped._rng.random()


def _masked_forward(layer, x, lengths, seed):
    """The training forward rebuilt from functional's kernels: every layer and direction
    on W_hh * mask, the masks drawn as the layer draws them (in the same order)."""
    rng = np.random.default_rng(seed)
    p, L, D = layer.weight_drop, layer.num_layers, layer.num_directions
    inp, finals = x, []
    for l in range(L):
        ys = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, *_ = layer._weights(l, d)
            keep = rng.random(w_hh.shape) >= p
            mask = keep.astype(layer.dtype) * layer.dtype.type(1.0 / (1.0 - p))
            y, fin, _ = F._forward(layer._cell, inp, [None] * layer._n_states, w_ih,
                                   w_hh * mask, b_ih, b_hh, lengths, d == 1, layer._option,
                                   False)
            ys.append(y)
            finals.append(fin)
        inp = np.concatenate(ys, axis=2)
    return inp, finals


@pytest.mark.parametrize("cls", CELLS)
def test_weight_drop_training_forward_runs_the_masked_weights(cls):
    x, lengths = _x(), [5, 2, 4]
    layer = cls(2, 4, num_layers=2, bidirectional=True, seed=42, weight_drop=0.4)
    layer._rng = np.random.default_rng(43)
    y, state = layer(x, lengths=lengths)
    want_y, want_finals = _masked_forward(layer, x, lengths, 43)
    np.testing.assert_array_equal(y, want_y)
    for k, fin in enumerate(want_finals):
        for s, f in zip(_states(state), fin):
            np.testing.assert_array_equal(s[k], f)
    # fresh masks at the next forward; eval then runs the raw weights
    assert not np.array_equal(layer(x, lengths=lengths)[0], y)
    layer.eval()
    assert not np.array_equal(layer(x, lengths=lengths)[0], y)


def test_weight_drop_masks_drop_about_p_of_the_weights():
    layer = LSTM(3, 50, seed=44, weight_drop=0.3)
    layer._rng = np.random.default_rng(45)
    w, mask = layer._dropped_weights(0, 0)
    assert mask.shape == (200, 50) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / 0.7)}
    assert 0.25 < np.mean(mask == 0) < 0.35
    np.testing.assert_array_equal(w[1], layer._params["weight_hh_l0"] * mask)
    assert w[0] is layer._params["weight_ih_l0"]  # only W_hh is dropped


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_drop_gradients_match_finite_differences(cls, bias):
    """float64, stacked, bidirectional, ragged, training masks held fixed: each finite
    difference reruns the forward with the layer's generator reseeded."""
    kw = dict(peepholes=True) if cls is LSTM else {}
    layer = cls(2, 3, num_layers=2, bias=bias, bidirectional=True, dtype=np.float64,
                seed=46, weight_drop=0.5, **kw)
    rng = np.random.default_rng(47)
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 6))
    lengths = [4, 1, 3]

    def forward():
        layer._rng = np.random.default_rng(48)
        return layer.forward(x, lengths=lengths)

    def loss():
        y, state = forward()
        return np.sum(y * dy) + sum(np.sum(s) for s in _states(state))

    y, state = forward()
    ones = [np.ones_like(s) for s in _states(state)]
    dx, _ = layer.backward(dy, tuple(ones) if cls is LSTM else ones[0])
    eps = 1e-6
    for name, p in layer.named_parameters().items():
        for idx in [(0,), (p.shape[0] - 1,), (p.shape[0] // 2,)]:
            idx = idx + (p.ndim - 1) * (min(1, p.shape[-1] - 1),)
            old = p[idx]
            p[idx] = old + eps
            up = loss()
            p[idx] = old - eps
            down = loss()
            p[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(layer.grads[name][idx] - fd) <= 1e-7 * max(1.0, abs(fd)), (name, idx)
    # a dropped element of W_hh gets no gradient
    layer._rng = np.random.default_rng(48)
    _, mask = layer._dropped_weights(0, 0)
    assert np.all(layer.grads["weight_hh_l0"][mask == 0] == 0)
    # and x's gradient through the masked weights
    for idx in [(0, 0, 0), (2, 2, 1)]:
        old = x[idx]
        x[idx] = old + eps
        up = loss()
        x[idx] = old - eps
        down = loss()
        x[idx] = old
        fd = (up - down) / (2 * eps)
        assert abs(dx[idx] - fd) <= 1e-7 * max(1.0, abs(fd)), idx


@pytest.mark.parametrize("cls", CELLS)
def test_weight_drop_streams_and_pools_run_the_raw_weights(cls):
    layer = cls(3, 5, num_layers=2, seed=49, weight_drop=0.5)
    x = _x(6, 2, 3, seed=50)
    layer.eval()
    y, _ = layer(x)
    layer.train()  # a stream runs as in eval whatever the layer's mode
    stream = layer.stream(batch_size=2)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(6)]), y)
    pool = layer.stream_pool(2)
    ids = [pool.open(), pool.open()]
    np.testing.assert_array_equal(np.stack([pool.step(ids, x[t]) for t in range(6)]), y)
