"""Tests of rnnfuse.reference, the NumPy oracle the kernels are checked against.

- backward: float64 central finite differences of a random linear loss, every cell and option;
- forward: an independent per-sample, per-step loop written here from the formulas;
- dtypes, inputs untouched, need_ctx, ctx misuse, empty sizes;
- parity with torch.nn.LSTM / GRU / RNN (skipped without torch).
"""

import numpy as np
import pytest

from rnnfuse import reference as ref

CELLS = ["lstm", "gru", "gru_nolbr", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "gru_nolbr": 3, "rnn_tanh": 1, "rnn_relu": 1}
BIASES = ["both", "none", "ih", "hh"]
RAGGED = [2, 0, 4]  # with T=4: a short, an empty and a full sequence, unsorted


# ------------------------------------------------------------------------------ helpers


def _sig(v):
    return 1.0 / (1.0 + np.exp(-v))


def make_params(cell, rng, T=4, B=3, I=3, H=4, dtype=np.float64, h0=True, bias="both"):
    """Random inputs and weights (scale ~0.5) for one cell."""
    G = GATES[cell]
    p = {
        "x": rng.standard_normal((T, B, I)),
        "h0": rng.standard_normal((B, H)) * 0.5 if h0 else None,
        "w_ih": rng.standard_normal((G * H, I)) * 0.5,
        "w_hh": rng.standard_normal((G * H, H)) * 0.5,
        "b_ih": rng.standard_normal(G * H) * 0.5 if bias in ("both", "ih") else None,
        "b_hh": rng.standard_normal(G * H) * 0.5 if bias in ("both", "hh") else None,
    }
    if cell == "lstm":
        p["c0"] = rng.standard_normal((B, H)) * 0.5 if h0 else None
    return {k: (None if v is None else v.astype(dtype)) for k, v in p.items()}


def forward(cell, p, lengths=None, reverse=False, need_ctx=True):
    """Run the reference forward; returns (outputs tuple, ctx); outputs are y, h_n[, c_n]."""
    args = (p["x"], p["h0"])
    w = (p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    if cell == "lstm":
        y, h, c, ctx = ref.lstm_forward(*args, p["c0"], *w, lengths, reverse, need_ctx=need_ctx)
        return (y, h, c), ctx
    if cell.startswith("gru"):
        y, h, ctx = ref.gru_forward(*args, *w, lengths, reverse, cell == "gru", need_ctx=need_ctx)
    else:
        y, h, ctx = ref.rnn_forward(*args, *w, lengths, reverse, cell[4:], need_ctx=need_ctx)
    return (y, h), ctx


def backward(cell, ctx, douts):
    """Run the reference backward; returns a dict name -> gradient."""
    if cell == "lstm":
        names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
        grads = ref.lstm_backward(*douts, ctx)
    else:
        names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
        fn = ref.gru_backward if cell.startswith("gru") else ref.rnn_backward
        grads = fn(*douts, ctx)
    assert len(grads) == len(names)
    return dict(zip(names, grads))


def random_douts(cell, rng, p, which=("y", "h", "c")):
    T, B, _ = p["x"].shape
    H = p["w_hh"].shape[1]
    shapes = {"y": (T, B, H), "h": (B, H), "c": (B, H)}
    keys = ["y", "h", "c"] if cell == "lstm" else ["y", "h"]
    return tuple(rng.standard_normal(shapes[k]) if k in which else None for k in keys)


def loss(outs, douts):
    return sum(np.sum(o * d) for o, d in zip(outs, douts) if d is not None)


def rel_err(a, b):
    """||a - b|| / max(||a||, ||b||); 0 when both are exactly zero."""
    den = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if den == 0 else np.linalg.norm(a - b) / den


def fd_grad(f, p, name, eps=1e-6):
    """Central finite differences of f(params) with respect to p[name] (float64)."""
    base = p[name]
    g = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        q = dict(p)
        for sign in (1, -1):
            v = base.copy()
            v[idx] += sign * eps
            q[name] = v
            g[idx] += sign * f(q)
    return g / (2 * eps)


def check_gradients(cell, p, lengths, reverse, douts):
    (outs, ctx) = forward(cell, p, lengths, reverse)
    grads = backward(cell, ctx, douts)

    def f(q):
        return loss(forward(cell, q, lengths, reverse, need_ctx=False)[0], douts)

    for name, g in grads.items():
        if name in ("b_ih", "b_hh") and p[name] is None:
            assert g is None, f"gradient of absent {name} must be None"
            continue
        q = dict(p)
        if q[name] is None:  # h0/c0 None: the gradient is at a zero initial state
            q[name] = np.zeros_like(grads[name])
        assert g.shape == q[name].shape and g.dtype == np.float64, name
        num = fd_grad(f, q, name)
        assert np.linalg.norm(num) > 0 or np.all(g == 0), name
        err = rel_err(g, num)
        assert err < 1e-6, f"{cell} d{name}: relative error {err:.2e}"
    # padding contributes nothing: dx is exactly zero there
    if lengths is not None:
        T = p["x"].shape[0]
        pad = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
        assert np.all(grads["x"][pad] == 0)
    return grads


# ------------------------------------------------------------- finite-difference checks


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", BIASES)
def test_gradients_fd(cell, lengths, reverse, bias):
    rng = np.random.default_rng([GATES[cell], len(cell), int(reverse), BIASES.index(bias)])
    p = make_params(cell, rng, bias=bias)
    check_gradients(cell, p, lengths, reverse, random_douts(cell, rng, p))


# which upstream gradients are given (the rest None), with or without h0/c0
GRAD_INPUTS = [(), ("y",), ("h",), ("c",), ("y", "c"), ("h", "c"), ("y", "h")]
CELL_GRAD_INPUTS = [(c, w) for c in CELLS for w in GRAD_INPUTS if c == "lstm" or "c" not in w]


@pytest.mark.parametrize(
    "cell,which", CELL_GRAD_INPUTS, ids=[f"{c}-{'+'.join(w) or 'nothing'}" for c, w in CELL_GRAD_INPUTS]
)
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "noh0"])
def test_gradients_fd_none_inputs(cell, which, h0):
    rng = np.random.default_rng([GATES[cell], len(which), int(h0)])
    p = make_params(cell, rng, T=3, B=3, I=2, H=3, h0=h0)
    check_gradients(cell, p, [3, 1, 0], True, random_douts(cell, rng, p, which))


@pytest.mark.parametrize("cell", CELLS)
def test_empty_sequence_passes_state_gradient(cell):
    rng = np.random.default_rng(7)
    p = make_params(cell, rng)
    douts = random_douts(cell, rng, p)
    outs, ctx = forward(cell, p, lengths=[0, 4, 0])
    g = backward(cell, ctx, douts)
    np.testing.assert_array_equal(g["h0"][[0, 2]], douts[1][[0, 2]])
    np.testing.assert_array_equal(outs[1][[0, 2]], p["h0"][[0, 2]])
    if cell == "lstm":
        np.testing.assert_array_equal(g["c0"][[0, 2]], douts[2][[0, 2]])
        np.testing.assert_array_equal(outs[2][[0, 2]], p["c0"][[0, 2]])
    assert np.all(g["x"][:, [0, 2]] == 0)


# ------------------------------------------------------------------ naive forward oracle


def naive_forward(cell, p, lengths=None, reverse=False):
    """One sample, one step at a time, straight from the formulas in docs/design.md."""
    x = p["x"].astype(np.float64)
    T, B, _ = x.shape
    H = p["w_hh"].shape[1]
    W, U = p["w_ih"].astype(np.float64), p["w_hh"].astype(np.float64)
    bi = np.zeros(W.shape[0]) if p["b_ih"] is None else p["b_ih"].astype(np.float64)
    bh = np.zeros(W.shape[0]) if p["b_hh"] is None else p["b_hh"].astype(np.float64)
    y = np.zeros((T, B, H))
    h_n, c_n = np.zeros((B, H)), np.zeros((B, H))
    for b in range(B):
        L = T if lengths is None else lengths[b]
        h = np.zeros(H) if p["h0"] is None else p["h0"][b].astype(np.float64)
        c = np.zeros(H) if p.get("c0") is None else p["c0"][b].astype(np.float64)
        for t in (reversed(range(L)) if reverse else range(L)):
            xt = x[t, b]
            if cell == "lstm":
                a = W @ xt + bi + U @ h + bh
                i, f = _sig(a[:H]), _sig(a[H:2 * H])
                g, o = np.tanh(a[2 * H:3 * H]), _sig(a[3 * H:])
                c = f * c + i * g
                h = o * np.tanh(c)
            elif cell.startswith("gru"):
                ax, ah = W @ xt + bi, U @ h + bh
                r = _sig(ax[:H] + ah[:H])
                z = _sig(ax[H:2 * H] + ah[H:2 * H])
                if cell == "gru":
                    n = np.tanh(ax[2 * H:] + r * ah[2 * H:])
                else:
                    n = np.tanh(ax[2 * H:] + U[2 * H:] @ (r * h) + bh[2 * H:])
                h = (1 - z) * n + z * h
            else:
                a = W @ xt + bi + U @ h + bh
                h = np.tanh(a) if cell == "rnn_tanh" else np.maximum(a, 0)
            y[t, b] = h
        h_n[b], c_n[b] = h, c
    return (y, h_n, c_n) if cell == "lstm" else (y, h_n)


FWD_LENGTHS = [None, RAGGED, [4, 4, 4], [1, 3, 3], [0, 0, 0]]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", FWD_LENGTHS, ids=["none", "ragged", "full", "ties", "empty"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)], ids=["f64", "f32"])
def test_forward_matches_naive(cell, lengths, reverse, dtype, tol):
    rng = np.random.default_rng([GATES[cell], len(cell), 11])
    p = make_params(cell, rng, dtype=dtype)
    outs, _ = forward(cell, p, lengths, reverse)
    expected = naive_forward(cell, p, lengths, reverse)
    for name, got, want in zip(["y", "h_n", "c_n"], outs, expected):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, name
        assert np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want))), name
    if lengths is not None:
        pad = np.arange(4)[:, None] >= np.asarray(lengths)[None, :]
        assert np.all(outs[0][pad] == 0), "y must be exactly 0 at padding"
        empty = np.asarray(lengths) == 0
        np.testing.assert_array_equal(outs[1][empty], p["h0"][empty])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_forward_many_ragged(cell, reverse):
    # more sequences than steps, tied lengths, in no particular order
    rng = np.random.default_rng([GATES[cell], 23, int(reverse)])
    p = make_params(cell, rng, T=5, B=9, I=2, H=3, h0=False)
    lengths = [5, 2, 0, 2, 5, 1, 3, 0, 4]
    outs, _ = forward(cell, p, lengths, reverse)
    for got, want in zip(outs, naive_forward(cell, p, lengths, reverse)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_reverse_is_forward_on_flipped_prefix(cell):
    rng = np.random.default_rng(5)
    p = make_params(cell, rng)
    lengths = [3, 1, 4]
    outs, _ = forward(cell, p, lengths, reverse=True)
    for b, L in enumerate(lengths):
        q = dict(p)
        q["x"] = p["x"][:L, b:b + 1][::-1].copy()
        for k in ("h0", "c0"):
            if k in p:
                q[k] = p[k][b:b + 1]
        o1, _ = forward(cell, q)
        np.testing.assert_allclose(outs[0][:L, b], o1[0][::-1, 0], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(outs[1][b], o1[1][0], rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------- dtypes and side effects


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_float32_stays_float32(cell, lengths, reverse):
    rng = np.random.default_rng(3)
    p = make_params(cell, rng, dtype=np.float32)
    p64 = {k: (None if v is None else v.astype(np.float64)) for k, v in p.items()}
    douts = tuple(d.astype(np.float32) for d in random_douts(cell, rng, p))
    outs, ctx = forward(cell, p, lengths, reverse)
    grads = backward(cell, ctx, douts)
    outs64, ctx64 = forward(cell, p64, lengths, reverse)
    grads64 = backward(cell, ctx64, douts)
    for o, o64 in zip(outs, outs64):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, o64, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert g.dtype == np.float32, name
        assert rel_err(g, grads64[name]) < 1e-5, name


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_inputs_not_modified(cell, lengths, reverse):
    rng = np.random.default_rng(4)
    p = make_params(cell, rng)
    douts = random_douts(cell, rng, p)
    lengths = None if lengths is None else np.array(lengths)
    saved = {k: v.copy() for k, v in p.items()}
    saved_d = [d.copy() for d in douts]
    saved_l = None if lengths is None else lengths.copy()
    outs, ctx = forward(cell, p, lengths, reverse)
    outs_copy = [o.copy() for o in outs]
    backward(cell, ctx, douts)
    for k in p:
        np.testing.assert_array_equal(p[k], saved[k], err_msg=k)
    for d, s in zip(douts, saved_d):
        np.testing.assert_array_equal(d, s)
    if lengths is not None:
        np.testing.assert_array_equal(lengths, saved_l)
    # backward does not touch the forward's outputs either
    for o, s in zip(outs, outs_copy):
        np.testing.assert_array_equal(o, s)


@pytest.mark.parametrize("cell", CELLS)
def test_noncontiguous_inputs(cell):
    rng = np.random.default_rng(8)
    p = make_params(cell, rng)
    q = {k: np.asfortranarray(v) if v is not None and v.ndim == 2 else v for k, v in p.items()}
    q["x"] = np.ascontiguousarray(p["x"].transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not q["x"].flags.c_contiguous and not q["w_ih"].flags.c_contiguous
    douts = random_douts(cell, rng, p)
    o1, c1 = forward(cell, p, RAGGED, True)
    o2, c2 = forward(cell, q, RAGGED, True)
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    g1, g2 = backward(cell, c1, douts), backward(cell, c2, douts)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-12, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
def test_need_ctx_false(cell, lengths):
    rng = np.random.default_rng(9)
    p = make_params(cell, rng)
    outs, ctx = forward(cell, p, lengths, True, need_ctx=True)
    outs_nc, ctx_nc = forward(cell, p, lengths, True, need_ctx=False)
    assert ctx is not None and ctx_nc is None
    for a, b in zip(outs, outs_nc):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="need_ctx=False"):
        backward(cell, None, random_douts(cell, rng, p))


@pytest.mark.parametrize("cell", CELLS)
def test_backward_twice_raises(cell):
    rng = np.random.default_rng(10)
    p = make_params(cell, rng)
    douts = random_douts(cell, rng, p)
    _, ctx = forward(cell, p)
    backward(cell, ctx, douts)
    with pytest.raises(ValueError, match="once"):
        backward(cell, ctx, douts)


@pytest.mark.parametrize("cell,other", [("lstm", "gru"), ("gru", "rnn_tanh"), ("rnn_relu", "lstm")])
def test_ctx_of_another_cell_raises(cell, other):
    rng = np.random.default_rng(12)
    p = make_params(other, rng)
    _, ctx = forward(other, p)
    q = make_params(cell, rng)
    with pytest.raises(TypeError, match="ctx"):
        backward(cell, ctx, random_douts(cell, rng, q))
    with pytest.raises(TypeError, match="ctx"):
        backward(cell, object(), random_douts(cell, rng, q))
    # the failed call did not use the context up
    backward(other, ctx, random_douts(other, rng, p))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_empty_sizes(cell, T, B, reverse):
    rng = np.random.default_rng(13)
    I, H, G = 3, 4, GATES[cell]
    p = make_params(cell, rng, T=T, B=B, I=I, H=H)
    lengths = [0] * B if T == 0 else None
    for lens in (None, lengths):
        outs, ctx = forward(cell, p, lens, reverse)
        assert outs[0].shape == (T, B, H)
        np.testing.assert_array_equal(outs[1], p["h0"])
        douts = random_douts(cell, rng, p)
        g = backward(cell, ctx, douts)
        assert g["x"].shape == (T, B, I)
        np.testing.assert_array_equal(g["h0"], douts[1])
        for k, shape in [("w_ih", (G * H, I)), ("w_hh", (G * H, H)), ("b_ih", (G * H,)), ("b_hh", (G * H,))]:
            assert g[k].shape == shape and np.all(g[k] == 0), k
        if cell == "lstm":
            np.testing.assert_array_equal(outs[2], p["c0"])
            np.testing.assert_array_equal(g["c0"], douts[2])


# ------------------------------------------------------------------------ PyTorch parity


def _torch_module(torch, cell, p, bias):
    I, H = p["w_ih"].shape[1], p["w_hh"].shape[1]
    if cell == "lstm":
        m = torch.nn.LSTM(I, H, bias=bias)
    elif cell == "gru":
        m = torch.nn.GRU(I, H, bias=bias)
    else:
        m = torch.nn.RNN(I, H, bias=bias, nonlinearity=cell[4:])
    m = m.double()
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.from_numpy(p["w_ih"]))
        m.weight_hh_l0.copy_(torch.from_numpy(p["w_hh"]))
        if bias:
            m.bias_ih_l0.copy_(torch.from_numpy(p["b_ih"]))
            m.bias_hh_l0.copy_(torch.from_numpy(p["b_hh"]))
    return m


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_parity(cell, lengths, reverse, bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng([GATES[cell], len(cell), int(reverse), int(bias)])
    T, B = 4, 3
    p = make_params(cell, rng, T=T, B=B, bias="both" if bias else "none")
    douts = random_douts(cell, rng, p)
    outs, ctx = forward(cell, p, lengths, reverse)
    grads = backward(cell, ctx, douts)

    m = _torch_module(torch, cell, p, bias)
    x = torch.from_numpy(p["x"]).requires_grad_()
    states = [torch.from_numpy(p[k]).requires_grad_() for k in (["h0", "c0"] if cell == "lstm" else ["h0"])]
    lens = [T] * B if lengths is None else lengths
    y_t = torch.zeros(T, B, p["w_hh"].shape[1], dtype=torch.float64)
    n_t = [torch.zeros_like(s) for s in states]
    total = 0
    for b, L in enumerate(lens):  # torch per sequence, over its valid prefix
        st = [s[b:b + 1].unsqueeze(0) for s in states]
        if L == 0:
            fin = [s[0] for s in st]
        else:
            xb = x[:L, b:b + 1]
            if reverse:
                xb = xb.flip(0)
            yb, fin = m(xb, tuple(st) if cell == "lstm" else st[0])
            fin = [f[0] for f in fin] if cell == "lstm" else [fin[0]]
            if reverse:
                yb = yb.flip(0)
            y_t[:L, b] = yb[:, 0].detach()
            total = total + (yb[:, 0] * torch.from_numpy(douts[0][:L, b])).sum()
        for k, f in enumerate(fin):
            n_t[k][b] = f[0].detach()
            total = total + (f[0] * torch.from_numpy(douts[1 + k][b])).sum()
    total.backward()

    np.testing.assert_allclose(outs[0], y_t.numpy(), rtol=1e-12, atol=1e-13)
    for o, t in zip(outs[1:], n_t):
        np.testing.assert_allclose(o, t.numpy(), rtol=1e-12, atol=1e-13)
    want = {"x": x.grad, "h0": states[0].grad, "w_ih": m.weight_ih_l0.grad, "w_hh": m.weight_hh_l0.grad}
    if cell == "lstm":
        want["c0"] = states[1].grad
    if bias:
        want["b_ih"], want["b_hh"] = m.bias_ih_l0.grad, m.bias_hh_l0.grad
    else:
        assert grads["b_ih"] is None and grads["b_hh"] is None
    for k, t in want.items():
        np.testing.assert_allclose(grads[k], t.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float32_single_unit_agrees_with_float64(cell):
    # Regression: with H=1 the gate blocks are strided (B, 1) views, which NumPy 2.4.6's
    # in-place float32 np.negative misreads; the reference must not depend on it.
    rng = np.random.default_rng(3)
    G = 4 if cell == "lstm" else 3
    args64 = [rng.standard_normal(s) for s in ((2, 3, 1), (3, 1), (G, 1), (G, 1), (G,), (G,))]
    x, h0, w_ih, w_hh, b_ih, b_hh = args64
    if cell == "lstm":
        run = lambda a: ref.lstm_forward(a[0], a[1], a[1], *a[2:])[0]  # noqa: E731
    else:
        run = lambda a: ref.gru_forward(*a)[0]  # noqa: E731
    y64 = run(args64)
    y32 = run([a.astype(np.float32) for a in args64])
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-6)
