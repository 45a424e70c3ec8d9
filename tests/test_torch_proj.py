"""rnnfuse.torch.LSTM with proj_size: parity with torch.nn.LSTM(proj_size=...) in outputs,
states and every gradient (stacked, bidirectional, batch_first, packed ragged), its
parameters as torch.nn's, swap_modules, torch.compile, torch.export, torch.jit.trace and
torch.func against eager, and what it refuses. Skipped without PyTorch."""
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import rnnfuse.torch as rt  # noqa: E402
from rnnfuse.torch._functions import VariantFunction, Variants  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
DTYPES = [torch.float32, torch.float64]

pytestmark = [pytest.mark.filterwarnings("ignore:LSTM with projections"),  # torch.nn's own
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # jit.trace, onnx


def close(got, want, dtype, what):
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **TOL[dtype])


def pair(I, H, P, dtype, **kw):
    """torch.nn.LSTM(proj_size=P) with its random init, and ours from its state dict."""
    m = nn.LSTM(I, H, proj_size=P, dtype=dtype, **kw)
    o = rt.LSTM(I, H, proj_size=P, dtype=dtype, **kw)
    o.load_state_dict(m.state_dict())
    return m, o


def run(module, x, hx, weights):
    """Outputs, states and every gradient (inputs' and parameters') of a weighted sum."""
    module.zero_grad()
    x, hx = x.detach().requires_grad_(), tuple(s.detach().requires_grad_() for s in hx)
    like, wy = weights[:2]  # like: the PackedSequence that x is the data of, or None
    if like is None:
        y, (h_n, c_n) = module(x, hx)
    else:
        y, (h_n, c_n) = module(like._replace(data=x), hx)
        y = y.data
    loss = (y * wy).sum() + (h_n * weights[2]).sum() + (c_n * weights[3]).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return y, h_n, c_n, x.grad, [s.grad for s in hx], grads


CONFIGS = [dict(),
           dict(num_layers=2, bidirectional=True),
           dict(num_layers=2, batch_first=True),
           dict(bidirectional=True, batch_first=True, bias=False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "plain")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_parity_with_torch_nn(dtype, kw, packed):
    torch.manual_seed(0)
    T, B, I, H, P = 6, 4, 5, 7, 3
    m, o = pair(I, H, P, dtype, **kw)
    D, L = 2 if kw.get("bidirectional") else 1, kw.get("num_layers", 1)
    hx = (torch.randn(L * D, B, P, dtype=dtype), torch.randn(L * D, B, H, dtype=dtype))
    wh, wc = torch.randn(L * D, B, P, dtype=dtype), torch.randn(L * D, B, H, dtype=dtype)
    if packed:
        lengths = torch.tensor([3, 6, 1, 4])  # unsorted
        padded = torch.randn(T, B, I, dtype=dtype)
        like = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        x, weights = like.data, (like, torch.randn(like.data.shape[0], D * P, dtype=dtype),
                                 wh, wc)
    else:
        x = torch.randn(B, T, I, dtype=dtype) if kw.get("batch_first") else \
            torch.randn(T, B, I, dtype=dtype)
        weights = (None, torch.randn(*x.shape[:2], D * P, dtype=dtype), wh, wc)
    want, got = run(m, x, hx, weights), run(o, x, hx, weights)
    for name, g, w in zip(["output", "h_n", "c_n", "dx"], got[:4], want[:4]):
        close(g, w, dtype, name)
    assert got[1].shape == (L * D, B, P) and got[2].shape == (L * D, B, H)
    close(got[4][0], want[4][0], dtype, "dh_0")
    close(got[4][1], want[4][1], dtype, "dc_0")
    assert got[5].keys() == want[5].keys()
    assert any(name.startswith("weight_hr_l") for name in got[5])
    for name in want[5]:
        close(got[5][name], want[5][name], dtype, "d" + name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_matches_training_path(dtype):
    torch.manual_seed(1)
    m, o = pair(4, 6, 2, dtype, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=dtype)
    with torch.no_grad():
        got, want = o(x), m(x)
    close(got[0], want[0], dtype, "output")
    close(got[1][0], want[1][0], dtype, "h_n")
    close(got[1][1], want[1][1], dtype, "c_n")
    y = o(x[:, 0])[0]  # unbatched
    close(y, m(x[:, 0])[0], dtype, "unbatched output")


def test_function_gradcheck():
    torch.manual_seed(2)
    d = dict(dtype=torch.float64, requires_grad=True)
    T, B, I, H, P = 4, 3, 2, 4, 2
    args = (torch.randn(T, B, I, **d), torch.randn(B, P, **d), torch.randn(B, H, **d),
            torch.randn(4 * H, I, **d), torch.randn(4 * H, P, **d), torch.randn(4 * H, **d),
            torch.randn(4 * H, **d), torch.randn(P, H, **d))
    for reverse in (False, True):
        spec = Variants("lstm", None, torch.tensor([4, 1, 3]), reverse)
        assert torch.autograd.gradcheck(
            lambda *a: VariantFunction.apply(spec, *a, None), args)  # no peepholes


def test_parameters_and_state_dict_as_torch_nn():
    m = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    o = rt.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    assert isinstance(o, nn.LSTM) and o.proj_size == 3
    assert [(n, p.shape) for n, p in o.named_parameters()] == \
        [(n, p.shape) for n, p in m.named_parameters()]
    assert o.weight_hr_l1_reverse.shape == (3, 8) and o.weight_ih_l1.shape == (32, 6)
    assert o.weight_hh_l0.shape == (32, 3)
    o.load_state_dict(m.state_dict())
    assert all(a is b for a, b in zip(o._flat_weights, o.parameters()))
    m.load_state_dict(o.state_dict())  # and back
    assert o.to_torch().weight_hr_l0 is o.weight_hr_l0
    assert type(o.to_torch()) is nn.LSTM and o.to_torch().proj_size == 3
    twin = rt.LSTM.from_torch(m)
    assert twin.proj_size == 3 and twin.weight_hr_l0_reverse is m.weight_hr_l0_reverse


def test_swap_modules_swaps_projected_lstm():
    torch.manual_seed(3)
    model = nn.Sequential(nn.LSTM(3, 6, proj_size=2, num_layers=2, batch_first=True))
    x = torch.randn(2, 5, 3)
    before = model(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert rt.swap_modules(model) == ["0"]
    assert type(model[0]) is rt.LSTM and model[0].proj_size == 2
    close(model(x)[0], before, torch.float32, "output after swap")
    assert rt.unswap_modules(model) == ["0"] and type(model[0]) is nn.LSTM


def test_swap_modules_swaps_projected_subclass_and_autocast():
    class Doubled(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)[0] * 2

    torch.manual_seed(4)
    model = nn.Sequential(Doubled(3, 6, proj_size=2, bidirectional=True))
    x = torch.randn(5, 2, 3)
    before = model(x)
    assert rt.swap_modules(model) == ["0"]
    assert isinstance(model[0], Doubled) and isinstance(model[0], rt.LSTM)
    close(model(x), before, torch.float32, "subclass's output after swap")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32, returned in bf16
        y, (h, c) = rt.LSTM(3, 6, proj_size=2)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and h.shape == (1, 2, 2) and c.shape == (1, 2, 6)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("make, error, match", [
    (lambda: rt.LSTM(3, 4, proj_size=4), ValueError,
     r"proj_size must be smaller than hidden_size=4 \(0 for no projection\), got 4"),
    (lambda: rt.LSTM(3, 4, proj_size=-1), ValueError, r"proj_size must be >= 0, got -1"),
    (lambda: rt.LSTM(3, 4, proj_size=1.5), TypeError, r"proj_size must be an int"),
])
def test_bad_proj_size(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_hx_shapes_named():
    o = rt.LSTM(3, 5, proj_size=2, num_layers=2)
    x = torch.randn(4, 3, 3)
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h_0\) must have shape \(2, 3, 2\) = "
                       r"\(num_layers\*num_directions, batch, proj_size\), got \(2, 3, 5\)"):
        o(x, (torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)))
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c_0\) must have shape \(2, 3, 5\) = "
                       r"\(num_layers\*num_directions, batch, hidden_size\)"):
        o(x, (torch.zeros(2, 3, 2), torch.zeros(2, 3, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peepholes", [False, True])
def test_stream(dtype, peepholes):
    """Two layers' steps (proj_size wide) and final (h, c) equal the eval forward bit for
    bit; reset to a state continues as the forward from it."""
    torch.manual_seed(0)
    T, B, I, H, P = 5, 3, 4, 6, 2
    o = rt.LSTM(I, H, num_layers=2, proj_size=P, peepholes=peepholes, dtype=dtype).eval()
    with torch.no_grad():
        for p in o.parameters():
            p.add_(torch.rand_like(p) * 0.2)
        x = torch.randn(T, B, I, dtype=dtype)
        y, (h, c) = o(x)
        middle = o(x[:2])[1]
        again = o(x[2:], middle)[0]
    stream = o.stream(B)
    assert stream.proj_size == P and stream.hidden_size == H
    assert torch.equal(torch.stack([stream.step(x[t]) for t in range(T)]), y)
    assert all(torch.equal(s, w) for s, w in zip(stream.state, (h, c)))
    stream.reset(middle)
    assert torch.equal(torch.stack([stream.step(x[t]) for t in range(2, T)]), again)


def test_stream_bad_state():
    stream = rt.LSTM(3, 5, num_layers=2, proj_size=2).eval().stream(4)
    with pytest.raises(ValueError, match=r"state\[0\] \(h\) must have shape \(2, 4, 2\) "
                       r"\(num_layers, batch_size, proj_size\), got \(2, 4, 5\)"):
        stream.reset((torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)))
    with pytest.raises(ValueError, match=r"state\[1\] \(c\) must have shape \(2, 4, 5\) "
                       r"\(num_layers, batch_size, hidden_size\), got \(2, 4, 2\)"):
        stream.reset((torch.zeros(2, 4, 2), torch.zeros(2, 4, 2)))
    with pytest.raises(ValueError, match=r"a bidirectional LSTM cannot be streamed"):
        rt.LSTM(3, 5, proj_size=2, bidirectional=True).eval().stream()


# ---------------------------------------------------------------- tracing: the operators

@pytest.fixture
def fresh_dynamo():
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def results(model, x, hx, like=None):
    """Outputs, states and every gradient (x's, the states', the parameters') of a loss,
    of model over x (the data of the PackedSequence like, if given) and states hx."""
    x, hx = x.detach().requires_grad_(), tuple(s.detach().requires_grad_() for s in hx)
    y, (h_n, c_n) = model(x if like is None else like._replace(data=x), hx)
    y = y if like is None else y.data
    loss = y.pow(2).sum() + h_n.pow(3).sum() + c_n.pow(3).sum()
    return [y, h_n, c_n, *torch.autograd.grad(loss, [x, *hx, *model.parameters()])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compile_fullgraph_is_eager_bitwise(packed, fresh_dynamo):
    o = pair(3, 5, 2, torch.float64, num_layers=2, bidirectional=True)[1]
    compiled = torch.compile(o, fullgraph=True, backend="aot_eager")
    for T, B in [(5, 3), (7, 2)]:
        x = torch.randn(T, B, 3, dtype=torch.float64)
        hx = (torch.randn(4, B, 2, dtype=torch.float64), torch.randn(4, B, 5, dtype=torch.float64))
        like = pack_padded_sequence(x, torch.tensor([2, T, 1][:B]), enforce_sorted=False) \
            if packed else None
        x = x if like is None else like.data
        got, want = results(compiled, x, hx, like), results(o, x, hx, like)
        for k, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("peepholes", [False, True])
def test_export_with_dynamic_length_and_batch_is_eager_bitwise(peepholes):
    from torch.export import Dim
    o = rt.LSTM(3, 5, proj_size=2, peepholes=peepholes, bidirectional=True,
                dtype=torch.float64)
    T, B = Dim("T"), Dim("B")
    hx = (torch.zeros(2, 2, 2, dtype=torch.float64), torch.zeros(2, 2, 5, dtype=torch.float64))
    ep = torch.export.export(o, (torch.randn(6, 2, 3, dtype=torch.float64), hx),
                             dynamic_shapes=({0: T, 1: B}, ({1: B}, {1: B})))
    assert torch.ops.rnnfuse.lstm.default in {n.target for n in ep.graph.nodes}
    exported = ep.module()
    for t, b in [(9, 5), (1, 1)]:
        x = torch.randn(t, b, 3, dtype=torch.float64)
        hx = (torch.randn(2, b, 2, dtype=torch.float64), torch.randn(2, b, 5, dtype=torch.float64))
        for k, (a, w) in enumerate(zip(results(exported, x, hx), results(o, x, hx))):
            assert torch.equal(a, w), k


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_and_torch_func_run_it():
    o = rt.LSTM(3, 4, proj_size=2)
    traced = torch.jit.trace(o, torch.randn(5, 2, 3))
    x = torch.randn(7, 3, 3)
    assert torch.equal(traced(x)[0], o(x)[0])  # not the example's output
    params = {k: v.detach() for k, v in o.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(o, p, (x,))[0].sum())(params)
    o(x)[0].sum().backward()
    for k, p in o.named_parameters():
        assert torch.equal(got[k], p.grad), k


def test_onnx_export_refused():
    pytest.importorskip("onnx")
    o = rt.LSTM(3, 4, proj_size=2)
    with pytest.raises(RuntimeError, match=r"LSTM with proj_size=2 cannot be exported to "
                       r"ONNX: ONNX's LSTM has no projection"):
        torch.onnx.export(o, (torch.randn(5, 2, 3),), io.BytesIO(), dynamo=False)
