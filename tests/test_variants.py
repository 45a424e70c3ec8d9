"""Cell variants: the LSTM's peepholes (ONNX's P), and zoneout for every cell.

- the reference's gradients (dP included) against float64 central finite differences;
- the kernels (AVX2 and portable) against the reference: float32/64, ragged, reverse, B=1,
  inference, and bitwise repeatable at 1 and 2 threads;
- zero peepholes, zero masks and p=0 compute the plain cell; bad input is refused, named;
- layers (stacked, bidirectional): parameters, gradients, state dicts, masks, streams, pools;
- ONNX: P through to_onnx/from_onnx, ONNX's own test_lstm_with_peepholes vector, ONNX's
  reference LSTM and ONNX Runtime (skipped without onnx / onnxruntime).
"""
import os

import numpy as np
import pytest

from rnnfuse import LSTM, GRU, _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R
from rnnfuse.onnx_weights import from_onnx, to_onnx
from checks import assert_close, assert_gradient, kernel  # tests/checks.py

NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "peepholes"]


def make_case(T, B, I, H, dtype, seed=0, lengths=None):
    """Random inputs, weights, peepholes (scale ~1, so that they matter) and upstream
    gradients."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    s = 1 / np.sqrt(H)
    args = dict(x=r(T, B, I), h0=r(B, H), c0=r(B, H), w_ih=r(4 * H, I, scale=s),
                w_hh=r(4 * H, H, scale=s), b_ih=r(4 * H, scale=s), b_hh=r(4 * H, scale=s),
                peepholes=r(3 * H))
    upstream = (r(T, B, H), r(B, H), r(B, H))
    return args, upstream, lengths


def run(module, args, upstream, lengths, reverse=False):
    a = args
    y, h_n, c_n, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                           a["b_ih"], a["b_hh"], lengths, reverse,
                                           peepholes=a["peepholes"])
    return (y, h_n, c_n), module.lstm_backward(*upstream, ctx)


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("lengths,reverse", [(None, False), ([3, 0, 4], False),
                                             ([3, 0, 4], True)])
def test_reference_gradients_match_finite_differences(lengths, reverse):
    args, upstream, _ = make_case(4, 3, 2, 3, np.float64, seed=1)

    def loss(a):
        y, h_n, c_n, _ = R.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                        a["b_ih"], a["b_hh"], lengths, reverse,
                                        need_ctx=False, peepholes=a["peepholes"])
        return sum(np.sum(o * u) for o, u in zip((y, h_n, c_n), upstream))

    _, grads = run(R, args, upstream, lengths, reverse)
    assert len(grads) == 8
    for name, grad in zip(NAMES, grads):
        for idx in np.ndindex(args[name].shape):
            assert_gradient(grad[idx], lambda: loss(args), args[name], idx, name)


def test_reference_peepholes_follow_the_equations():
    """One step of one row written out: i, f see c_{t-1}; o sees c_t (ONNX's order i o f)."""
    args, _, _ = make_case(1, 1, 2, 3, np.float64, seed=2)
    a, H = args, 3
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    P = a["peepholes"]
    z = a["w_ih"] @ a["x"][0, 0] + a["b_ih"] + a["w_hh"] @ a["h0"][0] + a["b_hh"]
    c0 = a["c0"][0]
    i = sig(z[:H] + P[:H] * c0)
    f = sig(z[H:2 * H] + P[2 * H:] * c0)
    c = f * c0 + i * np.tanh(z[2 * H:3 * H])
    o = sig(z[3 * H:] + P[H:2 * H] * c)
    (y, h_n, c_n), _ = run(R, args, (None, None, None), None)
    np.testing.assert_allclose(c_n[0], c, rtol=1e-13)
    np.testing.assert_allclose(y[0, 0], o * np.tanh(c), rtol=1e-13)


# ---------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths", [None, [7, 2, 0, 5, 7]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("H", [5, 37])  # a partial vector; several vectors and a tail
def test_kernels_match_reference(kernel, dtype, lengths, reverse, H):
    case = make_case(7, 5, 3, H, dtype, seed=H, lengths=lengths)
    got, want = run(F, *case, reverse), run(R, *case, reverse)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_of_one_and_inference(kernel, dtype):
    case = make_case(6, 1, 4, 9, dtype, seed=3)
    got, want = run(F, *case), run(R, *case)
    assert_close(got[1], want[1], dtype, "backward")
    a = case[0]
    y, h_n, c_n, ctx = F.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                      a["b_ih"], a["b_hh"], peepholes=a["peepholes"],
                                      need_ctx=False)
    assert ctx is None
    for g, w in zip((y, h_n, c_n), got[0]):  # inference: the training forward's bits
        np.testing.assert_array_equal(g, w)


def test_zero_peepholes_compute_the_plain_cell(kernel):
    """Adding zero terms is exact: the same numbers as without peepholes, and dP is the
    gradient the plain cell would give them."""
    args, upstream, lengths = make_case(6, 4, 3, 11, np.float32, seed=4, lengths=[6, 3, 0, 5])
    args["peepholes"] = np.zeros(33, np.float32)
    outs, grads = run(F, args, upstream, lengths)
    a = args
    y, h_n, c_n, ctx = F.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                      a["b_ih"], a["b_hh"], lengths)
    plain = F.lstm_backward(*upstream, ctx)
    assert len(plain) == 7
    for g, w in zip(outs + grads[:7], (y, h_n, c_n) + plain):
        np.testing.assert_array_equal(g, w)
    want = run(R, args, upstream, lengths)[1][7]
    np.testing.assert_allclose(grads[7], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,error,message", [
    (dict(peepholes=np.zeros(12)), ValueError, r"peepholes must have shape \(15,\)"),
    (dict(peepholes=np.zeros((3, 5))), ValueError, r"peepholes must be 1-D"),
    (dict(peepholes=np.zeros(15, np.float32)), TypeError,
     r"peepholes must have dtype float64 \(the dtype of x\), got float32"),
    (dict(peepholes="abc"), TypeError, r"peepholes must have dtype float64"),
])
def test_bad_peepholes_are_refused(change, error, message):
    args, _, _ = make_case(2, 2, 3, 5, np.float64)
    args.update(change)
    with pytest.raises(error, match=message):
        run(F, args, (None, None, None), None)


def test_peepholes_only_for_the_lstm():
    with pytest.raises(ValueError, match="peepholes are an LSTM option; gru has none"):
        F._forward("gru", np.zeros((1, 1, 2)), [None], np.zeros((6, 2)), np.zeros((6, 2)),
                   None, None, None, False, True, True, np.zeros(6))
    with pytest.raises(TypeError, match="peepholes"):
        GRU(2, 3, peepholes=True)


# ---------------------------------------------------------------- layers

def _layer_loss(layer, x, dy, lengths):
    y, (h, c) = layer.forward(x, lengths=lengths)
    return np.sum(y * dy) + np.sum(h) + 2 * np.sum(c)


def test_layer_parameters_start_at_zero_as_the_plain_layer():
    plain = LSTM(3, 4, num_layers=2, bidirectional=True, seed=5)
    peep = LSTM(3, 4, num_layers=2, bidirectional=True, seed=5, peepholes=True)
    names = ["weight_peep_l0", "weight_peep_l0_reverse", "weight_peep_l1",
             "weight_peep_l1_reverse"]
    sd = peep.state_dict()
    assert [k for k in sd if "peep" in k] == names
    assert list(sd)[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                            "weight_peep_l0"]
    for n in names:
        assert sd[n].shape == (12,) and not sd[n].any() and peep.grads[n].shape == (12,)
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(sd[k], v)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(peep(x)[0], plain(x)[0])
    assert repr(peep) == "LSTM(3, 4, num_layers=2, bidirectional=True, peepholes=True)"
    with pytest.raises(TypeError, match="peepholes must be a bool"):
        LSTM(3, 4, peepholes="yes")


@pytest.mark.parametrize("bias", [True, False])
def test_layer_gradients_match_finite_differences(bias):
    """Stacked, bidirectional, ragged, float64: every peephole's gradient lands under its
    own name, and the other parameters' still do."""
    layer = LSTM(2, 3, num_layers=2, bidirectional=True, bias=bias, dtype=np.float64,
                 seed=6, peepholes=True)
    rng = np.random.default_rng(7)
    for k, v in layer.named_parameters().items():
        if "peep" in k:
            v[...] = rng.standard_normal(v.shape)
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 6))
    lengths = [4, 1, 3]
    y, (h, c) = layer.forward(x, lengths=lengths)
    layer.zero_grad()
    layer.backward(dy, (np.ones_like(h), 2 * np.ones_like(c)))
    for name, p in layer.named_parameters().items():
        for idx in [(0,), (p.shape[0] - 1,), (p.shape[0] // 2,)]:
            idx = idx + (0,) * (p.ndim - 1)
            assert_gradient(layer.grads[name][idx], lambda: _layer_loss(layer, x, dy, lengths),
                            p, idx, name)


def test_layer_state_dict_round_trip():
    a = LSTM(3, 4, num_layers=2, seed=8, peepholes=True)
    a.named_parameters()["weight_peep_l1"][...] = np.arange(12)
    b = LSTM(3, 4, num_layers=2, seed=9, peepholes=True)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(a(x)[0], b(x)[0])
    with pytest.raises(ValueError, match="unexpected key 'weight_peep_l0'"):
        LSTM(3, 4, num_layers=2).load_state_dict(a.state_dict())


def _peep_layer(dtype=np.float32, num_layers=2):
    layer = LSTM(3, 5, num_layers=num_layers, dtype=dtype, seed=10, peepholes=True)
    rng = np.random.default_rng(11)
    for k, v in layer.named_parameters().items():
        if "peep" in k:
            v[...] = rng.standard_normal(v.shape)
    return layer.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stream_carries_peepholes(dtype):
    layer = _peep_layer(dtype)
    x = np.random.default_rng(12).standard_normal((6, 2, 3)).astype(dtype)
    y, (h, c) = layer(x)
    stream = layer.stream(batch_size=2)
    steps = np.stack([stream.step(x[t]) for t in range(6)])
    np.testing.assert_array_equal(steps, y)
    np.testing.assert_array_equal(stream.state[1], c)


def test_stream_pool_carries_peepholes():
    layer = _peep_layer()
    x = np.random.default_rng(13).standard_normal((4, 3, 3)).astype(np.float32)
    y, _ = layer(x)
    pool = layer.stream_pool(4)
    ids = [pool.open() for _ in range(3)]
    for t in range(4):
        order = ids[::-1] if t % 2 else ids  # any order, any subset
        out = pool.step(order, x[t][[ids.index(i) for i in order]])
        for row, sid in enumerate(order):
            np.testing.assert_array_equal(out[row], y[t, ids.index(sid)])


def test_stream_refuses_peepholes_of_another_cell():
    w = [np.zeros((6, 2), np.float32), np.zeros((6, 2), np.float32), None, None,
         np.zeros(6, np.float32)]
    with pytest.raises(ValueError, match="only the LSTM's have a fifth, its peepholes"):
        _kernels.Stream("gru", True, np.float32, 1, [w])
    w = [np.zeros((8, 2), np.float32), np.zeros((8, 2), np.float32), None, None,
         np.zeros(5, np.float32)]
    with pytest.raises(ValueError, match="peepholes must be a C-contiguous"):
        _kernels.StreamPool("lstm", False, np.float32, 1, [w])


# ---------------------------------------------------------------- ONNX

def test_onnx_weights_carry_peepholes():
    a = LSTM(3, 4, num_layers=2, bidirectional=True, seed=14, peepholes=True)
    for k, v in a.named_parameters().items():
        if "peep" in k:
            v[...] = np.random.default_rng(len(k)).standard_normal(v.shape)
    w = to_onnx(a)
    assert w[1]["P"].shape == (2, 12)
    np.testing.assert_array_equal(w[1]["P"][1], a.state_dict()["weight_peep_l1_reverse"])
    b = LSTM(3, 4, num_layers=2, bidirectional=True, seed=15, peepholes=True)
    from_onnx(b, w)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    assert "P" not in to_onnx(LSTM(3, 4))[0]
    plain = LSTM(3, 4, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"weights\[0\]\['P'\] has nonzero peepholes"):
        from_onnx(plain, w)
    del w[0]["P"]  # absent: zeros
    from_onnx(b, w)
    assert not b.state_dict()["weight_peep_l0"].any()
    w[0]["P"] = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"weights\[0\]\['P'\] must have shape \(2, 12\)"):
        from_onnx(b, w)


def _onnx_lstm_case(export):
    """ONNX's own test vector: its stored files where the onnx package has them, else the
    same case built by onnx's test-case code (inputs, expected outputs)."""
    import onnx
    from onnx import numpy_helper
    name = "test_lstm_with_peepholes"
    d = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node", name)
    if os.path.isdir(d):
        model = onnx.load(os.path.join(d, "model.onnx"))
        data = os.path.join(d, "test_data_set_0")
        read = lambda f: numpy_helper.to_array(  # noqa: E731
            onnx.load_tensor(os.path.join(data, f)))
        files = sorted(os.listdir(data))
        inputs = [read(f) for f in files if f.startswith("input")]
        outputs = [read(f) for f in files if f.startswith("output")]
        return model.graph.node[0], inputs, outputs
    from onnx.backend.test.case.node import lstm as cases
    got = []
    expect = cases.expect
    cases.expect = lambda node, inputs, outputs, name, **kw: got.append((node, inputs, outputs))
    try:
        export()
    finally:
        cases.expect = expect
    return got[0]


def test_onnx_backend_vector_lstm_with_peepholes():
    pytest.importorskip("onnx")
    from onnx.backend.test.case.node.lstm import LSTM as OnnxLSTMCases
    node, inputs, outputs = _onnx_lstm_case(OnnxLSTMCases.export_peepholes)
    named = dict(zip(node.input, inputs))
    assert list(node.output) == ["", "Y_h"] and node.op_type == "LSTM"
    X, W, P = named["X"], named["W"], named["P"]
    H = named["R"].shape[-1]
    layer = LSTM(X.shape[2], H, peepholes=True)
    from_onnx(layer, {k: named[k] for k in ("W", "R", "B", "P")})
    assert np.all(named["sequence_lens"] == X.shape[0])
    _, (h_n, _) = layer(X, (named["initial_h"], named["initial_c"]))
    np.testing.assert_allclose(h_n, outputs[0], rtol=1e-6, atol=1e-7)
    assert W.shape[0] == 1 and P.any()


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_onnx_reference_lstm_with_random_peepholes(direction):
    """A longer random case against ONNX's reference LSTM (its test-case helper)."""
    pytest.importorskip("onnx")
    from onnx.backend.test.case.node.lstm import LSTMHelper
    D = 2 if direction == "bidirectional" else 1
    layer = LSTM(4, 6, bidirectional=D == 2, dtype=np.float64, seed=16, peepholes=True)
    rng = np.random.default_rng(17)
    (w,) = to_onnx(layer)
    w["P"] = rng.standard_normal((D, 18))
    from_onnx(layer, w)
    x = rng.standard_normal((5, 3, 4))
    h0, c0 = rng.standard_normal((2, D, 3, 6))
    y, (h_n, c_n) = layer(x, (h0, c0))
    for d in range(D):
        one = {k: w[k][d:d + 1] for k in ("W", "R", "B", "P")}
        Y, Y_h, Y_c = LSTMHelper(X=x, initial_h=h0[d:d + 1], initial_c=c0[d:d + 1], **one,
                                 direction="reverse" if d else "forward").step()
        np.testing.assert_allclose(y[:, :, d * 6:(d + 1) * 6], Y[:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h_n[d], Y_h[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(c_n[d], Y_c[0], rtol=1e-12, atol=1e-12)


# ================================================================ zoneout

ZCELLS = [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"), ("rnn", "relu")]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def zcase(cell, T, B, I, H, dtype, seed=0, zoneout="mask"):
    """Random inputs and weights of one cell, zoneout (p, or fresh 0/1 masks of keep
    probability 0.4) and upstream gradients."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    G, s = GATES[cell], 1 / np.sqrt(H)
    args = dict(x=r(T, B, I), h0=r(B, H), w_ih=r(G * H, I, scale=s), w_hh=r(G * H, H, scale=s),
                b_ih=r(G * H, scale=s), b_hh=r(G * H, scale=s))
    mask = lambda: (rng.random((T, B, H)) < 0.4).astype(dtype)  # noqa: E731
    if cell == "lstm":
        args["c0"] = r(B, H)
        z = 0.4 if zoneout == "p" else (mask(), mask())
    else:
        z = 0.4 if zoneout == "p" else mask()
    up = (r(T, B, H), r(B, H), r(B, H)) if cell == "lstm" else (r(T, B, H), r(B, H))
    return args, z, up


def zforward(module, cell, option, a, zoneout, lengths=None, reverse=False, need_ctx=True):
    w = (a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    if cell == "lstm":
        y, h, c, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], *w, lengths, reverse,
                                           need_ctx=need_ctx, zoneout=zoneout)
        return (y, h, c), ctx
    if cell == "gru":
        y, h, ctx = module.gru_forward(a["x"], a["h0"], *w, lengths, reverse, option,
                                       need_ctx=need_ctx, zoneout=zoneout)
    else:
        y, h, ctx = module.rnn_forward(a["x"], a["h0"], *w, lengths, reverse, option,
                                       need_ctx=need_ctx, zoneout=zoneout)
    return (y, h), ctx


def zrun(module, cell, option, a, zoneout, up, lengths=None, reverse=False):
    outs, ctx = zforward(module, cell, option, a, zoneout, lengths, reverse)
    backward = getattr(module, f"{cell}_backward")
    return outs, backward(*up, ctx)


@pytest.mark.parametrize("cell,option", ZCELLS)
@pytest.mark.parametrize("zoneout", ["mask", "p"])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([3, 0, 4], True)])
def test_zoneout_reference_gradients_match_finite_differences(cell, option, zoneout, lengths,
                                                              reverse):
    args, z, up = zcase(cell, 4, 3, 2, 3, np.float64, seed=21, zoneout=zoneout)
    if option == "relu":  # keep the pre-activations away from relu's kink
        args["b_ih"] += 0.5

    def loss(a):
        outs, _ = zforward(R, cell, option, a, z, lengths, reverse, need_ctx=False)
        return sum(np.sum(o * u) for o, u in zip(outs, up))

    _, grads = zrun(R, cell, option, args, z, up, lengths, reverse)
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
    if cell != "lstm":
        names.remove("c0")
    for name, grad in zip(names, grads):
        for idx in np.ndindex(args[name].shape):
            assert_gradient(grad[idx], lambda: loss(args), args[name], idx, name)


@pytest.mark.parametrize("cell,option", ZCELLS)
def test_zoneout_reference_follows_the_definition(cell, option):
    """All-ones masks keep the initial state; all-zeros masks and p=0 are the plain cell;
    p mixes the previous state and the plain step's."""
    args, _, _ = zcase(cell, 3, 2, 2, 4, np.float64, seed=22)
    n = 2 if cell == "lstm" else 1
    shape = args["x"].shape[:2] + (4,)
    pack = lambda v: tuple([v] * n) if n == 2 else v  # noqa: E731
    kept, _ = zforward(R, cell, option, args, pack(np.ones(shape)))
    np.testing.assert_array_equal(kept[1], args["h0"])
    np.testing.assert_array_equal(kept[0], np.broadcast_to(args["h0"], kept[0].shape))
    plain, _ = zforward(R, cell, option, args, None)
    for z in (pack(np.zeros(shape)), 0.0):
        for got, want in zip(zforward(R, cell, option, args, z)[0], plain):
            np.testing.assert_allclose(got, want, rtol=1e-15)
    one = {k: (v[:1] if k == "x" else v) for k, v in args.items()}
    step, _ = zforward(R, cell, option, one, 0.25)
    plain1, _ = zforward(R, cell, option, one, None)
    np.testing.assert_allclose(step[1], 0.25 * args["h0"] + 0.75 * plain1[1], rtol=1e-13)


@pytest.mark.parametrize("cell,option", ZCELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zoneout", ["mask", "p"])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([7, 2, 0, 5, 7], False),
                                             ([7, 2, 0, 5, 7], True)])
def test_zoneout_kernels_match_reference(kernel, cell, option, dtype, zoneout, lengths,
                                         reverse):
    args, z, up = zcase(cell, 7, 5, 3, 37, dtype, seed=23, zoneout=zoneout)
    got = zrun(F, cell, option, args, z, up, lengths, reverse)
    want = zrun(R, cell, option, args, z, up, lengths, reverse)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")
    if zoneout == "p":  # inference: the training forward's bits
        outs, ctx = zforward(F, cell, option, args, z, lengths, reverse, need_ctx=False)
        assert ctx is None
        for g, w in zip(outs, got[0]):
            np.testing.assert_array_equal(g, w)


def test_zoneout_with_peepholes_and_batch_of_one(kernel):
    args, z, up = zcase("lstm", 6, 1, 4, 9, np.float64, seed=24)
    args["peepholes"] = np.random.default_rng(25).standard_normal(27)
    a = args
    outs = []
    for module in (F, R):
        y, h, c, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                           a["b_ih"], a["b_hh"], peepholes=a["peepholes"],
                                           zoneout=z)
        outs.append((y, h, c) + tuple(module.lstm_backward(*up, ctx)))
    assert len(outs[0]) == 11
    assert_close(outs[0], outs[1], np.float64, "lstm")


@pytest.mark.parametrize("zoneout,error,message", [
    (1.0, ValueError, r"zoneout must be a probability in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"zoneout must be a probability in \[0, 1\), got -0.1"),
    (np.zeros((2, 2, 5)), TypeError, r"for the LSTM, a pair \(z_h, z_c\)"),
    ((np.zeros((2, 2, 4)), None), ValueError, r"zoneout\[0\] must have shape \(2, 2, 5\)"),
    ((None, np.zeros((2, 2, 5), np.float32)), TypeError,
     r"zoneout\[1\] must have dtype float64"),
])
def test_bad_zoneout_is_refused(zoneout, error, message):
    args, _, _ = zcase("lstm", 2, 2, 3, 5, np.float64)
    with pytest.raises(error, match=message):
        zforward(F, "lstm", None, args, zoneout)


def test_bad_zoneout_is_refused_gru_rnn():
    args, _, _ = zcase("gru", 2, 2, 3, 5, np.float64)
    with pytest.raises(ValueError, match=r"zoneout must be 3-D with shape \(2, 2, 5\)"):
        zforward(F, "gru", True, args, np.zeros((2, 5)))
    with pytest.raises(TypeError, match="zoneout must be a float in"):
        zforward(F, "gru", True, args, True)
    args, _, _ = zcase("rnn", 2, 2, 3, 5, np.float64)
    with pytest.raises(TypeError, match="zoneout must have dtype float64"):
        zforward(F, "rnn", "tanh", args, np.zeros((2, 2, 5), np.float32))


@pytest.mark.parametrize("cls", [LSTM, GRU, "RNN"])
def test_layer_zoneout_option_is_checked(cls):
    from rnnfuse import RNN
    cls = RNN if cls == "RNN" else cls
    with pytest.raises(ValueError, match=r"zoneout must be a probability in \[0, 1\), got 1"):
        cls(2, 3, zoneout=1)
    with pytest.raises(TypeError, match="zoneout must be a float, got bool"):
        cls(2, 3, zoneout=True)
    assert repr(cls(2, 3, zoneout=0.25)).endswith("zoneout=0.25)")


@pytest.mark.parametrize("cls", [LSTM, GRU, "RNN"])
def test_layer_zoneout_masks_are_seeded_and_fresh(cls):
    from rnnfuse import RNN
    cls = RNN if cls == "RNN" else cls
    x = np.random.default_rng(26).standard_normal((5, 3, 2)).astype(np.float32)
    a, b = cls(2, 4, zoneout=0.5, seed=27), cls(2, 4, zoneout=0.5, seed=27)
    ya, yb = a(x)[0], b(x)[0]
    np.testing.assert_array_equal(ya, yb)  # the same seed, the same masks
    assert not np.array_equal(a(x)[0], ya)  # the next forward draws fresh ones
    # in training, a unit either keeps its previous value or takes the new one
    kept = np.isclose(ya[1:], ya[:-1], rtol=0, atol=0)
    assert 0.2 < kept.mean() < 0.8
    a.eval()
    assert not np.array_equal(a(x)[0], ya)


@pytest.mark.parametrize("cls", [LSTM, GRU, "RNN"])
def test_layer_zoneout_gradients_match_finite_differences(cls):
    """Training masks, stacked, bidirectional, ragged, float64: each finite difference
    reruns the forward with the same masks (the layer's rng reseeded)."""
    from rnnfuse import RNN
    cls = RNN if cls == "RNN" else cls
    kw = dict(peepholes=True) if cls is LSTM else {}
    layer = cls(2, 3, num_layers=2, bidirectional=True, dtype=np.float64, seed=28,
                zoneout=0.4, **kw)
    rng = np.random.default_rng(29)
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 6))
    lengths = [4, 1, 3]

    def loss():
        layer._rng = np.random.default_rng(30)
        y, state = layer.forward(x, lengths=lengths)
        return np.sum(y * dy) + sum(np.sum(s) for s in (state if cls is LSTM else [state]))

    layer._rng = np.random.default_rng(30)
    y, state = layer.forward(x, lengths=lengths)
    ones = tuple(np.ones_like(s) for s in state) if cls is LSTM else np.ones_like(state)
    layer.backward(dy, ones)
    for name, p in layer.named_parameters().items():
        for idx in [(0,), (p.shape[0] - 1,)]:
            idx = idx + (0,) * (p.ndim - 1)
            assert_gradient(layer.grads[name][idx], loss, p, idx, name)


@pytest.mark.parametrize("cls", [LSTM, GRU, "RNN"])
def test_stream_and_pool_carry_zoneout(cls):
    from rnnfuse import RNN
    cls = RNN if cls == "RNN" else cls
    layer = cls(3, 5, num_layers=2, seed=31, zoneout=0.3).eval()
    x = np.random.default_rng(32).standard_normal((6, 2, 3)).astype(np.float32)
    y, _ = layer(x)
    stream = layer.stream(batch_size=2)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(6)]), y)
    pool = layer.stream_pool(2)
    ids = [pool.open(), pool.open()]
    np.testing.assert_array_equal(np.stack([pool.step(ids, x[t]) for t in range(6)]), y)
    with pytest.raises(ValueError, match="zoneout must be a probability"):
        _kernels.Stream(layer._cell, layer._option, np.float32, 1, layer._stream_weights(),
                        zoneout=1.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_variants_repeat_bitwise_at_each_thread_count(threads):
    """Large enough for the time loops to be shared among threads: peepholes' dP and
    zoneout's carries agree with the reference and repeat bitwise."""
    from threadpoolctl import threadpool_limits
    lengths = np.full(64, 30)
    lengths[[3, 9]] = [0, 11]
    args, z, up = zcase("lstm", 30, 64, 40, 96, np.float32, seed=33)
    args["peepholes"] = np.random.default_rng(34).standard_normal(288).astype(np.float32)
    a = args

    def both(module):
        y, h, c, ctx = module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                           a["b_ih"], a["b_hh"], lengths, True,
                                           peepholes=a["peepholes"], zoneout=z)
        return (y, h, c) + tuple(module.lstm_backward(*up, ctx))

    with threadpool_limits(threads):
        first, again = both(F), both(F)
    assert_close(first, both(R), np.float32, "lstm")
    for g, w in zip(first, again):
        np.testing.assert_array_equal(g, w)


def test_onnx_runtime_lstm_with_peepholes():
    """The exported weights, P included, in a one-node ONNX graph run by ONNX Runtime give
    our outputs (ragged, bidirectional)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(35)
    layer = LSTM(3, 4, bidirectional=True, seed=36, peepholes=True)
    for k, v in layer.named_parameters().items():
        if "peep" in k:
            v[...] = rng.standard_normal(v.shape)
    T, B = 5, 3
    x = rng.standard_normal((T, B, 3)).astype(np.float32)
    lengths = np.array([5, 2, 4], np.int32)
    h0, c0 = rng.standard_normal((2, 2, B, 4)).astype(np.float32)
    y, (h_n, c_n) = layer(x, (h0, c0), lengths)
    (w,) = to_onnx(layer)
    inits = [numpy_helper.from_array(w[k], k) for k in ("W", "R", "B", "P")]
    inits.append(numpy_helper.from_array(lengths, "sequence_lens"))
    inputs = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    feeds = {"X": x, "initial_h": h0, "initial_c": c0}
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], **w["attributes"])
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph([node], "g", [vi(k, v.shape) for k, v in feeds.items()],
                              [vi(o, None) for o in ("Y", "Y_h", "Y_c")], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    Y, Y_h, Y_c = sess.run(None, feeds)
    np.testing.assert_allclose(Y.transpose(0, 2, 1, 3).reshape(T, B, 8), y, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(Y_h, h_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Y_c, c_n, rtol=1e-5, atol=1e-5)
