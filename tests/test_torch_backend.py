"""rnnfuse.torch: gradients by gradcheck, parity with torch.nn (outputs, states and every
gradient, from the same state dict), training with torch.optim, swap_modules, and every
refused argument. Skipped cleanly when PyTorch is not installed.
"""
import importlib
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import rnnfuse.torch as rt  # noqa: E402
from rnnfuse.torch import _functions  # noqa: E402
from rnnfuse import functional as F  # noqa: E402

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def classes(cell):
    """(torch.nn class, rnnfuse class, extra constructor arguments) of a cell."""
    if cell == "lstm":
        return nn.LSTM, rt.LSTM, {}
    if cell == "gru":
        return nn.GRU, rt.GRU, {}
    return nn.RNN, rt.RNN, {"nonlinearity": cell[4:]}


def pair(cell, I, H, dtype, **kw):
    """torch.nn's module with its own random init, and ours loaded from its state dict."""
    theirs, ours, extra = classes(cell)
    m = theirs(I, H, dtype=dtype, **extra, **kw)
    o = ours(I, H, dtype=dtype, **extra, **kw)
    o.load_state_dict(m.state_dict())
    return m, o


def close(got, want, dtype, what=""):
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **TOL[dtype])


# ---------------------------------------------------------------- import

def test_import_rnnfuse_does_not_import_torch():
    code = ("import sys, rnnfuse, rnnfuse.layers, rnnfuse.functional; "
            "assert 'torch' not in sys.modules, 'rnnfuse imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    monkeypatch.delitem(sys.modules, "rnnfuse.torch")
    with pytest.raises(ImportError, match=r"rnnfuse\.torch needs PyTorch.*pip install torch"):
        importlib.import_module("rnnfuse.torch")


# ---------------------------------------------------------------- gradcheck

def apply_cell(cell, x, states, weights, lengths, reverse):
    """One direction of one layer through the cell's autograd Function."""
    if cell == "lstm":
        return rt.LSTMFunction.apply(x, *states, *weights, lengths, reverse)
    if cell.startswith("gru"):
        return rt.GRUFunction.apply(x, *states, *weights, lengths, reverse, cell == "gru")
    return rt.RNNFunction.apply(x, *states, *weights, lengths, reverse, cell[4:])


GRADCHECK_CASES = {  # bias, reverse, lengths, initial states given
    "plain": (True, False, None, True),
    "nobias-reverse-ragged": (False, True, [4, 0, 2], True),
    "ragged-zero-state": (True, False, [1, 4, 3], False),
    "reverse-ragged-zero-state": (True, True, [3, 4, 1], False),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_original", "rnn_tanh", "rnn_relu"])
def test_function_gradcheck(cell, case):
    bias, reverse, lengths, with_states = GRADCHECK_CASES[case]
    g = torch.Generator().manual_seed(len(cell) + 7 * len(case))
    T, B, I, H = 4, 3, 2, 3
    G = {"l": 4, "g": 3, "r": 1}[cell[0]]
    n_states = 2 if cell == "lstm" else 1

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x = leaf(T, B, I)
    states = [leaf(B, H) if with_states else None for _ in range(n_states)]
    weights = [leaf(G * H, I), leaf(G * H, H)]
    weights += [leaf(G * H), leaf(G * H)] if bias else [None, None]
    lengths = None if lengths is None else torch.tensor(lengths)

    def f(*tensors):
        it = iter(tensors)
        xs = next(it)
        ss = [next(it) if s is not None else None for s in states]
        ws = [next(it) if w is not None else None for w in weights]
        return apply_cell(cell, xs, ss, ws, lengths, reverse)

    inputs = [t for t in [x, *states, *weights] if t is not None]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_module_gradcheck_packed_bidirectional_stacked(cell):
    """Through the module: packed ragged input (unsorted), two layers, both directions."""
    torch.manual_seed(1)
    _, ours, extra = classes(cell)
    m = ours(2, 2, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    n_states = 2 if cell == "lstm" else 1
    hx = [torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(n_states)]

    def f(x, *rest):
        h0, ps = rest[:n_states], rest[n_states:]
        packed = pack_padded_sequence(x, [2, 3, 1], enforce_sorted=False)
        out, h = torch.func.functional_call(m, dict(zip(names, ps)),
                                            (packed, h0 if n_states == 2 else h0[0]))
        return (out.data, *(h if n_states == 2 else (h,)))

    assert torch.autograd.gradcheck(f, [x, *hx, *params])


# ---------------------------------------------------------------- parity with torch.nn

PARITY_CASES = {  # module arguments, input form
    "plain": (dict(), "tensor"),
    "nobias-stacked3": (dict(num_layers=3, bias=False), "tensor-no-hx"),
    "bidir-stacked-bfirst": (dict(num_layers=2, bidirectional=True, batch_first=True), "tensor"),
    "packed-sorted": (dict(num_layers=2, bidirectional=True), "packed-sorted"),
    "packed-unsorted-bfirst": (dict(num_layers=3, bidirectional=True, batch_first=True),
                               "packed-unsorted"),
    "packed-unsorted-no-hx": (dict(bidirectional=True), "packed-unsorted-no-hx"),
    "unbatched": (dict(num_layers=2, bidirectional=True), "unbatched"),
}


def outputs_and_grads(module, x, hx, form, batch_first):
    """Everything forward gives and every gradient of a random weighting of it, by name."""
    x = x.clone().requires_grad_()
    hx = [h.clone().requires_grad_() for h in hx]
    inp = x
    if form.startswith("packed"):
        sorted_ = form == "packed-sorted"
        lengths = [6, 5, 5, 2] if sorted_ else [5, 2, 6, 2]  # ties: order must follow torch's
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sorted_)
    state = None if not hx else tuple(hx) if len(hx) == 2 else hx[0]
    out, fin = module(inp, state)
    fin = list(fin) if isinstance(fin, tuple) else [fin]
    got = {}
    if isinstance(out, PackedSequence):
        got.update(batch_sizes=out.batch_sizes, sorted_indices=out.sorted_indices,
                   unsorted_indices=out.unsorted_indices)
        out = out.data
    got["output"] = out
    got.update({f"final state {k}": f for k, f in enumerate(fin)})
    g = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in [out, *fin])
    loss.backward()
    got["grad input"] = x.grad
    got.update({f"grad initial state {k}": h.grad for k, h in enumerate(hx)})
    got.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return got


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_parity_with_torch_nn(cell, dtype, case):
    kw, form = PARITY_CASES[case]
    torch.manual_seed(CELLS.index(cell) + 10 * list(PARITY_CASES).index(case))
    T, B, I, H = 6, 4, 3, 5
    m, ours = pair(cell, I, H, dtype, **kw)
    bf = kw.get("batch_first", False)
    shape = (T, I) if form == "unbatched" else (B, T, I) if bf else (T, B, I)
    x = torch.randn(shape, dtype=dtype)
    LD = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    n_states = 2 if cell == "lstm" else 1
    state_shape = (LD, H) if form == "unbatched" else (LD, B, H)
    hx = [] if form.endswith("no-hx") else [torch.randn(state_shape, dtype=dtype)
                                           for _ in range(n_states)]

    want = outputs_and_grads(m, x, hx, form, bf)
    got = outputs_and_grads(ours, x, hx, form, bf)
    assert list(got) == list(want)
    for k in want:
        close(got[k], want[k], dtype, k)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_with_dropout_matches_torch_nn(cell):
    torch.manual_seed(3)
    m, ours = pair(cell, 4, 3, torch.float32, num_layers=3, dropout=0.5)
    m.eval()
    ours.eval()
    x = torch.randn(7, 2, 4)
    close(ours(x)[0], m(x)[0], torch.float32, "output")


@pytest.mark.parametrize("cell", CELLS)
def test_same_seed_same_initial_weights_as_torch_nn(cell):
    theirs, ours, extra = classes(cell)
    torch.manual_seed(5)
    m = theirs(3, 4, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(5)
    o = ours(3, 4, num_layers=2, bidirectional=True, **extra)
    assert list(o.state_dict()) == list(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(o.state_dict()[k], v), k
    assert all(p.abs().max() <= 0.5 for p in o.parameters())  # uniform(-1/sqrt(4), 1/sqrt(4))
    assert [[p.shape for p in ps] for ps in o.all_weights] == \
        [[p.shape for p in ps] for ps in m.all_weights]
    relu = ", nonlinearity=relu" if cell == "rnn_relu" else ""  # torch.nn's repr omits it
    assert repr(o) == repr(m)[:-1] + relu + ")"


def test_state_dict_loads_into_torch_nn():
    torch.manual_seed(6)
    ours = rt.GRU(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    m = nn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    m.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    close(ours(x)[0], m(x)[0], torch.float64, "output")


def test_default_dtype_is_torchs():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert rt.LSTM(2, 3).weight_hh_l0.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert rt.LSTM(2, 3).weight_hh_l0.dtype == old


def test_double_converts_the_module():
    m = rt.RNN(2, 3).double()
    y, h = m(torch.randn(4, 1, 2, dtype=torch.float64))
    assert y.dtype == h.dtype == torch.float64


# ---------------------------------------------------------------- dropout and training

def test_dropout_acts_between_layers_in_training_only():
    torch.manual_seed(7)
    m = rt.GRU(3, 4, num_layers=2, dropout=1.0, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, h = m(x)
    # dropout=1 zeroes layer 0's output: layer 1 then runs on zeros, layer 0 is untouched
    first, second = rt.GRU(3, 4, dtype=torch.float64), rt.GRU(4, 4, dtype=torch.float64)
    sd = m.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k.endswith("_l0")})
    second.load_state_dict({k[:-1] + "0": v for k, v in sd.items() if k.endswith("_l1")})
    close(h[0], first(x)[1][0], torch.float64, "layer 0 state")
    y1, h1 = second(torch.zeros(5, 2, 4, dtype=torch.float64))
    close(y, y1, torch.float64, "output")
    close(h[1], h1[0], torch.float64, "layer 1 state")

    m.dropout = 0.5
    y_train = m(x)[0]
    m.eval()
    y_eval = m(x)[0]
    assert not torch.allclose(y_train, y_eval)
    assert torch.equal(m(x)[0], y_eval)  # eval mode is deterministic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_adam_training_matches_torch_nn(cell, dtype):
    torch.manual_seed(8)
    m, ours = pair(cell, 3, 4, dtype, num_layers=2, bidirectional=True, batch_first=True)
    heads = [nn.Linear(8, 1, dtype=dtype) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    x, target = torch.randn(4, 6, 3, dtype=dtype), torch.randn(4, 6, 1, dtype=dtype)
    losses = []
    for rnn, head in zip((m, ours), heads):
        opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=0.05)
        run = []
        for _ in range(5):
            opt.zero_grad()
            loss = ((head(rnn(x)[0]) - target) ** 2).mean()
            loss.backward()
            opt.step()
            run.append(loss.detach())
        losses.append(torch.stack(run))
    close(losses[1], losses[0], dtype, "losses")
    assert losses[1][-1] < losses[1][0]


# ---------------------------------------------------------------- autograd contract

def test_backward_twice_without_retain_graph_is_refused_by_torch():
    x = torch.randn(4, 2, 3, requires_grad=True)
    y, _ = rt.LSTM(3, 4)(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@pytest.mark.parametrize("cell", CELLS)
def test_backward_twice_with_retain_graph_replays_forward(cell):
    """The kernel's record is consumed by the first backward; the second replays forward."""
    _, ours, extra = classes(cell)
    m = ours(3, 4, bidirectional=True, dtype=torch.float64, **extra)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = (m(x)[0] ** 2).sum()
    first = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *m.parameters()])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y, _ = rt.GRU(3, 4, dtype=torch.float64)(x)
    with pytest.raises(RuntimeError, match=r"first derivatives only: .*create_graph=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_weights_changed_in_place_before_backward_are_refused():
    m = rt.RNN(3, 4)
    y, _ = m(torch.randn(4, 2, 3))
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_kernels_keep_no_workspace_when_nothing_is_recorded(monkeypatch):
    seen, real = [], F.lstm_forward
    monkeypatch.setattr(F, "lstm_forward",
                        lambda *a, **k: seen.append(k["need_ctx"]) or real(*a, **k))
    m, x = rt.LSTM(3, 4), torch.randn(4, 2, 3)
    with torch.no_grad():
        m(x)
    with torch.inference_mode():
        m(x)
    m.requires_grad_(False)(x)  # nothing requires grad
    assert seen == [False] * 3
    m(x.clone().requires_grad_())  # the input does
    m.requires_grad_(True).eval()(x)  # eval mode still gives gradients, as torch.nn does
    assert seen == [False] * 3 + [True] * 2


def test_functions_accept_lengths_and_absent_arguments():
    x = torch.randn(5, 3, 2)
    w_ih, w_hh = torch.randn(3 * 4, 2), torch.randn(3 * 4, 4)
    y, h = rt.GRUFunction.apply(x, None, w_ih, w_hh, None, None, torch.tensor([5, 0, 2]))
    assert y.shape == (5, 3, 4) and torch.all(y[:, 1] == 0) and torch.all(h[1] == 0)
    assert torch.all(y[2:, 2] == 0)


# ---------------------------------------------------------------- swap_modules

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnns = nn.ModuleDict({"lstm": nn.LSTM(3, 4, batch_first=True),
                                   "gru": nn.GRU(4, 5, num_layers=2, bidirectional=True,
                                                 batch_first=True)})
        self.head = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.RNN(6, 2, nonlinearity="relu"))
        self.proj = nn.LSTM(2, 4, proj_size=2, batch_first=True)

    def forward(self, x):
        y = self.rnns["gru"](self.rnns["lstm"](x)[0])[0]
        y = self.head[2](self.head[1](self.head[0](y)))[0]
        return self.proj(y)[0]


@pytest.mark.filterwarnings("ignore:LSTM with projections")  # torch.nn's own, about oneDNN
def test_swap_modules_keeps_weights_and_outputs():
    torch.manual_seed(9)
    net = Net()
    params = list(net.parameters())
    x = torch.randn(2, 5, 3)
    before = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left as it is
        names = rt.swap_modules(net)
    assert names == ["proj", "rnns.lstm", "rnns.gru", "head.2"]  # parents in named_modules order
    assert type(net.rnns["lstm"]) is rt.LSTM and type(net.rnns["gru"]) is rt.GRU
    assert type(net.head[2]) is rt.RNN and net.head[2].nonlinearity == "relu"
    assert type(net.proj) is rt.LSTM and net.proj.proj_size == 2
    assert all(a is b for a, b in zip(params, net.parameters()))  # the same Parameters
    close(net(x), before, torch.float32, "output")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rt.swap_modules(net) == []  # nothing left to swap, nothing to report


def test_swap_modules_reports_what_it_leaves():
    class MyGRU(nn.GRU):
        pass

    shared = nn.GRU(2, 3)
    model = nn.Sequential(shared, nn.Sequential(shared), MyGRU(2, 3),
                          nn.LSTM(2, 3, device="meta"), nn.RNN(2, 3).half())
    with pytest.warns(UserWarning) as record:
        names = rt.swap_modules(model)
    assert names == ["0", "2", "1.0"]  # parents in named_modules order
    assert model[0] is model[1][0] and type(model[0]) is rt.GRU
    assert isinstance(model[2], MyGRU) and isinstance(model[2], rt.GRU)
    message = str(record[0].message)
    assert "2:" not in message
    assert "3: device must be the CPU" in message
    assert "4: dtype must be torch.float32 or torch.float64" in message
    with pytest.warns(UserWarning, match="the model itself"):
        assert rt.swap_modules(nn.LSTM(2, 3)) == []
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rt.swap_modules([nn.LSTM(2, 3)])


def test_from_torch_shares_parameters_and_mode():
    m = nn.LSTM(2, 3, num_layers=2, dropout=0.3).eval()
    rng = torch.get_rng_state()
    twin = rt.LSTM.from_torch(m)
    assert torch.equal(torch.get_rng_state(), rng)  # swapping does not move the global RNG
    assert not twin.training and twin.dropout == 0.3 and twin.num_layers == 2
    assert twin.weight_hh_l1 is m.weight_hh_l1
    with pytest.raises(TypeError, match="LSTM.from_torch needs a torch.nn.LSTM, got GRU"):
        rt.LSTM.from_torch(nn.GRU(2, 3))


# ---------------------------------------------------------------- refused arguments

@pytest.mark.parametrize("make, error, match", [
    (lambda: rt.LSTM(3, 4, proj_size=4), ValueError,
     r"proj_size must be smaller than hidden_size=4 \(0 for no projection\), got 4"),
    (lambda: rt.LSTM(3, 4, proj_size=-1), ValueError, r"proj_size must be >= 0, got -1"),
    (lambda: rt.LSTM(3, 4, device="meta"), ValueError, r"device must be the CPU.*got meta"),
    (lambda: rt.GRU(3, 4, dtype=torch.float16), TypeError,
     r"dtype must be torch.float32 or torch.float64, got torch.float16"),
    (lambda: rt.GRU(3, 4, dtype=torch.int64), TypeError, r"dtype must be .*got torch.int64"),
    (lambda: rt.RNN(3, 4, nonlinearity="sigmoid"), ValueError,
     r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    (lambda: rt.RNN(3, 0), ValueError, r"hidden_size must be >= 1, got 0"),
    (lambda: rt.RNN(2.5, 3), TypeError, r"input_size must be an int, got float"),
    (lambda: rt.LSTM(3, 4, num_layers=0), ValueError, r"num_layers must be >= 1"),
    (lambda: rt.LSTM(3, 4, bias="yes"), TypeError, r"bias must be a bool"),
    (lambda: rt.LSTM(3, 4, batch_first=1), TypeError, r"batch_first must be a bool"),
    (lambda: rt.GRU(3, 4, dropout=1.5), ValueError, r"dropout must be a probability in \[0, 1\]"),
    (lambda: rt.GRU(3, 4, dropout="0.1"), ValueError, r"dropout must be a probability"),
])
def test_constructor_refuses(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_dropout_with_one_layer_warns_once_and_twins_do_not_warn_again():
    filters = list(warnings.filters)
    with pytest.warns(UserWarning) as record:
        m = rt.GRU(3, 4, dropout=0.2)
    assert [str(w.message) for w in record] == [
        "dropout acts on the outputs of all but the last layer, so it does nothing with "
        "num_layers=1 (dropout=0.2)"]  # torch.nn's own warning is not added
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        twin = m.to_torch()
        again = rt.GRU.from_torch(twin)
    assert not record and twin.dropout == again.dropout == 0.2
    assert warnings.filters == filters  # (the process's filters were never changed)


@pytest.mark.parametrize("args, error, match", [  # to LSTM(3, 5, num_layers=2)
    (([1.0, 2.0],), TypeError, r"input must be a torch.Tensor or a PackedSequence, got list"),
    ((torch.randn(2, 3, 4, 3),), ValueError, r"input must be 2-D .* or 3-D .*got 4-D"),
    ((torch.randn(3),), ValueError, r"got 1-D with shape \(3,\)"),
    ((torch.randn(6, 4, 4),), RuntimeError, r"input.size\(-1\) must be equal to input_size=3, "
                                            r"got 4"),
    ((torch.randn(6, 4, 3, dtype=torch.float64),), ValueError,
     r"input must have dtype torch.float32 \(the parameters' dtype\), got torch.float64"),
    ((torch.randn(6, 4, 3).int(),), ValueError, r"input must have dtype torch.float32"),
    ((torch.empty(6, 4, 3, device="meta"),), RuntimeError, r"input is on meta.*CPU"),
    ((torch.randn(6, 4, 3), torch.randn(2, 4, 5)), TypeError,
     r"hx must be a tuple \(h_0, c_0\) of two tensors for LSTM, got Tensor"),
    ((torch.randn(6, 4, 3), (torch.randn(2, 4, 5), None)), TypeError,
     r"hx\[1\] \(c_0\) must be a torch.Tensor, got NoneType"),
    ((torch.randn(6, 4, 3), (torch.randn(1, 4, 5), torch.randn(2, 4, 5))), RuntimeError,
     r"hx\[0\] \(h_0\) must have shape \(2, 4, 5\) = \(num_layers\*num_directions, batch, "
     r"hidden_size\), got \(1, 4, 5\)"),
    ((torch.randn(6, 3), (torch.randn(2, 1, 5), torch.randn(2, 1, 5))), RuntimeError,
     r"must have shape \(2, 5\) .* for unbatched 2-D input, got \(2, 1, 5\)"),
    ((torch.randn(6, 4, 3), (torch.randn(2, 4, 5), torch.randn(2, 4, 5).double())), ValueError,
     r"hx\[1\] \(c_0\) must have dtype torch.float32"),
])
def test_forward_refuses(args, error, match):
    with pytest.raises(error, match=match):
        rt.LSTM(3, 5, num_layers=2)(*args)


def test_forward_refuses_a_hidden_state_of_the_wrong_batch_for_gru():
    with pytest.raises(RuntimeError, match=r"hx must have shape \(1, 2, 4\)"):
        rt.GRU(3, 4)(torch.randn(5, 2, 3), torch.randn(1, 3, 4))


def test_forward_refuses_parameters_moved_off_the_kernels_reach():
    with pytest.raises(TypeError, match=r"parameters must all be torch.float32 or all "
                                        r"torch.float64, got torch.float16"):
        rt.GRU(3, 4).half()(torch.randn(5, 2, 3).half())
    with pytest.raises(RuntimeError, match=r"parameter weight_ih_l0 is on meta"):
        rt.GRU(3, 4).to("meta")(torch.randn(5, 2, 3))


def test_tensors_reach_the_kernels_and_come_back_without_copies(monkeypatch):
    """Contiguous CPU tensors are handed to the kernels as NumPy views of their memory,
    and the kernels' outputs become the returned tensors without a copy."""
    seen = {}
    real = F.lstm_forward

    def spy(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *args, **kw):
        out = real(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *args, **kw)
        seen.update(x=x, w_ih=w_ih, w_hh=w_hh, y=out[0])
        return out

    monkeypatch.setattr(F, "lstm_forward", spy)
    lstm = rt.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    y, _ = lstm(x)
    assert seen["x"].__array_interface__["data"][0] == x.data_ptr()
    assert seen["w_ih"].__array_interface__["data"][0] == lstm.weight_ih_l0.data_ptr()
    assert seen["w_hh"].__array_interface__["data"][0] == lstm.weight_hh_l0.data_ptr()
    assert y.data_ptr() == seen["y"].__array_interface__["data"][0]


# ---------------------------------------------------------------- TorchScript, trace, export

class Wrapper(nn.Module):
    """torch.jit.script cannot script a top-level torch.nn.LSTM either (its forward is
    overloaded); inside a module it can."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_to_torch_shares_parameters_and_gives_the_same_outputs(cell):
    theirs, ours, extra = classes(cell)
    m = ours(3, 5, num_layers=2, bidirectional=True, batch_first=True, dropout=0.2,
             **extra).eval()
    twin = m.to_torch()
    assert type(twin) is theirs and not twin.training
    assert twin.batch_first and twin.bidirectional and twin.num_layers == 2
    assert all(a is b for a, b in zip(m.parameters(), twin.parameters()))
    x = torch.randn(2, 6, 3)
    close(twin(x)[0], m(x)[0], torch.float32, "output")
    with torch.no_grad():
        m.weight_hh_l1.mul_(0.5)  # torch.nn reads the shared Parameter, not a copy
    close(twin(x)[0], m(x)[0], torch.float32, "output after an update")


@pytest.mark.parametrize("grad", [False, True])
def test_tracing_records_the_operators(grad):
    # (more in test_torch_ops.py) the trace calls rnnfuse's operator, not a constant
    model = Wrapper(rt.LSTM(3, 4))
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, (torch.randn(5, 2, 3),))
    x = torch.randn(7, 3, 3)
    close(traced(x), model(x), torch.float32, "traced")


def test_traced_twin_follows_its_input():
    # What the refusal points to: the traced torch.nn twin computes, for a new input, the
    # rnnfuse module's answer (not the example's).
    model = Wrapper(rt.GRU(3, 4, num_layers=2))
    assert rt.unswap_modules(model) == ["rnn"] and type(model.rnn) is nn.GRU
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(5, 2, 3),))
        x = torch.randn(7, 3, 3)
        close(traced(x), rt.GRU.from_torch(model.rnn)(x)[0], torch.float32, "traced")


def test_script_compiles_the_torch_nn_twin():
    torch.manual_seed(0)
    model = Wrapper(rt.LSTM(3, 4, num_layers=2))
    x = torch.randn(6, 2, 3)
    want = model(x)
    scripted = torch.jit.script(model)
    close(scripted(x), want, torch.float32, "scripted")
    assert isinstance(scripted, torch.jit.ScriptModule)


def test_export_records_the_operators():
    # (more in test_torch_ops.py)
    model = Wrapper(rt.RNN(3, 4))
    ep = torch.export.export(model, (torch.randn(5, 2, 3),))
    assert "torch.ops.rnnfuse.rnn" in str(ep.graph_module.code)
    x = torch.randn(5, 2, 3)
    close(ep.module()(x), model(x), torch.float32, "exported")


def test_functions_refuse_tracers_tensors_with_the_fix():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x, w_ih, w_hh = (mode.from_tensor(torch.randn(*s)) for s in [(5, 2, 3), (4, 3),
                                                                     (4, 4)])
        with pytest.raises(RuntimeError, match=r"torch\.ops\.rnnfuse\.lstm, gru and rnn"):
            rt.RNNFunction.apply(x, None, w_ih, w_hh, None, None, None, False, "tanh")


def test_unswap_modules_undoes_swap_modules():
    model = nn.Sequential(nn.LSTM(3, 4), Wrapper(nn.GRU(4, 2)))
    params = list(model.parameters())
    assert rt.swap_modules(model) == ["0", "1.rnn"]
    assert rt.unswap_modules(model) == ["0", "1.rnn"]
    assert type(model[0]) is nn.LSTM and type(model[1].rnn) is nn.GRU
    assert all(a is b for a, b in zip(params, model.parameters()))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rt.unswap_modules([model])


def test_torchscript_onnx_export_writes_standard_nodes():
    # (more in test_torch_export.py, with onnxruntime)
    import io
    pytest.importorskip("onnx")  # the exporter writes through it
    f = io.BytesIO()
    torch.onnx.export(Wrapper(rt.GRU(3, 4)), (torch.randn(5, 2, 3),), f, dynamo=False)
    assert b"GRU" in f.getvalue() and b"rnnfuse" not in f.getvalue()


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_autocast_computes_in_float32_and_returns_the_inputs_dtype(cell, low):
    theirs, ours, extra = classes(cell)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), ours(4, 5, num_layers=2, **extra))
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=low):
        h = model[0](x)  # autocast's Linear hands the recurrent module `low`
        assert h.dtype == low
        y, state = model[1](h)
        y.float().sum().backward()
    h_n = state[0] if cell == "lstm" else state
    assert y.dtype == h_n.dtype == low
    want, want_state = model[1](h.detach().float())  # the same numbers, outside autocast
    want_h = want_state[0] if cell == "lstm" else want_state
    close(y, want.to(low), torch.float32, "output")
    close(h_n, want_h.to(low), torch.float32, "h_n")
    assert model[0].weight.grad is not None and model[1].weight_ih_l0.grad is not None
    with torch.autocast("cpu", dtype=low):  # float32 input, lower-precision state
        y32, _ = model[1](h.detach().float(), _cast_state(want_state, low))
    assert y32.dtype == torch.float32


def _cast_state(state, dtype):
    return tuple(s.to(dtype) for s in state) if isinstance(state, tuple) else state.to(dtype)


def test_lower_precision_module_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match=r"keep the module in float32 \(.float\(\)\) and run "
                                        r"it under torch.autocast"):
        rt.LSTM(3, 4).bfloat16()(torch.randn(5, 2, 3, dtype=torch.bfloat16))



# ---------------------------------------------------------------- the torch.nn classes

def test_modules_are_torch_nn_modules_with_flat_weights():
    m = rt.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert isinstance(m, nn.LSTM) and isinstance(m, nn.RNNBase)
    assert m._flat_weights_names == list(dict(m.named_parameters()))
    assert all(a is b for a, b in zip(m._flat_weights, m.parameters()))
    # common initialisation code reads torch.nn's attributes and runs unchanged
    for name, p in m.named_parameters():
        (nn.init.orthogonal_ if "weight_hh" in name else nn.init.zeros_)(p)
    assert torch.equal(m.bias_ih_l1_reverse, torch.zeros(16))
    twin = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    close(m(x)[0], twin(x)[0], torch.float32, "output")
    m.weight_hh_l0 = nn.Parameter(torch.zeros(16, 4))  # torch.nn's list follows
    assert m._flat_weights[1] is m.weight_hh_l0


class Scaled(nn.LSTM):
    """A subclass whose forward wraps torch.nn's."""

    def __init__(self, *args, scale=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x, hx=None):
        y, state = super().forward(x, hx)
        return y * self.scale, state


def test_swapped_subclass_keeps_its_methods_and_runs_on_rnnfuse(monkeypatch):
    import copy
    import io
    torch.manual_seed(4)
    model = nn.Sequential(Scaled(3, 4, num_layers=2, scale=3.0))
    x = torch.randn(6, 2, 3)
    want = model(x)[0]
    assert rt.swap_modules(model) == ["0"]
    swapped = model[0]
    assert isinstance(swapped, Scaled) and isinstance(swapped, rt.LSTM)
    assert type(swapped).__name__ == "Scaled" and swapped.scale == 3.0
    calls = []
    kernel = _functions._kernel_forward
    monkeypatch.setattr(_functions, "_kernel_forward",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    close(model(x)[0], want, torch.float32, "output")
    assert len(calls) == 2  # one kernel call per layer: the subclass's forward reached ours
    for again in (copy.deepcopy(swapped),
                  torch.load(io.BytesIO(_saved(swapped)), weights_only=False)):
        assert type(again) is type(swapped)
        close(again(x)[0], want, torch.float32, "output of a copy")
    assert rt.unswap_modules(model) == ["0"] and type(model[0]) is Scaled
    close(model(x)[0], want, torch.float32, "output after unswap")


def _saved(module):
    import io
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- cells

def cell_classes(cell):
    """(torch.nn cell class, rnnfuse cell class, extra constructor arguments)."""
    if cell == "lstm":
        return nn.LSTMCell, rt.LSTMCell, {}
    if cell == "gru":
        return nn.GRUCell, rt.GRUCell, {}
    return nn.RNNCell, rt.RNNCell, {"nonlinearity": cell[4:]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["batched", "unbatched", "no_hx"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_cells_match_torch_nn_outputs_and_gradients(cell, form, bias, dtype):
    theirs, ours, extra = cell_classes(cell)
    torch.manual_seed(1)
    m = theirs(5, 7, bias=bias, dtype=dtype, **extra)
    o = ours(5, 7, bias=bias, dtype=dtype, **extra)
    assert isinstance(o, theirs) and list(o.state_dict()) == list(m.state_dict())
    o.load_state_dict(m.state_dict())
    shape = (3, 5) if form != "unbatched" else (5,)
    x = torch.randn(*shape, dtype=dtype)
    hshape = (3, 7) if form != "unbatched" else (7,)
    hx = None if form == "no_hx" else tuple(torch.randn(hshape, dtype=dtype)
                                            for _ in range(2 if cell == "lstm" else 1))
    results = []
    for module in (m, o):
        xi = x.clone().requires_grad_()
        hi = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
        out = module(xi, hi if cell == "lstm" or hi is None else hi[0])
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(2)
        sum(o_.mul(torch.randn_like(o_)).sum() for o_ in outs).backward()
        grads = [xi.grad] + ([] if hi is None else [h.grad for h in hi])
        grads += [p.grad for p in module.parameters()]
        results.append((outs, grads))
    for got, want in zip(results[1][0], results[0][0]):
        close(got, want, dtype, "output")
    for got, want in zip(results[1][1], results[0][1]):
        close(got, want, dtype, "gradient")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cell_gradcheck(cell):
    _, ours, extra = cell_classes(cell)
    o = ours(3, 4, dtype=torch.float64, **extra)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h: o(x, (h, h * 0.5) if cell == "lstm" else h),
                                    (x, h))


def test_cells_refuse_bad_input_with_names():
    cell = rt.LSTMCell(3, 4)
    with pytest.raises(ValueError, match=r"input must be 1-D \(input_size\) unbatched or 2-D"):
        cell(torch.randn(2, 2, 3))
    with pytest.raises(RuntimeError, match="input_size=3, got 5"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c_0\) must have shape \(2, 4\)"):
        cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(3, 4)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        cell(torch.randn(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        rt.RNNCell(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        rt.GRUCell(3, 0)


def test_swap_modules_replaces_cells():
    torch.manual_seed(6)
    model = nn.ModuleList([nn.LSTMCell(3, 4), nn.GRUCell(4, 4), nn.RNNCell(4, 2, nonlinearity="relu")])
    x = torch.randn(5, 3)

    def run():
        h, _ = model[0](x)
        return model[2](model[1](h))

    want = run()
    assert rt.swap_modules(model) == ["0", "1", "2"]
    assert [type(m) for m in model] == [rt.LSTMCell, rt.GRUCell, rt.RNNCell]
    assert model[2].nonlinearity == "relu"
    close(run(), want, torch.float32, "output")
    assert rt.unswap_modules(model) == ["0", "1", "2"]
    assert [type(m) for m in model] == [nn.LSTMCell, nn.GRUCell, nn.RNNCell]


# ---------------------------------------------------------------- cells' packed weights

CELL_PAIRS = {"lstm": (nn.LSTMCell, rt.LSTMCell), "gru": (nn.GRUCell, rt.GRUCell),
              "rnn": (nn.RNNCell, rt.RNNCell)}


def _cell_pair(kind, dtype=torch.float64):
    torch.manual_seed(7)
    ref_cls, ours_cls = CELL_PAIRS[kind]
    ours = ours_cls(5, 6, dtype=dtype)
    ref = ref_cls(5, 6, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _step_out(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", list(CELL_PAIRS))
def test_cells_follow_their_weights_through_training(kind):
    ours, ref = _cell_pair(kind)
    x = torch.randn(2, 5, dtype=torch.float64)

    def check(what):
        with torch.no_grad():
            for _ in range(2):
                close(_step_out(ours(x)), _step_out(ref(x)), torch.float64, what)

    check("fresh")
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):  # training: gradients, then a step
        for m, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            for _ in range(2):  # two calls per step
                _step_out(m(x)).square().sum().backward()
            opt.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            close(a.grad, b.grad, torch.float64, "gradient")
        check("after an optimizer step")
    state = {k: v * 0.5 for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    ref.load_state_dict(state)
    check("after load_state_dict")
    with torch.no_grad():
        ours.weight_hh.mul_(1.5)
        ref.weight_hh.mul_(1.5)
    check("after an in-place change")
    ours.weight_ih = nn.Parameter(ref.weight_ih.detach().clone())
    check("after a new parameter")
    ours.float()
    ref.float()
    with torch.no_grad():
        for _ in range(2):
            close(_step_out(ours(x.float())), _step_out(ref(x.float())), torch.float32,
                  "after .float()")


def test_cells_repack_for_another_code_path():
    from rnnfuse import _kernels
    if _kernels.kernel() == "portable":
        pytest.skip("this CPU runs the portable code only")
    ours, ref = _cell_pair("gru", torch.float32)
    x = torch.randn(1, 5)
    try:
        with torch.no_grad():
            for path in ("avx2", "portable", "avx2"):
                _kernels.set_kernel(path)
                for _ in range(2):
                    close(ours(x), ref(x), torch.float32, path)
    finally:
        _kernels.set_kernel()


@pytest.mark.parametrize("variant", [{}, {"layer_norm": True}, {"zoneout": 0.3}])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_nothing_wants_are_left_out_and_the_rest_keep_their_bits(cell, variant):
    """An input or a state that needs no gradient gets none, and every other gradient has
    the bits it has when they all do (the kernels then skip dx's and dh0's products)."""
    if variant.get("layer_norm") and cell != "lstm" and cell != "gru":
        pytest.skip("layer norm is an LSTM and GRU option")
    _, cls, extra = classes(cell)
    torch.manual_seed(4)
    module = cls(3, 5, num_layers=2, dtype=torch.float64, **extra, **variant)
    x, h0 = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64)
    hx = (h0, torch.randn(2, 2, 5, dtype=torch.float64)) if cell == "lstm" else h0
    states = list(hx) if cell == "lstm" else [hx]

    def grads(wanted):
        for t in (x, *states):
            t.requires_grad_(t is x and "x" in wanted or t is not x and "states" in wanted)
            t.grad = None
        module.zero_grad()
        torch.manual_seed(5)  # the same zoneout masks
        y, _ = module(x, hx)
        y.square().sum().backward()
        return [p.grad for p in module.parameters()], [t.grad for t in (x, *states)]

    full, full_inputs = grads({"x", "states"})
    for wanted in ({"x"}, {"states"}, set()):
        params, inputs = grads(wanted)
        assert all(torch.equal(a, b) for a, b in zip(params, full))
        assert (inputs[0] is not None) == ("x" in wanted)
        assert all((g is not None) == ("states" in wanted) for g in inputs[1:])
        for g, want in zip(inputs, full_inputs):
            assert g is None or torch.equal(g, want)
