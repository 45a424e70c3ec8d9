"""Parity with torch.nn.LSTM / GRU / RNN / Linear / Embedding: outputs and every gradient,
with PyTorch's own state dict (converted to NumPy) loaded unchanged. Skipped cleanly
when PyTorch is not installed.
"""
import numpy as np
import pytest

from rnnfuse.layers import GRU, LSTM, RNN, Embedding, Linear, Sequential

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def pair(cell, I, H, dtype, **kw):
    """A torch module with its default random init, and ours loaded from its state dict."""
    if cell == "lstm":
        m, ours = torch.nn.LSTM(I, H, **kw), LSTM
    elif cell == "gru":
        m, ours = torch.nn.GRU(I, H, **kw), GRU
    else:
        m = torch.nn.RNN(I, H, nonlinearity=cell[4:], **kw)
        ours = lambda *a, **k: RNN(*a, nonlinearity=cell[4:], **k)  # noqa: E731
    m = m.to(TORCH_DTYPE[dtype])
    layer = ours(I, H, dtype=dtype, **kw)
    layer.load_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    return m, layer


def check(got, want, dtype, what):
    np.testing.assert_allclose(got, want.detach().numpy(), err_msg=what, **TOL[dtype])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recurrent_parity(cell, batch_first, ragged, bias, dtype):
    torch.manual_seed(len(cell) + 10 * batch_first + 100 * ragged + 1000 * bias)
    rng = np.random.default_rng([len(cell), batch_first, ragged, bias, dtype().itemsize])
    T, B, I, H = 6, 4, 3, 5
    m, layer = pair(cell, I, H, dtype, num_layers=2, bidirectional=True, bias=bias,
                    batch_first=batch_first)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = rng.standard_normal(shape).astype(dtype)
    n_states = 2 if cell == "lstm" else 1
    s0 = [rng.standard_normal((4, B, H)).astype(dtype) for _ in range(n_states)]
    lengths = np.array([6, 2, 5, 1]) if ragged else None
    state = tuple(s0) if n_states == 2 else s0[0]

    y, s = layer(x, state, lengths)
    s = list(s) if n_states == 2 else [s]
    gy = rng.standard_normal(y.shape).astype(dtype)
    gs = [rng.standard_normal(a.shape).astype(dtype) for a in s]
    dx, d0 = layer.backward(gy, tuple(gs) if n_states == 2 else gs[0])
    d0 = list(d0) if n_states == 2 else [d0]

    xt = torch.from_numpy(x).requires_grad_()
    st = [torch.from_numpy(a).requires_grad_() for a in s0]
    inp = xt
    if ragged:  # PyTorch's way to padding: a packed sequence, unpacked to length T
        inp = pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=batch_first,
                                   enforce_sorted=False)
    yt, fin = m(inp, tuple(st) if n_states == 2 else st[0])
    if ragged:
        yt, _ = pad_packed_sequence(yt, batch_first=batch_first, total_length=T)
    fin = list(fin) if n_states == 2 else [fin]
    loss = (yt * torch.from_numpy(gy)).sum()
    loss = loss + sum((f * torch.from_numpy(g)).sum() for f, g in zip(fin, gs))
    loss.backward()

    check(y, yt, dtype, "y")
    for k in range(n_states):
        check(s[k], fin[k], dtype, f"final state {k}")
        check(d0[k], st[k].grad, dtype, f"initial state gradient {k}")
    check(dx, xt.grad, dtype, "dx")
    named = dict(m.named_parameters())
    assert list(layer.grads) == list(named)
    for k, p in named.items():
        check(layer.grads[k], p.grad, dtype, k)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_parity(cell):
    torch.manual_seed(3)
    m, layer = pair(cell, 4, 3, np.float32, num_layers=3, dropout=0.5)
    m.eval()
    layer.eval()
    x = np.random.default_rng(5).standard_normal((7, 2, 4)).astype(np.float32)
    with torch.no_grad():
        yt, _ = m(torch.from_numpy(x))
    check(layer(x)[0], yt, np.float32, "y")


def test_embedding_linear_model_parity():
    torch.manual_seed(4)
    rng = np.random.default_rng(6)
    temb, tlstm, tlin = (torch.nn.Embedding(9, 3, padding_idx=0).double(),
                         torch.nn.LSTM(3, 4, bidirectional=True).double(),
                         torch.nn.Linear(8, 2).double())
    model = Sequential(Embedding(9, 3, padding_idx=0, dtype=np.float64),
                       LSTM(3, 4, bidirectional=True, dtype=np.float64),
                       Linear(8, 2, dtype=np.float64))
    sd = {f"{i}.{k}": v.detach().numpy() for i, mod in enumerate((temb, tlstm, tlin))
          for k, v in mod.state_dict().items()}
    model.load_state_dict(sd)
    ids = rng.integers(0, 9, size=(5, 3))
    y, _ = model(ids)
    gy = rng.standard_normal(y.shape)
    model.backward(gy)

    yt = tlin(tlstm(temb(torch.from_numpy(ids)))[0])
    (yt * torch.from_numpy(gy)).sum().backward()
    check(y, yt, np.float64, "y")
    for i, mod in enumerate((temb, tlstm, tlin)):
        for k, p in mod.named_parameters():
            check(model.grads[f"{i}.{k}"], p.grad, np.float64, f"{i}.{k}")
