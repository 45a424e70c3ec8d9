"""rnnfuse.layers: recurrent layers (stacking, directions, dropout, state dicts), the small
layers, Sequential and the ONNX weight layout.

The oracles: float64 central finite differences of whole layers and models, and a hand
composition of rnnfuse.functional calls. Weights, inputs, states and upstream gradients are
random (never ones or zeros) so that gate, direction or layer mix-ups show.
PyTorch parity lives in test_layers_torch.py.
"""
import copy

import numpy as np
import pytest

from rnnfuse import functional as F
from checks import central_difference  # tests/checks.py
from rnnfuse.layers import GRU, LSTM, RNN, Embedding, Linear, Module, Sequential
from rnnfuse.onnx_weights import from_onnx, to_onnx

CLASSES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
CELLS = [("lstm", {}), ("gru", {"linear_before_reset": True}),
         ("gru", {"linear_before_reset": False}), ("rnn", {"nonlinearity": "tanh"}),
         ("rnn", {"nonlinearity": "relu"})]
CELL_IDS = ["lstm", "gru_lbr", "gru_orig", "rnn_tanh", "rnn_relu"]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def make(cell, opts, I=3, H=2, **kw):
    return CLASSES[cell](I, H, **opts, **kw)


def parts(state):
    """A layer's state as a list of arrays: [h] or [h, c]."""
    return list(state) if isinstance(state, tuple) else [state]


def pack(layer, arrays):
    return tuple(arrays) if isinstance(layer, LSTM) else arrays[0]


def random_state(layer, B, rng):
    shape = (layer.num_layers * layer.num_directions, B, layer.hidden_size)
    return pack(layer, [rng.standard_normal(shape).astype(layer.dtype)
                        for _ in range(2 if isinstance(layer, LSTM) else 1)])


def assert_close(got, want, dtype, what):
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * 10,
                               err_msg=what)


# ---------------------------------------------------------------- finite differences

def numeric_grad(loss, arrays, eps=1e-6):
    """Central differences of loss() in every entry of each array (perturbed in place)."""
    out = []
    for a in arrays:
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            g[i] = central_difference(loss, a, i, eps)
        out.append(g)
    return out


def assert_fd(analytic, numeric, what, tol=1e-7):
    scale = max(np.max(np.abs(numeric)), 1e-3)
    err = np.max(np.abs(analytic - numeric)) / scale
    assert err < tol, f"{what}: finite-difference relative error {err:.2e}"


def fd_check_recurrent(layer, x, state, lengths, rng, fresh_rng=None):
    """The layer's dx, dstate and parameter gradients against finite differences of
    loss = <y, gy> + <state_n, gs>. fresh_rng() (dropout) resets the mask stream."""
    y, s = layer.forward(x, state, lengths)
    gy = rng.standard_normal(y.shape)
    gs = [rng.standard_normal(p.shape) for p in parts(s)]

    def loss():
        if fresh_rng is not None:
            layer._rng = fresh_rng()
        y, s = layer.forward(x, state, lengths)
        return np.sum(y * gy) + sum(np.sum(a * g) for a, g in zip(parts(s), gs))

    loss()
    layer.zero_grad()
    dx, ds = layer.backward(gy, pack(layer, gs))
    inputs = [x] + parts(state)
    numeric = numeric_grad(loss, inputs + layer.parameters())
    analytic = [dx] + parts(ds) + list(layer.grads.values())
    names = ["x"] + [f"state[{i}]" for i in range(len(parts(state)))] + list(layer.grads)
    assert len(numeric) == len(analytic)
    for a, n, name in zip(analytic, numeric, names):
        assert_fd(a, n, name)


@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
def test_finite_differences_stacked_bidirectional_ragged(cell, opts, batch_first):
    rng = np.random.default_rng([len(cell), len(opts), batch_first])
    layer = make(cell, opts, I=3, H=2, num_layers=2, bidirectional=True,
                 batch_first=batch_first, dtype=np.float64, seed=1)
    T, B = 4, 4
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3))
    fd_check_recurrent(layer, x, random_state(layer, B, rng), np.array([4, 2, 0, 3]), rng)


def test_finite_differences_with_dropout():
    # the mask stream restarts before each forward, so every evaluation drops the same units
    rng = np.random.default_rng(7)
    layer = LSTM(3, 2, num_layers=3, bidirectional=True, dropout=0.4, dtype=np.float64,
                 seed=3)
    rng0 = copy.deepcopy(layer._rng)
    x = rng.standard_normal((4, 3, 3))
    fd_check_recurrent(layer, x, random_state(layer, 3, rng), [4, 1, 3], rng,
                       fresh_rng=lambda: copy.deepcopy(rng0))


# ---------------------------------------------------------------- hand composition

def kernel(cell, opts, x, s0, w, lengths, reverse):
    """One direction of one layer through rnnfuse.functional: y, finals, ctx."""
    if cell == "lstm":
        y, h, c, ctx = F.lstm_forward(x, *s0, *w, lengths=lengths, reverse=reverse)
        return y, [h, c], ctx
    fwd = F.gru_forward if cell == "gru" else F.rnn_forward
    y, h, ctx = fwd(x, *s0, *w, lengths=lengths, reverse=reverse, **opts)
    return y, [h], ctx


def kernel_back(cell, dy, dfin, ctx):
    if cell == "lstm":
        dx, dh, dc, *dw = F.lstm_backward(dy, *dfin, ctx)
        return dx, [dh, dc], dw
    dx, dh, *dw = (F.gru_backward if cell == "gru" else F.rnn_backward)(dy, *dfin, ctx)
    return dx, [dh], dw


def compose(cell, opts, sd, x, s0, lengths, dy, ds, masks, L):
    """A bidirectional L-layer stack written out by hand: layer l's input is
    [fwd | rev] of layer l-1 times masks[l-1]; returns y, finals, dx, dinits, grads."""
    inp, finals, ctxs = x, [np.empty_like(s) for s in s0], []
    for l in range(L):
        ys = []
        for d, sfx in enumerate(["", "_reverse"]):
            w = [sd[f"{k}_l{l}{sfx}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            y, fin, ctx = kernel(cell, opts, inp, [s[2 * l + d] for s in s0], w, lengths,
                                 d == 1)
            for f_all, f in zip(finals, fin):
                f_all[2 * l + d] = f
            ys.append(y)
            ctxs.append(ctx)
        inp = np.concatenate(ys, axis=2)
        if l < L - 1 and masks is not None:
            inp = inp * masks[l]
    y = inp
    H = ds[0].shape[-1]
    g, dinits, grads = dy, [np.empty_like(s) for s in s0], {}
    for l in reversed(range(L)):
        dxs = []
        for d, sfx in enumerate(["", "_reverse"]):
            dx, dh, dw = kernel_back(cell, np.ascontiguousarray(g[..., d * H:(d + 1) * H]),
                                     [s[2 * l + d] for s in ds], ctxs[2 * l + d])
            for a, b in zip(dinits, dh):
                a[2 * l + d] = b
            for k, v in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), dw):
                grads[f"{k}_l{l}{sfx}"] = v
            dxs.append(dx)
        g = dxs[0] + dxs[1]
        if l > 0 and masks is not None:
            g = g * masks[l - 1]
    return y, finals, g, dinits, grads


@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_layer_bidirectional_equals_hand_composition(cell, opts, dtype):
    rng = np.random.default_rng([len(cell), len(opts), dtype().itemsize])
    layer = make(cell, opts, I=5, H=4, num_layers=2, bidirectional=True, dtype=dtype, seed=2)
    T, B = 6, 4
    x = rng.standard_normal((T, B, 5)).astype(dtype)
    state = random_state(layer, B, rng)
    lengths = np.array([6, 3, 0, 5])
    y, s = layer(x, state, lengths)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ds = [rng.standard_normal(p.shape).astype(dtype) for p in parts(s)]
    dx, d0 = layer.backward(dy, pack(layer, ds))

    want = compose(cell, opts, layer.state_dict(), x, parts(state), lengths, dy, ds, None, 2)
    assert y.shape == (T, B, 8) and parts(s)[0].shape == (4, B, 4)
    assert np.all(y[3:, 1] == 0) and np.all(y[:, 2] == 0)  # padding is zero
    for got, exp, what in [(y, want[0], "y"), (dx, want[2], "dx")] + \
            [(a, b, "state_n") for a, b in zip(parts(s), want[1])] + \
            [(a, b, "dstate0") for a, b in zip(parts(d0), want[3])] + \
            [(layer.grads[k], v, k) for k, v in want[4].items()]:
        assert got.dtype == dtype, what
        assert_close(got, exp, dtype, what)


def test_dropout_is_inverted_and_between_layers_only():
    # white box: the masks are (rng.random(shape) >= p) / (1 - p), drawn after the weights
    rng = np.random.default_rng(11)
    p = 0.3
    layer = GRU(3, 4, num_layers=3, bidirectional=True, dropout=p, dtype=np.float64, seed=5)
    x = rng.standard_normal((5, 2, 3))
    state = random_state(layer, 2, rng)
    lengths = [5, 3]
    mask_rng = copy.deepcopy(layer._rng)
    y, h = layer(x, state, lengths)
    masks = [(mask_rng.random((5, 2, 8)) >= p) / (1 - p) for _ in range(2)]
    assert 0 < np.mean(masks[0] == 0) < 0.6
    dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h.shape)
    dx, dh0 = layer.backward(dy, dh)
    want = compose("gru", {"linear_before_reset": True}, layer.state_dict(), x, [state],
                   lengths, dy, [dh], masks, 3)
    for got, exp in [(y, want[0]), (h, want[1][0]), (dx, want[2]), (dh0, want[3][0])]:
        assert_close(got, exp, np.float64, "dropout")
    for k, v in want[4].items():
        assert_close(layer.grads[k], v, np.float64, k)


def test_dropout_seeded_training_only():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    a = LSTM(4, 6, num_layers=2, dropout=0.5, seed=9)
    b = LSTM(4, 6, num_layers=2, dropout=0.5, seed=9)
    plain = LSTM(4, 6, num_layers=2, seed=9)  # same weights: the init draws come first
    ya, yb = a(x)[0], b(x)[0]
    np.testing.assert_array_equal(ya, yb)                 # reproducible from the seed
    assert not np.allclose(ya, a(x)[0])                   # a fresh mask each forward
    assert not np.allclose(ya, plain(x)[0])               # dropout acts in training
    np.testing.assert_array_equal(a.eval()(x)[0], plain(x)[0])  # and not in eval mode


def test_dropout_one_blocks_the_lower_layers():
    rng = np.random.default_rng(13)
    layer = RNN(3, 4, num_layers=2, dropout=1.0, dtype=np.float64, seed=0)
    x = rng.standard_normal((4, 2, 3))
    y, h = layer(x)
    assert np.all(np.isfinite(y))
    dx, _ = layer.backward(rng.standard_normal(y.shape), None)
    np.testing.assert_array_equal(dx, 0)  # every path from x passes the all-zero mask


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match="num_layers=1"):
        LSTM(3, 4, dropout=0.2)


# ---------------------------------------------------------------- forward/backward behaviour

@pytest.mark.parametrize("cell,opts", CELLS[::2], ids=CELL_IDS[::2])
def test_batch_first_is_a_transpose(cell, opts):
    rng = np.random.default_rng(21)
    tm = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, dtype=np.float64,
              seed=4)
    bf = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, dtype=np.float64,
              seed=4, batch_first=True)
    x = rng.standard_normal((5, 3, 3))
    state = random_state(tm, 3, rng)
    y1, s1 = tm(x, state, [5, 2, 4])
    y2, s2 = bf(x.transpose(1, 0, 2), state, [5, 2, 4])
    np.testing.assert_array_equal(y2, y1.transpose(1, 0, 2))
    for a, b in zip(parts(s1), parts(s2)):  # h_n stays (L*D, B, H), as in PyTorch
        np.testing.assert_array_equal(a, b)
    dy = rng.standard_normal(y1.shape)
    dx1, _ = tm.backward(dy)
    dx2, _ = bf.backward(dy.transpose(1, 0, 2))
    np.testing.assert_array_equal(dx2, dx1.transpose(1, 0, 2))
    for k in tm.grads:
        np.testing.assert_array_equal(tm.grads[k], bf.grads[k])


def test_zero_state_by_default_and_last_valid_state():
    rng = np.random.default_rng(22)
    layer = LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((6, 2, 3))
    zeros = tuple(np.zeros((4, 2, 4)) for _ in range(2))
    y, (h, c) = layer(x)
    y0, (h0, c0) = layer(x, zeros)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(h, h0)
    # lengths: the row of length 3 ends as the same row run alone on its 3 steps
    y3, (h3, c3) = layer(x, lengths=[6, 3])
    ys, (hs, cs) = layer(x[:3, 1:])
    np.testing.assert_allclose(y3[:3, 1:], ys, rtol=1e-12)
    np.testing.assert_allclose(h3[:, 1:], hs, rtol=1e-12)
    np.testing.assert_allclose(c3[:, 1:], cs, rtol=1e-12)
    assert np.all(y3[3:, 1] == 0)


def test_bias_false():
    layer = GRU(3, 4, num_layers=2, bias=False, seed=0)
    assert list(layer.state_dict()) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                        "weight_hh_l1"]
    x = np.random.default_rng(0).standard_normal((3, 2, 3)).astype(np.float32)
    y, h = layer(x)
    dx, dh = layer.backward(y)
    assert dx.shape == x.shape and set(layer.grads) == set(layer.state_dict())


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(23)
    layer = RNN(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, 8))
    layer(x)
    layer.backward(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    assert all(np.any(v != 0) for v in once.values())
    layer(x)
    layer.backward(dy)
    for k, v in layer.grads.items():
        np.testing.assert_allclose(v, 2 * once[k], rtol=1e-14)
    layer.zero_grad()
    assert all(np.all(v == 0) for v in layer.grads.values())


def test_eval_mode_runs_inference_only_unless_asked():
    rng = np.random.default_rng(24)
    layer = LSTM(3, 4, num_layers=2, dtype=np.float64, seed=1)
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, 4))
    y_train, _ = layer(x)
    dx_train, _ = layer.backward(dy)
    layer.eval()
    assert not layer.training
    y_eval, _ = layer(x)
    np.testing.assert_array_equal(y_eval, y_train)
    with pytest.raises(RuntimeError, match="without a matching forward.*need_grad=True"):
        layer.backward(dy)
    layer(x, need_grad=True)
    np.testing.assert_array_equal(layer.backward(dy)[0], dx_train)
    assert layer.train() is layer and layer.training


def test_call_is_forward_and_repr():
    layer = GRU(3, 4, num_layers=2, bidirectional=True, linear_before_reset=False,
                dtype=np.float64)
    assert repr(layer) == ("GRU(3, 4, num_layers=2, bidirectional=True, "
                           "linear_before_reset=False, dtype=float64)")
    assert repr(RNN(2, 3, nonlinearity="relu")) == "RNN(2, 3, nonlinearity='relu')"
    x = np.random.default_rng(0).standard_normal((2, 1, 3))
    np.testing.assert_array_equal(layer(x)[0], layer.forward(x)[0])


# ---------------------------------------------------------------- parameters and state dicts

def test_parameter_names_shapes_and_init():
    layer = LSTM(3, 5, num_layers=2, bidirectional=True, seed=0)
    want = {}
    for l, n_in in [(0, 3), (1, 10)]:
        for sfx in ["", "_reverse"]:
            want.update({f"weight_ih_l{l}{sfx}": (20, n_in), f"weight_hh_l{l}{sfx}": (20, 5),
                         f"bias_ih_l{l}{sfx}": (20,), f"bias_hh_l{l}{sfx}": (20,)})
    sd = layer.state_dict()
    assert list(sd) == list(want)  # PyTorch's order too
    assert {k: v.shape for k, v in sd.items()} == want
    assert list(layer.grads) == list(want)
    assert all(v.dtype == np.float32 for v in sd.values())
    k = 1 / np.sqrt(5)
    allv = np.concatenate([v.ravel() for v in sd.values()])
    assert allv.min() >= -k and allv.max() <= k and allv.max() - allv.min() > 1.8 * k
    again = LSTM(3, 5, num_layers=2, bidirectional=True, seed=0).state_dict()
    other = LSTM(3, 5, num_layers=2, bidirectional=True, seed=1).state_dict()
    assert all(np.array_equal(sd[n], again[n]) for n in sd)
    assert not any(np.array_equal(sd[n], other[n]) for n in sd)
    f64 = RNN(3, 5, dtype=np.float64, seed=0).parameters()
    assert all(p.dtype == np.float64 for p in f64)


@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
def test_state_dict_round_trip(cell, opts):
    rng = np.random.default_rng(31)
    a = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, seed=0)
    b = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, seed=1)
    live = b.parameters()
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    sd = a.state_dict()
    sd["weight_ih_l0"][...] = 0.5  # a copy: the layer does not change
    assert not np.any(a.state_dict()["weight_ih_l0"] == 0.5)
    b.load_state_dict(a.state_dict())
    assert all(p is q for p, q in zip(live, b.parameters()))  # loaded in place
    ya, sa = a(x, lengths=[5, 2])
    yb, sb = b(x, lengths=[5, 2])
    np.testing.assert_array_equal(ya, yb)
    for p, q in zip(parts(sa), parts(sb)):
        np.testing.assert_array_equal(p, q)


def test_load_state_dict_refuses_every_mismatch_at_once():
    layer = LSTM(3, 4, num_layers=2, seed=0)
    before = layer.state_dict()
    sd = LSTM(3, 4, num_layers=2, seed=1).state_dict()
    del sd["bias_hh_l1"]
    sd["weight_hr_l0"] = np.zeros((4, 4), np.float32)
    sd["weight_hh_l0"] = np.zeros((16, 5), np.float32)
    sd["bias_ih_l0"] = sd["bias_ih_l0"].astype(np.float64)
    with pytest.raises(ValueError) as e:
        layer.load_state_dict(sd)
    msg = str(e.value)
    assert "4 problem(s)" in msg and "nothing was loaded" in msg
    assert "missing key 'bias_hh_l1'" in msg
    assert "unexpected key 'weight_hr_l0'" in msg
    assert "'weight_hh_l0': expected shape (16, 4), got (16, 5)" in msg
    assert "'bias_ih_l0': expected dtype float32, got float64" in msg
    for k, v in layer.state_dict().items():  # untouched, even the valid entries
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="state_dict must be a mapping.*got list"):
        layer.load_state_dict([1, 2])


# ---------------------------------------------------------------- error cases

@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(input_size=0), ValueError, "input_size must be >= 1, got 0"),
    (dict(input_size=2.0), TypeError, "input_size must be an int, got float 2.0"),
    (dict(hidden_size=-1), ValueError, "hidden_size must be >= 1, got -1"),
    (dict(hidden_size=True), TypeError, "hidden_size must be an int, got bool"),
    (dict(num_layers=0), ValueError, "num_layers must be >= 1, got 0"),
    (dict(hidden_size=2**29), ValueError, r"4\*hidden_size and input_size must be below 2\*\*31"),
    (dict(input_size=10**30), ValueError, r"below 2\*\*31 .*input_size=10+$"),
    (dict(bias=1), TypeError, "bias must be a bool, got int 1"),
    (dict(batch_first="yes"), TypeError, "batch_first must be a bool, got str"),
    (dict(bidirectional=None), TypeError, "bidirectional must be a bool, got NoneType"),
    (dict(dropout=1.5, num_layers=2), ValueError,
     r"dropout must be a probability in \[0, 1\], got 1.5"),
    (dict(dropout="0.1"), TypeError, "dropout must be a float, got str"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64, got"),
    (dict(dtype="half"), TypeError, "dtype must be float32 or float64, got 'half'"),
    (dict(seed=-3), ValueError, "seed must be >= 0, got -3"),
    (dict(seed="a"), TypeError, "seed must be None, an int or a numpy.random.Generator, got str"),
])
def test_constructor_errors(kwargs, exc, msg):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        LSTM(**args)


def test_cell_option_errors():
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="linear_before_reset must be a bool, got int"):
        GRU(3, 4, linear_before_reset=0)


def test_forward_errors():
    lstm = LSTM(3, 4, num_layers=2, seed=0)
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"x must be 3-D \(T, B, input_size\), got 2-D "
                                         r"with shape \(5, 3\)"):
        lstm(x[:, 0])
    with pytest.raises(ValueError, match=r"x must be 3-D \(B, T, input_size\), batch_first"):
        LSTM(3, 4, batch_first=True)(x[0])
    with pytest.raises(ValueError, match=r"input_size=3 features on its last axis, got shape "
                                         r"\(5, 2, 4\)"):
        lstm(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32 .the layer's dtype., "
                                        "got float64"):
        lstm(x.astype(np.float64))
    with pytest.raises(TypeError, match="x must be an array, got NoneType"):
        lstm(None)
    h = np.zeros((2, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\) for LSTM, got ndarray"):
        lstm(x, h)
    with pytest.raises(ValueError, match=r"state\[c\] must have shape \(2, 2, 4\) "
                                         r"\(num_layers\*num_directions, batch, hidden_size\), "
                                         r"got \(1, 2, 4\)"):
        lstm(x, (h, h[:1]))
    with pytest.raises(ValueError, match=r"state must have shape \(4, 2, 4\)"):
        GRU(3, 4, num_layers=2, bidirectional=True)(x, h)  # L*D = 4 rows
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\], got \[6\]"):
        lstm(x, lengths=[6, 1])
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        lstm(x, lengths=[5, 1, 1])
    with pytest.raises(TypeError, match="lengths must be integers, got dtype float64"):
        lstm(x, lengths=[5.0, 1.0])


def test_backward_errors_and_tape():
    rng = np.random.default_rng(41)
    gru = GRU(3, 4, num_layers=2, seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"GRU.backward called without a matching forward"):
        gru.backward(None)
    y, h = gru(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 2, 4\) \(the shape of y\), "
                                         r"got \(5, 2, 3\)"):
        gru.backward(dy[..., :3])
    with pytest.raises(TypeError, match="dy must have dtype float32"):
        gru.backward(dy.astype(np.float64))
    with pytest.raises(ValueError, match=r"dstate must have shape \(2, 2, 4\)"):
        gru.backward(dy, h[:1])
    gru.backward(dy, h)  # the rejected calls left the forward's tape in place
    with pytest.raises(RuntimeError, match="GRU.backward called twice for one forward"):
        gru.backward(dy, h)
    with pytest.raises(ValueError):
        gru(x, lengths=[9, 9])
    with pytest.raises(RuntimeError, match="without a matching forward"):
        gru.backward(dy)  # a failed forward leaves nothing to backpropagate


# ---------------------------------------------------------------- Embedding, Linear

def test_embedding_forward_backward():
    rng = np.random.default_rng(51)
    emb = Embedding(7, 3, dtype=np.float64, seed=0)
    ids = np.array([[1, 4, 1], [6, 0, 1]])
    y = emb(ids)
    np.testing.assert_array_equal(y, emb.parameters()[0][ids])
    dy = rng.standard_normal(y.shape)
    assert emb.backward(dy) is None
    want = np.zeros((7, 3))
    for i in np.ndindex(ids.shape):  # repeated ids add up
        want[ids[i]] += dy[i]
    np.testing.assert_allclose(emb.grads["weight"], want, rtol=1e-15)
    assert repr(emb) == "Embedding(7, 3)"


def test_embedding_padding_idx_and_errors():
    emb = Embedding(5, 2, padding_idx=-1, seed=0)
    assert emb.padding_idx == 4 and np.all(emb.parameters()[0][4] == 0)
    y = emb([[4, 2]])
    emb.backward(np.ones_like(y) * 0.5)
    assert np.all(emb.grads["weight"][4] == 0) and np.all(emb.grads["weight"][2] == 0.5)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_embeddings=5\), "
                                         r"got \[-1, 5, 9\]"):
        emb(np.array([0, 5, -1, 9, 5]))
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        emb(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="padding_idx must be < num_embeddings=5, got 5"):
        Embedding(5, 2, padding_idx=5)
    with pytest.raises(ValueError, match="num_embeddings must be >= 1, got 0"):
        Embedding(0, 2)


def test_linear_finite_differences_at_every_timestep():
    rng = np.random.default_rng(52)
    lin = Linear(4, 3, dtype=np.float64, seed=0)
    k = 1 / np.sqrt(4)
    assert all(np.all(np.abs(p) <= k) for p in lin.parameters())
    x = rng.standard_normal((5, 2, 4))
    gy = rng.standard_normal((5, 2, 3))
    y = lin(x)
    np.testing.assert_allclose(y[3, 1], lin.parameters()[0] @ x[3, 1] + lin.parameters()[1],
                               rtol=1e-14)
    dx = lin.backward(gy)

    def loss():
        return np.sum(lin(x) * gy)

    num = numeric_grad(loss, [x] + lin.parameters())
    for a, n, name in zip([dx] + list(lin.grads.values()), num, ["x", "weight", "bias"]):
        assert_fd(a, n, name)
    with pytest.raises(ValueError, match=r"in_features=4 on its last axis, got shape \(5, 3\)"):
        lin(x[:, :, :3].reshape(5, 6)[:, :3])
    with pytest.raises(RuntimeError, match="Linear.backward called without a matching "
                                           "forward: run forward first$"):
        lin.backward(gy)  # the failed forward left nothing
    lin(x)
    lin.backward(gy)
    with pytest.raises(RuntimeError, match="Linear.backward called twice"):
        lin.backward(gy)
    assert list(Linear(2, 3, bias=False).state_dict()) == ["weight"]


# ---------------------------------------------------------------- Sequential

def tagger(dtype=np.float64):
    return Sequential(Embedding(11, 3, dtype=dtype, seed=0),
                      LSTM(3, 2, num_layers=2, bidirectional=True, dtype=dtype, seed=1),
                      Linear(4, 3, dtype=dtype, seed=2))


def test_sequential_finite_differences():
    rng = np.random.default_rng(61)
    model = tagger()
    ids = rng.integers(0, 11, size=(4, 3))
    lengths = np.array([4, 1, 3])
    state = [random_state(model[1], 3, rng)]
    y, states = model(ids, state, lengths)
    assert y.shape == (4, 3, 3) and len(states) == 1 and states[0][0].shape == (4, 3, 2)
    gy = rng.standard_normal(y.shape)
    gs = [rng.standard_normal(p.shape) for p in states[0]]

    def loss():
        y, (s,) = model(ids, state, lengths)
        return np.sum(y * gy) + sum(np.sum(a * g) for a, g in zip(s, gs))

    loss()
    dx, (ds,) = model.backward(gy, [tuple(gs)])
    assert dx is None  # an Embedding has no input gradient
    grads = model.grads
    assert list(grads) == list(model.state_dict())
    assert list(grads)[:3] == ["0.weight", "1.weight_ih_l0", "1.weight_hh_l0"]
    num = numeric_grad(loss, list(state[0]) + model.parameters())
    for a, n, name in zip(list(ds) + list(grads.values()), num, ["h0", "c0"] + list(grads)):
        assert_fd(a, n, name)


def test_sequential_state_dict_save_train_eval(tmp_path):
    rng = np.random.default_rng(62)
    a, b = tagger(np.float32), Sequential(
        Embedding(11, 3, seed=5), LSTM(3, 2, num_layers=2, bidirectional=True, seed=6),
        Linear(4, 3, seed=7))
    np.savez(tmp_path / "model.npz", **a.state_dict())
    with np.load(tmp_path / "model.npz") as f:
        b.load_state_dict(dict(f))
    ids = rng.integers(0, 11, size=(5, 2))
    np.testing.assert_array_equal(a(ids)[0], b(ids)[0])
    b.eval()
    assert not b.training and all(not m.training for m in b)
    b.train()
    assert all(m.training for m in b)
    bad = a.state_dict()
    bad["1.bias_ih_l0"] = bad["1.bias_ih_l0"][:3]
    del bad["2.bias"]
    with pytest.raises(ValueError, match=r"(?s)2 problem.*missing key '2.bias'.*"
                                         r"'1.bias_ih_l0': expected shape \(8,\), got \(3,\)"):
        b.load_state_dict(bad)
    model = Sequential(Linear(3, 2), Linear(2, 2))
    model.zero_grad()
    assert len(model.parameters()) == 4


def test_sequential_nested_and_errors():
    rng = np.random.default_rng(63)
    inner = Sequential(GRU(3, 4, dtype=np.float64, seed=0), Linear(4, 3, dtype=np.float64))
    model = Sequential(Linear(2, 3, dtype=np.float64), inner,
                       RNN(3, 2, dtype=np.float64, seed=1))
    x = rng.standard_normal((4, 2, 2))
    y, states = model(x)
    assert len(states) == 2 and isinstance(states[0], list) and states[1].shape == (1, 2, 2)
    y2, _ = model(x, [[states[0][0]], None])  # state passing: continue from the final states
    assert not np.allclose(y, y2)
    dx, d0 = model.backward(rng.standard_normal(y.shape))
    assert dx.shape == x.shape and d0[0][0].shape == (1, 2, 4) and d0[1].shape == (1, 2, 2)
    assert "1.0.weight_ih_l0" in model.state_dict()
    with pytest.raises(TypeError, match="argument 1 is ufunc"):
        Sequential(Linear(2, 2), np.tanh)
    with pytest.raises(RuntimeError, match="Sequential.backward called twice"):
        model.backward(y)
    with pytest.raises(ValueError, match="state must be None or a list with one entry per "
                                         r"stateful layer \(2\), got list of length 1"):
        model(x, [None])
    assert isinstance(model, Module) and model.stateful


# ---------------------------------------------------------------- ONNX weight layout

@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_round_trip(cell, opts, bias):
    a = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, bias=bias, seed=0)
    b = make(cell, opts, I=3, H=4, num_layers=2, bidirectional=True, bias=bias, seed=1)
    w = to_onnx(a)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    assert [x["W"].shape for x in w] == [(2, G * 4, 3), (2, G * 4, 8)]
    assert w[1]["R"].shape == (2, G * 4, 4)
    assert (w[0]["B"].shape == (2, 2 * G * 4)) if bias else w[0]["B"] is None
    assert w[0]["attributes"]["direction"] == "bidirectional"
    from_onnx(b, w)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)


def test_onnx_hand_worked_lstm_and_gru():
    # H = 1, I = 1: one number per gate, so the gate orders are visible.
    lstm = LSTM(1, 1)
    lstm.load_state_dict({"weight_ih_l0": np.array([[1], [2], [3], [4]], np.float32),  # i f g o
                          "weight_hh_l0": np.array([[5], [6], [7], [8]], np.float32),
                          "bias_ih_l0": np.array([.1, .2, .3, .4], np.float32),
                          "bias_hh_l0": np.array([.5, .6, .7, .8], np.float32)})
    (w,) = to_onnx(lstm)
    np.testing.assert_array_equal(w["W"], [[[1], [4], [2], [3]]])  # i o f c
    np.testing.assert_array_equal(w["R"], [[[5], [8], [6], [7]]])
    np.testing.assert_allclose(w["B"], [[.1, .4, .2, .3, .5, .8, .6, .7]])
    assert w["attributes"] == {"hidden_size": 1, "direction": "forward",
                               "activations": ["Sigmoid", "Tanh", "Tanh"]}

    gru = GRU(1, 1, linear_before_reset=False)
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    from_onnx(gru, {"W": f32([[[1], [2], [3]]]), "R": f32([[[4], [5], [6]]]),  # z r h
                    "B": f32([[.1, .2, .3, .4, .5, .6]]),
                    "attributes": {"linear_before_reset": 0}})
    sd = gru.state_dict()
    np.testing.assert_array_equal(sd["weight_ih_l0"], [[2], [1], [3]])  # r z n
    np.testing.assert_array_equal(sd["weight_hh_l0"], [[5], [4], [6]])
    np.testing.assert_allclose(sd["bias_ih_l0"], [.2, .1, .3])
    np.testing.assert_allclose(sd["bias_hh_l0"], [.5, .4, .6])


def test_onnx_errors():
    gru = GRU(2, 3, seed=0)
    before = gru.state_dict()
    w = to_onnx(GRU(2, 3, seed=1, linear_before_reset=False))
    with pytest.raises(ValueError, match="attribute linear_before_reset=0 does not match the "
                                         "layer's linear_before_reset=1"):
        from_onnx(gru, w)
    w[0]["attributes"]["linear_before_reset"] = 1
    w[0]["attributes"]["clip"] = 3.0
    with pytest.raises(ValueError, match="ONNX attribute 'clip' is not supported"):
        from_onnx(gru, w)
    del w[0]["attributes"]
    w[0]["R"] = w[0]["R"][:, :, :2]
    with pytest.raises(ValueError, match=r"weights\[0\]\['R'\] must have shape \(1, 9, 3\), "
                                         r"got \(1, 9, 2\)"):
        from_onnx(gru, w)
    with pytest.raises(ValueError, match="must be a list of 1 dict"):
        from_onnx(gru, [w[0], w[0]])
    with pytest.raises(ValueError, match="nonzero biases.*bias=False"):
        from_onnx(GRU(2, 3, bias=False), to_onnx(GRU(2, 3)))
    with pytest.raises(TypeError, match="layer must be an rnnfuse LSTM, GRU or RNN"):
        to_onnx(Linear(2, 2))
    for k, v in gru.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
def test_onnx_runtime_parity(cell, opts):
    """The exported weights in a one-node ONNX graph give our outputs (ragged, both ways)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(71)
    layer = make(cell, opts, I=3, H=4, bidirectional=True, seed=0)
    T, B = 5, 3
    x = rng.standard_normal((T, B, 3)).astype(np.float32)
    lengths = np.array([5, 2, 4], np.int32)
    state = random_state(layer, B, rng)
    y, s = layer(x, state, lengths)

    (w,) = to_onnx(layer)
    attrs = dict(w["attributes"])
    inits = [numpy_helper.from_array(w[k], k) for k in ("W", "R", "B")]
    inits.append(numpy_helper.from_array(lengths, "sequence_lens"))
    inputs = ["X", "W", "R", "B", "sequence_lens", "initial_h"]
    feeds = {"X": x, "initial_h": parts(state)[0]}
    if cell == "lstm":
        inputs.append("initial_c")
        feeds["initial_c"] = state[1]
    outputs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    node = helper.make_node(cell.upper(), inputs, outputs, **attrs)
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa
    graph = helper.make_graph(
        [node], "g", [vi(k, v.shape) for k, v in feeds.items()],
        [vi(o, None) for o in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    # ONNX Y is (T, D, B, H): ours is its directions side by side on the last axis
    np.testing.assert_allclose(got[0].transpose(0, 2, 1, 3).reshape(T, B, 8), y,
                               rtol=1e-5, atol=1e-5)
    for g, p in zip(got[1:], parts(s)):
        np.testing.assert_allclose(g, p, rtol=1e-5, atol=1e-5)


def test_modules_lists_every_module_in_order():
    inner = Sequential(GRU(3, 4, seed=0), Linear(4, 2, seed=0))
    lstm = LSTM(2, 3, seed=0)
    model = Sequential(lstm, inner)
    assert [id(m) for m in model.modules()] == [id(model), id(lstm), id(inner), id(inner[0]),
                                                id(inner[1])]
    assert list(lstm.modules()) == [lstm]
