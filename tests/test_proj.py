"""The LSTM with a projection (PyTorch's proj_size, "LSTMP"): h_t = W_hr (o_t tanh(c_t)).

- the reference's gradients (dw_hr included) against float64 central finite differences;
- the kernels (every code path) against the reference: float32/64, ragged, reverse, B=1,
  inference (the training forward's bits, batch-invariant), with and without peepholes;
- layers: parameters named and shaped as torch.nn.LSTM's, stacked, bidirectional, ragged,
  against torch.nn.LSTM(proj_size=...) in outputs and every gradient where torch imports;
- every refusal, with its message.
"""
import numpy as np
import pytest

from rnnfuse import GRU, LSTM, RNN, _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R
from checks import assert_close, assert_gradient, kernel  # tests/checks.py

NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "peepholes"]


def make_case(T, B, I, H, P, dtype, seed=0, peepholes=False):
    """Random inputs, weights and upstream gradients of scale ~1."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    s = 1 / np.sqrt(H)
    args = dict(x=r(T, B, I), h0=r(B, P), c0=r(B, H), w_ih=r(4 * H, I, scale=s),
                w_hh=r(4 * H, P, scale=s), b_ih=r(4 * H, scale=s), b_hh=r(4 * H, scale=s),
                w_hr=r(P, H, scale=s), peepholes=r(3 * H) if peepholes else None)
    upstream = (r(T, B, P), r(B, P), r(B, H))
    return args, upstream


def forward(module, a, lengths=None, reverse=False, need_ctx=True):
    return module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                               a["b_hh"], lengths, reverse, need_ctx=need_ctx,
                               peepholes=a["peepholes"], w_hr=a["w_hr"])


def run(module, args, upstream, lengths=None, reverse=False):
    y, h_n, c_n, ctx = forward(module, args, lengths, reverse)
    return (y, h_n, c_n), module.lstm_backward(*upstream, ctx)


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("peepholes", [False, True])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([3, 0, 4], False),
                                             ([3, 0, 4], True)])
def test_reference_gradients_match_finite_differences(lengths, reverse, peepholes):
    args, upstream = make_case(4, 3, 2, 4, 2, np.float64, seed=1, peepholes=peepholes)

    def loss():
        y, h_n, c_n, _ = forward(R, args, lengths, reverse, need_ctx=False)
        return sum(np.sum(o * u) for o, u in zip((y, h_n, c_n), upstream))

    _, grads = run(R, args, upstream, lengths, reverse)
    names = NAMES if peepholes else NAMES[:-1]
    assert len(grads) == len(names)
    for name, grad in zip(names, grads):
        assert grad.shape == args[name].shape, name
        for idx in np.ndindex(args[name].shape):
            assert_gradient(grad[idx], loss, args[name], idx, name)


def test_reference_projection_follows_the_equations():
    """One step of one row written out: m = o tanh(c), h = W_hr m, y = h."""
    a, _ = make_case(1, 1, 2, 4, 3, np.float64, seed=2)
    H = 4
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    z = a["w_ih"] @ a["x"][0, 0] + a["b_ih"] + a["w_hh"] @ a["h0"][0] + a["b_hh"]
    i, f, o = sig(z[:H]), sig(z[H:2 * H]), sig(z[3 * H:])
    c = f * a["c0"][0] + i * np.tanh(z[2 * H:3 * H])
    h = a["w_hr"] @ (o * np.tanh(c))
    y, h_n, c_n, _ = forward(R, a)
    np.testing.assert_allclose(c_n[0], c, rtol=1e-13)
    np.testing.assert_allclose(y[0, 0], h, rtol=1e-13)
    np.testing.assert_array_equal(h_n[0], y[0, 0])


# ---------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths", [None, [7, 2, 0, 5, 7, 1, 7, 3]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("H,P", [(5, 3), (37, 20)])  # a partial vector; vectors and a tail
def test_kernels_match_reference(kernel, dtype, lengths, reverse, H, P):
    case = make_case(7, 8, 3, H, P, dtype, seed=H)
    got, want = run(F, *case, lengths, reverse), run(R, *case, lengths, reverse)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_with_peepholes_match_reference(kernel, dtype):
    case = make_case(6, 7, 3, 19, 6, dtype, seed=4, peepholes=True)
    lengths = [6, 3, 0, 6, 1, 2, 5]
    got, want = run(F, *case, lengths, True), run(R, *case, lengths, True)
    assert len(got[1]) == 9
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_of_one_and_inference(kernel, dtype):
    args, upstream = make_case(6, 1, 4, 9, 4, dtype, seed=3)
    got, want = run(F, args, upstream), run(R, args, upstream)
    assert_close(got[1], want[1], dtype, "backward")
    y, h_n, c_n, ctx = forward(F, args, need_ctx=False)
    assert ctx is None
    for g, w in zip((y, h_n, c_n), got[0]):  # inference: the training forward's bits
        np.testing.assert_array_equal(g, w)


def test_inference_is_batch_invariant(kernel):
    """A row's outputs are the same bits alone as among others, ragged."""
    args, _ = make_case(9, 13, 5, 33, 17, np.float32, seed=5)
    lengths = np.array([9, 4, 9, 0, 2, 9, 7, 1, 9, 3, 5, 9, 6])
    y, h_n, c_n, _ = forward(F, args, lengths, need_ctx=False)
    for b in (0, 1, 6, 12):
        one = dict(args, x=args["x"][:, b:b + 1], h0=args["h0"][b:b + 1],
                   c0=args["c0"][b:b + 1])
        y1, h1, c1, _ = forward(F, one, lengths[b:b + 1], need_ctx=False)
        np.testing.assert_array_equal(y1[:, 0], y[:, b])
        np.testing.assert_array_equal(h1[0], h_n[b])
        np.testing.assert_array_equal(c1[0], c_n[b])


def test_threads_give_the_same_bits():
    args, upstream = make_case(20, 64, 16, 64, 32, np.float32, seed=6)
    results = []
    for n in (1, 2):
        before = _kernels.set_threads(n)
        try:
            results.append(run(F, args, upstream, [20] * 60 + [5, 9, 0, 13]))
        finally:
            _kernels.set_threads(before)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        np.testing.assert_array_equal(a, b)


def test_empty_batch_and_all_padding():
    for T, B, lengths in ((4, 0, None), (4, 3, [0, 0, 0]), (0, 2, None)):
        args, upstream = make_case(T, B, 3, 6, 2, np.float64, seed=7)
        got, want = run(F, args, upstream, lengths), run(R, args, upstream, lengths)
        assert_close(got[0], want[0], np.float64, "forward")
        assert_close(got[1], want[1], np.float64, "backward")


def test_projection_returns_dw_hr_eighth():
    args, upstream = make_case(3, 2, 3, 4, 2, np.float64)
    grads = run(F, args, upstream)[1]
    assert len(grads) == 8 and grads[7].shape == (2, 4)


# ---------------------------------------------------------------- layers

def test_layer_parameters_are_named_and_shaped_as_torch():
    layer = LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, seed=0)
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    assert list(shapes)[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                "weight_hr_l0"]
    assert shapes["weight_hh_l0"] == (32, 3) and shapes["weight_hr_l0_reverse"] == (3, 8)
    assert shapes["weight_ih_l1"] == (32, 6)  # D * proj_size inputs
    assert "proj_size=3" in repr(layer)


def test_layer_gradients_match_finite_differences_through_the_stack():
    """A stacked, bidirectional, ragged layer with peepholes: the layer's gradients of a
    random linear loss, float64, against central differences of its forward."""
    rng = np.random.default_rng(8)
    layer = LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, seed=1,
                 dtype=np.float64, peepholes=True)
    for p in layer.parameters():
        p += 0.3 * rng.standard_normal(p.shape)  # nonzero peepholes too
    x = rng.standard_normal((4, 3, 3))
    h0, c0 = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 5))
    lengths = [4, 1, 3]
    y, (h_n, c_n) = layer(x, (h0, c0), lengths)
    gy, gh, gc = (rng.standard_normal(a.shape) for a in (y, h_n, c_n))
    dx, (dh0, dc0) = layer.backward(gy, (gh, gc))

    def loss():
        y, (h_n, c_n) = layer.eval()(x, (h0, c0), lengths)
        layer.train()
        return np.sum(y * gy) + np.sum(h_n * gh) + np.sum(c_n * gc)

    for name, p in layer.named_parameters().items():
        for idx in list(np.ndindex(p.shape))[::7]:
            assert_gradient(layer.grads[name][idx], loss, p, idx, name)
    for name, a, g in (("x", x, dx), ("h0", h0, dh0), ("c0", c0, dc0)):
        for idx in list(np.ndindex(a.shape))[::5]:
            assert_gradient(g[idx], loss, a, idx, name)


def test_weight_drop_masks_the_projected_w_hh():
    layer = LSTM(3, 6, proj_size=2, weight_drop=0.5, seed=2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, _ = layer(x)
    assert y.shape == (5, 2, 2)
    layer.backward(np.ones_like(y))
    assert np.any(layer.grads["weight_hh_l0"] == 0)  # dropped elements get no gradient


@pytest.mark.parametrize("make,message", [
    (lambda: LSTM(3, 4, proj_size=4), "proj_size must be < hidden_size=4, got 4"),
    (lambda: LSTM(3, 4, proj_size=-1), "proj_size must be >= 0, got -1"),
    (lambda: LSTM(3, 4, proj_size=2.0), "proj_size must be an int, got float"),
    (lambda: LSTM(3, 4, proj_size=True), "proj_size must be an int, got bool"),
    (lambda: GRU(3, 4, proj_size=2), "proj_size is an LSTM option; GRU has no projection"),
    (lambda: RNN(3, 4, proj_size=2), "proj_size is an LSTM option; RNN has no projection"),
    (lambda: GRU(3, 4, proj_size="2"), "proj_size must be an int, got str"),
    (lambda: LSTM(3, 4, proj_size=2, zoneout=0.1), "zoneout is not supported with proj_size"),
    (lambda: LSTM(3, 4, proj_size=2, layer_norm=True),
     "layer_norm is not supported with proj_size"),
    (lambda: LSTM(3, 4, proj_size=2, recurrent_dropout=0.1),
     "recurrent_dropout is not supported with proj_size"),
])
def test_layer_refusals(make, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
        make()


def test_layer_state_shapes_are_checked():
    layer = LSTM(3, 4, num_layers=2, proj_size=2)
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"state\[h\] must have shape \(2, 1, 2\)"):
        layer(x, (np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32)))
    with pytest.raises(ValueError, match=r"state\[c\] must have shape \(2, 1, 4\)"):
        layer(x, (np.zeros((2, 1, 2), np.float32), np.zeros((2, 1, 2), np.float32)))


def test_onnx_refuses_a_projection():
    from rnnfuse.onnx_weights import to_onnx
    with pytest.raises(ValueError, match="ONNX's LSTM has no projection"):
        to_onnx(LSTM(3, 4, proj_size=2))


# ---------------------------------------------------------------- functional refusals

def _bad(**change):
    a, _ = make_case(3, 2, 3, 4, 2, np.float64)
    a.update(change)
    return a


@pytest.mark.parametrize("args,kw,message", [
    (_bad(w_hr=np.zeros((4, 4))), {}, r"w_hr must have shape \(proj_size, hidden_size\) "
                                      r"with 0 < proj_size < hidden_size, got \(4, 4\)"),
    (_bad(w_hr=np.zeros(4)), {}, r"w_hr must have shape \(proj_size, hidden_size\)"),
    (_bad(w_hr=np.zeros((2, 4), np.float32)), {}, "w_hr must have dtype float64"),
    (_bad(w_hh=np.zeros((16, 4))), {}, r"w_hh must have shape \(16, 2\), got \(16, 4\)"),
    (_bad(h0=np.zeros((2, 4))), {}, r"h0 must have shape \(2, 2\), got \(2, 4\)"),
    (_bad(c0=np.zeros((2, 2))), {}, r"c0 must have shape \(2, 4\), got \(2, 2\)"),
    (_bad(), {"zoneout": 0.1}, "zoneout is not supported with a projection"),
    (_bad(), {"recurrent_dropout": np.ones((2, 4))},
     "recurrent_dropout is not supported with a projection"),
])
def test_functional_refusals(args, kw, message):
    a = args
    with pytest.raises((ValueError, TypeError), match=message):
        F.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                       w_hr=a["w_hr"], **kw)


def test_backward_checks_the_projected_shapes():
    args, (dy, dh_n, dc_n) = make_case(3, 2, 3, 4, 2, np.float64)
    _, _, _, ctx = forward(F, args)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 2, 2\)"):
        F.lstm_backward(np.zeros((3, 2, 4)), dh_n, dc_n, ctx)
    with pytest.raises(ValueError, match=r"dh_n must have shape \(2, 2\)"):
        F.lstm_backward(dy, np.zeros((2, 4)), dc_n, ctx)
    grads = F.lstm_backward(dy, dh_n, dc_n, ctx)  # the refusals left the ctx usable
    assert len(grads) == 8
    with pytest.raises(ValueError, match="ctx was already used"):
        F.lstm_backward(dy, dh_n, dc_n, ctx)


# ---------------------------------------------------------------- against torch.nn.LSTM

@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
def test_torch_parity(dtype, ragged, batch_first):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(7 + ragged + 2 * batch_first)
    rng = np.random.default_rng([ragged, batch_first, np.dtype(dtype).itemsize])
    T, B, I, H, P, L = 6, 4, 3, 7, 3, 2
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    m = torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=P,
                      batch_first=batch_first).to(tdtype)
    layer = LSTM(I, H, L, bidirectional=True, proj_size=P, batch_first=batch_first,
                 dtype=dtype)
    layer.load_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    s0 = [rng.standard_normal((2 * L, B, n)).astype(dtype) for n in (P, H)]
    lengths = np.array([6, 2, 5, 1]) if ragged else None
    y, s = layer(x, tuple(s0), lengths)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gs = [rng.standard_normal(a.shape).astype(dtype) for a in s]
    dx, d0 = layer.backward(gy, tuple(gs))

    xt = torch.from_numpy(x).requires_grad_()
    st = [torch.from_numpy(a).requires_grad_() for a in s0]
    inp = xt
    if ragged:
        inp = pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=batch_first,
                                   enforce_sorted=False)
    yt, fin = m(inp, tuple(st))
    if ragged:
        yt, _ = pad_packed_sequence(yt, batch_first=batch_first, total_length=T)
    loss = (yt * torch.from_numpy(gy)).sum()
    loss = loss + sum((f * torch.from_numpy(g)).sum() for f, g in zip(fin, gs))
    loss.backward()

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    check = lambda got, want, what: np.testing.assert_allclose(  # noqa: E731
        got, want.detach().numpy(), err_msg=what, **tol)
    check(y, yt, "y")
    for k in range(2):
        check(s[k], fin[k], f"final state {k}")
        check(d0[k], st[k].grad, f"initial state gradient {k}")
    check(dx, xt.grad, "dx")
    named = dict(m.named_parameters())
    assert list(layer.grads) == list(named)
    for k, p in named.items():
        check(layer.grads[k], p.grad, k)
