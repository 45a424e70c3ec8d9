"""rnnfuse.optim: update formulas against torch.optim (and hand-computed steps), in-place
updates, skipped gradients, clipping, schedules, state dicts and bad input."""
import copy
import math

import numpy as np
import pytest

from rnnfuse.optim import (SGD, Adam, AdamW, CosineAnnealingLR, LinearWarmup, StepLR,
                           clip_grad_norm)


def _params(rng, dtype=np.float64):
    return {"w": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=4).astype(dtype)}


def _grads(rng, params):
    return {k: rng.normal(size=p.shape).astype(p.dtype) for k, p in params.items()}


OPTIMIZERS = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (SGD, dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05)),
    (Adam, dict(lr=0.01)),
    (Adam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)),
    (AdamW, dict(lr=0.01)),
    (AdamW, dict(lr=0.02, betas=(0.5, 0.99), weight_decay=0.3)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls, kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_matches_torch_optim(cls, kw, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _params(rng, dtype)
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = cls(params, **kw)
    topt = getattr(torch.optim, cls.__name__)(list(tparams.values()), foreach=False, **kw)
    live = {k: v for k, v in params.items()}  # the arrays the "model" holds
    for _ in range(6):
        grads = _grads(rng, params)
        opt.step(grads)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
    rtol = 1e-13 if dtype == np.float64 else 2e-6
    for k in params:
        assert live[k] is params[k] and opt.params[k] is params[k]  # updated in place
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=rtol, atol=rtol)


def test_sgd_momentum_by_hand():
    p = {"x": np.array([1.0])}
    opt = SGD(p, lr=0.5, momentum=0.9, dampening=0.5, weight_decay=0.1)
    opt.step({"x": np.array([2.0])})         # g = 2 + 0.1 = 2.1; buf = 2.1
    assert p["x"][0] == pytest.approx(1 - 0.5 * 2.1)
    x1 = p["x"][0]
    opt.step({"x": np.array([1.0])})         # g = 1 + 0.1 x1; buf = 0.9*2.1 + 0.5 g
    g = 1 + 0.1 * x1
    assert p["x"][0] == pytest.approx(x1 - 0.5 * (0.9 * 2.1 + 0.5 * g))


def test_adam_first_step_is_lr_times_sign():
    p = {"x": np.array([1.0, -2.0, 3.0])}
    Adam(p, lr=0.1).step({"x": np.array([5.0, -1e-3, 0.2])})
    np.testing.assert_allclose(p["x"], [0.9, -1.9, 2.9], rtol=1e-6)


def test_adamw_decay_is_decoupled():
    p = {"x": np.array([2.0])}
    AdamW(p, lr=0.1, weight_decay=0.5).step({"x": np.array([0.0])})
    assert p["x"][0] == 2.0 * (1 - 0.05)  # zero gradient: only the decay moves it


def test_missing_or_none_gradient_skips_parameter_and_its_state():
    rng = np.random.default_rng(1)
    params = _params(rng)
    b0 = params["b"].copy()
    opt = Adam(params, lr=0.1)
    opt.step({"w": np.ones((3, 4)), "b": None})
    opt.step({"w": np.ones((3, 4))})
    np.testing.assert_array_equal(params["b"], b0)
    assert "b" not in opt.state and opt.state["w"]["step"] == 2


def test_grads_are_not_modified():
    rng = np.random.default_rng(2)
    params = _params(rng)
    grads = _grads(rng, params)
    before = copy.deepcopy(grads)
    for cls, kw in OPTIMIZERS:
        cls(params, **kw).step(grads)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


def _run(cls, kw, params, gs, sd=None):
    """Copies of params after the steps gs (from state dict sd if given) and the optimizer."""
    out = {k: v.copy() for k, v in params.items()}
    opt = cls(out, **kw)
    if sd is not None:
        opt.load_state_dict(sd)
    for g in gs:
        opt.step(g)
    return out, opt


@pytest.mark.parametrize("cls, kw", [OPTIMIZERS[i] for i in (1, 3, 5, 7)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_state_dict_resumes_exactly(cls, kw):
    rng = np.random.default_rng(3)
    params = _params(rng)
    gs = [_grads(rng, params) for _ in range(6)]
    straight, _ = _run(cls, kw, params, gs)
    half, opt = _run(cls, kw, params, gs[:3])
    sd, half = opt.state_dict(), {k: v.copy() for k, v in half.items()}
    opt.step(gs[3])  # stepping on must not leak into the state dict taken before
    # a fresh optimizer built with other hyperparameters gets the saved ones back
    resumed, opt2 = _run(cls, {"lr": 123.0}, half, gs[3:], sd=sd)
    assert opt2.lr == kw["lr"]
    for k in params:
        np.testing.assert_array_equal(resumed[k], straight[k])


def test_load_state_dict_refuses_bad_state_and_leaves_optimizer_unchanged():
    rng = np.random.default_rng(4)
    params = _params(rng)
    opt = Adam(params, lr=0.1)
    opt.step(_grads(rng, params))
    good = opt.state_dict()
    cases = [
        ({**good, "type": "SGD"}, ValueError, "optimizer state_dict is for 'SGD', this optimizer is 'Adam'"),
        ({k: v for k, v in good.items() if k != "hyper"}, ValueError, "must have keys"),
        ({**good, "hyper": {**good["hyper"], "lr": -1.0}}, ValueError, "lr must be >= 0.0, got -1.0"),
        ({**good, "hyper": {**good["hyper"], "betas": [0.9, 1.5]}}, ValueError, r"betas\[1\] must be in \[0.0, 1.0\)"),
        ({**good, "state": {"zzz": good["state"]["w"]}}, ValueError, "state for 'zzz', which is not one of the parameters"),
        ({**good, "state": {"w": {**good["state"]["w"], "exp_avg": np.zeros((4, 3))}}}, ValueError,
         r"state\['w'\]\['exp_avg'\] must be a float64 array of shape \(3, 4\), got a float64 array of shape \(4, 3\)"),
        ({**good, "state": {"w": {**good["state"]["w"], "exp_avg": np.zeros((3, 4), np.float32)}}}, ValueError, "got a float32 array"),
        ({**good, "state": {"w": {"step": 1, "exp_avg": good["state"]["w"]["exp_avg"]}}}, ValueError, "must have keys"),
        ({**good, "state": {"w": {**good["state"]["w"], "step": -1}}}, ValueError, r"step'\] must be >= 0"),
        ([1, 2], TypeError, "state_dict must be a mapping"),
    ]
    snapshot = copy.deepcopy(opt.state_dict())
    p_before = {k: v.copy() for k, v in params.items()}
    for sd, err, msg in cases:
        with pytest.raises(err, match=msg):
            opt.load_state_dict(sd)
        after = opt.state_dict()
        assert after["hyper"] == snapshot["hyper"]
        for k in snapshot["state"]:
            for b, v in snapshot["state"][k].items():
                np.testing.assert_array_equal(after["state"][k][b], v)
    for k in params:
        np.testing.assert_array_equal(params[k], p_before[k])


@pytest.mark.parametrize("make, err, msg", [
    (lambda p: SGD(p, lr=-0.1), ValueError, "lr must be >= 0.0, got -0.1"),
    (lambda p: SGD(p, lr="0.1"), TypeError, "lr must be a real number, got str"),
    (lambda p: SGD(p, nesterov=True), ValueError, "nesterov=True needs momentum > 0 and dampening == 0"),
    (lambda p: SGD(p, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening == 0"),
    (lambda p: SGD(p, nesterov=1), TypeError, "nesterov must be a bool"),
    (lambda p: Adam(p, betas=0.9), TypeError, r"betas must be a pair \(beta1, beta2\), got 0.9"),
    (lambda p: Adam(p, betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be in \[0.0, 1.0\), got 1.0"),
    (lambda p: Adam(p, eps=-1), ValueError, "eps must be >= 0.0, got -1.0"),
    (lambda p: AdamW(p, weight_decay=float("nan")), ValueError, "weight_decay must be >= 0.0, got nan"),
    (lambda p: Adam([p["w"]]), TypeError, "params must be a mapping of name -> np.ndarray, got list"),
    (lambda p: Adam({}), ValueError, "params must not be empty"),
    (lambda p: Adam({"w": [1.0, 2.0]}), TypeError, r"params\['w'\] must be an np.ndarray \(updated in place\), got list"),
    (lambda p: Adam({"w": np.zeros(2, int)}), TypeError, r"params\['w'\] must have dtype float32 or float64, got int64"),
    (lambda p: Adam({"a": p["w"], "b": p["w"]}), ValueError, r"params\['b'\] is the same array as params\['a'\]"),
    (lambda p: Adam({1: p["w"]}), TypeError, "params keys must be str"),
])
def test_constructor_bad_input(make, err, msg):
    with pytest.raises(err, match=msg):
        make({"w": np.zeros(3)})


def test_model_object_hint_and_readonly_param():
    class Model:
        def named_parameters(self):
            return {}
    with pytest.raises(TypeError, match=r"pass model.named_parameters\(\)"):
        SGD(Model())
    w = np.zeros(3)
    w.flags.writeable = False
    with pytest.raises(ValueError, match="must be writeable"):
        SGD({"w": w})


@pytest.mark.parametrize("grads, err, msg", [
    ({"w": np.zeros((3, 4)), "extra": np.zeros(1)}, ValueError, r"grads has name\(s\) that are not parameters: \['extra'\]"),
    ({"w": np.zeros((4, 3))}, ValueError, r"grads\['w'\] must have shape \(3, 4\) \(the parameter's\), got \(4, 3\)"),
    ({"w": np.zeros((3, 4), np.float32)}, TypeError, r"grads\['w'\] must have dtype float64 \(the parameter's\), got float32"),
    ({"w": [[0.0] * 4] * 3}, TypeError, r"grads\['w'\] must be an np.ndarray, got list"),
    ([np.zeros((3, 4))], TypeError, "grads must be a mapping"),
])
def test_step_bad_grads_change_nothing(grads, err, msg):
    rng = np.random.default_rng(5)
    params = _params(rng)
    before = {k: v.copy() for k, v in params.items()}
    opt = Adam(params)
    good_b = {"b": np.ones(4)}
    with pytest.raises(err, match=msg):
        opt.step({**good_b, **grads} if isinstance(grads, dict) else grads)
    for k in params:  # b came first in the dict and was valid: still untouched
        np.testing.assert_array_equal(params[k], before[k])
    assert opt.state == {}


# ---------------------------------------------------------------- clipping

def test_clip_grad_norm_matches_torch_and_returns_pre_clip_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    for max_norm, norm_type in [(0.5, 2.0), (100.0, 2.0), (0.3, math.inf)]:
        grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "c": None}
        ts = [torch.tensor(grads["a"]), torch.tensor(grads["b"])]
        params = [torch.zeros_like(t, requires_grad=True) for t in ts]
        for p, t in zip(params, ts):
            p.grad = t.clone()
        want = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type).item()
        a_obj = grads["a"]
        got = clip_grad_norm(grads, max_norm, norm_type=norm_type)
        assert grads["a"] is a_obj  # in place
        assert got == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(grads["a"], params[0].grad.numpy(), rtol=1e-12)
        np.testing.assert_allclose(grads["b"], params[1].grad.numpy(), rtol=1e-12)


def test_clip_grad_norm_by_hand_and_float32():
    g = {"x": np.array([3.0, 4.0], np.float32)}
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert g["x"].dtype == np.float32
    np.testing.assert_allclose(g["x"], [0.6, 0.8], rtol=1e-5)
    g = {"x": np.array([0.3, 0.4])}
    assert clip_grad_norm(g, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(g["x"], [0.3, 0.4])  # under the limit: untouched
    assert clip_grad_norm({}, 1.0) == 0.0


def test_clip_grad_norm_nonfinite():
    g = {"x": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(g, 1.0))
    assert np.isnan(g["x"]).all()
    with pytest.raises(ValueError, match="total norm of the gradients is inf"):
        clip_grad_norm({"x": np.array([np.inf, 1.0])}, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("args, err, msg", [
    (([np.zeros(2)], 1.0), TypeError, "grads must be a mapping"),
    (({"x": np.zeros(2)}, -1.0), ValueError, "max_norm must be >= 0.0, got -1.0"),
    (({"x": np.zeros(2)}, 1.0, 1.0), ValueError, "norm_type must be 2.0 or inf, got 1.0"),
    (({"x": np.zeros(2, int)}, 1.0), TypeError, r"grads\['x'\] must be a float32 or float64 array, got int64"),
])
def test_clip_grad_norm_bad_input(args, err, msg):
    with pytest.raises(err, match=msg):
        clip_grad_norm(*args)


# ---------------------------------------------------------------- schedules

def _lrs(sched, n):
    out = [sched.optimizer.lr]
    for _ in range(n):
        out.append(sched.step())
        assert sched.get_lr() == sched.optimizer.lr == out[-1]
    return out


def test_step_lr():
    opt = SGD({"x": np.zeros(1)}, lr=1.0)
    np.testing.assert_allclose(_lrs(StepLR(opt, step_size=2, gamma=0.5), 5),
                               [1, 1, 0.5, 0.5, 0.25, 0.25])


def test_cosine_matches_formula_and_stays_at_eta_min():
    opt = SGD({"x": np.zeros(1)}, lr=0.1)
    lrs = _lrs(CosineAnnealingLR(opt, T_max=4, eta_min=0.01), 6)
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * min(t, 4) / 4)) / 2 for t in range(7)]
    np.testing.assert_allclose(lrs, want, rtol=1e-15)


@pytest.mark.parametrize("cls, kw", [(StepLR, dict(step_size=3, gamma=0.7)),
                                     (CosineAnnealingLR, dict(T_max=10, eta_min=0.001))])
def test_schedules_match_torch(cls, kw):
    torch = pytest.importorskip("torch")
    opt = SGD({"x": np.zeros(1)}, lr=0.1)
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], lr=0.1)
    tsched = getattr(torch.optim.lr_scheduler, cls.__name__)(topt, **kw)
    ours = _lrs(cls(opt, **kw), 10)
    theirs = [tsched.get_last_lr()[0]]
    for _ in range(10):
        topt.step()
        tsched.step()
        theirs.append(tsched.get_last_lr()[0])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_linear_warmup_then_cosine_and_constant():
    opt = SGD({"x": np.zeros(1)}, lr=0.2)
    sched = LinearWarmup(opt, warmup_steps=4, after=CosineAnnealingLR(opt, T_max=4))
    lrs = _lrs(sched, 9)
    np.testing.assert_allclose(lrs[:5], [0.0, 0.05, 0.1, 0.15, 0.2])
    np.testing.assert_allclose(lrs[4:], [0.2 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)] + [0.0],
                               atol=1e-15)
    opt = SGD({"x": np.zeros(1)}, lr=1.0)
    np.testing.assert_allclose(_lrs(LinearWarmup(opt, 2, start_factor=0.5), 3), [0.5, 0.75, 1, 1])


def test_schedule_state_dict_resumes():
    def make():
        opt = Adam({"x": np.zeros(1)}, lr=0.3)
        return opt, LinearWarmup(opt, 3, after=StepLR(opt, 2, gamma=0.5), start_factor=0.1)
    opt, sched = make()
    full = _lrs(sched, 10)
    opt, sched = make()
    _lrs(sched, 4)
    sd = copy.deepcopy(sched.state_dict())
    opt2, sched2 = make()
    sched2.load_state_dict(sd)
    assert opt2.lr == full[4]
    assert _lrs(sched2, 6) == full[4:]


def test_schedule_bad_input_and_bad_state():
    opt = SGD({"x": np.zeros(1)}, lr=0.1)
    with pytest.raises(ValueError, match="step_size must be >= 1, got 0"):
        StepLR(opt, 0)
    with pytest.raises(TypeError, match="T_max must be an int, got float"):
        CosineAnnealingLR(opt, 2.5)
    with pytest.raises(ValueError, match=r"start_factor must be in \[0.0, 1.0\], got 2.0"):
        LinearWarmup(opt, 3, start_factor=2)
    with pytest.raises(TypeError, match="optimizer must have an lr attribute"):
        StepLR(object(), 1)
    with pytest.raises(TypeError, match="after must be None or an LRSchedule"):
        LinearWarmup(opt, 3, after="cosine")
    other = SGD({"y": np.zeros(1)}, lr=0.1)
    with pytest.raises(ValueError, match="after must be a schedule of the same optimizer"):
        LinearWarmup(opt, 3, after=StepLR(other, 2))
    sched = StepLR(opt, 2)
    sched.step()
    good = sched.state_dict()
    for bad, err, msg in [
        ({**good, "type": "CosineAnnealingLR"}, ValueError, "schedule state_dict is for 'CosineAnnealingLR'"),
        ({**good, "gamma": -1.0}, ValueError, "gamma must be >= 0.0, got -1.0"),
        ({**good, "last_step": "3"}, TypeError, "last_step'\\] must be an int"),
        ({k: v for k, v in good.items() if k != "gamma"}, ValueError, "must have keys"),
    ]:
        with pytest.raises(err, match=msg):
            sched.load_state_dict(bad)
        assert sched.state_dict() == good


def test_clip_grad_norm_refuses_the_same_array_twice():
    g = np.full(4, 3.0)
    with pytest.raises(ValueError, match=r"grads\['b'\] is the same array as grads\['a'\]"):
        clip_grad_norm({"a": g, "b": g}, 1.0)
    assert np.array_equal(g, np.full(4, 3.0))  # nothing scaled
