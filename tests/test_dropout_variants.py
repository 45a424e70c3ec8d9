"""Dropout variants: weight drop (DropConnect on W_hh, AWD-LSTM) and variational
recurrent dropout (one (B, H) mask on h_{t-1} in the recurrent product, every step).

Weight drop (layers):
- eval mode computes the plain layer bitwise; p=0 draws nothing;
- a training forward is the plain kernels run on W_hh * mask, the mask reproduced from
  the layer's generator; masks are seeded and fresh per forward;
- float64 finite differences of every parameter with the masks held fixed (the layer's
  generator reseeded per evaluation): stacked, bidirectional, ragged;
- bad values are refused, naming the argument.
Recurrent dropout (kernels and layers):
- the reference's gradients against float64 finite differences, and its definition;
- the kernels (each code path) against the reference: float32/64, ragged, reverse, every
  cell and option; bitwise repeatable at 1 and 2 threads; an all-ones mask is the plain
  cell; bad masks are refused, named;
- layers: eval and p=0 are the plain layer, masks seeded, finite differences; with zoneout
  and weight drop together, bidirectional and ragged; a resumed fit() draws the same masks.
"""
import numpy as np
import pytest

from rnnfuse import GRU, LSTM, RNN
from rnnfuse import functional as F
from rnnfuse import reference as R
from checks import assert_close, assert_gradient, kernel  # tests/checks.py

CELLS = [LSTM, GRU, RNN]
KERNEL_CELLS = [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"),
                ("rnn", "relu")]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _x(T=5, B=3, I=2, dtype=np.float32, seed=40):
    return np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)


def _states(state):
    return list(state) if isinstance(state, tuple) else [state]


# ---------------------------------------------------------------- layers

VARIANTS = ["weight_drop", "recurrent_dropout"]


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("name", VARIANTS)
def test_layer_options_are_checked(cls, name):
    with pytest.raises(ValueError, match=rf"{name} must be a probability in \[0, 1\), got 1"):
        cls(2, 3, **{name: 1})
    with pytest.raises(ValueError, match=rf"{name} must be a probability in \[0, 1\), "
                                         r"got -0.1"):
        cls(2, 3, **{name: -0.1})
    with pytest.raises(TypeError, match=f"{name} must be a float, got bool"):
        cls(2, 3, **{name: True})
    with pytest.raises(TypeError, match=f"{name} must be a float, got str"):
        cls(2, 3, **{name: "0.5"})
    assert repr(cls(2, 3, **{name: 0.25})).endswith(f"{name}=0.25)")
    assert name not in repr(cls(2, 3))


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("name", VARIANTS)
def test_layer_eval_is_the_plain_layer_bitwise(cls, name):
    x = _x()
    plain = cls(2, 4, num_layers=2, bidirectional=True, seed=41).eval()
    dropped = cls(2, 4, num_layers=2, bidirectional=True, seed=41, **{name: 0.5}).eval()
    y0, s0 = plain(x, lengths=[5, 2, 0])
    y1, s1 = dropped(x, lengths=[5, 2, 0])
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(_states(s0), _states(s1)):
        np.testing.assert_array_equal(a, b)
    # training with p=0 draws nothing: the same numbers and the same generator state
    plain.train(), dropped.train()
    setattr(dropped, name, 0.0)
    np.testing.assert_array_equal(plain(x)[0], dropped(x)[0])
    assert plain._rng.random() == dropped._rng.random()


def _masked_forward(layer, x, lengths, seed):
    """The training forward rebuilt from functional's kernels: every layer and direction
    on W_hh * its weight drop mask and with its recurrent dropout mask, the masks drawn as
    the layer draws them (in the same order)."""
    rng = np.random.default_rng(seed)
    L, D, B, H = layer.num_layers, layer.num_directions, x.shape[1], layer.hidden_size

    def mask(shape, p):
        keep = rng.random(shape) >= p
        return keep.astype(layer.dtype) * layer.dtype.type(1.0 / (1.0 - p))

    inp, finals = x, []
    for l in range(L):
        ys = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, *_ = layer._weights(l, d)
            if layer.weight_drop:
                w_hh = w_hh * mask(w_hh.shape, layer.weight_drop)
            m = mask((B, H), layer.recurrent_dropout) if layer.recurrent_dropout else None
            y, fin, _ = F._forward(layer._cell, inp, [None] * layer._n_states, w_ih, w_hh,
                                   b_ih, b_hh, lengths, d == 1, layer._option, False,
                                   recurrent_dropout=m)
            ys.append(y)
            finals.append(fin)
        inp = np.concatenate(ys, axis=2)
    return inp, finals


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("variant", [dict(weight_drop=0.4), dict(recurrent_dropout=0.4),
                                     dict(weight_drop=0.3, recurrent_dropout=0.5)])
def test_layer_training_forward_runs_the_masks(cls, variant):
    x, lengths = _x(), [5, 2, 4]
    layer = cls(2, 4, num_layers=2, bidirectional=True, seed=42, **variant)
    layer._rng = np.random.default_rng(43)
    y, state = layer(x, lengths=lengths)
    want_y, want_finals = _masked_forward(layer, x, lengths, 43)
    np.testing.assert_array_equal(y, want_y)
    for k, fin in enumerate(want_finals):
        for s, f in zip(_states(state), fin):
            np.testing.assert_array_equal(s[k], f)
    # fresh masks at the next forward; eval then runs without them
    assert not np.array_equal(layer(x, lengths=lengths)[0], y)
    layer.eval()
    assert not np.array_equal(layer(x, lengths=lengths)[0], y)


def test_layer_masks_drop_about_p():
    layer = LSTM(3, 50, seed=44, weight_drop=0.3, recurrent_dropout=0.2)
    layer._rng = np.random.default_rng(45)
    w, mask = layer._dropped_weights(0, 0)
    assert mask.shape == (200, 50) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / 0.7)}
    assert 0.25 < np.mean(mask == 0) < 0.35
    np.testing.assert_array_equal(w[1], layer._params["weight_hh_l0"] * mask)
    assert w[0] is layer._params["weight_ih_l0"]  # only W_hh is dropped
    m = layer._recurrent_dropout_arg((40, 50))
    assert m.shape == (40, 50) and m.dtype == np.float32
    assert set(np.unique(m)) == {np.float32(0), np.float32(1 / 0.8)}
    assert 0.15 < np.mean(m == 0) < 0.25


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("variant,bias", [
    (dict(weight_drop=0.5), True), (dict(weight_drop=0.5), False),
    (dict(recurrent_dropout=0.5), True), (dict(recurrent_dropout=0.5), False),
    (dict(zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.5), True),
])
def test_layer_gradients_match_finite_differences(cls, variant, bias):
    """float64, stacked, bidirectional, ragged, training masks held fixed: each finite
    difference reruns the forward with the layer's generator reseeded. The last variant
    combines zoneout, recurrent dropout and weight drop (and the LSTM's peepholes)."""
    kw = dict(peepholes=True) if cls is LSTM else {}
    kw.update(variant)
    layer = cls(2, 3, num_layers=2, bias=bias, bidirectional=True, dtype=np.float64,
                seed=46, **kw)
    rng = np.random.default_rng(47)
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 6))
    lengths = [4, 1, 3]
    if cls is LSTM:  # peepholes start at zero; make them matter
        for name, p in layer.named_parameters().items():
            if name.startswith("weight_peep"):
                p[...] = rng.standard_normal(p.shape)

    def forward():
        layer._rng = np.random.default_rng(48)
        return layer.forward(x, lengths=lengths)

    def loss():
        y, state = forward()
        return np.sum(y * dy) + sum(np.sum(s) for s in _states(state))

    y, state = forward()
    ones = [np.ones_like(s) for s in _states(state)]
    dx, _ = layer.backward(dy, tuple(ones) if cls is LSTM else ones[0])
    for name, p in layer.named_parameters().items():
        for idx in [(0,), (p.shape[0] - 1,), (p.shape[0] // 2,)]:
            idx = idx + (p.ndim - 1) * (min(1, p.shape[-1] - 1),)
            assert_gradient(layer.grads[name][idx], loss, p, idx, name)
    if "weight_drop" in variant:  # a dropped element of W_hh gets no gradient
        layer._rng = np.random.default_rng(48)
        _, mask = layer._dropped_weights(0, 0)
        assert np.all(layer.grads["weight_hh_l0"][mask == 0] == 0)
    for idx in [(0, 0, 0), (2, 2, 1)]:  # and x's gradient
        assert_gradient(dx[idx], loss, x, idx, "x")


@pytest.mark.parametrize("cls", CELLS)
def test_streams_and_pools_run_without_the_masks(cls):
    layer = cls(3, 5, num_layers=2, seed=49, weight_drop=0.5, recurrent_dropout=0.5)
    x = _x(6, 2, 3, seed=50)
    layer.eval()
    y, _ = layer(x)
    layer.train()  # a stream runs as in eval whatever the layer's mode
    stream = layer.stream(batch_size=2)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(6)]), y)
    pool = layer.stream_pool(2)
    ids = [pool.open(), pool.open()]
    np.testing.assert_array_equal(np.stack([pool.step(ids, x[t]) for t in range(6)]), y)


# ---------------------------------------------------------------- recurrent dropout: kernels


def rcase(cell, T, B, I, H, dtype, seed=0, p=0.4):
    """Random inputs, weights, upstream gradients and a recurrent dropout mask (keep
    probability 1-p, scaled by 1/(1-p))."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    G, s = GATES[cell], 1 / np.sqrt(H)
    args = dict(x=r(T, B, I), h0=r(B, H), w_ih=r(G * H, I, scale=s), w_hh=r(G * H, H, scale=s),
                b_ih=r(G * H, scale=s), b_hh=r(G * H, scale=s))
    if cell == "lstm":
        args["c0"] = r(B, H)
    mask = ((rng.random((B, H)) >= p) / (1 - p)).astype(dtype)
    up = (r(T, B, H), r(B, H), r(B, H)) if cell == "lstm" else (r(T, B, H), r(B, H))
    return args, mask, up


def rforward(module, cell, option, a, mask, lengths=None, reverse=False, need_ctx=True,
             zoneout=None):
    w = (a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    kw = dict(need_ctx=need_ctx, zoneout=zoneout, recurrent_dropout=mask)
    if cell == "lstm":
        y, h, c, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], *w, lengths, reverse,
                                           **kw)
        return (y, h, c), ctx
    forward = module.gru_forward if cell == "gru" else module.rnn_forward
    y, h, ctx = forward(a["x"], a["h0"], *w, lengths, reverse, option, **kw)
    return (y, h), ctx


def rrun(module, cell, option, a, mask, up, lengths=None, reverse=False, zoneout=None):
    outs, ctx = rforward(module, cell, option, a, mask, lengths, reverse, zoneout=zoneout)
    return tuple(outs) + tuple(getattr(module, f"{cell}_backward")(*up, ctx))


@pytest.mark.parametrize("cell,option", KERNEL_CELLS)
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([3, 0, 4], True),
                                             ([4, 1, 2], False)])
def test_recurrent_dropout_reference_gradients_match_finite_differences(cell, option, lengths,
                                                                        reverse):
    args, mask, up = rcase(cell, 4, 3, 2, 3, np.float64, seed=60)
    if option == "relu":  # keep the pre-activations away from relu's kink
        args["b_ih"] = args["b_ih"] + 1.0
    names = list(args)

    def loss(a):
        outs, _ = rforward(R, cell, option, a, mask, lengths, reverse, need_ctx=False)
        return sum(np.sum(o * u) for o, u in zip(outs, up))

    got = rrun(R, cell, option, args, mask, up, lengths, reverse)
    n_out = len(up)
    grads = dict(zip(["x", "h0"] + (["c0"] if cell == "lstm" else [])
                     + ["w_ih", "w_hh", "b_ih", "b_hh"], got[n_out:]))
    for name in names:
        p = args[name]
        for idx in [(0,) * p.ndim, tuple(d - 1 for d in p.shape),
                    tuple(d // 2 for d in p.shape)]:
            assert_gradient(grads[name][idx], lambda: loss(args), p, idx, name)


@pytest.mark.parametrize("cell,option", [("lstm", None), ("rnn", "tanh"), ("gru", True),
                                         ("gru", False)])
def test_recurrent_dropout_reference_follows_the_definition(cell, option):
    """One step: the product takes h0 * m, the state's own path (the GRU's z h0, the
    LSTM's c) takes h0 and c0 unmasked."""
    args, mask, up = rcase(cell, 1, 3, 2, 4, np.float64, seed=61)
    (y, h, *c), _ = rforward(R, cell, option, args, mask)
    a, H = args, 4
    pre = a["x"][0] @ a["w_ih"].T + a["b_ih"]
    hm = a["h0"] * mask
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    if cell == "lstm":
        g = pre + hm @ a["w_hh"].T + a["b_hh"]
        i, f, gg, o = sig(g[:, :H]), sig(g[:, H:2 * H]), np.tanh(g[:, 2 * H:3 * H]), sig(g[:, 3 * H:])
        c1 = f * a["c0"] + i * gg
        want = o * np.tanh(c1)
        np.testing.assert_allclose(c[0], c1, rtol=1e-12, atol=1e-12)
    elif cell == "rnn":
        want = np.tanh(pre + hm @ a["w_hh"].T + a["b_hh"])
    else:
        hh = hm @ a["w_hh"].T
        r = sig(pre[:, :H] + hh[:, :H] + a["b_hh"][:H])
        z = sig(pre[:, H:2 * H] + hh[:, H:2 * H] + a["b_hh"][H:2 * H])
        w_hn, b_hn = a["w_hh"][2 * H:], a["b_hh"][2 * H:]
        inner = r * (hm @ w_hn.T + b_hn) if option else (r * hm) @ w_hn.T + b_hn
        n = np.tanh(pre[:, 2 * H:] + inner)
        want = (1 - z) * n + z * a["h0"]
    np.testing.assert_allclose(y[0], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell,option", KERNEL_CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([5, 0, 3, 1], False),
                                             ([5, 0, 3, 1], True)])
def test_recurrent_dropout_kernels_match_reference(kernel, cell, option, dtype, lengths,
                                                   reverse):
    args, mask, up = rcase(cell, 5, 4, 3, 7, dtype, seed=62)
    got = rrun(F, cell, option, args, mask, up, lengths, reverse)
    want = rrun(R, cell, option, args, mask, up, lengths, reverse)
    assert_close(got, want, dtype, f"{cell} {option} {kernel}")
    # inference (no ctx) gives the training forward's outputs
    outs, ctx = rforward(F, cell, option, args, mask, lengths, reverse, need_ctx=False)
    assert ctx is None
    for a, b in zip(outs, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell,option", KERNEL_CELLS)
def test_recurrent_dropout_with_zoneout_and_batch_of_one(kernel, cell, option):
    args, mask, up = rcase(cell, 6, 1, 2, 5, np.float64, seed=63)
    zmask = (np.random.default_rng(64).random((6, 1, 5)) < 0.4).astype(np.float64)
    zoneout = (zmask, zmask[::-1].copy()) if cell == "lstm" else zmask
    for reverse in (False, True):
        got = rrun(F, cell, option, args, mask, up, None, reverse, zoneout=zoneout)
        want = rrun(R, cell, option, args, mask, up, None, reverse, zoneout=zoneout)
        assert_close(got, want, np.float64, f"{cell} {option} reverse={reverse}")


@pytest.mark.parametrize("cell,option", KERNEL_CELLS)
def test_recurrent_dropout_of_ones_is_the_plain_cell(kernel, cell, option):
    args, mask, up = rcase(cell, 5, 4, 3, 6, np.float32, seed=65)
    lengths = [5, 2, 0, 4]
    plain = rrun(F, cell, option, args, None, up, lengths)
    ones = rrun(F, cell, option, args, np.ones_like(mask), up, lengths)
    for a, b in zip(plain, ones):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    # and a mask that drops something changes y and dW_hh
    dropped = rrun(F, cell, option, args, mask, up, lengths)
    n_out = len(up)
    assert not np.array_equal(dropped[0], plain[0])
    assert not np.array_equal(dropped[n_out + 3 + (cell == "lstm")], plain[n_out + 3 + (cell == "lstm")])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell,option", [("lstm", None), ("gru", False), ("gru", True),
                                         ("rnn", "tanh")])
def test_recurrent_dropout_repeats_bitwise_at_each_thread_count(threads, cell, option):
    """Large enough for the time loops to be shared among threads."""
    from threadpoolctl import threadpool_limits
    lengths = np.full(64, 20)
    lengths[[3, 9]] = [0, 11]
    args, mask, up = rcase(cell, 20, 64, 24, 96, np.float32, seed=66)
    with threadpool_limits(threads):
        first = rrun(F, cell, option, args, mask, up, lengths, True)
        again = rrun(F, cell, option, args, mask, up, lengths, True)
    assert_close(first, rrun(R, cell, option, args, mask, up, lengths, True), np.float32,
                  cell)
    for g, w in zip(first, again):
        if g is not None:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("change,error,message", [
    (lambda m: m[:, :-1], ValueError, r"recurrent_dropout must have shape \(3, 4\)"),
    (lambda m: m[None], ValueError, r"recurrent_dropout must be 2-D with shape \(3, 4\)"),
    (lambda m: m.astype(np.float32), TypeError, "recurrent_dropout must have dtype float64"),
    (lambda m: -m, ValueError, "recurrent_dropout must hold finite values >= 0"),
    (lambda m: m * np.nan, ValueError, "recurrent_dropout must hold finite values >= 0"),
    (lambda m: np.where(m > 0, np.inf, m), ValueError, "recurrent_dropout must hold finite values >= 0"),
    (lambda m: 0.5, TypeError, "recurrent_dropout must be a \\(B, H\\) mask array"),
    (lambda m: True, TypeError, "recurrent_dropout must be a \\(B, H\\) mask array"),
    (lambda m: "mask", TypeError, "recurrent_dropout"),
])
@pytest.mark.parametrize("cell,option", [("lstm", None), ("gru", False), ("rnn", "tanh")])
def test_bad_recurrent_dropout_is_refused(cell, option, change, error, message):
    args, mask, _ = rcase(cell, 2, 3, 2, 4, np.float64, seed=67)
    with pytest.raises(error, match=message):
        rforward(F, cell, option, args, change(mask))
    non_contiguous = np.asfortranarray(mask)  # converted, not refused
    assert_close(rforward(F, cell, option, args, non_contiguous)[0],
                  rforward(R, cell, option, args, mask)[0], np.float64, cell)


def test_resumed_training_draws_the_same_masks(tmp_path):
    """fit() checkpoints every layer's generator: a run interrupted and resumed with weight
    drop and recurrent dropout reproduces the uninterrupted run's losses bitwise."""
    from rnnfuse import Adam
    from rnnfuse import train
    from rnnfuse.apps import charlm
    text = "the quick brown fox jumps over the lazy dog. " * 40

    def run(p=(0.3, 0.4), **kw):
        vocab = charlm.Vocab(text)
        ids = vocab.encode(text)
        rng = np.random.default_rng(70)
        model = charlm.char_model(vocab.size, "lstm", 8, 1, embed=6, seed=70)
        assert isinstance(model[1], LSTM)
        model[1].weight_drop, model[1].recurrent_dropout = p
        task = charlm.CharLM(model, ids[:1500], ids[1500:], k=10, batch_size=4, rng=rng)
        return train.fit(task, Adam(model.named_parameters(), lr=1e-2), clip=1.0, rng=rng,
                         progress=False, **kw)

    full = run(epochs=2)
    ck = str(tmp_path / "ck.rnnf")
    first = run(epochs=2, save=ck, max_steps=11)
    assert first.stopped == "max_steps"
    rest = run(epochs=2, save=ck, resume=ck)
    assert rest.losses == full.losses
    assert run((0.0, 0.0), epochs=2).losses != full.losses  # and the masks were drawn
