"""The layer-normalized LSTM and GRU (haste's form), fused in csrc/layernorm.c.

- the reference follows the equations (one step written out) and its gradients, the gains'
  included, match float64 central finite differences, with zoneout and recurrent dropout;
- the kernels (every code path) match the reference: float32/64, ragged, reverse, B=1,
  zoneout, recurrent dropout; inference gives training's bits; bitwise at 1 and 2 threads;
  their own gradients match finite differences too;
- layers: parameters, state dicts, layer norm + zoneout + bidirectional + ragged + stacked
  against finite differences; streams, pools and quantized() refuse it;
- an independent PyTorch loop of the same math (skipped without torch);
- every refusal, with its message.
"""
import numpy as np
import pytest

from rnnfuse import GRU, LSTM, RNN, _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R
from rnnfuse.onnx_weights import from_onnx, to_onnx
from checks import assert_close, assert_gradient, kernel  # tests/checks.py

CELLS = ["lstm", "gru"]
NAMES = {"lstm": ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "g_ih", "g_hh", "g_c",
                  "b_c"],
         "gru": ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "g_ih", "g_hh"]}


def make_case(cell, T, B, I, H, dtype, seed=0):
    """Random inputs, weights, gains away from 1 (so that they matter) and upstream
    gradients."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0, at=0.0):
        return (at + scale * rng.standard_normal(shape)).astype(dtype)

    G, s = (4 if cell == "lstm" else 3), 1 / np.sqrt(H)
    a = dict(x=r(T, B, I), h0=r(B, H), w_ih=r(G * H, I, scale=s), w_hh=r(G * H, H, scale=s),
             b_ih=r(G * H, scale=s), b_hh=r(G * H, scale=s), g_ih=r(G * H, scale=0.3, at=1),
             g_hh=r(G * H, scale=0.3, at=1))
    up = [r(T, B, H), r(B, H)]
    if cell == "lstm":
        a.update(c0=r(B, H), g_c=r(H, scale=0.3, at=1), b_c=r(H, scale=0.3))
        up.append(r(B, H))
    return a, up


def layer_norm_of(cell, a):
    return tuple(a[n] for n in NAMES[cell][-(4 if cell == "lstm" else 2):])


def forward(module, cell, a, lengths=None, reverse=False, **kw):
    ln = layer_norm_of(cell, a)
    if cell == "lstm":
        y, h, c, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                           a["b_ih"], a["b_hh"], lengths, reverse,
                                           layer_norm=ln, **kw)
        return (y, h, c), ctx
    y, h, ctx = module.gru_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                   a["b_hh"], lengths, reverse, layer_norm=ln, **kw)
    return (y, h), ctx


def run(module, cell, a, up, lengths=None, reverse=False, **kw):
    outs, ctx = forward(module, cell, a, lengths, reverse, **kw)
    back = module.lstm_backward if cell == "lstm" else module.gru_backward
    return outs + tuple(back(*up, ctx))


def variants(cell, T, B, H, dtype, seed):
    """Training zoneout masks and a recurrent dropout mask."""
    rng = np.random.default_rng(seed)
    mask = lambda: (rng.random((T, B, H)) < 0.3).astype(dtype)  # noqa: E731
    return dict(zoneout=(mask(), mask()) if cell == "lstm" else mask(),
                recurrent_dropout=(rng.random((B, H)) > 0.25).astype(dtype) / 0.75)


def check_finite_differences(module, cell, lengths, reverse, kw):
    a, up = make_case(cell, 3, 3, 2, 2, np.float64, seed=1)

    def loss():
        outs, _ = forward(module, cell, a, lengths, reverse, need_ctx=False, **kw)
        return sum(np.sum(o * u) for o, u in zip(outs, up))

    grads = run(module, cell, a, up, lengths, reverse, **kw)[len(up):]
    assert len(grads) == len(NAMES[cell])
    for name, grad in zip(NAMES[cell], grads):
        for idx in np.ndindex(a[name].shape):
            assert_gradient(grad[idx], loss, a[name], idx, name)


CASES = [(None, False, False), ([3, 0, 2], False, False), ([3, 0, 2], True, True),
         (None, True, True)]


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths,reverse,with_variants", CASES)
def test_reference_gradients_match_finite_differences(cell, lengths, reverse, with_variants):
    kw = variants(cell, 3, 3, 2, np.float64, 2) if with_variants else {}
    check_finite_differences(R, cell, lengths, reverse, kw)


def _ln(v, g):
    return g * (v - v.mean()) / np.sqrt(v.var() + 1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_reference_follows_the_equations(cell):
    """Two steps of one row written out from the definitions."""
    a, _ = make_case(cell, 2, 1, 3, 4, np.float64, seed=3)
    H = 4
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h, c = a["h0"][0], a["c0"][0] if cell == "lstm" else None
    ys = []
    for t in range(2):
        gi = _ln(a["w_ih"] @ a["x"][t, 0], a["g_ih"])
        gh = _ln(a["w_hh"] @ h, a["g_hh"])
        if cell == "lstm":
            pre = gi + gh + a["b_ih"] + a["b_hh"]
            i, f, o = sig(pre[:H]), sig(pre[H:2 * H]), sig(pre[3 * H:])
            g = np.tanh(pre[2 * H:3 * H])
            c = f * c + i * g
            h = o * np.tanh(_ln(c, a["g_c"]) + a["b_c"])
        else:
            b_ih, b_hh = a["b_ih"], a["b_hh"]
            r = sig(gi[:H] + gh[:H] + b_ih[:H] + b_hh[:H])
            z = sig(gi[H:2 * H] + gh[H:2 * H] + b_ih[H:2 * H] + b_hh[H:2 * H])
            n = np.tanh(gi[2 * H:] + b_ih[2 * H:] + r * (gh[2 * H:] + b_hh[2 * H:]))
            h = (1 - z) * n + z * h
        ys.append(h)
    outs, _ = forward(R, cell, a)
    np.testing.assert_allclose(outs[0][:, 0], np.stack(ys), rtol=1e-12, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(outs[2][0], c, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the kernels

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths,reverse,with_variants", CASES)
def test_kernels_match_reference(kernel, cell, dtype, lengths, reverse, with_variants):
    H = 5 if lengths is None else 17  # a tail of the vector width
    a, up = make_case(cell, 3, 3, 4, H, dtype, seed=4)
    kw = variants(cell, 3, 3, H, dtype, 5) if with_variants else {}
    want = run(R, cell, a, up, lengths, reverse, **kw)
    assert_close(run(F, cell, a, up, lengths, reverse, **kw), want, dtype, cell)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths,reverse,with_variants", CASES[1:3])
def test_kernel_gradients_match_finite_differences(cell, lengths, reverse, with_variants):
    kw = variants(cell, 3, 3, 2, np.float64, 6) if with_variants else {}
    check_finite_differences(F, cell, lengths, reverse, kw)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_of_one_eval_zoneout_and_inference(kernel, cell, dtype):
    """B=1 and eval's zoneout against the reference; inference (need_ctx=False) gives the
    training forward's bits."""
    a, up = make_case(cell, 6, 1, 3, 40, dtype, seed=7)
    for kw in ({}, {"zoneout": 0.3}):
        assert_close(run(F, cell, a, up, **kw), run(R, cell, a, up, **kw), dtype, cell)
        train, _ = forward(F, cell, a, [6], True, **kw)
        infer, ctx = forward(F, cell, a, [6], True, need_ctx=False, **kw)
        assert ctx is None
        for t, i in zip(train, infer):
            np.testing.assert_array_equal(t, i)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_in_chunks_of_steps(cell):
    """A long inference runs its projection a chunk of steps at a time."""
    a, up = make_case(cell, 300, 5, 3, 8, np.float32, seed=8)
    lengths = [300, 7, 0, 299, 150]
    train, _ = forward(F, cell, a, lengths)
    infer, _ = forward(F, cell, a, lengths, need_ctx=False)
    for t, i in zip(train, infer):
        np.testing.assert_array_equal(t, i)
    assert_close(train, forward(R, cell, a, lengths)[0], np.float32, cell)


@pytest.mark.parametrize("cell", CELLS)
def test_rows_do_not_depend_on_the_batch(cell):
    """Batch invariance: a row's outputs are the same bits alone or among others."""
    a, _ = make_case(cell, 5, 6, 3, 24, np.float32, seed=9)
    whole, _ = forward(F, cell, a, need_ctx=False)
    one = dict(a, x=a["x"][:, 2:3], h0=a["h0"][2:3], **({"c0": a["c0"][2:3]}
                                                           if cell == "lstm" else {}))
    alone, _ = forward(F, cell, one, need_ctx=False)
    np.testing.assert_array_equal(alone[0][:, 0], whole[0][:, 2])


@pytest.mark.parametrize("threads", [1, 2])
def test_repeat_bitwise_at_each_thread_count(threads):
    """Large enough for the time loops to be shared among threads."""
    from threadpoolctl import threadpool_limits
    lengths = np.full(64, 30)
    lengths[[3, 9]] = [0, 11]
    for cell in CELLS:
        a, up = make_case(cell, 30, 64, 40, 96, np.float32, seed=10)
        kw = variants(cell, 30, 64, 96, np.float32, 11)
        with threadpool_limits(threads):
            first, again = (run(F, cell, a, up, lengths, True, **kw) for _ in range(2))
        assert_close(first, run(R, cell, a, up, lengths, True, **kw), np.float32, cell)
        for g, w in zip(first, again):
            np.testing.assert_array_equal(g, w)


def test_dict_form():
    """A dict of the names gives the tuple's result."""
    a, up = make_case("lstm", 3, 2, 3, 4, np.float64, seed=12)
    outs, _ = forward(F, "lstm", a)
    y, h, c, _ = F.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                a["b_hh"], layer_norm={n: a[n] for n in NAMES["lstm"][7:]})
    np.testing.assert_array_equal(y, outs[0])


# ---------------------------------------------------------------- refusals

def test_refusals_name_the_argument():
    a, _ = make_case("gru", 2, 2, 3, 4, np.float64)

    def gru(**kw):
        return F.gru_forward(a["x"], None, a["w_ih"], a["w_hh"], None, None, **kw)

    ln = (a["g_ih"], a["g_hh"])
    with pytest.raises(ValueError, match="layer_norm is for the LSTM and the GRU with "
                                         "linear_before_reset=True; the GRU with"):
        gru(linear_before_reset=False, layer_norm=ln)
    with pytest.raises(ValueError, match=r"layer_norm g_hh must have shape \(12,\)"):
        gru(layer_norm=(a["g_ih"], a["g_hh"][:5]))
    with pytest.raises(TypeError, match=r"layer_norm must be a tuple \(g_ih, g_hh\)"):
        gru(layer_norm=(a["g_ih"],))
    with pytest.raises(ValueError, match=r"layer_norm must have the keys \(g_ih, g_hh\)"):
        gru(layer_norm={"g_ih": a["g_ih"]})
    with pytest.raises(TypeError, match="layer_norm g_ih must have dtype float64"):
        gru(layer_norm=(a["g_ih"].astype(np.float32), a["g_hh"]))
    w = np.zeros((4, 3)), np.zeros((4, 4))
    with pytest.raises(ValueError, match="layer_norm is for .*; the RNN has none"):
        F.rnn_forward(a["x"], None, *w, None, None, layer_norm=ln)
    b, _ = make_case("lstm", 2, 2, 3, 4, np.float64)
    with pytest.raises(ValueError, match="layer_norm and peepholes cannot be combined"):
        F.lstm_forward(b["x"], None, None, b["w_ih"], b["w_hh"], None, None,
                       peepholes=np.zeros(12), layer_norm=layer_norm_of("lstm", b))
    with pytest.raises(TypeError, match=r"layer_norm must be a tuple \(g_ih, g_hh, g_c, b_c\)"):
        F.lstm_forward(b["x"], None, None, b["w_ih"], b["w_hh"], None, None, layer_norm=ln)


def kernels_forward(cell, a, layer_norm, option=True, peep=None, **kw):
    """_kernels.forward called directly (functional.py's checks bypassed)."""
    T, B, I = a["x"].shape
    H = a["w_hh"].shape[1]
    plan = _kernels.Plan(np.full(B, T), T, False)
    ws = np.empty(_kernels.workspace_size(cell, plan, I, H, True, cell != "rnn"),
                  a["x"].dtype)
    return _kernels.forward(cell, a["x"], None, None, a["w_ih"], a["w_hh"], None, None, plan,
                            ws, I, H, True, option, peep=peep, layer_norm=layer_norm, **kw)


def test_kernels_check_the_layer_norm_arrays():
    """The C reads every gain the cell has: a missing one would reach it as NULL."""
    a, _ = make_case("lstm", 2, 2, 3, 4, np.float64)
    g_ih, g_hh, g_c, b_c = layer_norm_of("lstm", a)
    with pytest.raises(ValueError, match=r"layer_norm must hold 4 arrays \(g_ih, g_hh, "
                                         r"g_c, b_c\) for the lstm, got tuple of 2"):
        kernels_forward("lstm", a, (g_ih, g_hh))
    with pytest.raises(ValueError, match="layer_norm must hold 4 arrays .* got list of 5"):
        kernels_forward("lstm", a, [g_ih, g_hh, g_c, b_c, b_c])
    with pytest.raises(ValueError, match=r"layer_norm g_c must have shape \(4,\), got "
                                         r"\(2, 2\)"):
        kernels_forward("lstm", a, (g_ih, g_hh, g_c.reshape(2, 2), b_c))
    with pytest.raises(ValueError, match=r"layer_norm g_hh must have shape \(16,\), got "
                                         r"\(4,\)"):
        kernels_forward("lstm", a, (g_ih, g_c, g_c, b_c))
    with pytest.raises(ValueError, match="layer_norm b_c must be a C-contiguous"):
        kernels_forward("lstm", a, (g_ih, g_hh, g_c, b_c.astype(np.float32)))
    with pytest.raises(ValueError, match="layer_norm is for the LSTM without peepholes and "
                                         "the GRU with linear_before_reset, got lstm"):
        kernels_forward("lstm", a, (g_ih, g_hh, g_c, b_c), peep=np.zeros(12))
    kernels_forward("lstm", a, (g_ih, g_hh, g_c, b_c))  # the right ones run
    b, _ = make_case("gru", 2, 2, 3, 4, np.float64)
    ln = layer_norm_of("gru", b)
    with pytest.raises(ValueError, match=r"layer_norm must hold 2 arrays \(g_ih, g_hh\) "
                                         r"for the gru, got tuple of 4"):
        kernels_forward("gru", b, ln + ln)
    with pytest.raises(ValueError, match="layer_norm is for .* got gru with option=False"):
        kernels_forward("gru", b, ln, option=False)
    rnn = dict(x=b["x"], w_ih=b["w_ih"][:4], w_hh=b["w_hh"][:4])
    with pytest.raises(ValueError, match="layer_norm is for .* got rnn"):
        kernels_forward("rnn", rnn, (ln[0][:4], ln[1][:4]))
    with pytest.raises(ValueError, match="layer_norm is for the LSTM and the GRU, not the rnn"):
        _kernels.workspace_size("rnn", _kernels.Plan([2], 2, False), 3, 4, True, True)


def test_kernels_check_the_layer_norm_gradients():
    a, up = make_case("lstm", 2, 2, 3, 4, np.float64)
    _, ctx = forward(F, "lstm", a)
    ctx.layer_norm = ctx.layer_norm[:2]  # as a ctx that lost two gains would hold them
    with pytest.raises(ValueError, match="layer_norm must hold 4 arrays"):
        _kernels.backward("lstm", *up, ctx)


def test_kernels_refuse_another_buffer_for_the_layer_norm_backward():
    # its backward writes into the saved state itself
    a, up = make_case("lstm", 2, 2, 3, 4, np.float64)
    _, ctx = forward(F, "lstm", a)
    with pytest.raises(ValueError, match="out must be None with layer_norm"):
        _kernels.backward("lstm", *up, ctx, np.empty_like(ctx.ws))


def test_packed_weights_of_the_other_gru_layout_are_refused():
    """The layer-normalized GRU runs with linear_before_reset: weights packed without it
    (the n block apart) would be misread."""
    a, _ = make_case("gru", 2, 2, 3, 4, np.float64)
    ln = layer_norm_of("gru", a)
    run = lambda packed: F._forward("gru", a["x"], (None,), a["w_ih"], a["w_hh"], None,  # noqa: E731
                                    None, None, False, True, False, packed=packed,
                                    layer_norm=ln)[0]
    ok = _kernels.pack_weights(a["w_ih"], a["w_hh"], 3, True)
    np.testing.assert_array_equal(run(ok), run(None))
    with pytest.raises(ValueError, match="packed must be pack_weights' array for G=3, H=4, "
                                         "I=3, lbr=True"):
        run(_kernels.pack_weights(a["w_ih"], a["w_hh"], 3, False))


def test_layer_refusals_name_the_argument():
    with pytest.raises(ValueError, match="layer_norm needs linear_before_reset=True"):
        GRU(3, 4, linear_before_reset=False, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm and peepholes cannot be combined"):
        LSTM(3, 4, peepholes=True, layer_norm=True)
    with pytest.raises(TypeError, match="layer_norm must be a bool"):
        LSTM(3, 4, layer_norm=1)
    with pytest.raises(TypeError, match="layer_norm"):
        RNN(3, 4, layer_norm=True)
    for cls in (LSTM, GRU):
        layer = cls(3, 4, layer_norm=True)
        with pytest.raises(ValueError, match="quantized\\(\\) does not take a layer with "
                                             "layer_norm"):
            layer.quantized()
        with pytest.raises(ValueError, match="a layer with layer_norm cannot be converted"):
            to_onnx(layer)
        with pytest.raises(ValueError, match="a layer with layer_norm cannot be converted"):
            from_onnx(layer, [])


# ---------------------------------------------------------------- layers

def test_layer_parameters_and_state_dict():
    layer = LSTM(3, 4, num_layers=2, bidirectional=True, seed=13, layer_norm=True)
    p = layer.named_parameters()
    for k in ("l0", "l1_reverse"):
        assert p[f"ln_weight_ih_{k}"].shape == p[f"ln_weight_hh_{k}"].shape == (16,)
        assert np.all(p[f"ln_weight_ih_{k}"] == 1) and np.all(p[f"ln_weight_c_{k}"] == 1)
        assert p[f"ln_bias_c_{k}"].shape == (4,) and np.all(p[f"ln_bias_c_{k}"] == 0)
    assert "layer_norm=True" in repr(layer)
    gru = GRU(3, 4, seed=13, layer_norm=True)
    assert sorted(k for k in gru.named_parameters() if k.startswith("ln_")) == \
        ["ln_weight_hh_l0", "ln_weight_ih_l0"]
    rng = np.random.default_rng(14)
    for v in layer.named_parameters().values():
        v[...] = rng.standard_normal(v.shape)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    other = LSTM(3, 4, num_layers=2, bidirectional=True, seed=15, layer_norm=True)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other(x)[0], layer(x)[0])


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_layer_with_zoneout_bidirectional_ragged_matches_finite_differences(cls):
    """Layer norm + zoneout (training masks) + recurrent dropout + weight drop, stacked,
    bidirectional, ragged, float64: each finite difference reruns the forward with the
    same masks (the layer's rng reseeded)."""
    layer = cls(2, 3, num_layers=2, bidirectional=True, dtype=np.float64, seed=16,
                zoneout=0.4, recurrent_dropout=0.2, weight_drop=0.2, layer_norm=True)
    rng = np.random.default_rng(17)
    for k, v in layer.named_parameters().items():
        if k.startswith("ln_"):
            v[...] += 0.3 * rng.standard_normal(v.shape)
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 6))
    lengths = [4, 1, 3]
    lstm = cls is LSTM

    def loss():
        layer._rng = np.random.default_rng(18)
        y, state = layer.forward(x, lengths=lengths)
        return np.sum(y * dy) + sum(np.sum(s) for s in (state if lstm else [state]))

    layer._rng = np.random.default_rng(18)
    y, state = layer.forward(x, lengths=lengths)
    ones = tuple(np.ones_like(s) for s in state) if lstm else np.ones_like(state)
    layer.backward(dy, ones)
    for name, p in layer.named_parameters().items():
        for idx in [(0,), (p.shape[0] - 1,)]:
            idx = idx + (0,) * (p.ndim - 1)
            assert_gradient(layer.grads[name][idx], loss, p, idx, name)


# ---------------------------------------------------------------- PyTorch

def _torch_loop(torch, cell, a, reverse_lengths=None):
    """The same math as a loop of torch ops with nn.functional.layer_norm (float64)."""
    fln = torch.nn.functional.layer_norm
    t = {k: torch.tensor(v, requires_grad=True) for k, v in a.items()}
    T, B, _ = a["x"].shape
    H = a["h0"].shape[1]
    h, c = t["h0"], t.get("c0")
    ys = []
    for s in range(T):
        gi = fln(t["x"][s] @ t["w_ih"].T, (t["g_ih"].shape[0],), t["g_ih"], None, 1e-5)
        gh = fln(h @ t["w_hh"].T, (t["g_hh"].shape[0],), t["g_hh"], None, 1e-5)
        if cell == "lstm":
            i, f, g, o = (gi + gh + t["b_ih"] + t["b_hh"]).split(H, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(fln(c, (H,), t["g_c"], t["b_c"], 1e-5))
        else:
            pre = gi + t["b_ih"]
            rec = gh + t["b_hh"]
            r = torch.sigmoid(pre[:, :H] + rec[:, :H])
            z = torch.sigmoid(pre[:, H:2 * H] + rec[:, H:2 * H])
            n = torch.tanh(pre[:, 2 * H:] + r * rec[:, 2 * H:])
            h = (1 - z) * n + z * h
        ys.append(h)
    return t, [torch.stack(ys), h] + ([c] if cell == "lstm" else [])


@pytest.mark.parametrize("cell", CELLS)
def test_against_a_torch_loop(cell):
    torch = pytest.importorskip("torch")
    a, up = make_case(cell, 4, 3, 5, 6, np.float64, seed=19)
    t, outs = _torch_loop(torch, cell, a)
    sum((o * torch.tensor(u)).sum() for o, u in zip(outs, up)).backward()
    want = [o.detach().numpy() for o in outs] + [t[n].grad.numpy() for n in NAMES[cell]]
    assert_close(run(F, cell, a, up), want, np.float64, cell, tol=1e-10)
