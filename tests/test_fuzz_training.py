"""Fuzzing the training pieces: losses, optimizers and schedules, data utilities, checkpoints.

Valid random calls (shapes with 0 and 1 in every dimension, both float dtypes, views,
read-only arrays, Python lists) are checked against plain NumPy computations written here,
straight from each docstring. Bad calls must raise TypeError/ValueError naming the
argument (CheckpointError for a damaged file) and change nothing.

The default run uses a few examples per test; the long run (tools/fuzz_long.sh) sets
RNNFUSE_FUZZ_EXAMPLES, the variable test_reliability.py reads.
"""
import copy
import hashlib
import json
import math
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnnfuse import checkpoint, data, losses, optim
from rnnfuse.checkpoint import CheckpointError
from layouts import relayout  # tests/layouts.py

FUZZ_EXAMPLES = int(os.environ.get("RNNFUSE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                derandomize="RNNFUSE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [np.float32, np.float64]
SEEDS = st.integers(0, 2**32 - 1)
# NaN/inf inputs and the complex->real casts some cases ask for warn, as NumPy does
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")]


# ---------------------------------------------------------------- helpers

LAYOUTS = st.sampled_from(["C", "F", "strided", "negative", "readonly"])


def snapshot(*objs):
    return copy.deepcopy(objs if len(objs) > 1 else objs[0])


def assert_same(a, b, what=""):
    """Equal structure, types, dtypes and bits (NaN payloads and -0.0 included)."""
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), what  # C order, any layout
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{what}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, float):
        same_bits = struct.pack("<d", a) == struct.pack("<d", b)
        assert same_bits or (math.isnan(a) and math.isnan(b)), what  # JSON keeps no NaN payload
    else:
        assert a == b, f"{what}: {a!r} vs {b!r}"


def assert_untouched(obj, before, what="arguments"):
    """Every numeric array in obj (nested in lists, tuples, dicts) has its old bits."""
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        assert obj.dtype == before.dtype and obj.shape == before.shape, what
        assert obj.tobytes() == before.tobytes(), f"{what} was modified"
    elif isinstance(obj, (list, tuple)):
        for i, (x, y) in enumerate(zip(obj, before)):
            assert_untouched(x, y, f"{what}[{i}]")
    elif isinstance(obj, dict):
        for k in obj:
            assert_untouched(obj[k], before[k], f"{what}[{k!r}]")


def storable(value, dtype):
    try:
        np.array(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def assert_close(got, want, atol, what):
    """got (the library's, in its own dtype) against want (float64): NaN where want is NaN,
    the same infinities, finite values within atol."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)],
                                  err_msg=f"{what}: inf")
    err = np.abs(got[fin] - want[fin])
    assert err.size == 0 or err.max() <= atol, f"{what}: error {err.max():.3g} > {atol:.3g}"


def refused(call, names, exc=(TypeError, ValueError)):
    """call() raises one of exc whose message names one of `names`."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert any(n in msg for n in names), f"message names none of {names}: {msg!r}"
    return msg


BAD_ARRAYS = {  # values of a wrong kind where a float array is required
    "None": None, "str": "abc", "bytes": b"xy", "dict": {}, "object()": object(),
    "ragged": [[1.0], [1.0, 2.0]], "ints": [[1, 2], [3, 4]], "bools": [[True]],
}


# ---------------------------------------------------------------- losses: plain references

def mask_of(lengths, T, B):
    return np.arange(T)[:, None] < np.asarray(lengths, dtype=np.int64)[None, :]


def ce_reference(logits, targets, lengths, reduction):
    """Token by token, from the definition: -log softmax(z)[y], gradient softmax - onehot."""
    z = np.array(logits, dtype=np.float64)
    t = np.asarray(targets).astype(np.int64)
    real = np.ones(t.shape, bool) if lengths is None else mask_of(lengths, *t.shape)
    loss, grad = 0.0, np.zeros_like(z)
    with np.errstate(invalid="ignore"):
        for idx in zip(*np.nonzero(real)):
            row = z[idx]
            m = row.max()
            p = np.exp(row - m)
            loss += m + np.log(p.sum()) - row[t[idx]]
            grad[idx] = p / p.sum()
            grad[idx + (t[idx],)] -= 1
    n = int(real.sum())
    div = n if reduction == "mean" and n else 1
    return loss / div, grad / div, real


def mse_reference(pred, target, lengths, reduction):
    p = np.array(pred, dtype=np.float64)
    t = np.asarray(target).astype(np.asarray(pred).dtype).astype(np.float64)  # documented cast
    with np.errstate(invalid="ignore"):
        d = p - t
    if lengths is not None:
        real = mask_of(lengths, *p.shape[:2]).reshape(p.shape[:2] + (1,) * (p.ndim - 2))
        real = np.broadcast_to(real, p.shape)
        d = np.where(real, d, 0.0)
        n = int(real.sum())
    else:
        n = d.size
    div = n if reduction == "mean" and n else 1
    return float(np.sum(d * d)) / div, 2 * d / div


INT_KINDS = ["list", "int64", "int32", "int16", "uint8", "uint64"]


def int_container(values, kind):
    values = np.asarray(values, dtype=np.int64)
    if kind == "list":
        return values.tolist() if values.size else values  # [] would be float64: use the array
    return values.astype(kind)


# ---------------------------------------------------------------- losses: valid calls

@st.composite
def ce_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    seq = draw(st.booleans())
    T, B, V = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(1, 5))
    shape = (T, B, V) if seq else (B, V)
    rng = np.random.default_rng(draw(SEEDS))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))  # 1e4: exp overflows without log-sum-exp
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    targets = rng.integers(0, V, shape[:-1])
    lengths = None
    if seq and draw(st.booleans()):
        lengths = rng.integers(0, T + 1, B)
        pad = ~mask_of(lengths, T, B)
        targets[pad] = draw(st.sampled_from([V, 1000]))       # ignored at padding steps
        logits[pad] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 7.0]))
        lengths = int_container(lengths, draw(st.sampled_from(INT_KINDS)))
    if logits.size and draw(st.integers(0, 5)) == 0:          # non-finite at a real step
        logits.flat[draw(st.integers(0, logits.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    targets = int_container(targets, draw(st.sampled_from(INT_KINDS)))
    if draw(st.booleans()):
        logits = relayout(logits, draw(LAYOUTS))
    elif dtype == np.float64 and logits.size and draw(st.booleans()):
        logits = logits.tolist()                              # Python floats are float64
    return dtype, logits, targets, lengths, draw(st.sampled_from(["mean", "sum"]))


@FUZZ
@given(case=ce_cases())
def test_fuzz_cross_entropy_matches_numpy(case):
    dtype, logits, targets, lengths, reduction = case
    before = snapshot(logits, targets, lengths)
    loss, grad = losses.cross_entropy(logits, targets, lengths, reduction=reduction)
    assert_same((logits, targets, lengths), before, "inputs")  # never modified
    want_loss, want_grad, real = ce_reference(logits, targets, lengths, reduction)
    assert type(loss) is dtype and isinstance(grad, np.ndarray) and grad.dtype == dtype
    z = np.asarray(logits, np.float64)
    zr = z[real]
    zmax = float(np.max(np.abs(zr[np.isfinite(zr)]), initial=0.0))  # the scale of the error
    tol = (1e-5 if dtype == np.float32 else 1e-12) * (1 + 2 * zmax)
    n = max(int(real.sum()), 1)
    assert_close(loss, np.float64(want_loss), tol * (n if reduction == "sum" else 1), "loss")
    assert_close(grad, want_grad, 1e-5 if dtype == np.float32 else 1e-12, "grad")
    assert not np.any(grad[~real]), "padding steps must get a zero gradient"


@st.composite
def mse_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    with_lengths = draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=2 if with_lengths else 0,
                                max_size=4)))
    rng = np.random.default_rng(draw(SEEDS))
    pred = np.asarray(rng.standard_normal(shape)).astype(dtype)
    target_dtype = draw(st.sampled_from(["same", "float32", "float64", "int32", "uint8", "bool"]))
    target = np.asarray(3 * rng.standard_normal(shape))
    target = target.astype(dtype if target_dtype == "same" else target_dtype)
    lengths = None
    if with_lengths:
        T, B = shape[:2]
        lengths = rng.integers(0, T + 1, B)
        pad = ~mask_of(lengths, T, B)
        pred[pad] = draw(st.sampled_from([np.nan, np.inf, 5.0]))  # ignored at padding steps
        if target.dtype.kind == "f":
            target[pad] = np.nan
        lengths = int_container(lengths, draw(st.sampled_from(INT_KINDS)))
    if pred.size and draw(st.integers(0, 5)) == 0:
        pred.flat[draw(st.integers(0, pred.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    pred = relayout(pred, draw(LAYOUTS))
    if draw(st.booleans()):
        target = relayout(target, draw(LAYOUTS))
    elif target.size and draw(st.booleans()):
        target = target.tolist()
    return dtype, pred, target, lengths, draw(st.sampled_from(["mean", "sum"]))


@FUZZ
@given(case=mse_cases())
def test_fuzz_mse_matches_numpy(case):
    dtype, pred, target, lengths, reduction = case
    before = snapshot(pred, target, lengths)
    loss, grad = losses.mse_loss(pred, target, lengths, reduction=reduction)
    assert_same((pred, target, lengths), before, "inputs")
    want_loss, want_grad = mse_reference(pred, target, lengths, reduction)
    assert type(loss) is dtype and grad.dtype == dtype and grad.shape == np.shape(pred)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_close(loss, np.float64(want_loss), rtol * (1 + abs(want_loss)), "loss")
    scale = float(np.max(np.abs(want_grad[np.isfinite(want_grad)]), initial=0.0))
    assert_close(grad, want_grad, rtol * (1 + scale), "grad")


# ---------------------------------------------------------------- losses: bad calls

def bad_float_arrays(good):
    vals = dict(BAD_ARRAYS)
    vals.update({t: good.astype(t) for t in ("float16", "int64", "int8", "bool", "complex64",
                                             "complex128", "longdouble", "object")})
    vals["scalar"] = 1.5
    return vals


@FUZZ
@given(seq=st.booleans(), T=st.integers(1, 3), B=st.integers(1, 3), V=st.integers(1, 4),
       dtype=st.sampled_from(FLOATS), data_=st.data(),
       slot=st.sampled_from(["logits", "targets", "lengths", "reduction"]))
def test_fuzz_cross_entropy_refuses_bad_arguments(seq, T, B, V, dtype, data_, slot):
    rng = np.random.default_rng(T * 100 + B * 10 + V)
    logits = rng.standard_normal((T, B, V) if seq else (B, V)).astype(dtype)
    targets = rng.integers(0, V, logits.shape[:-1])
    args = {"logits": logits, "targets": targets, "lengths": None, "reduction": "mean"}
    if slot == "logits":
        bad = dict(bad_float_arrays(logits), rank1=logits.reshape(-1), rank4=logits[..., None],
                   no_classes=logits[..., :0])
        if not seq:
            bad["rank3_for_2d_targets"] = logits[None]
    elif slot == "targets":
        bad = {"float": targets.astype(np.float32), "bool": targets.astype(bool),
               "complex": targets.astype(complex), "object": targets.astype(object),
               "None": None, "str": "ab", "extra_axis": targets[..., None],
               "flat": targets.reshape(-1)[:-1] if targets.size > 1 else targets[..., None],
               "negative": np.where(targets == targets.flat[0], -1, targets),
               "too_big": np.full_like(targets, V),
               "huge": np.full(targets.shape, 2**63, np.uint64)}
    elif slot == "lengths":
        bad = {"negative": np.full(B, -1), "too_long": np.full(B, T + 1),
               "float": np.full(B, 1.0), "bool": np.ones(B, bool), "2d": np.ones((1, B), int),
               "short": np.ones(B + 1, int), "str": "1", "none_list": [None] * B,
               "huge": np.full(B, 2**64 - 1, np.uint64)}
        if not seq:
            bad = {"for_2d_logits": np.ones(B, int)}
    else:
        bad = {"avg": "avg", "None": None, "int": 1, "upper": "MEAN"}
    key = data_.draw(st.sampled_from(sorted(bad)))
    args[slot] = bad[key]
    before = snapshot(args)
    refused(lambda: losses.cross_entropy(args["logits"], args["targets"], args["lengths"],
                                         reduction=args["reduction"]), [slot])
    assert_untouched(args, before)


@FUZZ
@given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=3), dtype=st.sampled_from(FLOATS),
       data_=st.data(), slot=st.sampled_from(["pred", "target", "lengths", "reduction"]))
def test_fuzz_mse_refuses_bad_arguments(shape, dtype, data_, slot):
    rng = np.random.default_rng(sum(shape))
    pred = rng.standard_normal(shape).astype(dtype)
    args = {"pred": pred, "target": pred.copy(), "lengths": None, "reduction": "sum"}
    if slot == "pred":
        bad = dict(bad_float_arrays(pred))
    elif slot == "target":
        bad = {"complex": pred.astype(complex), "object": pred.astype(object), "None": None,
               "str": "ab", "strings": pred.astype(str), "shape": pred[..., None],
               "transposed": pred.T if pred.shape != pred.T.shape else pred[:1, :0],
               "dict": {}, "datetime": np.zeros(shape, "datetime64[s]")}
    elif slot == "lengths":
        T, B = shape[:2]
        bad = {"negative": np.full(B, -1), "too_long": np.full(B, T + 1),
               "float": np.full(B, 1.0), "bool": np.ones(B, bool), "short": np.ones(B + 1, int),
               "1d_pred": "1d"}
    else:
        bad = {"avg": "avg", "None": None, "bytes": b"sum"}
    key = data_.draw(st.sampled_from(sorted(bad)))
    if key == "1d_pred":  # lengths need (T, B, ...)
        args.update(pred=pred.reshape(-1), target=pred.reshape(-1), lengths=[1] * shape[1])
        slot = "pred"
    else:
        args[slot] = bad[key]
    before = snapshot(args)
    refused(lambda: losses.mse_loss(args["pred"], args["target"], args["lengths"],
                                    reduction=args["reduction"]), [slot])
    assert_untouched(args, before)


# ---------------------------------------------------------------- optimizers: references

def sgd_reference(p, g, s, h):
    """torch.optim.SGD, as optim.SGD's docstring states it."""
    g = g + h["weight_decay"] * p
    if h["momentum"]:
        s["buf"] = (g.copy() if "buf" not in s
                    else h["momentum"] * s["buf"] + (1 - h["dampening"]) * g)
        g = g + h["momentum"] * s["buf"] if h["nesterov"] else s["buf"]
    return p - h["lr"] * g


def adam_reference(p, g, s, h, decoupled):
    """torch.optim.Adam / AdamW, as optim.Adam's docstring states it."""
    b1, b2 = h["betas"]
    if decoupled:
        p = p * (1 - h["lr"] * h["weight_decay"])
    else:
        g = g + h["weight_decay"] * p
    s["t"] = t = s.get("t", 0) + 1
    s["m"] = s.get("m", 0 * p) + (1 - b1) * (g - s.get("m", 0 * p))
    s["v"] = b2 * s.get("v", 0 * p) + (1 - b2) * g * g
    return p - h["lr"] / (1 - b1 ** t) * s["m"] / (np.sqrt(s["v"]) / math.sqrt(1 - b2 ** t)
                                                   + h["eps"])


def number(draw, low, high):
    """A real number of a random Python/NumPy type, in [low, high]."""
    x = draw(st.floats(low, high))
    kind = draw(st.sampled_from(["float", "np64", "np32", "int"]))
    if kind == "int" and float(int(x)) == x:
        return int(x)
    if kind == "np32" and float(np.float32(x)) == x:
        return np.float32(x)
    return np.float64(x) if kind == "np64" else x


@st.composite
def optimizers(draw):
    kind = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    h = {"lr": number(draw, 0, 1), "weight_decay": number(draw, 0, 0.5)}
    if kind == "SGD":
        h["momentum"] = draw(st.sampled_from([0.0, number(draw, 0, 0.99)]))
        h["nesterov"] = bool(h["momentum"] > 0 and draw(st.booleans()))
        h["dampening"] = 0.0 if h["nesterov"] else number(draw, 0, 1)
    else:
        h["betas"] = (number(draw, 0, 0.99), number(draw, 0, 0.999))
        h["eps"] = draw(st.sampled_from([1e-8, 1e-3, 0.0])) if h["lr"] else 1e-8
    return kind, h


@st.composite
def param_dicts(draw, min_size=1):
    rng = np.random.default_rng(draw(SEEDS))
    params = {}
    for i in range(draw(st.integers(min_size, 4))):
        shape = draw(st.lists(st.integers(0, 3), max_size=3))  # 0-d and 0-size too
        dtype = draw(st.sampled_from(FLOATS))
        params[f"w{i}"] = np.array(rng.standard_normal(shape), dtype=dtype)
    return params


def random_grads(draw, params, rng):
    """name -> gradient (any layout, maybe read-only), None, or missing."""
    grads = {}
    for k, p in params.items():
        what = draw(st.sampled_from(["grad", "grad", "grad", "None", "missing"]))
        if what == "missing":
            continue
        g = (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-6, 3)).astype(p.dtype)
        grads[k] = None if what == "None" else relayout(np.asarray(g), draw(LAYOUTS))
    return grads


def state_of(opt):
    return copy.deepcopy(opt.state_dict())


@FUZZ
@given(spec=optimizers(), params=param_dicts(), steps=st.integers(1, 3), data_=st.data())
def test_fuzz_optimizer_steps_match_numpy(spec, params, steps, data_):
    kind, h = spec
    opt = getattr(optim, kind)(params, **h)
    # in each parameter's dtype, as the optimizer works: a float64 reference would differ by
    # more than rounding where Adam's m += (1 - beta1) * (g - m) cancels in float32
    ref = {k: p.copy() for k, p in params.items()}
    ref_state = {k: {} for k in params}
    hf = {k: (tuple(map(float, v)) if k == "betas" else v if k == "nesterov" else float(v))
          for k, v in h.items()}  # Python floats, as the optimizers store them
    rng = np.random.default_rng(data_.draw(SEEDS))
    arrays, counts = dict(params), dict.fromkeys(params, 0)
    for _ in range(steps):
        grads = random_grads(data_.draw, params, rng)
        before = snapshot(grads)
        opt.step(grads)
        assert_same(grads, before, "grads")  # never modified
        for k, g in grads.items():
            if g is None:  # skipped, as a missing name: no state either
                continue
            counts[k] += 1
            g = np.array(g)
            ref[k] = (sgd_reference(ref[k], g, ref_state[k], hf) if kind == "SGD" else
                      adam_reference(ref[k], g, ref_state[k], hf, kind == "AdamW"))
    for k, p in params.items():
        assert p is arrays[k] and p.dtype == arrays[k].dtype  # updated in place
        want = np.asarray(ref[k], np.float64)
        assert_close(p, want, (1e-5 if p.dtype == np.float32 else 1e-12)
                     * (1 + float(np.max(np.abs(want[np.isfinite(want)]), initial=0))), k)
        assert (k in opt.state) == (counts[k] > 0), k
        assert opt.state.get(k, {}).get("step", 0) == counts[k], k

    # a fresh optimizer over copies, loaded from state_dict, takes bitwise the same next step
    twins = {k: p.copy() for k, p in params.items()}
    twin = getattr(optim, kind)(twins, lr=0.5)
    twin.load_state_dict(opt.state_dict())
    grads = random_grads(data_.draw, params, rng)
    opt.step(grads)
    twin.step(grads)
    assert_same(twins, dict(params), "resumed step")


def test_sgd_momentum_of_a_0d_parameter_with_weight_decay():
    # regression: for a 0-d p, g + weight_decay * p is a NumPy scalar, so the momentum
    # buffer was one too; `buf *= momentum` then rebound a local and the stored buffer
    # never moved
    p, want, state = np.array(1.0), np.float64(1.0), {}
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False)
    opt = optim.SGD({"p": p}, **h)
    for g in (1.0, -2.0, 0.5):
        opt.step({"p": np.array(g)})
        want = sgd_reference(want, np.float64(g), state, h)
    assert isinstance(opt.state["p"]["momentum_buffer"], np.ndarray)
    assert p == want


BAD_NUMBERS = [-1, -1e-9, float("nan"), float("-inf"), True, np.bool_(False), "0.1", None,
               1 + 1j, [0.1], np.array([0.1]), 10**400, object()]


@FUZZ
@given(spec=optimizers(), params=param_dicts(), data_=st.data())
def test_fuzz_optimizer_refuses_bad_hyperparameters(spec, params, data_):
    kind, h = spec
    cls = getattr(optim, kind)
    name = data_.draw(st.sampled_from(sorted(h)))
    if name == "betas":
        bad = data_.draw(st.sampled_from(
            [(1.0, 0.9), (0.9, 1.0), (0.9,), (0.9, 0.99, 0.9), 0.9, "ab", None,
             np.array([0.9, 0.99]), (float("nan"), 0.9), (-0.1, 0.9), (0.9, True), {}]))
    elif name == "nesterov":
        bad = data_.draw(st.sampled_from([1, "yes", None, 0.0]))
    else:
        bad = data_.draw(st.sampled_from(BAD_NUMBERS))
    refused(lambda: cls(params, **dict(h, **{name: bad})), [name])
    # on a live optimizer, a bad lr is refused and the old one stays
    opt = cls(params, **h)
    if name == "lr":
        refused(lambda: setattr(opt, "lr", bad), ["lr"])
        assert opt.lr == float(h["lr"])
    if kind == "SGD" and h["momentum"] == 0 and name == "nesterov":
        refused(lambda: cls(params, **dict(h, nesterov=True)), ["nesterov"])


@FUZZ
@given(spec=optimizers(), params=param_dicts(), data_=st.data())
def test_fuzz_refused_step_changes_nothing(spec, params, data_):
    kind, h = spec
    opt = getattr(optim, kind)(params, **h)
    rng = np.random.default_rng(data_.draw(SEEDS))
    opt.step(random_grads(data_.draw, params, rng))  # some state first
    grads = {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}
    name = data_.draw(st.sampled_from(sorted(params)))
    p = params[name]
    bad = {"extra name": ("other", p), "list": (name, p.tolist()),
           "scalar": (name, 1.0), "int dtype": (name, p.astype(np.int64)),
           "float16": (name, p.astype(np.float16)),
           "other float": (name, p.astype(np.float32 if p.dtype == np.float64 else np.float64)),
           "complex": (name, p.astype(complex)), "object": (name, p.astype(object)),
           "extra axis": (name, p[..., None]), "string": (name, "g")}
    if p.ndim:
        bad["transposed or cut"] = (name, p.T if p.T.shape != p.shape else p[:0] if len(p)
                                    else np.zeros((1,) + p.shape[1:], p.dtype))
    what = data_.draw(st.sampled_from(sorted(bad)))
    key, value = bad[what]
    grads[key] = value
    params_before, state_before = snapshot(params), state_of(opt)
    refused(lambda: opt.step(grads), ["grads"])
    assert_same(params, params_before, "params after a refused step")
    assert_same(state_of(opt), state_before, "state after a refused step")
    for not_a_mapping in ([grads[name]], None, np.zeros(2), "grads"):
        refused(lambda: opt.step(not_a_mapping), ["grads"])
    assert_same(params, params_before, "params after a refused step")


@FUZZ
@given(spec=optimizers(), params=param_dicts(), data_=st.data())
def test_fuzz_optimizer_refuses_bad_state_dicts(spec, params, data_):
    """load_state_dict with one wrong entry: refused, and the optimizer unchanged."""
    kind, h = spec
    opt = getattr(optim, kind)(params, **h)
    rng = np.random.default_rng(data_.draw(SEEDS))
    opt.step({k: np.array(rng.standard_normal(p.shape), p.dtype) for k, p in params.items()})
    sd = opt.state_dict()
    name = data_.draw(st.sampled_from(sorted(params)))
    p = params[name]
    where = data_.draw(st.sampled_from(["top", "type", "hyper", "state", "param", "step",
                                        "buffer"]))
    if where == "top":
        key = data_.draw(st.sampled_from(sorted(sd) + ["extra"]))
        if key in sd:
            del sd[key]
        else:
            sd[key] = 1
    elif where == "type":
        sd["type"] = data_.draw(st.sampled_from(["Other", None, 3, "SGD" if kind != "SGD" else
                                                 "Adam", "adam"]))
    elif where == "hyper":
        key = data_.draw(st.sampled_from(sorted(sd["hyper"]) + ["momentum_x", "all"]))
        if key == "all":
            sd["hyper"] = data_.draw(st.sampled_from([None, [], "lr"]))
        elif key not in sd["hyper"]:
            sd["hyper"][key] = 0.1
        elif key == "nesterov":
            sd["hyper"][key] = data_.draw(st.sampled_from([1, "yes", None]))
        elif key == "betas":
            sd["hyper"][key] = data_.draw(st.sampled_from([[1.0, 0.9], [0.9], None, "ab"]))
        else:
            sd["hyper"][key] = data_.draw(st.sampled_from(BAD_NUMBERS))
    elif where == "state":
        sd["state"] = data_.draw(st.sampled_from([None, [], {"nope": {"step": 1}},
                                                  {name: None}, {name: []}]))
    elif where == "param":
        sd["state"][name] = data_.draw(st.sampled_from([{}, {"step": 1, "other": p.copy()},
                                                        {"momentum": p.copy()}]))
    elif where == "step":
        sd["state"][name]["step"] = data_.draw(st.sampled_from([-1, 1.5, True, None, "3",
                                                                np.float64(1.0)]))
    else:
        buffers = [b for b in sd["state"][name] if b != "step"]
        if not buffers:  # SGD without momentum keeps only a step count
            sd["state"][name]["momentum_buffer"] = p.copy()
            sd["state"][name]["exp_avg"] = p.copy()
        else:
            other = np.float32 if p.dtype == np.float64 else np.float64
            sd["state"][name][data_.draw(st.sampled_from(buffers))] = data_.draw(st.sampled_from(
                [None, p.tolist(), p.astype(other), p[..., None], p.astype(complex), 1.0,
                 p.reshape(-1)[:0] if p.size else np.zeros(1, p.dtype)]))
    before, lr = state_of(opt), opt.lr
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(sd)
    assert_same(state_of(opt), before, "optimizer after a refused load")
    assert opt.lr == lr


@FUZZ
@given(seed=SEEDS, data_=st.data(),
       bad=st.sampled_from(["missing", "extra", "epoch", "position", "rng"]))
def test_fuzz_batch_iterator_refuses_bad_state_and_goes_on(seed, data_, bad):
    seqs = [np.arange(L, dtype=np.float64) for L in (3, 1, 0, 2, 4)]
    make = lambda: data.BatchIterator(seqs, batch_size=2, seed=seed)  # noqa: E731
    it, twin = make(), make()
    for x in (it, twin):  # both a batch into the first epoch
        next(iter(x))
    sd = it.state_dict()
    if bad == "missing":
        del sd[data_.draw(st.sampled_from(sorted(sd)))]
    elif bad == "extra":
        sd["more"] = 0
    elif bad == "epoch":
        sd["epoch"] = data_.draw(st.sampled_from([-1, 1.5, True, None, "0"]))
    elif bad == "position":
        sd["position"] = data_.draw(st.sampled_from([-1, len(it) + 1, 2.0, None]))
    else:
        sd["rng"] = data_.draw(JSON_VALUES | st.sampled_from(
            [{"bit_generator": "MT19937"}, {**sd["rng"], "state": None},
             {**sd["rng"], "state": {"state": -1, "inc": 2**200}},
             {**sd["rng"], "state": {"state": "x", "inc": 1}}]))
    with pytest.raises((TypeError, ValueError)):
        it.load_state_dict(sd)
    a, b = list(it) + list(it), list(twin) + list(twin)  # both go on alike
    assert len(a) == len(b) and all(np.array_equal(u, v) for x, y in zip(a, b)
                                    for u, v in zip(x, y))


@FUZZ
@given(params=param_dicts(min_size=0), max_norm=st.floats(0, 10),
       norm_type=st.sampled_from([2, 2.0, math.inf]), data_=st.data())
def test_fuzz_clip_grad_norm_matches_numpy(params, max_norm, norm_type, data_):
    rng = np.random.default_rng(data_.draw(SEEDS))
    grads = {k: np.array(rng.standard_normal(p.shape) * 10.0 ** rng.integers(-3, 3), p.dtype)
             for k, p in params.items()}
    if grads and data_.draw(st.booleans()):
        grads[data_.draw(st.sampled_from(sorted(grads)))] = None
    live = {k: g for k, g in grads.items() if g is not None}
    want = {k: g.astype(np.float64) for k, g in live.items()}
    flat = np.concatenate([g.ravel() for g in want.values()] + [np.zeros(0)])
    norm = float(np.max(np.abs(flat), initial=0.0) if norm_type == math.inf
                 else np.sqrt(np.sum(flat * flat)))
    coef = max_norm / (norm + 1e-6)
    got = optim.clip_grad_norm(grads, max_norm, norm_type=norm_type)
    assert isinstance(got, float)
    assert math.isclose(got, norm, rel_tol=1e-5, abs_tol=1e-30), (got, norm)
    for k, g in live.items():
        expect = want[k] * min(coef, 1.0)
        assert_close(g, expect, 1e-5 * (1 + float(np.max(np.abs(expect), initial=0))), k)


@FUZZ
@given(params=param_dicts(), data_=st.data(),
       slot=st.sampled_from(["grads", "max_norm", "norm_type", "value"]))
def test_fuzz_clip_grad_norm_refuses_and_changes_nothing(params, data_, slot):
    grads = {k: np.array(p * 100) for k, p in params.items()}  # large: a valid call scales them
    args = {"grads": grads, "max_norm": 1.0, "norm_type": 2.0}
    if slot == "grads":
        args["grads"] = data_.draw(st.sampled_from([None, [np.ones(2)], np.ones(2), "g"]))
    elif slot == "max_norm":
        args["max_norm"] = data_.draw(st.sampled_from(BAD_NUMBERS))
    elif slot == "norm_type":
        args["norm_type"] = data_.draw(st.sampled_from([1, 0, "2", None, -2.0, float("nan")]))
    else:
        name = data_.draw(st.sampled_from(sorted(grads)))
        ro = grads[name].copy()
        ro.flags.writeable = False
        grads[name] = data_.draw(st.sampled_from(
            [grads[name].astype(np.int64), grads[name].astype(np.float16), grads[name].tolist(),
             grads[name].astype(complex), ro, "g"]))
        slot = "grads"
    before = snapshot(args)
    refused(lambda: optim.clip_grad_norm(args["grads"], args["max_norm"],
                                         norm_type=args["norm_type"]), [slot])
    assert_untouched(args, before)


# ---------------------------------------------------------------- schedules

def schedule_formula(kind, kw, base, after, step):
    """The closed forms in optim's docstrings (over Python floats, as the schedules store)."""
    kw = {k: (v if k in ("step_size", "T_max", "warmup_steps") else float(v))
          for k, v in kw.items()}
    if kind == "StepLR":
        with np.errstate(over="ignore"):
            return base * float(np.float64(kw["gamma"]) ** (step // kw["step_size"]))
    if kind == "CosineAnnealingLR":
        t = min(step, kw["T_max"])
        cos = math.cos(math.pi * t / kw["T_max"])
        return kw["eta_min"] + (base - kw["eta_min"]) * (1 + cos) / 2
    w, f = kw["warmup_steps"], kw["start_factor"]
    if step < w:
        return base * (f + (1 - f) * step / w)
    return base if after is None else schedule_formula(*after[:2], base, None, step - w)


@st.composite
def schedule_specs(draw, allow_warmup=True):
    kind = draw(st.sampled_from(["StepLR", "CosineAnnealingLR"]
                                + (["LinearWarmup"] if allow_warmup else [])))
    if kind == "StepLR":
        kw = {"step_size": draw(st.integers(1, 5)), "gamma": number(draw, 0, 2)}
    elif kind == "CosineAnnealingLR":
        kw = {"T_max": draw(st.integers(1, 8)), "eta_min": number(draw, 0, 0.5)}
    else:
        kw = {"warmup_steps": draw(st.integers(0, 5)), "start_factor": number(draw, 0, 1)}
    after = draw(schedule_specs(False)) if kind == "LinearWarmup" and draw(st.booleans()) else None
    return kind, kw, after


def build_schedule(opt, spec):
    kind, kw, after = spec
    cls = getattr(optim, kind)
    if kind == "LinearWarmup":
        return cls(opt, after=None if after is None else build_schedule(opt, after), **kw)
    return cls(opt, **kw)


@FUZZ
@given(spec=schedule_specs(), base=st.floats(0, 1), steps=st.integers(0, 12),
       more=st.integers(1, 6))
def test_fuzz_schedules_follow_their_formula_and_resume(spec, base, steps, more):
    opt = optim.SGD({"w": np.zeros(2)}, lr=base)
    sched = build_schedule(opt, spec)
    kind, kw, after = spec
    for step in range(steps + 1):
        want = schedule_formula(kind, kw, base, after, step)
        assert math.isclose(opt.lr, want, rel_tol=1e-12, abs_tol=1e-300), (step, opt.lr, want)
        assert sched.get_lr() == opt.lr
        if step < steps:
            assert sched.step() == opt.lr
    twin_opt = optim.SGD({"w": np.zeros(2)}, lr=0.123)
    twin = build_schedule(twin_opt, spec)
    twin.load_state_dict(copy.deepcopy(sched.state_dict()))
    assert twin_opt.lr == opt.lr
    for _ in range(more):
        assert twin.step() == sched.step()


@FUZZ
@given(spec=schedule_specs(), data_=st.data())
def test_fuzz_schedules_refuse_bad_parameters(spec, data_):
    kind, kw, after = spec
    opt = optim.SGD({"w": np.zeros(2)}, lr=0.1)
    name = data_.draw(st.sampled_from(sorted(kw)))
    if name in ("step_size", "T_max", "warmup_steps"):
        bad = data_.draw(st.sampled_from([-1, 1.5, True, None, "3", np.float64(2.0)]
                                         + ([0] if name != "warmup_steps" else [])))
    else:
        bad = data_.draw(st.sampled_from(BAD_NUMBERS + ([1.5] if name == "start_factor" else [])))
    refused(lambda: build_schedule(opt, (kind, dict(kw, **{name: bad}), after)), [name])
    # a state dict with a bad value is refused and the live schedule is unchanged
    sched = build_schedule(opt, spec)
    sd = sched.state_dict()
    before, lr = copy.deepcopy(sd), opt.lr
    sd[name] = bad
    with pytest.raises((TypeError, ValueError)):
        sched.load_state_dict(sd)
    assert_same(sched.state_dict(), before, "schedule after a refused load")
    assert opt.lr == lr


def test_step_lr_growing_past_the_float_range_gives_inf_not_an_exception():
    # regression: gamma > 1 over many steps raised OverflowError from sched.step()
    opt = optim.SGD({"w": np.zeros(2)}, lr=1.0)
    sched = optim.StepLR(opt, step_size=1, gamma=10.0)
    for _ in range(400):
        sched.step()
    assert opt.lr == math.inf
    zero = optim.StepLR(optim.SGD({"w": np.zeros(2)}, lr=0.0), step_size=1, gamma=1e300)
    for _ in range(3):
        assert zero.step() == 0.0


def test_huge_int_hyperparameter_is_a_value_error():
    # regression: float(10**400) raised OverflowError
    with pytest.raises(ValueError, match="lr"):
        optim.Adam({"w": np.zeros(2)}, lr=10**400)


# ---------------------------------------------------------------- data: pad, bucket, batch

@st.composite
def ragged(draw, min_size=1, max_len=5):
    """A list of sequences (L_i, *tail) of one dtype, maybe as lists or views."""
    rng = np.random.default_rng(draw(SEEDS))
    tail = tuple(draw(st.lists(st.integers(0, 2), max_size=2)))
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "int8", "bool", "float16",
                                  "complex64", "uint32"]))
    seqs = []
    for _ in range(draw(st.integers(min_size, 5))):
        L = draw(st.integers(0, max_len))
        a = np.asarray(rng.integers(-5, 100, (L,) + tail)).astype(dtype)
        form = draw(st.sampled_from(["array", "array", "view", "readonly", "list"]))
        if form == "list" and a.size:
            seqs.append(a.tolist())
        elif form in ("view", "readonly") and a.ndim > 1:
            seqs.append(relayout(a, "strided" if form == "view" else "readonly"))
        else:
            seqs.append(a)
    return seqs


@FUZZ
@given(seqs=ragged(), pad=st.sampled_from([0, -1, 7]), cast=st.sampled_from([None, "float64",
                                                                             "int32"]))
def test_fuzz_pad_sequences_round_trip(seqs, pad, cast):
    before = snapshot(seqs)
    arrays = [np.asarray(s) for s in seqs]
    if not storable(pad, np.result_type(*arrays) if cast is None else cast):  # -1 in uint32
        with pytest.raises(ValueError, match="padding_value"):
            data.pad_sequences(seqs, dtype=cast, padding_value=pad)
        return
    x, lengths = data.pad_sequences(seqs, dtype=cast, padding_value=pad)
    assert_same(seqs, before, "seqs")
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(a) for a in arrays]
    assert x.shape == (max(lengths), len(seqs)) + arrays[0].shape[1:]
    assert x.dtype == (np.result_type(*arrays) if cast is None else np.dtype(cast))
    for i, a in enumerate(arrays):  # unpadding gives the sequences back, padding is pad
        np.testing.assert_array_equal(x[:len(a), i], a.astype(x.dtype))
        assert np.all(x[len(a):, i] == np.asarray(pad).astype(x.dtype))


@FUZZ
@given(lengths=st.lists(st.integers(0, 9), max_size=12), batch_size=st.integers(1, 5),
       shuffle=st.booleans(), drop_last=st.booleans(), seed=SEEDS,
       kind=st.sampled_from(INT_KINDS))
def test_fuzz_bucket_by_length_partitions_by_length(lengths, batch_size, shuffle, drop_last,
                                                    seed, kind):
    arg = int_container(lengths, kind)
    batches = data.bucket_by_length(arg, batch_size, shuffle=shuffle, seed=seed,
                                    drop_last=drop_last)
    n = len(lengths)
    assert [len(b) for b in batches].count(batch_size) >= len(batches) - 1
    flat = np.concatenate(batches + [np.zeros(0, np.int64)])
    assert flat.dtype == np.int64 and len(set(flat.tolist())) == len(flat)  # each index once
    assert len(flat) == (n - n % batch_size if drop_last else n)
    # batches hold neighbours in length: ordered by their shortest, lengths never decrease
    L = np.asarray(lengths, dtype=np.int64)
    ordered = sorted(batches, key=lambda b: (L[b].min(), L[b].max(), -len(b)))
    seq = np.concatenate([L[b] for b in ordered] + [np.zeros(0, np.int64)])
    if not shuffle:
        seq = np.concatenate([L[b] for b in batches] + [np.zeros(0, np.int64)])
    assert np.all(np.diff(seq) >= 0)
    again = data.bucket_by_length(arg, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded


@FUZZ
@given(n=st.integers(1, 9), batch_size=st.integers(1, 4), shuffle=st.booleans(),
       drop_last=st.booleans(), bucket=st.booleans(), seed=SEEDS, data_=st.data())
def test_fuzz_batch_iterator_covers_each_sequence_and_resumes(n, batch_size, shuffle, drop_last,
                                                              bucket, seed, data_):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 5, n)
    seqs = [np.full((L, 2), i, np.float32) for i, L in enumerate(lens)]  # seq i holds i
    labels = np.arange(n) * 10
    steps = [np.arange(L) + 100 * i for i, L in enumerate(lens)]        # per-step targets
    make = lambda: data.BatchIterator(seqs, labels, steps, batch_size=batch_size,  # noqa: E731
                                      shuffle=shuffle, seed=seed, drop_last=drop_last,
                                      bucket=bucket, padding_value=-1)
    it = make()
    seen = []
    for epoch in range(2):
        batches = list(it)
        assert len(batches) == len(it) and it.epoch == epoch + 1
        ids = []
        for x, lengths, y, per_step in batches:
            idx = y // 10
            ids += idx.tolist()
            assert x.shape == (max(lengths, default=0), len(idx), 2) and x.dtype == np.float32
            np.testing.assert_array_equal(lengths, lens[idx])
            for b, i in enumerate(idx):
                assert np.all(x[:lens[i], b] == i) and np.all(x[lens[i]:, b] == -1)
                np.testing.assert_array_equal(per_step[:lens[i], b], steps[i])
        assert len(set(ids)) == len(ids) == (n - n % batch_size if drop_last else n)
        if not shuffle and not bucket:
            assert ids == list(range(len(ids)))
        seen.append(ids)
    # stop after a random number of batches; a restored iterator yields what the original would
    it = make()
    stop = data_.draw(st.integers(0, len(it)))
    for k, _ in enumerate(it):
        if k + 1 >= stop:
            break
    twin = make()
    twin.load_state_dict(copy.deepcopy(it.state_dict()))
    rest, twin_rest = list(it) + list(it), list(twin) + list(twin)
    assert len(rest) == len(twin_rest)
    for a, b in zip(rest, twin_rest):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert twin.epoch == it.epoch


@FUZZ
@given(data_=st.data(), fn=st.sampled_from(["pad_sequences", "BatchIterator", "bucket_by_length",
                                            "tbptt_windows"]))
def test_fuzz_data_functions_refuse_bad_inputs(data_, fn):
    good = [np.zeros((2, 3)), np.ones((1, 3))]
    bad_seqs = [None, "abc", np.zeros((2, 3)), 3, {}, [None], ["ab"], [np.zeros(())],
                [np.zeros((2, 3)), np.zeros((2, 4))], [[[1.0], [1.0, 2.0]]],
                [np.array([object()])], [{"a": 1}], [np.array(["a", "b"])],
                [np.zeros(2, "datetime64[s]")]]
    if fn == "pad_sequences":
        case = data_.draw(st.sampled_from(
            [dict(seqs=s) for s in bad_seqs] + [dict(seqs=[])]
            + [dict(seqs=good, dtype=d) for d in ("nonsense", 3.5, "float128x")]
            + [dict(seqs=[np.zeros((1, 1), np.int64)], padding_value=v)
               for v in (float("nan"), "abc", 2**80, None)]))
        call = lambda: data.pad_sequences(**case)  # noqa: E731
    elif fn == "BatchIterator":
        case = data_.draw(st.sampled_from(
            [dict(seqs=s, batch_size=1) for s in bad_seqs] + [dict(seqs=[], batch_size=1)]
            + [dict(seqs=good, batch_size=b) for b in (0, -1, 1.5, True, None, "2")]
            + [dict(seqs=good, batch_size=1, shuffle=v) for v in (1, "yes", None)]
            + [dict(seqs=good, batch_size=1, seed=v) for v in (-1, 1.5, "0")]
            + [dict(seqs=good, fields=(f,), batch_size=1) for f in
               (np.zeros(3), np.zeros(()), [np.zeros(2)], [np.zeros(3), np.zeros(1)], "ab", None)]
            + [dict(seqs=good, batch_size=1, padding_value="x")]))
        call = lambda: data.BatchIterator(case["seqs"], *case.get("fields", ()),  # noqa: E731
                                          **{k: v for k, v in case.items()
                                             if k not in ("seqs", "fields")})
    elif fn == "bucket_by_length":
        case = data_.draw(st.sampled_from(
            [dict(lengths=v, batch_size=2) for v in
             (None, "ab", [1.5, 2.0], [-1, 2], np.ones((2, 2), int), [True, False], 3,
              np.array([2**64 - 1], np.uint64), [[1], [2, 3]])]
            + [dict(lengths=[1, 2], batch_size=b) for b in (0, -2, 2.0, True, None)]
            + [dict(lengths=[1, 2], batch_size=1, shuffle=s) for s in (1, "no")]
            + [dict(lengths=[1, 2], batch_size=1, drop_last=s) for s in (0, None)]))
        call = lambda: data.bucket_by_length(**case)  # noqa: E731
    else:
        case = data_.draw(st.sampled_from(
            [dict(streams=s, k=2, batch_size=1) for s in bad_seqs[:2] + bad_seqs[3:] + [[]]]
            + [dict(streams=good, k=k, batch_size=1) for k in (0, -1, 1.5, True, None)]
            + [dict(streams=good, k=2, batch_size=b) for b in (0, 2.5, "1")]
            + [dict(streams=good, k=2, batch_size=1, targets=t) for t in
               ([np.zeros(2)], [np.zeros(2), np.zeros(2)], [np.zeros(2), np.zeros(1), np.zeros(1)],
                "ab", np.zeros(3))]
            + [dict(streams=np.zeros(()), k=2, batch_size=1)]))
        call = lambda: data.tbptt_windows(**case)  # noqa: E731 (checked at the call, not lazily)
    before = snapshot(case)
    with pytest.raises((TypeError, ValueError)):
        call()
    assert_untouched(case, before)


# ---------------------------------------------------------------- data: TBPTT and reset_state

@FUZZ
@given(streams=ragged(min_size=0, max_len=9), k=st.integers(1, 4), batch_size=st.integers(1, 4),
       single=st.booleans(), with_targets=st.booleans(), pad=st.sampled_from([0, -3]))
def test_fuzz_tbptt_windows_reassemble_every_sequence(streams, k, batch_size, single,
                                                      with_targets, pad):
    if single:  # one array: split into batch_size contiguous rows
        arrays = [np.asarray(s) for s in streams]
        assume(arrays)
        streams = np.concatenate(arrays)
        xs = np.array_split(streams, batch_size)
    else:
        assume(streams)
        xs = [np.asarray(s) for s in streams]
    targets = None
    if with_targets:
        targets = ([np.asarray(a) * 2 for a in streams] if not single else streams * 2)
    dtypes = [np.result_type(*xs)] + ([] if targets is None else [np.result_type(targets)
                                       if single else np.result_type(*targets)])
    if not all(storable(pad, dt) for dt in dtypes):  # -3 in uint32
        with pytest.raises(ValueError, match="padding_value"):
            data.tbptt_windows(streams, k, batch_size, targets=targets, padding_value=pad)
        return
    windows = list(data.tbptt_windows(streams, k, batch_size, targets=targets,
                                      padding_value=pad))
    got = {i: [] for i in range(len(xs))}
    got_y = {i: [] for i in range(len(xs))}
    row_of = {}
    for w in windows:
        T = w.x.shape[0]
        assert 1 <= T <= k and T == w.lengths.max() and w.x.shape[1] == batch_size
        assert w.lengths.dtype == np.int64 and w.reset.dtype == bool and w.seq_ids.dtype == np.int64
        assert (w.y is None) == (targets is None)
        for b in range(batch_size):
            s, n = int(w.seq_ids[b]), int(w.lengths[b])
            assert np.all(w.x[n:, b] == np.asarray(pad).astype(w.x.dtype))
            if s < 0:
                assert n == 0 and not w.reset[b]
                continue
            assert row_of.setdefault(s, b) == b, "a sequence stays on its row"
            assert bool(w.reset[b]) == (not got[s]), "reset exactly when a sequence starts"
            got[s].append(w.x[:n, b])
            if targets is not None:
                got_y[s].append(w.y[:n, b])
    for i, a in enumerate(xs):
        if len(a) == 0:
            assert not got[i], "empty sequences are skipped"
            continue
        np.testing.assert_array_equal(np.concatenate(got[i]), a)
        if targets is not None:
            np.testing.assert_array_equal(np.concatenate(got_y[i]), a * 2)


@st.composite
def nested_states(draw, B, depth=0):
    kind = draw(st.sampled_from(["array", "None", "tuple", "list"] if depth < 2 else
                                ["array", "None"]))
    if kind == "None":
        return None
    if kind == "array":
        axis_first = draw(st.booleans())
        shape = (B, draw(st.integers(0, 3))) if axis_first else (draw(st.integers(1, 2)), B, 2)
        a = np.random.default_rng(draw(SEEDS)).standard_normal(shape) + 1
        return relayout(a.astype(draw(st.sampled_from(FLOATS))), draw(LAYOUTS))
    items = draw(st.lists(nested_states(B, depth + 1), max_size=3))
    return tuple(items) if kind == "tuple" else items


@FUZZ
@given(B=st.integers(0, 4), data_=st.data())
def test_fuzz_reset_state_zeroes_exactly_the_reset_rows(B, data_):
    state = data_.draw(nested_states(B))
    reset = np.array(data_.draw(st.lists(st.booleans(), min_size=B, max_size=B)), dtype=bool)
    before = snapshot(state)

    def check(got, old):
        if old is None:
            assert got is None
        elif isinstance(old, (tuple, list)):
            assert type(got) is type(old) and len(got) == len(old)
            for g, o in zip(got, old):
                check(g, o)
        else:
            axis = 0 if old.shape[0] == B and old.ndim == 2 else 1
            assert got.shape == old.shape and got.dtype == old.dtype
            want = old.copy()
            np.moveaxis(want, axis, 0)[reset] = 0
            np.testing.assert_array_equal(got, want)
            assert not np.shares_memory(got, old)

    def axis_of(s):  # the strategy puts the batch first only in (B, n) arrays
        return 0 if isinstance(s, np.ndarray) and s.ndim == 2 else 1

    if isinstance(state, np.ndarray):
        check(data.reset_state(state, reset, batch_axis=axis_of(state)), state)
    elif state is None or all(axis_of(s) == 1 for s in _leaves(state)):
        check(data.reset_state(state, reset), state)
    assert_same(state, before, "state")  # new arrays; the old ones untouched
    if B and isinstance(state, np.ndarray):
        for bad in (reset.astype(int), reset[:-1], reset[None], "ab", None):
            with pytest.raises((TypeError, ValueError)):
                data.reset_state(state, bad, batch_axis=axis_of(state))


def _leaves(s):
    if isinstance(s, (tuple, list)):
        return [x for item in s for x in _leaves(item)]
    return [] if s is None else [s]


def test_tbptt_windows_checks_its_arguments_at_the_call():
    # regression: a generator function checked nothing until the first window was asked for
    with pytest.raises(ValueError, match="k"):
        data.tbptt_windows([np.zeros(3)], k=0, batch_size=1)
    with pytest.raises(ValueError, match="streams"):
        data.tbptt_windows([], k=2, batch_size=1)


def test_rng_state_with_out_of_range_ints_is_a_value_error():
    # regression: numpy's OverflowError escaped from load_state_dict
    it = data.BatchIterator([np.zeros(2)], batch_size=1, seed=0)
    sd = it.state_dict()
    sd["rng"] = {**sd["rng"], "state": {"state": -1, "inc": 1}}
    with pytest.raises(ValueError, match="rng"):
        it.load_state_dict(sd)


def test_batch_iterator_checks_padding_in_every_dtype_a_batch_can_take():
    # regression: only seqs[0]'s dtype was checked; a batch of uint8 sequences alone then
    # failed mid-epoch, after the position had moved past it
    seqs = [np.zeros(2, np.int8), np.zeros(1, np.uint8)]
    with pytest.raises(ValueError, match="padding_value -1 cannot be stored in dtype uint8"):
        data.BatchIterator(seqs, batch_size=1, padding_value=-1)
    with pytest.raises(ValueError, match="padding_value"):  # a per-step field too
        data.BatchIterator([np.zeros(2)], [np.zeros(2, np.uint8)], batch_size=1,
                           padding_value=-1)
    with pytest.raises(ValueError, match="padding_value nan cannot be stored in dtype int64"):
        data.pad_sequences([np.zeros(2, np.int64), np.zeros(3, np.int64)],
                           padding_value=float("nan"))  # was INT64_MIN


def test_non_numeric_sequences_are_refused():
    # regression: string arrays were padded with '0' instead of being refused
    with pytest.raises(TypeError, match=r"seqs\[0\]"):
        data.pad_sequences([np.array(["a", "b"])])


# ---------------------------------------------------------------- checkpoints

ARRAY_DTYPES = ["bool", "int8", "uint16", "int32", "uint64", "int64", "float16", "float32",
                "float64", ">f8", ">i4", "complex64", "complex128", "longdouble"]


@st.composite
def arrays(draw):
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    raw = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape)),
                         max_size=dtype.itemsize * int(np.prod(shape))))
    a = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # any bits: NaN payloads too
    if dtype == np.bool_:
        a = np.asarray(a.view(np.uint8) % 2 == 1)
    return relayout(a, draw(LAYOUTS)) if a.ndim else a


def np_scalars():
    return arrays().filter(lambda a: a.ndim == 0).map(lambda a: a[()])


LEAVES = (st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats(allow_nan=True)
          | st.text(max_size=6) | arrays() | np_scalars())
TREES = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=3)
                     | st.lists(kids, max_size=3).map(tuple)
                     | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=12)


def check_round_trip(got, want, what):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.flags.writeable and got.flags.owndata, what
        assert_same(got, want, what)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), what
        for k in want:
            check_round_trip(got[k], want[k], f"{what}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            check_round_trip(g, w, f"{what}[{i}]")
    else:
        assert_same(got, want, what)



@FUZZ
@given(model=st.dictionaries(st.text(max_size=8), arrays(), max_size=4), opt=TREES, sched=TREES,
       rng_state=TREES, extra=TREES, step=st.integers(0, 2**70))
def test_fuzz_checkpoint_round_trips_bitwise(model, opt, sched, rng_state, extra, step):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck.rnnf")
        before = snapshot(model, opt, sched, rng_state, extra)
        checkpoint.save_checkpoint(path, model, opt, sched, rng_state, step, extra)
        assert_same((model, opt, sched, rng_state, extra), before, "inputs")
        assert os.listdir(d) == ["ck.rnnf"]  # no temporary file left behind
        ck = checkpoint.load_checkpoint(path, expected=model)
    assert ck["step"] == step and type(ck["step"]) is int and ck["version"] == 1
    for key, want in (("model", model), ("optimizer", opt), ("scheduler", sched),
                      ("rng", rng_state), ("extra", extra)):
        check_round_trip(ck[key], want, key)


def _saved_blob(seed):
    rng = np.random.default_rng(seed)
    model = {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.integers(0, 9, 4)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck")
        checkpoint.save_checkpoint(path, model, {"lr": 0.1, "m": np.ones(2)}, None,
                                   {"state": 2**100}, 7, {"a": [1.5, "x", None]})
        with open(path, "rb") as f:
            return f.read()


BLOB = _saved_blob(0)


def load_bytes(blob, expected=None):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck")
        with open(path, "wb") as f:
            f.write(blob)
        return checkpoint.load_checkpoint(path, expected)


@FUZZ
@given(how=st.sampled_from(["flip", "truncate", "append", "splice", "replace"]), data_=st.data())
def test_fuzz_damaged_checkpoint_is_refused(how, data_):
    blob = bytearray(BLOB)
    if how == "flip":  # any bytes anywhere, each changed
        for _ in range(data_.draw(st.integers(1, 4))):
            i = data_.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data_.draw(st.integers(1, 255))
    elif how == "truncate":
        del blob[data_.draw(st.integers(0, len(blob) - 1)):]
    elif how == "append":
        blob += data_.draw(st.binary(min_size=1, max_size=40))
    elif how == "splice":
        i = data_.draw(st.integers(0, len(blob)))
        blob[i:i] = data_.draw(st.binary(min_size=1, max_size=8))
    else:
        blob = bytearray(data_.draw(st.binary(max_size=200)))
    assume(bytes(blob) != BLOB)
    with pytest.raises(CheckpointError):
        load_bytes(bytes(blob))


def _header(blob):
    _, _, hlen, dlen = struct.unpack_from("<8sIQQ", blob)
    return json.loads(blob[28:28 + hlen]), blob[28 + hlen:28 + hlen + dlen]


def _craft(head, payload):
    """A file with a valid checksum around any header: the checks after the checksum."""
    h = json.dumps(head).encode() if not isinstance(head, bytes) else head
    body = struct.pack("<8sIQQ", b"RNNFCKPT", 1, len(h), len(payload)) + h + payload
    return body + hashlib.sha256(body).digest()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                           | st.floats() | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                           max_leaves=6)


@FUZZ
@given(data_=st.data())
def test_fuzz_checkpoint_with_valid_checksum_but_bad_header_is_refused(data_):
    """A header that passes the checksum (a bug in a writer, or a crafted file) still gets
    CheckpointError, or loads into well-formed data."""
    head, payload = _header(BLOB)
    where = data_.draw(st.sampled_from(["array field", "tree node", "whole", "nested"]))
    if where == "array field":
        spec = head["arrays"][data_.draw(st.integers(0, len(head["arrays"]) - 1))]
        spec[data_.draw(st.sampled_from(sorted(spec)))] = data_.draw(
            JSON_VALUES | st.sampled_from([math.inf, -1, 2**63, [2**62, 4], "O", "(9,)f8", "<U3"]))
    elif where == "tree node":
        key = data_.draw(st.sampled_from(sorted(head["tree"])))
        head["tree"][key] = data_.draw(JSON_VALUES | st.sampled_from(
            [{"array": 99}, {"scalar": -1}, {"array": True}, {"dict": []}, {"tuple": {}}]))
    elif where == "whole":
        head = data_.draw(JSON_VALUES)
    else:
        depth = data_.draw(st.sampled_from([10, 5000]))
        head = b'{"tree":' + b"[" * depth + b"]" * depth + b',"arrays":[]}'
    try:
        ck = load_bytes(_craft(head, payload))
    except CheckpointError:
        return
    assert isinstance(ck["model"], dict) and type(ck["step"]) is int
    assert all(isinstance(v, np.ndarray) for v in ck["model"].values())


class _Weird:
    pass


@FUZZ
@given(data_=st.data(), previous=st.booleans())
def test_fuzz_bad_checkpoint_input_is_refused_before_writing(data_, previous):
    cyclic = {}
    cyclic["self"] = cyclic
    deep = []
    for _ in range(3000):
        deep = [deep]
    bad_values = [np.array([object()]), np.zeros(2, "U3"), np.zeros(2, "datetime64[s]"),
                  np.zeros(2, [("a", "f8")]), {1: 2}, {("a",): 1}, {None: 1}, {1.5: 0}, {b"k": 1},
                  {1, 2}, b"bytes", _Weird(), object(), 1 + 2j, cyclic, deep, np.float64,
                  range(3), memoryview(b"x")]
    slot = data_.draw(st.sampled_from(["model", "optimizer_state", "scheduler_state",
                                       "rng_state", "extra", "step"]))
    kwargs = dict(model_state={"w": np.ones(2)}, optimizer_state=None, scheduler_state=None,
                  rng_state=None, step=0, extra=None)
    if slot == "model":
        kwargs["model_state"] = data_.draw(st.sampled_from(
            [None, [np.ones(2)], {"w": [1.0]}, {1: np.ones(2)}, {"w": np.array([object()])},
             {"w": None}, {"w": 3.0}]))
    elif slot == "step":
        kwargs["step"] = data_.draw(st.sampled_from([-1, 1.5, True, None, "3", np.float64(2)]))
    else:
        value = data_.draw(st.sampled_from(bad_values))
        nest = data_.draw(st.sampled_from(["bare", "in list", "in dict"]))
        kwargs[slot] = value if nest == "bare" else [1, value] if nest == "in list" else {
            "k": {"deeper": value}}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck")
        if previous:
            with open(path, "wb") as f:
                f.write(BLOB)
        with pytest.raises((TypeError, ValueError)):
            checkpoint.save_checkpoint(path, **kwargs)
        assert os.listdir(d) == (["ck"] if previous else [])
        if previous:
            with open(path, "rb") as f:
                assert f.read() == BLOB  # the old checkpoint is intact


@FUZZ
@given(data_=st.data())
def test_fuzz_restore_with_a_bad_rng_state_changes_nothing(data_):
    """restore_checkpoint is all or nothing: an rng state the generator refuses is a
    CheckpointError, and the model, optimizer and generator keep their state."""
    import rnnfuse
    model = rnnfuse.Linear(2, 3, seed=0)
    opt = optim.Adam(model.named_parameters(), lr=0.1)
    gen = np.random.default_rng(1)
    good = gen.bit_generator.state
    bad = data_.draw(JSON_VALUES | st.sampled_from(
        [{**good, "state": {"state": -1, "inc": 2**200}}, {**good, "bit_generator": "MT19937"},
         {**good, "state": {"state": "x", "inc": 1}}, {**good, "state": None}]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck")
        twin = rnnfuse.Linear(2, 3, seed=5)
        checkpoint.save_checkpoint(path, twin.state_dict(), optim.Adam(
            twin.named_parameters(), lr=0.5).state_dict(), None, bad)
        model_before, opt_before = snapshot(model.state_dict()), state_of(opt)
        try:
            checkpoint.restore_checkpoint(path, model, optimizer=opt, rng=gen)
        except CheckpointError:
            assert_same(model.state_dict(), model_before, "model")
            assert_same(state_of(opt), opt_before, "optimizer")
            assert_same(gen.bit_generator.state, good, "generator")
            return
    assert_same(gen.bit_generator.state, bad, "generator")  # accepted: a valid state


def test_cyclic_or_too_deep_state_is_a_value_error():
    # regression: RecursionError escaped from save_checkpoint
    cyclic = []
    cyclic.append(cyclic)
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(ValueError, match="extra"):
            checkpoint.save_checkpoint(os.path.join(d, "ck"), {}, extra=cyclic)
        assert os.listdir(d) == []


def test_crafted_header_with_infinite_offset_is_a_checkpoint_error():
    # regression: OverflowError (int(inf)) and RecursionError escaped from load_checkpoint
    head, payload = _header(BLOB)
    head["arrays"][0]["offset"] = math.inf
    with pytest.raises(CheckpointError, match="malformed"):
        load_bytes(_craft(head, payload))
    with pytest.raises(CheckpointError, match="malformed"):
        load_bytes(_craft(b'{"tree":' + b"[" * 100000 + b"]" * 100000 + b"}", b""))
