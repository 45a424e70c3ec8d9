"""rnnfuse.torch's operators (torch.ops.rnnfuse.*) and what records them: torch.library's
opcheck, torch.compile with fullgraph=True, torch.export with a dynamic length and batch,
torch.jit.trace and torch.func. Skipped cleanly when PyTorch is not installed.
"""
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import rnnfuse.torch as rt  # noqa: E402
from rnnfuse.torch import _ops  # noqa: E402
from rnnfuse import _kernels, functional as F  # noqa: E402

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
STATES = {"lstm": 2, "gru": 1, "rnn": 1}
OPTIONS = {"lstm": [()], "gru": [(True,), (False,)], "rnn": [("tanh",), ("relu",)]}
CASES = [(cell, opt) for cell in GATES for opt in OPTIONS[cell]]
MODULES = {"lstm": (nn.LSTM, rt.LSTM, {}), "gru": (nn.GRU, rt.GRU, {}),
           "rnn_relu": (nn.RNN, rt.RNN, {"nonlinearity": "relu"})}
CELLS = {"lstm": (nn.LSTMCell, rt.LSTMCell), "gru": (nn.GRUCell, rt.GRUCell),
         "rnn": (nn.RNNCell, rt.RNNCell)}


def close(got, want, what="", dtype=torch.float32):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10,
                                                                          atol=1e-12)
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **tol)


def op_args(cell, option, lengths, train, bias=True, states=True, T=5, B=3, I=4, H=6,
            reverse=True, seed=0):
    """Random float64 arguments of torch.ops.rnnfuse.<cell>, inputs requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    G = GATES[cell]
    s = [leaf(B, H) if states else None for _ in range(STATES[cell])]
    b = [leaf(G * H), leaf(G * H)] if bias else [None, None]
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return (leaf(T, B, I), *s, leaf(G * H, I), leaf(G * H, H), *b, lens, reverse, *option,
            train)


# ---------------------------------------------------------------- the operators

@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("lengths", [None, [5, 0, 3]])
@pytest.mark.parametrize("cell,option", CASES)
def test_opcheck_forward(cell, option, lengths, train):
    # schema, autograd registration, fake (shape) function against the kernels, and
    # AOTAutograd with dynamic shapes (forward and backward)
    op = getattr(torch.ops.rnnfuse, cell)
    torch.library.opcheck(op, op_args(cell, option, lengths, train))
    torch.library.opcheck(op, op_args(cell, option, lengths, train, bias=False,
                                      states=False, reverse=False, seed=1))


@pytest.mark.parametrize("lengths", [None, [2, 5, 0]])
@pytest.mark.parametrize("cell,option", CASES)
def test_opcheck_backward(cell, option, lengths):
    bwd, outs, inputs, ws, lens = backward_case(cell, option, lengths)
    g = torch.Generator().manual_seed(2)
    douts = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    torch.library.opcheck(bwd, (*douts, *inputs, ws, lens, True, *option))
    douts[0] = None  # only the final state's gradient
    inputs[3 + STATES[cell]] = None  # no b_ih
    torch.library.opcheck(bwd, (*douts, *inputs, ws, lens, True, *option))


def backward_case(cell, option, lengths):
    """A training forward through the operator: the backward operator, the forward's
    outputs, its tensor inputs (detached), its workspace and lengths."""
    args = op_args(cell, option, lengths, True)
    n = STATES[cell]
    with torch.no_grad():
        *outs, ws = getattr(torch.ops.rnnfuse, cell)(*args)
    return (getattr(torch.ops.rnnfuse, cell + "_backward"), outs,
            [a.detach() for a in args[:5 + n]], ws, args[5 + n])


@pytest.mark.parametrize("sort", [False, True])
def test_opcheck_packing_operators(sort):
    from torch.nn.utils.rnn import pack_padded_sequence
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    lengths = torch.tensor([5, 4, 2]) if sort else torch.tensor([2, 5, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=sort)
    data = packed.data.clone().requires_grad_()
    torch.library.opcheck(torch.ops.rnnfuse.unpack, (data, packed.batch_sizes))
    padded, lens = torch.ops.rnnfuse.unpack(data, packed.batch_sizes)
    torch.library.opcheck(torch.ops.rnnfuse.pack, (padded.detach().requires_grad_(), lens,
                                                   data.shape[0]))
    assert torch.equal(torch.ops.rnnfuse.pack(padded, lens, data.shape[0]), data)
    torch.autograd.gradcheck(lambda d: torch.ops.rnnfuse.unpack(d, packed.batch_sizes)[0],
                             (data,))


@pytest.mark.parametrize("cell,option", CASES)
def test_operators_give_functionals_outputs_and_gradients(cell, option):
    args = op_args(cell, option, [5, 1, 3], True)
    n = STATES[cell]
    *outs, ws = getattr(torch.ops.rnnfuse, cell)(*args)
    arrays = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    want = getattr(F, cell + "_forward")(*arrays)
    for got, w in zip(outs, want[:-1]):
        close(got, torch.from_numpy(w), "output", torch.float64)
    g = torch.Generator().manual_seed(3)
    douts = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [a for a in args[:5 + n]], douts, retain_graph=True)
    want_grads = getattr(F, cell + "_backward")(*(d.numpy() for d in douts), want[-1])
    for got, w in zip(grads, want_grads):
        close(got, torch.from_numpy(w), "gradient", torch.float64)
    # backward leaves ws as it was: a graph kept with retain_graph runs backward again
    again = torch.autograd.grad(outs, [a for a in args[:5 + n]], douts)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", list(GATES))
def test_workspace_size_formula_matches_the_kernels(cell, reverse):
    rng = torch.Generator().manual_seed(4)
    for _ in range(6):
        T, B, I, H = (int(v) for v in torch.randint(1, 40, (4,), generator=rng))
        want = _kernels.workspace_size(cell, F._full_plan(T, B, reverse), I, H, True)
        assert _ops._workspace_size(cell, T, B, I, H, reverse) == want, (T, B, I, H)


def test_operators_check_their_arguments_with_functionals_messages():
    args = list(op_args("lstm", (), None, False))
    args[3] = args[3][:, :2]  # w_ih of the wrong input size
    with pytest.raises(ValueError, match=r"w_ih must have shape \(24, 4\)"):
        torch.ops.rnnfuse.lstm(*args)
    args = list(op_args("gru", (True,), [5, 6, 1], False))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        torch.ops.rnnfuse.gru(*args)


# ---------------------------------------------------------------- the cell variants

# the operators' variant arguments, each alone and together as the kernels take them
VARIANTS = [("lstm", ("peepholes",)), ("lstm", ("layer_norm",)), ("lstm", ("projection",)),
            ("lstm", ("zoneout", "recurrent_dropout", "peepholes")), ("lstm", ("zoneout_p",)),
            ("gru", ("layer_norm", "zoneout")), ("gru", ("recurrent_dropout", "zoneout_p")),
            ("rnn", ("zoneout", "recurrent_dropout"))]
VARIANT_IDS = ["-".join([cell, *v]) for cell, v in VARIANTS]


def variant_case(cell, variants, lengths, train, T=5, B=3, H=6, P=2):
    """op_args of the cell (float64, lengths, train) and the variants' keyword arguments
    (parameters requiring grad, masks of 0 and 1 or 0 and 2)."""
    g = torch.Generator().manual_seed(5)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    def mask(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) < 0.5).double() * scale

    args = list(op_args(cell, OPTIONS[cell][0], lengths, train, T=T, B=B, H=H))
    G, kw = GATES[cell], {}
    if "projection" in variants:  # h (and so w_hh's columns) P wide
        args[1], args[4] = leaf(B, P), leaf(4 * H, P)
        kw.update(w_hr=leaf(P, H), peepholes=leaf(3 * H))
    if "peepholes" in variants:
        kw["peepholes"] = leaf(3 * H)
    if "layer_norm" in variants:
        kw.update(g_ih=leaf(G * H), g_hh=leaf(G * H))
        if cell == "lstm":
            kw.update(g_c=leaf(H), b_c=leaf(H))
    if "zoneout" in variants:
        kw.update({f"zoneout_{s}": mask(T, B, H) for s in ("hc" if cell == "lstm" else "h")})
    if "zoneout_p" in variants:
        kw["zoneout_p"] = 0.3
    if "recurrent_dropout" in variants:
        kw["recurrent_dropout"] = mask(B, H, scale=2.0)
    return args, kw


def functional_keywords(cell, kw):
    """variant_case's keyword arguments as functional's forward takes them."""
    a = {k: v.detach().numpy() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    ln = [a[k] for k in ("g_ih", "g_hh", "g_c", "b_c") if k in a]
    zoneout = a.get("zoneout_p")
    if "zoneout_h" in a:
        zoneout = (a["zoneout_h"], a["zoneout_c"]) if cell == "lstm" else a["zoneout_h"]
    out = dict(zoneout=zoneout, recurrent_dropout=a.get("recurrent_dropout"),
               layer_norm=tuple(ln) or None)
    if cell == "lstm":
        out.update(peepholes=a.get("peepholes"), w_hr=a.get("w_hr"))
    return out


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("lengths", [None, [5, 0, 3]])
@pytest.mark.parametrize("cell,variants", VARIANTS, ids=VARIANT_IDS)
def test_opcheck_forward_with_variants(cell, variants, lengths, train):
    args, kw = variant_case(cell, variants, lengths, train)
    torch.library.opcheck(getattr(torch.ops.rnnfuse, cell), args, kw)


@pytest.mark.parametrize("lengths", [None, [2, 5, 0]])
@pytest.mark.parametrize("cell,variants", VARIANTS, ids=VARIANT_IDS)
def test_opcheck_backward_with_variants(cell, variants, lengths):
    args, kw = variant_case(cell, variants, lengths, True)
    kw = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    n, option = STATES[cell], OPTIONS[cell][0]
    inputs = [a.detach() for a in args[:5 + n]]
    *outs, ws = getattr(torch.ops.rnnfuse, cell)(*inputs, *args[5 + n:], **kw)
    douts = [torch.randn_like(o) for o in outs]
    bwd = getattr(torch.ops.rnnfuse, cell + "_backward")
    torch.library.opcheck(bwd, (*douts, *inputs, ws, args[5 + n], True, *option), kw)
    before = ws.clone()  # the kernels work elsewhere (layer norm, projection: on a copy)
    first = bwd(*douts, *inputs, ws, args[5 + n], True, *option, **kw)
    assert torch.equal(ws, before)
    again = bwd(*douts, *inputs, ws, args[5 + n], True, *option, **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("cell,variants", VARIANTS, ids=VARIANT_IDS)
def test_operators_with_variants_give_functionals_outputs_and_gradients(cell, variants):
    args, kw = variant_case(cell, variants, [5, 1, 3], True)
    n = STATES[cell]
    *outs, ws = getattr(torch.ops.rnnfuse, cell)(*args, **kw)
    arrays = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    want = getattr(F, cell + "_forward")(*arrays, **functional_keywords(cell, kw))
    for got, w in zip(outs, want[:-1]):
        close(got, torch.from_numpy(w), "output", torch.float64)
    douts = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3),
                         dtype=o.dtype) for o in outs]
    params = [v for v in kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(outs, [*args[:5 + n], *params], douts)
    want_grads = getattr(F, cell + "_backward")(*(d.numpy() for d in douts), want[-1])
    assert len(grads) == len(want_grads)
    for got, w in zip(grads, want_grads):
        close(got, torch.from_numpy(w), "gradient", torch.float64)


@pytest.mark.parametrize("cell,P", [("lstm", 0), ("gru", 0), ("lstm", 3)])
def test_workspace_size_formula_of_layer_norm_and_projection(cell, P):
    rng = torch.Generator().manual_seed(4)
    for _ in range(6):
        T, B, I, H = (int(v) for v in torch.randint(1, 40, (4,), generator=rng))
        H += P + 1
        plan = F._full_plan(T, B, False)
        want = (_kernels.lstmp_workspace_size(plan, I, H, P, True) if P
                else _kernels.workspace_size(cell, plan, I, H, True, True))
        assert _ops._workspace_size(cell, T, B, I, H, False, not P, P) == want, (T, B, I, H)


def test_operators_check_their_variant_arguments():
    args, kw = variant_case("lstm", ("zoneout", "zoneout_p"), None, True)
    with pytest.raises(ValueError, match="zoneout_p must be 0 where zoneout's masks are given"):
        torch.ops.rnnfuse.lstm(*args, **kw)
    args, kw = variant_case("lstm", ("projection", "zoneout"), None, True)
    with pytest.raises(ValueError, match=r"zoneout is not supported with a projection"):
        torch.ops.rnnfuse.lstm(*args, **kw)
    args, kw = variant_case("gru", ("layer_norm",), None, True)
    args[-2] = False  # linear_before_reset
    with pytest.raises(ValueError, match=r"layer_norm is for the LSTM and the GRU with "
                                         r"linear_before_reset=True"):
        torch.ops.rnnfuse.gru(*args, **kw)
    args, kw = variant_case("lstm", ("layer_norm", "peepholes"), None, True)
    with pytest.raises(ValueError, match="layer_norm and peepholes cannot be combined"):
        torch.ops.rnnfuse.lstm(*args, **kw)


# ---------------------------------------------------------------- torch.compile

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's caches per test: each test compiles new modules with the same forward,
    which would otherwise count toward Dynamo's recompile limit."""
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, x, hx=None):
    """A training step's outputs and gradients (inputs and parameters)."""
    x = x.detach().requires_grad_()
    out = model(x) if hx is None else model(x, hx)
    y = out[0] if isinstance(out, tuple) else out
    loss = (y ** 2).sum() + sum((s ** 2).sum() for s in _finals(out))
    params = [p for p in model.parameters()]
    return y.detach(), torch.autograd.grad(loss, [x, *params])


def _finals(out):
    if not isinstance(out, tuple):
        return []
    rest = out[1]
    return list(rest) if isinstance(rest, tuple) else [rest]


@pytest.mark.parametrize("kind", list(MODULES))
def test_compile_fullgraph_gives_eagers_outputs_and_gradients(kind):
    _, ours, extra = MODULES[kind]
    torch.manual_seed(5)
    m = ours(3, 5, num_layers=2, bidirectional=True, batch_first=True, **extra)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for T, B in [(6, 2), (4, 3)]:  # the second shape recompiles with dynamic shapes
        x = torch.randn(B, T, 3)
        y, grads = _step(compiled, x)
        y0, grads0 = _step(m, x)
        close(y, y0, "output")
        for a, b in zip(grads, grads0):
            close(a, b, "gradient")
        with torch.no_grad():
            close(compiled(x)[0], y0, "output without autograd")


@pytest.mark.parametrize("cell", list(CELLS))
def test_compile_fullgraph_runs_the_cells(cell):
    _, ours = CELLS[cell]
    torch.manual_seed(6)
    c = ours(3, 4)
    compiled = torch.compile(c, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3)
    h = (torch.randn(2, 4), torch.randn(2, 4)) if cell == "lstm" else torch.randn(2, 4)
    got, want = compiled(x, h), c(x, h)
    for a, b in zip(_finals((None, got)), _finals((None, want))):
        close(a, b, "state")


@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compile_fullgraph_takes_a_packed_sequence(kind, sort):
    from torch.nn.utils.rnn import pack_padded_sequence
    _, ours, extra = MODULES[kind]
    torch.manual_seed(18)
    m = ours(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    lengths = torch.tensor([5, 4, 2]) if sort else torch.tensor([4, 5, 2])
    h = _state(kind, 4, 3, 4)
    h = tuple(s.double() for s in h) if kind == "lstm" else h.double()
    results = []
    for module in (compiled, m):
        x = torch.randn(5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        packed = pack_padded_sequence(x, lengths, enforce_sorted=sort)
        y, state = module(packed, None if sort else h)
        states = state if kind == "lstm" else (state,)
        loss = y.data.pow(2).sum() + sum(s.pow(3).sum() for s in states)
        grads = torch.autograd.grad(loss, [x, *m.parameters()])
        results.append((y, states, grads))
    (y, states, grads), (y0, states0, grads0) = results
    assert torch.equal(y.batch_sizes, y0.batch_sizes)
    close(y.data, y0.data, "output", torch.float64)
    for a, b in zip(states, states0):
        close(a, b, "state", torch.float64)
    for a, b in zip(grads, grads0):
        close(a, b, "gradient", torch.float64)


def test_compile_with_inductor_trains_a_model_like_eager():
    torch.manual_seed(7)
    model = nn.Sequential(rt.LSTM(4, 8, num_layers=2))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(7, 3, 4)
    y, grads = _step(compiled, x)
    y0, grads0 = _step(model, x)
    close(y, y0, "output")
    for a, b in zip(grads, grads0):
        close(a, b, "gradient")


def test_compile_leaves_dynamos_rnn_setting_and_torch_nn_alone():
    # Dynamo takes rnnfuse's modules, not torch.nn's (allow_rnn stays as it was)
    import torch._dynamo
    assert not torch._dynamo.config.allow_rnn
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(nn.GRU(3, 4), fullgraph=True, backend="eager")(torch.randn(5, 2, 3))
    assert not torch._dynamo.config.allow_rnn


# ---------------------------------------------------------------- torch.export

class Wrapper(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h):
        y, state = self.rnn(x, h)
        return y, state


def _state(kind, L, B, H):
    h = torch.randn(L, B, H)
    return (h, torch.randn(L, B, H)) if kind == "lstm" else h


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", list(MODULES))
def test_export_with_dynamic_length_and_batch_follows_new_shapes(kind, grad):
    from torch.export import Dim
    _, ours, extra = MODULES[kind]
    torch.manual_seed(8)
    model = Wrapper(ours(3, 5, num_layers=2, bidirectional=True, **extra)).eval()
    T, B = Dim("T", min=1, max=4096), Dim("B", min=1, max=4096)
    h_dims = ({1: B}, {1: B}) if kind == "lstm" else {1: B}
    with torch.set_grad_enabled(grad):
        ep = torch.export.export(model, (torch.randn(6, 2, 3), _state(kind, 4, 2, 5)),
                                 dynamic_shapes={"x": {0: T, 1: B}, "h": h_dims})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert getattr(torch.ops.rnnfuse, kind[:4].rstrip("_")).default in targets
    for t, b in [(9, 5), (1, 1)]:
        x, h = torch.randn(t, b, 3), _state(kind, 4, b, 5)
        with torch.no_grad():
            got, want = ep.module()(x, h), model(x, h)
        close(got[0], want[0], "output")
        for a, w in zip(_finals(got), _finals(want)):
            close(a, w, "state")


@pytest.mark.parametrize("cell", list(CELLS))
def test_export_cells_with_dynamic_batch(cell):
    from torch.export import Dim
    _, ours = CELLS[cell]
    torch.manual_seed(16)
    c = ours(3, 4)
    B = Dim("B", min=1, max=4096)

    def state(b):
        return (torch.randn(b, 4), torch.randn(b, 4)) if cell == "lstm" else torch.randn(b, 4)

    dims = ({0: B}, {0: B}) if cell == "lstm" else {0: B}
    ep = torch.export.export(c, (torch.randn(2, 3), state(2)), dynamic_shapes=({0: B}, dims))
    x, h = torch.randn(7, 3), state(7)
    with torch.no_grad():
        got, want = ep.module()(x, h), c(x, h)
    for a, w in zip(_finals((None, got)), _finals((None, want))):
        close(a, w, "state")


def test_compile_fullgraph_runs_a_swapped_subclass():
    class Doubled(nn.GRU):
        def forward(self, x):
            return super().forward(x)[0] * 2

    model = nn.Sequential(Doubled(3, 4))
    assert rt.swap_modules(model) == ["0"]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3)
    close(compiled(x), model(x), "output")


def test_exported_program_trains():
    # an exported program with autograd kept (the operators' gradient formula)
    from torch.export import Dim
    torch.manual_seed(9)
    model = Wrapper(rt.GRU(3, 4, num_layers=2))
    ep = torch.export.export(model, (torch.randn(6, 2, 3), torch.randn(2, 2, 4)),
                             dynamic_shapes={"x": {0: Dim("T"), 1: Dim("B")},
                                             "h": {1: Dim("B")}})
    x, h = torch.randn(8, 3, 3), torch.randn(2, 3, 4)
    exported = ep.module()
    xg = x.clone().requires_grad_()
    exported(xg, h)[0].pow(2).sum().backward()
    xw = x.clone().requires_grad_()
    model(xw, h)[0].pow(2).sum().backward()
    close(xg.grad, xw.grad, "input gradient")


# ---------------------------------------------------------------- torch.jit.trace

@pytest.mark.parametrize("kind", list(MODULES))
def test_trace_records_the_operator_and_follows_new_inputs(kind):
    _, ours, extra = MODULES[kind]
    torch.manual_seed(10)
    model = Wrapper(ours(3, 5, num_layers=2, bidirectional=True, **extra))
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(5, 2, 3), _state(kind, 4, 2, 5)))
    assert f"rnnfuse::{kind[:4].rstrip('_')}" in str(traced.inlined_graph)
    x, h = torch.randn(8, 3, 3), _state(kind, 4, 3, 5)  # another length and batch
    with torch.no_grad():
        got, want = traced(x, h), model(x, h)
    close(got[0], want[0], "output")
    for a, w in zip(_finals(got), _finals(want)):
        close(a, w, "state")
    # the trace keeps autograd: gradients as the module's (backward replays the forward)
    xg, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    traced(xg, h)[0].pow(2).sum().backward()
    model(xw, h)[0].pow(2).sum().backward()
    close(xg.grad, xw.grad, "input gradient")


# ---------------------------------------------------------------- torch.func

@pytest.mark.parametrize("kind", list(MODULES))
def test_func_grad_matches_autograd(kind):
    from torch.func import functional_call, grad
    _, ours, extra = MODULES[kind]
    torch.manual_seed(11)
    m = ours(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(params, x):
        return (functional_call(m, params, (x,))[0] ** 2).sum()

    params = {k: v.detach() for k, v in m.named_parameters()}
    got = grad(loss, argnums=(0, 1))(params, x)
    xw = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(dict(m.named_parameters()), xw), [xw, *m.parameters()])
    close(got[1], want[0], "input gradient", torch.float64)
    for (name, _), w in zip(m.named_parameters(), want[1:]):
        close(got[0][name], w, name, torch.float64)


def test_func_second_derivative_is_refused_not_zero():
    from torch.func import grad
    m = rt.RNN(2, 3, dtype=torch.float64)
    x = torch.randn(4, 1, 2, dtype=torch.float64)

    def f(x):
        return m(x)[0].pow(3).sum()

    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad(lambda x: grad(f)(x).sum())(x)


@pytest.mark.parametrize("kind", list(MODULES))
def test_vmap_over_examples(kind):
    from torch.func import functional_call, stack_module_state, vmap
    _, ours, extra = MODULES[kind]
    torch.manual_seed(12)
    m = ours(3, 4, bidirectional=True, **extra)
    xs = torch.randn(3, 5, 2, 3)
    with torch.no_grad():
        got = vmap(lambda x: m(x)[0])(xs)  # shared weights: one call over 3*2 rows
        close(got, torch.stack([m(x)[0] for x in xs]), "shared weights")
        models = [ours(3, 4, bidirectional=True, **extra) for _ in range(3)]
        params, buffers = stack_module_state(models)
        got = vmap(lambda p, x: functional_call(m, p, (x,))[0])(params, xs)
        close(got, torch.stack([mm(x)[0] for mm, x in zip(models, xs)]), "own weights")


@pytest.mark.parametrize("kind", list(MODULES))
def test_vmap_of_grad_gives_per_example_gradients(kind):
    # per-example gradients (torch.nn's own modules refuse vmap over grad)
    from torch.func import functional_call, grad, vmap
    theirs, ours, extra = MODULES[kind]
    torch.manual_seed(17)
    m = ours(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    ref = theirs(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    ref.load_state_dict(m.state_dict())
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)

    def loss(params, x):
        return (functional_call(m, params, (x,))[0] ** 3).sum()

    params = {k: v.detach() for k, v in m.named_parameters()}
    got = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, xs)
    for k, x in enumerate(xs):
        xw = x.clone().requires_grad_()
        want = torch.autograd.grad((ref(xw)[0] ** 3).sum(), [xw, *ref.parameters()])
        close(got[1][k], want[0], "input gradient", torch.float64)
        for (name, _), w in zip(ref.named_parameters(), want[1:]):
            close(got[0][name][k], w, name, torch.float64)


def test_compiled_backward_twice_with_retain_graph_gives_the_same_gradients():
    # backward only reads the saved workspace: a second backward runs over it again
    torch.manual_seed(13)
    m = rt.GRU(3, 4, num_layers=2, dtype=torch.float64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    loss = compiled(x)[0].pow(2).sum()
    first = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(m.parameters()))
    want = torch.autograd.grad(m(x)[0].pow(2).sum(), list(m.parameters()))
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b)
        close(a, w, "gradient", torch.float64)


def test_workspace_pool_reuses_only_what_nothing_holds():
    like = torch.empty(0)
    rt.release_workspace()
    a = _ops._pooled_empty(1000, like)
    pa = a.data_ptr()
    b = _ops._pooled_empty(1000, like)  # a is held: another buffer
    assert b.data_ptr() != pa
    del a
    assert _ops._pooled_empty(900, like).data_ptr() == pa  # free again: reused
    rt.release_workspace()


# ---------------------------------------------------------------- ONNX

def test_onnx_export_of_lengths_runs_in_onnxruntime():
    # the operators called directly: one node per direction, lengths as sequence_lens
    # (the modules' export: tests/test_torch_export.py)
    import io
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Ragged(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 3) * 0.5)
            self.u = nn.Parameter(torch.randn(12, 4) * 0.5)

        def forward(self, x, lengths):
            fwd = torch.ops.rnnfuse.gru(x, None, self.w, self.u, None, None, lengths, False,
                                        True, False)
            rev = torch.ops.rnnfuse.gru(x, None, self.w, self.u, None, None, lengths, True,
                                        True, False)
            return fwd[0], rev[0], rev[1]

    torch.manual_seed(15)
    model = Ragged()
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(5, 3, 3), torch.tensor([5, 2, 4])), f,
                      dynamo=False, opset_version=17, input_names=["x", "lengths"],
                      dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}})
    x, lengths = torch.randn(7, 4, 3), torch.tensor([7, 1, 4, 6])
    got = ort.InferenceSession(f.getvalue()).run(None, {"x": x.numpy(),
                                                        "lengths": lengths.numpy()})
    with torch.no_grad():
        want = model(x, lengths)
    for a, w in zip(got, want):
        close(torch.from_numpy(a), w, "output")


@pytest.mark.parametrize("before", [
    "import torch._dynamo.variables.builder",  # Dynamo imported first
    "",
    # rnnfuse.torch imported first, then a probe that finds Dynamo without importing it
    "import importlib.util; import rnnfuse.torch\n"
    "assert importlib.util.find_spec('torch._dynamo.variables.builder')",
])
def test_compile_fullgraph_whatever_was_imported_first(before):
    import subprocess
    import sys
    code = (f"import torch\n{before}\n"
            "import rnnfuse.torch as rt\n"
            "m = rt.GRU(3, 4)\n"
            "x = torch.randn(5, 2, 3)\n"
            "y = torch.compile(m, fullgraph=True, backend='eager')(x)[0]\n"
            "assert torch.equal(y, m(x)[0])\n")
    subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], check=True)


def test_import_hook_runs_only_when_the_module_is_imported(tmp_path, monkeypatch):
    import importlib
    import sys
    from rnnfuse.torch._dynamo import _AfterImport
    name = "rnnfuse_hook_target"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = _AfterImport(name, seen.append)
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    try:
        assert importlib.util.find_spec(name) is not None
        assert hook in sys.meta_path and not seen  # a probe runs nothing
        module = importlib.import_module(name)
        assert seen == [module] and hook not in sys.meta_path
    finally:
        sys.modules.pop(name, None)


def test_a_dynamo_that_cannot_be_adapted_warns():
    import types
    from rnnfuse.torch import _dynamo
    with pytest.warns(RuntimeWarning, match="could not let torch.compile take its modules "
                                            "whole .*has no VariableBuilder.wrap_module"):
        _dynamo._allow_or_warn(types.ModuleType("torch._dynamo.variables.builder"))


# ---------------------------------------------------------------- arguments the operators refuse

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("bad", ["sigmoid", "Tanh", ""])
def test_rnn_operator_refuses_other_nonlinearities(bad, train):
    args = list(op_args("rnn", ("tanh",), None, train))
    args[-2] = bad
    with torch.no_grad(), pytest.raises(ValueError,
                                        match="nonlinearity must be 'tanh' or 'relu'"):
        torch.ops.rnnfuse.rnn(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(
            ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        torch.ops.rnnfuse.rnn(*args)  # refused when traced as well


def test_rnn_backward_operator_refuses_other_nonlinearities():
    args = op_args("rnn", ("tanh",), None, True)
    with torch.no_grad():
        y, h_n, ws = torch.ops.rnnfuse.rnn(*args)
    inputs = [a.detach() for a in args[:6]]
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        torch.ops.rnnfuse.rnn_backward(y, h_n, *inputs, ws, None, True, "gelu")


@pytest.mark.parametrize("which,shape,match", [
    (4, (4 * 6, 5), r"w_hh must have shape \(4\*hidden_size, hidden_size\)"),
    (3, (4 * 6, 3), r"w_ih must have shape \(24, 4\)"),
    (0, (5, 3), r"x must be 3-D"),
])
def test_backward_operator_names_a_bad_argument(which, shape, match):
    args = op_args("lstm", (), None, True)
    with torch.no_grad():
        *outs, ws = torch.ops.rnnfuse.lstm(*args)
    inputs = [a.detach() for a in args[:7]]
    inputs[which] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        torch.ops.rnnfuse.lstm_backward(*outs, *inputs, ws, None, True)


@pytest.mark.parametrize("lengths", [None, [2, 5, 0]])
@pytest.mark.parametrize("cell,option", CASES)
def test_backward_operator_leaves_the_workspace_as_it_was(cell, option, lengths):
    # the kernels write the gradients elsewhere (a saved tensor that backward mutated
    # would cost a copy of it under torch.compile), so two backwards give the same bits
    bwd, outs, inputs, ws, lens = backward_case(cell, option, lengths)
    before = ws.clone()
    first = bwd(*outs, *inputs, ws, lens, True, *option)
    assert torch.equal(ws, before)
    again = bwd(*outs, *inputs, ws, lens, True, *option)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backward_operator_refuses_a_workspace_of_another_size():
    args = op_args("gru", (True,), None, True)
    with torch.no_grad():
        *outs, ws = torch.ops.rnnfuse.gru(*args)
    inputs = [a.detach() for a in args[:6]]
    with pytest.raises(ValueError, match=r"ws must be the forward's workspace: 1-D, "
                                         rf"contiguous, {ws.numel()} elements"):
        torch.ops.rnnfuse.gru_backward(*outs, *inputs, ws[:-2], None, True, True)
    with pytest.raises(ValueError, match="ws is empty: the forward ran with train=False"):
        torch.ops.rnnfuse.gru_backward(*outs, *inputs, ws[:0], None, True, True)


def test_compile_caches_are_tagged_with_the_workspace_layout(monkeypatch):
    # a compiled graph holds the operators' workspace sizes: a build whose sizes differ
    # must not reuse it from torch's on-disk caches
    tag = _ops._layout_tag()
    assert tag in torch.compiler.config.cache_key_tag.split(";")
    # (config.patch restores the entry; monkeypatch.setattr would delete it on undo)
    with torch.compiler.config.patch(cache_key_tag="users-own"):
        _ops._tag_compile_caches()
        _ops._tag_compile_caches()  # once only
        assert torch.compiler.config.cache_key_tag == f"users-own;{tag}"
    assert torch.compiler.config.cache_key_tag.split(";").count(tag) == 1
    sizes = _kernels.workspace_size
    monkeypatch.setattr(_kernels, "workspace_size", lambda *a: sizes(*a) + 16)
    assert _ops._layout_tag() != tag
