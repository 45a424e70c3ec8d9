"""rnnfuse.torch's cell variants (rnnfuse extensions): peepholes, layer_norm, zoneout,
recurrent_dropout and weight_drop as keyword arguments of LSTM, GRU and RNN. Outputs and
every gradient against rnnfuse's NumPy layers with the same parameters (and, in training,
the same masks), VariantFunction by float64 finite differences, state dicts both ways,
the variants off as the plain modules bit for bit, torch.compile, torch.export,
torch.jit.trace and torch.func against eager, and what is refused. Skipped without
PyTorch."""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnnfuse  # noqa: E402
import rnnfuse.torch as rt  # noqa: E402
from rnnfuse.torch._functions import VariantFunction, Variants  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jit.trace, onnx

CLASSES = {"lstm": (rnnfuse.LSTM, rt.LSTM), "gru": (rnnfuse.GRU, rt.GRU),
           "rnn": (rnnfuse.RNN, rt.RNN)}
# every variant of every cell, and each combination the layers take
CONFIGS = [("lstm", dict(peepholes=True, zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.3)),
           ("lstm", dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, weight_drop=0.2)),
           ("lstm", dict(proj_size=2, peepholes=True, weight_drop=0.4)),
           ("gru", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.2, weight_drop=0.3)),
           ("rnn", dict(zoneout=0.3, recurrent_dropout=0.3, weight_drop=0.2))]
IDS = ["-".join([cell, *kw]) for cell, kw in CONFIGS]
T, B, I, H = 5, 4, 3, 4
LENGTHS = [3, 5, 1, 4]  # unsorted, ragged


def close(got, want, what, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol,
                               err_msg=what)


def pair(cell, kw, seed=0, **shape):
    """A float64 rnnfuse layer with random variant parameters (not their initial 0 and 1,
    so that a misplaced one shows) and the rnnfuse.torch module loaded from its state
    dict."""
    np_cls, torch_cls = CLASSES[cell]
    layer = np_cls(I, H, dtype=np.float64, seed=seed, **shape, **kw)
    rng = np.random.default_rng(seed + 1)
    sd = layer.state_dict()
    for name, v in sd.items():
        if "peep" in name or name.startswith("ln_"):
            sd[name] = v + rng.uniform(-0.5, 0.5, v.shape)
    layer.load_state_dict(sd)
    module = torch_cls(I, H, dtype=torch.float64, **shape, **kw)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return layer, module


def record_masks(module, layer, monkeypatch):
    """Make ``layer`` (NumPy) run with the masks that ``module`` (torch) draws: each of
    the module's masks is recorded as it is drawn and handed to the layer, in order, when
    it asks for the same one."""
    drops, zones = [], []
    draw_drop, draw_zone = module._dropout_mask, module._zoneout_masks

    def drop(shape, p):
        mask = draw_drop(shape, p)
        drops.append(mask.numpy().copy())
        return mask

    def zone(shape):
        masks = draw_zone(shape)
        zones.append(tuple(m.numpy().copy() for m in masks) if isinstance(masks, tuple)
                     else masks.numpy().copy())
        return masks

    def replay_drop(shape, p=None):
        mask = drops.pop(0)
        assert mask.shape == tuple(shape)
        return mask

    monkeypatch.setattr(module, "_dropout_mask", drop)
    monkeypatch.setattr(module, "_zoneout_masks", zone)
    monkeypatch.setattr(layer, "_dropout_mask", replay_drop)
    monkeypatch.setattr(layer, "_zoneout_arg", lambda shape: zones.pop(0) if layer.zoneout
                        else None)
    return drops, zones


def run_both(layer, module, packed, seed=3):
    """The torch module and the NumPy layer over the same input (padded and
    batch_first, or a packed ragged batch): outputs, final states and every gradient
    (input's, initial states', parameters') of a random weighted sum."""
    rng = np.random.default_rng(seed)
    D, L, n = module.num_directions, module.num_layers, module._n_states
    widths = [module.proj_size or H, H][:n]
    x = rng.standard_normal((T, B, I))
    state = [rng.standard_normal((L * D, B, w)) for w in widths]
    wy = rng.standard_normal((T, B, D * widths[0]))
    wfin = [rng.standard_normal(s.shape) for s in state]
    lengths = LENGTHS if packed else None
    if not packed:  # batch_first
        x, wy = x.transpose(1, 0, 2).copy(), wy.transpose(1, 0, 2).copy()
    if lengths is not None:
        for b, n_b in enumerate(lengths):
            wy[n_b:, b] = 0  # the padding has no output in a packed one

    xt = torch.from_numpy(x).requires_grad_()
    st = [torch.from_numpy(s).requires_grad_() for s in state]
    hx = tuple(st) if n == 2 else st[0]
    module.zero_grad()
    if packed:
        y, fin = module(pack_padded_sequence(xt, torch.tensor(lengths),
                                             enforce_sorted=False), hx)
        y = pad_packed_sequence(y, total_length=T)[0]
    else:
        y, fin = module(xt, hx)
    fin = list(fin) if n == 2 else [fin]
    loss = (y * torch.from_numpy(wy)).sum() + sum(
        (f * torch.from_numpy(w)).sum() for f, w in zip(fin, wfin))
    loss.backward()
    got = dict(y=y, dx=xt.grad, **{f"fin{k}": f for k, f in enumerate(fin)},
               **{f"dstate{k}": s.grad for k, s in enumerate(st)},
               **{"d" + k: p.grad for k, p in module.named_parameters()})

    layer.zero_grad()
    y, fin = layer.forward(x, tuple(state) if n == 2 else state[0], lengths=lengths,
                           need_grad=True)
    fin = list(fin) if n == 2 else [fin]
    dx, dstate = layer.backward(wy, tuple(wfin) if n == 2 else wfin[0])
    dstate = list(dstate) if n == 2 else [dstate]
    want = dict(y=y, dx=dx, **{f"fin{k}": f for k, f in enumerate(fin)},
                **{f"dstate{k}": s for k, s in enumerate(dstate)},
                **{"d" + k: g for k, g in layer.grads.items()})
    return {k: v.detach().numpy() for k, v in got.items()}, want


@pytest.mark.parametrize("packed", [False, True], ids=["batch_first", "packed"])
@pytest.mark.parametrize("cell, kw", CONFIGS, ids=IDS)
def test_eval_matches_numpy_layer(cell, kw, packed):
    """Eval (zoneout's expectation, recurrent and weight drop off), stacked and
    bidirectional: outputs, states and every gradient as the NumPy layer's."""
    shape = dict(num_layers=2, bidirectional=True, batch_first=not packed)
    layer, module = pair(cell, kw, **shape)
    got, want = run_both(layer.eval(), module.eval(), packed)
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], name)


@pytest.mark.parametrize("packed", [False, True], ids=["batch_first", "packed"])
@pytest.mark.parametrize("cell, kw", CONFIGS, ids=IDS)
def test_training_matches_numpy_layer_with_the_same_masks(cell, kw, packed, monkeypatch):
    shape = dict(num_layers=2, bidirectional=True, batch_first=not packed)
    layer, module = pair(cell, kw, **shape)
    drops, zones = record_masks(module, layer, monkeypatch)
    torch.manual_seed(5)
    got, want = run_both(layer, module, packed)
    assert not drops and not zones  # the layer used every mask the module drew
    for name in want:
        close(got[name], want[name], name)
    # and the masks mattered: eval's numbers are not these
    monkeypatch.undo()
    assert not np.allclose(run_both(layer.eval(), module.eval(), packed)[0]["y"], got["y"])


@pytest.mark.parametrize("cell, kw", CONFIGS, ids=IDS)
def test_masks_come_from_torch_rng(cell, kw):
    module = CLASSES[cell][1](I, H, num_layers=2, **kw)
    x = torch.randn(T, B, I)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        y = module(x)[0]
        y.sum().backward()
        outs.append((y.detach(), module.weight_hh_l1.grad.clone()))
        module.zero_grad()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_masks_shapes_and_rates():
    module = rt.LSTM(I, 50, zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.2)
    torch.manual_seed(0)
    drop = module._dropout_mask((200, 50), 0.4)
    assert set(drop.unique().tolist()) == {0.0, np.float32(1 / 0.6)}
    assert abs((drop == 0).double().mean().item() - 0.4) < 0.03
    z_h, z_c = module._zoneout_masks((40, 5, 50))
    assert set(z_h.unique().tolist()) == {0.0, 1.0} and not torch.equal(z_h, z_c)
    assert abs(z_h.mean().item() - 0.3) < 0.03
    assert not torch.equal(z_h[0], z_h[1])  # fresh per step
    assert rt.GRU(I, H, zoneout=0.3)._zoneout_masks((2, 3, 4)).shape == (2, 3, 4)


# ---------------------------------------------------------------- VariantFunction

def _gradcheck_args(cell, kw, reverse):
    torch.manual_seed(11)
    d = dict(dtype=torch.float64)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    Tn, Bn, In, Hn, P = 4, 3, 2, 3, kw.get("proj_size", 0)
    R = P or Hn
    t = lambda *s: torch.randn(*s, **d).requires_grad_()  # noqa: E731
    zoneout = rdrop = None
    if kw.get("zoneout"):
        masks = [(torch.rand(Tn, Bn, Hn, **d) < 0.4).double() for _ in range(1 + (G == 4))]
        zoneout = tuple(masks) if G == 4 else masks[0]
    if kw.get("recurrent_dropout"):
        rdrop = (torch.rand(Bn, Hn, **d) >= 0.3).double() / 0.7
    spec = Variants(cell, {"lstm": None, "gru": True, "rnn": "tanh"}[cell],
                    torch.tensor([4, 1, 3]), reverse, zoneout, rdrop)
    tensors = [t(Tn, Bn, In), t(Bn, R), t(Bn, Hn) if G == 4 else None, t(G * Hn, In),
               t(G * Hn, R), t(G * Hn), t(G * Hn), t(P, Hn) if P else None,
               t(3 * Hn) if kw.get("peepholes") else None]
    if kw.get("layer_norm"):
        tensors += [t(G * Hn), t(G * Hn)] + ([t(Hn), t(Hn)] if G == 4 else [])
    return spec, tensors


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell, kw", CONFIGS, ids=IDS)
def test_variant_function_gradcheck(cell, kw, reverse):
    spec, tensors = _gradcheck_args(cell, kw, reverse)
    assert torch.autograd.gradcheck(lambda *a: VariantFunction.apply(spec, *a), tensors)


def test_variant_function_backward_twice_and_double_backward():
    spec, tensors = _gradcheck_args("lstm", dict(peepholes=True, zoneout=0.3), False)
    y = VariantFunction.apply(spec, *tensors)[0]
    first = torch.autograd.grad(y.sum(), tensors[8], retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(y.sum(), tensors[8])[0], first)  # replayed
    y = VariantFunction.apply(spec, *tensors)[0]
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(y.sum(), tensors[0], create_graph=True)


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("cell, kw", CONFIGS, ids=IDS)
def test_state_dict_both_ways_with_numpy_layer(cell, kw):
    layer, module = pair(cell, kw, num_layers=2, bidirectional=True)
    sd = module.state_dict()
    assert sorted(sd) == sorted(layer.state_dict())
    assert {k: tuple(v.shape) for k, v in sd.items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    fresh = CLASSES[cell][0](I, H, dtype=np.float64, num_layers=2, bidirectional=True, **kw)
    fresh.load_state_dict({k: v.numpy() for k, v in sd.items()})
    for k, v in fresh.state_dict().items():
        assert np.array_equal(v, layer.state_dict()[k]), k


def test_parameters_initialised_as_numpy_layers():
    module = rt.LSTM(I, H, num_layers=2, bidirectional=True, peepholes=True)
    assert module.weight_peep_l1_reverse.shape == (3 * H,)
    assert not module.weight_peep_l0.any() and module.weight_peep_l0.requires_grad
    ln = rt.LSTM(I, H, layer_norm=True, dtype=torch.float64)
    assert ln.ln_weight_ih_l0.shape == (4 * H,) and (ln.ln_weight_hh_l0 == 1).all()
    assert (ln.ln_weight_c_l0 == 1).all() and not ln.ln_bias_c_l0.any()
    assert ln.ln_bias_c_l0.dtype == torch.float64
    gru = rt.GRU(I, H, layer_norm=True)
    assert [n for n, _ in gru.named_parameters() if n.startswith("ln_")] == \
        ["ln_weight_ih_l0", "ln_weight_hh_l0"] and gru.ln_weight_ih_l0.shape == (3 * H,)
    assert "peepholes=True" in repr(module) and "zoneout=0.5" in repr(rt.RNN(I, H, zoneout=0.5))
    # the variants' parameters come after torch.nn's draws: the same seed gives the same
    torch.manual_seed(0)
    plain = rt.LSTM(I, H)
    torch.manual_seed(0)
    assert torch.equal(rt.LSTM(I, H, peepholes=True, zoneout=0.1).weight_hh_l0,
                       plain.weight_hh_l0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_variants_off_is_the_plain_module_bitwise(cell):
    off = dict(zoneout=0.0, weight_drop=0.0, recurrent_dropout=0.0)
    off.update(dict(peepholes=False, layer_norm=False) if cell == "lstm" else
               dict(layer_norm=False) if cell == "gru" else {})
    cls = CLASSES[cell][1]
    x = torch.randn(T, B, I)
    results = []
    for kw in ({}, off, dict(recurrent_dropout=0.5, weight_drop=0.5)):
        torch.manual_seed(0)
        module = cls(I, H, num_layers=2, bidirectional=True, **kw)
        if kw.get("weight_drop"):
            module.eval()  # both are no-ops in eval
        y = module(x)[0]
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad for p in module.parameters()])
    assert not cls(I, H, **off)._has_variants
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_autocast():
    torch.manual_seed(0)
    module = rt.LSTM(I, H, peepholes=True, zoneout=0.2, bidirectional=True).eval()
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = module(x.bfloat16())
    assert y.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), module(x.bfloat16().float())[0], rtol=0, atol=1e-2)


def test_unbatched_relu_and_inference_mode():
    torch.manual_seed(0)
    module = rt.RNN(I, H, nonlinearity="relu", zoneout=0.4, recurrent_dropout=0.3,
                    weight_drop=0.3, num_layers=2).eval()
    layer = rnnfuse.RNN(I, H, num_layers=2, nonlinearity="relu", zoneout=0.4,
                        dtype=np.float32).eval()
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    x = torch.randn(T, I)
    with torch.inference_mode():
        y, h = module(x)
    want_y, want_h = layer.forward(x.numpy()[:, None])
    assert y.shape == (T, H) and h.shape == (2, H)
    close(y, want_y[:, 0], "y", rtol=1e-6, atol=1e-6)
    close(h, want_h[:, 0], "h_n", rtol=1e-6, atol=1e-6)


def test_stream_with_peepholes_and_zoneout():
    torch.manual_seed(0)
    module = rt.LSTM(I, H, num_layers=2, peepholes=True, zoneout=0.3,
                     recurrent_dropout=0.2, weight_drop=0.2).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.rand_like(p) * 0.2)
        x = torch.randn(T, B, I)
        want = module(x)[0]
    stream = module.stream(B)
    assert torch.equal(torch.stack([stream.step(x[t]) for t in range(T)]), want)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stream_with_layer_norm(cell, dtype):
    """Two layers' steps and final state equal the eval forward bit for bit, with gains
    and cell bias away from their initial 1 and 0; reset to a state continues as the
    forward from it."""
    torch.manual_seed(0)
    module = CLASSES[cell][1](I, H, num_layers=2, layer_norm=True, zoneout=0.2,
                              dtype=dtype).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.rand_like(p) * 0.2)
        x = torch.randn(T, B, I, dtype=dtype)
        want, want_state = module(x)
        middle = module(x[:2])[1]
        again = module(x[2:], middle)[0]
    stream = module.stream(B)
    assert torch.equal(torch.stack([stream.step(x[t]) for t in range(T)]), want)
    states = stream.state if cell == "lstm" else (stream.state,)
    wants = want_state if cell == "lstm" else (want_state,)
    assert all(torch.equal(s, w) for s, w in zip(states, wants))
    stream.reset(middle)
    assert torch.equal(torch.stack([stream.step(x[t]) for t in range(2, T)]), again)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("make, error, match", [
    (lambda: rt.LSTM(3, 4, zoneout=1.0), ValueError,
     r"zoneout must be a probability in \[0, 1\), got 1.0"),
    (lambda: rt.GRU(3, 4, recurrent_dropout=-0.1), ValueError,
     r"recurrent_dropout must be a probability in \[0, 1\), got -0.1"),
    (lambda: rt.RNN(3, 4, weight_drop=True), TypeError,
     r"weight_drop must be a float, got bool True"),
    (lambda: rt.LSTM(3, 4, peepholes=1), TypeError, r"peepholes must be a bool, got int 1"),
    (lambda: rt.GRU(3, 4, layer_norm="yes"), TypeError, r"layer_norm must be a bool"),
    (lambda: rt.RNN(3, 4, layer_norm=True), TypeError,
     r"unexpected keyword argument 'layer_norm'"),
    (lambda: rt.GRU(3, 4, peepholes=True), TypeError,
     r"unexpected keyword argument 'peepholes'"),
    (lambda: rt.LSTM(3, 4, peepholes=True, layer_norm=True), ValueError,
     r"layer_norm and peepholes cannot be combined"),
    (lambda: rt.LSTM(3, 4, proj_size=2, zoneout=0.1), ValueError,
     r"zoneout is not supported with proj_size; turn zoneout off or pass proj_size=0"),
    (lambda: rt.LSTM(3, 4, proj_size=2, layer_norm=True), ValueError,
     r"layer_norm is not supported with proj_size"),
])
def test_bad_variants(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------- tracing: the operators

# each variant, and layer norm with zoneout over both directions and two layers (packed)
TRACED = CONFIGS + [("lstm", dict(layer_norm=True, zoneout=0.2, bidirectional=True,
                                  num_layers=2))]
TRACED_IDS = IDS + ["lstm-layer_norm-zoneout-bidirectional"]


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches per test (each compiles new modules with the same forward)."""
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step(model, params, x, lengths=None, seed=7):
    """model over x (a ragged batch packed by lengths, if given) with zero states: the
    output, the final states and the gradients of x and params (by name) of a loss over
    them, with the masks drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    x = x.detach().requires_grad_()
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, fin = model(inp)
    y = y if lengths is None else y.data
    fin = fin if isinstance(fin, tuple) else (fin,)
    loss = y.pow(2).sum() + sum(f.pow(3).sum() for f in fin)
    grads = torch.autograd.grad(loss, [x, *params.values()])
    return [y, *fin, *grads]


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {k} differs: {(a - b).abs().max()}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell, kw", TRACED, ids=TRACED_IDS)
def test_compile_fullgraph_is_eager_bitwise(cell, kw, train, fresh_dynamo):
    module = pair(cell, kw)[1].train(train)
    params = dict(module.named_parameters())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    packed = kw.get("bidirectional", False)
    for t, b in [(T, B), (T + 2, B - 1)]:  # the second: dynamic shapes
        x = torch.randn(t, b, I, dtype=torch.float64)
        lengths = torch.tensor(LENGTHS[:b]) if packed else None
        assert_bitwise(step(compiled, params, x, lengths), step(module, params, x, lengths))


def test_compile_with_inductor_trains_like_eager(fresh_dynamo):
    # (inductor draws its own random numbers unless told to fall back on torch's)
    module = pair("lstm", TRACED[-1][1])[1].train()
    params = dict(module.named_parameters())
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(module, fullgraph=True)
        assert_bitwise(step(compiled, params, x, lengths), step(module, params, x, lengths))


class OverX(torch.nn.Module):
    """A module over x alone, for torch.export."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell, kw", TRACED, ids=TRACED_IDS)
def test_export_with_dynamic_length_and_batch_is_eager_bitwise(cell, kw, train):
    from torch.export import Dim
    model = OverX(pair(cell, kw)[1]).train(train)
    ep = torch.export.export(model, (torch.randn(T, B, I, dtype=torch.float64),),
                             dynamic_shapes={"x": {0: Dim("T"), 1: Dim("B")}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert getattr(torch.ops.rnnfuse, cell).default in targets
    exported = ep.module()
    for t, b in [(T + 4, B + 3), (1, 1)]:
        x = torch.randn(t, b, I, dtype=torch.float64)
        assert_bitwise(step(exported, dict(exported.named_parameters()), x),
                       step(model, dict(model.named_parameters()), x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_and_torch_func_run_the_variants():
    module = pair("lstm", dict(layer_norm=True, zoneout=0.2))[1]
    x = torch.randn(T, B, I, dtype=torch.float64)
    traced = torch.jit.trace(module.eval(), x)
    x2 = torch.randn(T + 3, B, I, dtype=torch.float64)
    assert torch.equal(traced(x2)[0], module(x2)[0])  # not the example's output
    gru = pair("gru", CONFIGS[3][1])[1].train()
    params = {k: v.detach() for k, v in gru.named_parameters()}
    torch.manual_seed(1)
    got = torch.func.grad(lambda p: torch.func.functional_call(gru, p, (x,))[0].sum())(
        params)
    torch.manual_seed(1)
    gru(x)[0].sum().backward()
    for k, p in gru.named_parameters():
        assert torch.equal(got[k], p.grad), k


@pytest.mark.parametrize("kw", [dict(layer_norm=True, zoneout=0.2), dict(proj_size=2)],
                         ids=["layer_norm-zoneout", "proj_size"])
def test_vmap_of_grad_gives_per_example_gradients(kw):
    # (in eval: in training the masks are random numbers, which vmap wants told how)
    from torch.func import functional_call, grad, vmap
    module = pair("lstm", kw)[1].eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    xs = torch.randn(3, T, B, I, dtype=torch.float64)  # three examples

    def loss(p, x):
        return functional_call(module, p, (x,))[0].pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for n, x in enumerate(xs):
        want = grad(loss)(params, x)
        for k in params:
            assert torch.equal(got[k][n], want[k]), (n, k)


def test_weight_drop_runs_under_torch_func():
    """weight_drop is W_hh * mask in torch's operators: a torch.func transform records
    it (the same draws as eagerly under the same seed)."""
    module = rt.LSTM(3, 4, weight_drop=0.5)
    x = torch.randn(5, 2, 3)
    params = {k: v.detach() for k, v in module.named_parameters()}
    torch.manual_seed(1)
    got = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,))[0].sum())(
        params)
    torch.manual_seed(1)
    module(x)[0].sum().backward()
    plain = rt.LSTM(3, 4)
    plain.load_state_dict(module.state_dict())
    plain(x)[0].sum().backward()
    for k, p in module.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(module.weight_hh_l0.grad, plain.weight_hh_l0.grad)


def test_stream_onnx_and_torch_nn_refused():
    with pytest.raises(ValueError, match=r"a bidirectional LSTM cannot be streamed"):
        rt.LSTM(3, 4, layer_norm=True, bidirectional=True).eval().stream()
    with pytest.raises(RuntimeError, match=r"GRU.stream\(\) runs the module as in eval mode"):
        rt.GRU(3, 4, layer_norm=True).stream()
    module = rt.LSTM(3, 4, peepholes=True, weight_drop=0.2)
    for call in (module.to_torch, lambda: rt.unswap_modules(torch.nn.Sequential(module)),
                 lambda: torch.jit.script(module)):
        with pytest.raises(ValueError, match=r"LSTM with peepholes=True, weight_drop=0.2 has "
                           r"no torch.nn counterpart: torch.nn.LSTM has no such option"):
            call()
    pytest.importorskip("onnx")
    zoned = rt.LSTM(3, 4, peepholes=True, zoneout=0.1).eval()
    with pytest.raises(RuntimeError, match=r"LSTM with zoneout=0.1 cannot be exported to "
                       r"ONNX: rnnfuse.torch exports the plain cells and the LSTM's "
                       r"peepholes"):
        torch.onnx.export(zoned, (torch.randn(5, 2, 3),), io.BytesIO(), dynamo=False)
