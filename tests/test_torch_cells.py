"""rnnfuse.torch's cells over several steps (outputs and every gradient against torch.nn,
bit for bit against the same kernels run as a one-step layer), and the step API for
generation (module.stream: bit for bit against the module's forward; what it refuses).
Skipped when PyTorch is not installed."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import rnnfuse.torch as rt  # noqa: E402
from rnnfuse.torch import _modules  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
CELLS = {"lstm": (nn.LSTMCell, rt.LSTMCell, rt.LSTM, {}),
         "gru": (nn.GRUCell, rt.GRUCell, rt.GRU, {}),
         "rnn_tanh": (nn.RNNCell, rt.RNNCell, rt.RNN, {"nonlinearity": "tanh"}),
         "rnn_relu": (nn.RNNCell, rt.RNNCell, rt.RNN, {"nonlinearity": "relu"})}


def cell_pair(kind, I, H, dtype, bias=True):
    """(torch.nn cell, rnnfuse cell with the same parameters)."""
    theirs, ours, _, extra = CELLS[kind]
    torch.manual_seed(3)
    m = theirs(I, H, bias=bias, dtype=dtype, **extra)
    o = ours(I, H, bias=bias, dtype=dtype, **extra)
    o.load_state_dict(m.state_dict())
    return m, o


def unroll(module, xs, hx):
    """The cell over xs (T, B, I) from hx: every step's h, stacked."""
    out = []
    for x in xs:
        hx = module(x, hx)
        out.append(hx[0] if isinstance(hx, tuple) else hx)
    return torch.stack(out)


def initial_state(kind, shape, dtype, grad):
    s = [torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in
         range(2 if kind == "lstm" else 1)]
    return tuple(s) if kind == "lstm" else s[0]


def leaves(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


# ---------------------------------------------------------------- cells

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 16, None])  # None: unbatched
@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_over_steps_match_torch_nn_outputs_and_gradients(kind, B, dtype):
    m, o = cell_pair(kind, 6, 5, dtype)
    torch.manual_seed(4)
    shape = (4, 6) if B is None else (4, B, 6)
    xs = torch.randn(shape, dtype=dtype)
    hx = initial_state(kind, (5,) if B is None else (B, 5), dtype, False)
    results = []
    for module in (m, o):
        x = xs.clone().requires_grad_()
        h = tuple(s.clone().requires_grad_() for s in leaves(hx))
        ys = unroll(module, x, h if kind == "lstm" else h[0])
        ys.mul(torch.linspace(-1, 1, ys.numel(), dtype=dtype).view_as(ys)).sum().backward()
        results.append([ys, x.grad, *(s.grad for s in h),
                        *(p.grad for p in module.parameters())])
    for what, got, want in zip(["y", "dx", "dh0", "dc0/params"] + ["params"] * 4,
                               results[1], results[0]):
        torch.testing.assert_close(got, want, msg=lambda s: f"{what}: {s}", **TOL[dtype])


def layer_step(layer, x, hx):
    """A one-layer LSTM, GRU or RNN over the single step x (B, I) from hx: its finals."""
    states = tuple(s[None] for s in leaves(hx))
    _, finals = layer(x[None], states if len(states) == 2 else states[0])
    return [f[0] for f in leaves(finals)]


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_step_is_the_one_step_layers_numbers_bit_for_bit(kind):
    """A cell's direct step runs the kernels that a one-step layer runs: the same bits,
    outputs and gradients, for the step that packs in the kernel and those that read the
    cell's pack."""
    _, ours, layer_cls, extra = CELLS[kind]
    torch.manual_seed(5)
    cell = ours(6, 5, **extra)
    layer = layer_cls(6, 5, **extra)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(layer, name + "_l0").data = getattr(cell, name).data
    x = torch.randn(3, 6)
    hx = initial_state(kind, (3, 5), torch.float32, False)
    for _ in range(3):
        with torch.no_grad():
            got, want = leaves(cell(x, hx)), layer_step(layer, x, hx)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        grads = []
        for module, step in ((cell, lambda: leaves(cell(x, hx))),
                             (layer, lambda: layer_step(layer, x, hx))):
            module.zero_grad()
            sum(f.square().sum() for f in step()).backward()
            grads.append([p.grad for p in module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("B", [3, 20])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_leaves_out_the_gradients_nothing_wants_and_keeps_the_others_bitwise(kind, B):
    """A step whose input, or whose state, needs no gradient computes none for it: the
    parameters' gradients are those of a step where both need one, bit for bit."""
    _, o = cell_pair(kind, 6, 5, torch.float32)
    x = torch.randn(B, 6)
    hx = initial_state(kind, (B, 5), torch.float32, False)

    def grads(x_grad, h_grad):
        o.zero_grad()
        xs = x.clone().requires_grad_(x_grad)
        h = [s.clone().requires_grad_(h_grad) for s in leaves(hx)]
        out = leaves(o(xs, tuple(h) if kind == "lstm" else h[0]))
        sum((f * f.detach().sin()).sum() for f in out).backward()
        return [p.grad for p in o.parameters()], xs.grad, [s.grad for s in h]

    want, dx, dh = grads(True, True)
    assert dx is not None and all(d is not None for d in dh)
    for x_grad, h_grad in ((False, False), (False, True), (True, False)):
        got, dx, dh = grads(x_grad, h_grad)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert (dx is not None) == x_grad and all((d is not None) == h_grad for d in dh)


def test_cell_gradient_arrays_are_reused_only_once_nothing_holds_them():
    """A backward writes the weights' gradients into arrays of earlier ones that torch
    let go, never into one that something still holds (the gradients stay right)."""
    m, o = cell_pair("lstm", 6, 5, torch.float32)
    x = torch.randn(3, 6)

    def step(module):
        module.zero_grad(set_to_none=True)
        unroll(module, x.expand(2, 3, 6), None).square().sum().backward()
        return [p.grad for p in module.parameters()]

    step(o)
    held = step(o)  # these gradients are kept: the next step must not write into them
    copies = [g.clone() for g in held]
    got = step(o)
    assert all(torch.equal(g, c) for g, c in zip(held, copies))
    assert all(g.data_ptr() != h.data_ptr() for g, h in zip(got, held))
    del got, held
    again = step(o)  # nothing holds the earlier ones now: kept arrays come back
    for g in again[:2]:  # weight_ih's and weight_hh's
        kept = _modules._RECYCLED[(tuple(g.shape), np.dtype(np.float32))]
        assert g.data_ptr() in {a.ctypes.data for a in kept}
    for g, want in zip(again, step(m)):
        torch.testing.assert_close(g, want, **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_cell_gradcheck_over_two_steps(kind):
    _, o = cell_pair(kind, 3, 4, torch.float64)
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, h: unroll(o, x, (h, h * 0.5) if kind == "lstm" else h), (x, h))


def test_cell_backward_twice_with_retain_graph_replays_the_forward():
    _, o = cell_pair("lstm", 3, 4, torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    h, c = o(x)
    loss = (h * c).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in o.parameters()]
    o.zero_grad()
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, o.parameters()))


def test_cell_refuses_double_backward_and_inputs_changed_before_backward():
    _, o = cell_pair("gru", 3, 4, torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(o(x).sum(), x, create_graph=True)
    h = o(x)
    with torch.no_grad():
        o.weight_hh.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


def test_cell_with_frozen_parameters_and_inference_tensors():
    m, o = cell_pair("lstm", 3, 4, torch.float32)
    for p in o.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    o(x)[0].sum().backward()  # only the input's gradient
    assert x.grad is not None and all(p.grad is None for p in o.parameters())
    with torch.inference_mode():  # parameters without a version counter: nothing kept
        made = rt.LSTMCell(3, 4)
        made.load_state_dict(m.state_dict())
        for _ in range(2):
            torch.testing.assert_close(made(x.detach())[0], m(x.detach())[0])


def _sgd_through_data(m):
    for p in m.parameters():
        p.data.add_(p.grad, alpha=-0.5)  # as torch's word language model example trains


def _scale_in_place(m):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)


def _optimizer_step(m):
    torch.optim.SGD(m.parameters(), lr=0.5).step()


def _new_storage(m):
    for p in m.parameters():
        p.data = p.data * 0.5


@pytest.mark.parametrize("transposed", [False, True])  # W_hh a non-contiguous view
@pytest.mark.parametrize("change", [_sgd_through_data, _scale_in_place, _optimizer_step,
                                    _new_storage])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_see_every_change_of_their_parameters_between_calls(kind, change, transposed):
    """Whatever a cell keeps between calls, a change of its parameters reaches the next
    step, even one through .data that the version counter does not see."""
    m, o = cell_pair(kind, 5, 7, torch.float64)
    x, hx = torch.randn(3, 5, dtype=torch.float64), initial_state(kind, (3, 7), torch.float64,
                                                                   False)
    for module in (m, o):
        if transposed:
            module.weight_hh.data = module.weight_hh.data.t().contiguous().t()
        with torch.no_grad():
            module(x, hx)
            module(x, hx)  # twice with the same parameters, in inference ...
        leaves(module(x, hx))[0].sum().backward()  # ... and a training step
        change(module)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(leaves(o(x, hx))[0], leaves(m(x, hx))[0],
                                       **TOL[torch.float64])


def test_cells_refuse_bad_parameters_and_states_with_names():
    cell = rt.GRUCell(3, 4)
    with pytest.raises(ValueError, match=r"hx must have dtype torch.float32"):
        cell(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"hx must have shape \(2, 4\)"):
        cell(torch.randn(2, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"input must have dtype torch.float32"):
        cell(torch.randn(2, 3, dtype=torch.float64))
    cell(torch.randn(2, 3))  # its parameters are kept checked: a change is seen
    cell.weight_hh.data = cell.weight_hh.data.double()
    with pytest.raises(TypeError, match="parameters must all be torch.float32 or all"):
        cell(torch.randn(2, 3))


# ---------------------------------------------------------------- streams

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_stream_steps_are_the_forward_bit_for_bit(kind, dtype):
    *_, layer_cls, extra = CELLS[kind]
    torch.manual_seed(6)
    m = layer_cls(5, 7, num_layers=2, dropout=0.5, batch_first=True, dtype=dtype,
                  **extra).eval()
    x = torch.randn(3, 6, 5, dtype=dtype)
    hx = initial_state(kind, (2, 3, 7), dtype, False)
    y, finals = m(x, hx)  # with autograd recording: the same kernels
    s = m.stream(batch_size=3, state=hx)
    assert (s.batch_size, s.input_size, s.hidden_size, s.num_layers) == (3, 5, 7, 2)
    ys = torch.stack([s.step(x[:, t]) for t in range(6)], 1)
    assert torch.equal(ys, y.detach())
    assert all(torch.equal(a, b.detach()) for a, b in zip(leaves(s.state), leaves(finals)))
    s.reset()
    assert all(torch.count_nonzero(a) == 0 for a in leaves(s.state))
    s.reset(hx)
    with torch.no_grad():
        assert torch.equal(s.step(x[:, 0]), m(x[:, :1], hx)[0][:, 0])


def test_stream_keeps_the_weights_it_was_made_with():
    m = rt.LSTM(3, 4).eval()
    x = torch.randn(2, 3)
    s = m.stream(2)
    want = s.step(x)
    with torch.no_grad():
        m.weight_hh_l0.zero_()
        m.weight_ih_l0.zero_()
    s.reset()
    assert torch.equal(s.step(x), want)


def test_stream_refuses_with_what_to_do():
    with pytest.raises(RuntimeError, match=r"call module.eval\(\) first"):
        rt.LSTM(3, 4).stream()
    with pytest.raises(ValueError, match="bidirectional GRU cannot be streamed"):
        rt.GRU(3, 4, bidirectional=True).eval().stream()
    with pytest.raises(ValueError, match="batch_size"):
        rt.RNN(3, 4).eval().stream(-1)
    s = rt.LSTM(3, 4, num_layers=2).eval().stream(2)
    with pytest.raises(RuntimeError, match=r"x requires grad, but a stream computes no "
                                           r"gradients: step under torch.no_grad\(\)"):
        s.step(torch.randn(2, 3, requires_grad=True))
    with torch.no_grad():
        s.step(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\) \(batch_size, "
                                         r"input_size\), got \(3,\)"):
        s.step(torch.randn(3))
    with pytest.raises(ValueError, match="x must have dtype torch.float32"):
        s.step(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a plain torch.Tensor, got list"):
        s.step([[0.0] * 3] * 2)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        s.reset(torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"state\[1\] \(c\) must have shape \(2, 2, 4\)"):
        s.reset((torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)))
