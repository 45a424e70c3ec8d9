"""Reliability of the functional kernel API: fuzzing, threads, memory, sizes, determinism
and numerical edges (the C kernels behind rnnfuse.functional, checked against
rnnfuse.reference).

The hypothesis tests run a small number of examples by default; the long run sets
RNNFUSE_FUZZ_EXAMPLES (tools/fuzz_long.sh), and tools/sanitize.sh runs this file under
AddressSanitizer + UBSan. Tests that need ~10-20 GB of memory run only with
RNNFUSE_BIG_TESTS=1.
"""
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnnfuse import functional as F
from rnnfuse import reference as R
from layouts import relayout  # tests/layouts.py

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
CELLS = [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"), ("rnn", "relu")]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-4, np.float64: 1e-10}
ARG_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "dy", "dh_n",
             "dc_n", "ctx", "nonlinearity", "linear_before_reset", "input_size",
             "hidden_size", "reverse")

FUZZ_EXAMPLES = int(os.environ.get("RNNFUSE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="RNNFUSE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UNDER_SANITIZER = "libasan" in os.environ.get("LD_PRELOAD", "")


# ---------------------------------------------------------------- helpers

def make_case(cell, T, B, I, H, dtype, seed=0, lengths=None, scale=1.0):
    """Random weights (~1/sqrt(H)), inputs, initial states and upstream gradients."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    r = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    w = scale / np.sqrt(max(H, 1))
    return dict(x=r(T, B, I), h0=r(B, H), c0=r(B, H), w_ih=r(G * H, I, s=w),
                w_hh=r(G * H, H, s=w), b_ih=r(G * H, s=w), b_hh=r(G * H, s=w),
                lengths=lengths, dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H))


def forward(mod, cell, option, c, reverse=False, need_ctx=True):
    """(outputs tuple, ctx) of one forward call."""
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    if cell == "lstm":
        y, h, cn, ctx = mod.lstm_forward(c["x"], c["h0"], c["c0"], *w, lengths=c["lengths"],
                                         reverse=reverse, need_ctx=need_ctx)
        return (y, h, cn), ctx
    if cell == "gru":
        y, h, ctx = mod.gru_forward(c["x"], c["h0"], *w, lengths=c["lengths"], reverse=reverse,
                                    linear_before_reset=option, need_ctx=need_ctx)
    else:
        y, h, ctx = mod.rnn_forward(c["x"], c["h0"], *w, lengths=c["lengths"], reverse=reverse,
                                    nonlinearity=option, need_ctx=need_ctx)
    return (y, h), ctx


def backward(mod, cell, c, ctx):
    if cell == "lstm":
        return tuple(mod.lstm_backward(c["dy"], c["dh_n"], c["dc_n"], ctx))
    return tuple(getattr(mod, f"{cell}_backward")(c["dy"], c["dh_n"], ctx))


def run(mod, cell, option, c, reverse=False, need_ctx=True):
    outs, ctx = forward(mod, cell, option, c, reverse, need_ctx)
    return outs, (backward(mod, cell, c, ctx) if need_ctx else ())


def assert_close(got, want, dtype, what):
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"{what}[{k}]: expected None"
            continue
        assert isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == b.shape, \
            f"{what}[{k}]: {getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')} vs {b.shape}"
        if b.size == 0:
            continue
        scale = max(float(np.max(np.abs(b))), 1.0 if dtype == np.float32 else 1e-300)
        err = float(np.max(np.abs(a.astype(np.float64) - b))) / scale
        assert err <= TOL[dtype], f"{what}[{k}]: relative error {err:.2e}"


def assert_identical(got, want, what=""):
    for k, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"{what}[{k}]"
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}[{k}]")
            assert a.tobytes() == b.tobytes(), f"{what}[{k}]: not bitwise equal"


def canonical(c):
    """The case with every array C-contiguous, writeable and owned (the reference's input)."""
    out = {k: (None if v is None or k == "lengths" else np.array(v, copy=True, order="C"))
           for k, v in c.items()}
    if c.get("lengths") is not None:
        out["lengths"] = np.asarray(c["lengths"]).astype(np.int64)
    return out


def snapshot(c):
    return {k: (v.copy(), v.strides, v.flags.writeable) if isinstance(v, np.ndarray) else None
            for k, v in c.items()}


def assert_untouched(c, before):
    for k, v in c.items():
        if isinstance(v, np.ndarray):
            data, strides, writeable = before[k]
            np.testing.assert_array_equal(v, data, err_msg=f"{k} was modified")
            assert v.strides == strides and v.flags.writeable == writeable, k


# ---------------------------------------------------------------- 1. fuzzing: valid calls

LAYOUTS = ["C", "F", "strided", "negative", "readonly", "unaligned", "list", "broadcast"]


@st.composite
def valid_calls(draw):
    cell, option = draw(st.sampled_from(CELLS))
    dtype = draw(st.sampled_from(DTYPES))
    T, B = draw(st.integers(0, 5)), draw(st.integers(0, 4))
    I, H = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    if lengths is not None:
        kind = draw(st.sampled_from(["list", "int64", "int32", "uint8", "uint64", "int16"]))
        if kind != "list" or B == 0:  # [] is a float64 array: see test_empty_list_lengths
            lengths = np.array(lengths, dtype=np.int64 if kind == "list" else kind).reshape(B)
    c = make_case(cell, T, B, I, H, dtype, seed=draw(st.integers(0, 2**16)), lengths=lengths)
    for k in ("h0", "c0", "b_ih", "b_hh", "dy", "dh_n", "dc_n"):
        if draw(st.booleans()) and draw(st.booleans()):
            c[k] = None
    for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "dy", "dh_n", "dc_n"):
        c[k] = relayout(c[k], draw(st.sampled_from(LAYOUTS)))
    return cell, option, dtype, c, draw(st.booleans()), draw(st.booleans())


@FUZZ
@given(call=valid_calls())
def test_fuzz_valid_calls_match_reference(call):
    """Random shapes (0 and 1 in T and B), layouts, views, read-only and unaligned arrays,
    Python lists, optional arguments absent: equal to the reference, inputs untouched."""
    cell, option, dtype, c, reverse, need_ctx = call
    before = snapshot(c)
    got = run(F, cell, option, c, reverse, need_ctx)
    assert_untouched(c, before)
    want = run(R, cell, option, canonical(c), reverse, need_ctx)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")
    outs = [a for a in got[0] + got[1] if a is not None]
    for a in outs:  # fresh, owned, writeable outputs that alias no input
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.owndata
        for v in c.values():
            if isinstance(v, np.ndarray):
                assert not np.shares_memory(a, v)


# ---------------------------------------------------------------- 1. fuzzing: bad calls

class Weird:
    def __array__(self, dtype=None, copy=None):
        raise ValueError("Weird refuses to become an array")


def bad_values(good):
    """Values of every wrong kind for an array argument whose good value is `good`."""
    vals = [None, 1.0, 3, True, 1 + 2j, "abc", b"xy", {}, object(), Weird(), np.float32(1),
            [[1.0], [1.0, 2.0]], np.array(object()), np.empty(0)]
    if good is not None:
        vals += [good.astype(t) for t in (np.float16, np.int32, np.int64, np.bool_,
                                          np.uint8, np.complex64, np.complex128, object)]
        vals += [good.astype(good.dtype.newbyteorder(">")), good[..., None], good.reshape(-1),
                 np.asarray(good.tolist(), dtype=object), good.astype(np.longdouble)]
        if good.ndim >= 1:
            vals += [good[..., :0], np.concatenate([good, good[..., :1]], axis=-1)]
            if good.shape[-1] > 1:
                vals.append(good[..., 1:])
        if good.ndim >= 2 and good.shape[0]:
            vals.append(good[0])
        if good.ndim >= 2:
            vals.append(np.swapaxes(good, 0, -1))
        vals += [good.astype(np.float32 if good.dtype == np.float64 else np.float64)]
    return vals


def bad_lengths(T, B):
    return [np.arange(B, dtype=np.float64), np.ones(B, np.bool_), [0.5] * B, [True] * B,
            np.full(B, -1), np.full(B, T + 1), np.full(B, 2**40), np.full(B, 2**63, np.uint64),
            np.full(B + 1, T), np.full((1, B), T), np.full((B, 1), T), np.int64(T), T, "ab",
            [T] * (B + 1), [[T]] * B, np.full(B, T, object), [2**70] * B, {}, object(),
            Weird(), np.full(B, T, np.complex64), np.full(B, np.nan), [None] * B,
            np.full(B, np.iinfo(np.int64).min), np.full(B, T, np.float16)]


# The exception a user's own __array__ raises, passed through as it is.
KNOWN_UNNAMED = ("Weird refuses",)

BAD_SLOTS = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "dy", "dh_n", "dc_n",
             "option", "reverse"]


@FUZZ
@given(data=st.data(), cell_option=st.sampled_from(CELLS), dtype=st.sampled_from(DTYPES),
       T=st.integers(0, 3), B=st.integers(0, 3), I=st.integers(1, 3), H=st.integers(1, 4),
       slot=st.sampled_from(BAD_SLOTS))
def test_fuzz_bad_arguments_raise_type_or_value_error(data, cell_option, dtype, T, B, I, H,
                                                      slot):
    """One argument replaced by a value of a wrong kind: a TypeError/ValueError naming an
    argument, or (where the value is acceptable after all) the reference's result."""
    cell, option = cell_option
    c = make_case(cell, T, B, I, H, dtype, seed=T * 100 + B * 10 + H)
    reverse = False
    if slot == "lengths":
        c["lengths"] = data.draw(st.sampled_from(bad_lengths(T, B)))
    elif slot == "option":
        option = data.draw(st.sampled_from([None, "TANH", "sigmoid", 1, 0, "relu ", b"tanh",
                                            np.bool_(True), 1.0, "yes", [], object()]))
        if cell == "lstm":  # no option: LSTM's is none
            assume(False)
    elif slot == "reverse":
        reverse = data.draw(st.sampled_from([np.array([1, 0]), Weird(), "yes", 2, None]))
    else:
        c[slot] = data.draw(st.sampled_from(bad_values(c[slot])))
    if cell != "lstm" and slot in ("c0", "dc_n"):
        assume(False)  # not an argument of this cell
    before = snapshot(c)
    try:
        got = run(F, cell, option, c, reverse)
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert any(n in msg for n in ARG_NAMES + KNOWN_UNNAMED), \
            f"error names no argument: {msg!r}"
        assert_untouched(c, before)
        return
    except MemoryError:
        pytest.fail("MemoryError for a tiny call")
    # Accepted: must then be a value the contract allows, and computed right.
    assert_untouched(c, before)
    canon = dict(c)
    for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "dy", "dh_n", "dc_n"):
        if c[k] is not None:
            arr = np.asarray(c[k])
            assert arr.dtype == dtype and arr.ndim >= 1, f"{slot}={c[slot]!r} was accepted"
            canon[k] = np.ascontiguousarray(arr)
    if c["lengths"] is not None:
        canon["lengths"] = np.asarray(c["lengths"]).astype(np.int64)
    want = run(R, cell, option, canon, bool(reverse))
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


def _ctx_of(cell, option, dtype=np.float64, T=3, B=2, I=2, H=3):
    c = make_case(cell, T, B, I, H, dtype)
    return forward(F, cell, option, c)[1]


def test_mismatched_ctx_objects_are_refused():
    """Every backward with a ctx that is not its own forward's live ctx: Type/ValueError."""
    c = make_case("gru", 3, 2, 2, 3, np.float64)
    used = _ctx_of("gru", True)
    backward(F, "gru", dict(dy=None, dh_n=None), used)
    ref_ctx = forward(R, "gru", True, c)[1]
    strangers = [None, 0, "ctx", {}, [], object(), ref_ctx, used, _ctx_of("lstm", None),
                 _ctx_of("rnn", "tanh"), forward(F, "gru", True, c, need_ctx=False)[1],
                 pickle.loads(pickle.dumps(0))]
    for ctx in strangers:
        with pytest.raises((TypeError, ValueError)):
            F.gru_backward(None, None, ctx)
    # A ctx of the right cell but other shapes or dtype: the gradients must match *its* forward.
    small = _ctx_of("gru", False, dtype=np.float32, T=2, B=1, I=1, H=2)
    with pytest.raises((TypeError, ValueError), match="dy"):
        F.gru_backward(c["dy"], None, small)
    with pytest.raises((TypeError, ValueError), match="dh_n"):
        F.gru_backward(None, c["dh_n"].astype(np.float32), small)
    assert F.gru_backward(None, None, small)[0].shape == (2, 1, 1)


def test_hand_made_ctx_is_refused():
    with pytest.raises((TypeError, ValueError)):
        F.lstm_backward(None, None, None, F.Context())


def test_ragged_list_error_names_the_argument():
    c = make_case("rnn", 2, 2, 2, 3, np.float64)
    with pytest.raises(ValueError, match="w_ih"):
        F.rnn_forward(c["x"], None, [[1.0], [1.0, 2.0]], c["w_hh"], None, None)


def test_reverse_must_be_a_bool():
    c = make_case("rnn", 2, 2, 2, 3, np.float64)
    with pytest.raises((TypeError, ValueError), match="reverse"):
        F.rnn_forward(c["x"], None, c["w_ih"], c["w_hh"], None, None, reverse="no")


def test_empty_list_lengths():
    c = make_case("rnn", 2, 0, 2, 3, np.float64)
    F.rnn_forward(c["x"], None, c["w_ih"], c["w_hh"], None, None, lengths=[])


def test_misaligned_arrays_reach_c_aligned(monkeypatch):
    from rnnfuse import _kernels
    seen = []

    def spy(*args):
        seen.extend(a for a in args if isinstance(a, np.ndarray))
        return real(*args)

    real = _kernels.forward
    monkeypatch.setattr(_kernels, "forward", spy)
    c = make_case("gru", 3, 2, 4, 5, np.float32)
    c["b_ih"] = relayout(c["b_ih"], "unaligned")
    c["x"] = relayout(c["x"], "unaligned")
    forward(F, "gru", True, c)
    assert seen and all(a.flags.aligned for a in seen)


@pytest.mark.parametrize("damage", ["short", "long", "dtype", "strided", "unaligned",
                                    "read-only output", "list", "missing"])
@pytest.mark.parametrize("target", ["x", "w_hh", "b_ih", "ws"])
def test_kernel_wrappers_refuse_buffers_c_would_overrun(damage, target):
    """_kernels trusts functional.py for values but not for the buffers it hands C: an
    array of the wrong size, dtype or layout is refused before the GIL is released."""
    from rnnfuse import _kernels
    T, B, I, H = 3, 2, 4, 5
    rng = np.random.default_rng(0)
    plan = _kernels.Plan(np.full(B, T, np.int64), T, False)
    a = {"x": rng.standard_normal((T, B, I)), "w_hh": rng.standard_normal((3 * H, H)),
         "b_ih": rng.standard_normal(3 * H),
         "ws": np.zeros(_kernels.workspace_size("gru", plan, I, H, False))}
    a = {k: v.astype(np.float32) for k, v in a.items()}
    w_ih = rng.standard_normal((3 * H, I)).astype(np.float32)

    def call(a):
        _kernels.forward("gru", a["x"], None, None, w_ih, a["w_hh"], a["b_ih"], None, plan,
                         a["ws"], I, H, False, True)

    call(a)  # intact, the call runs
    v = a[target]
    a[target] = {"short": lambda: v.reshape(-1)[:-1].copy(),
                 "long": lambda: np.concatenate([v.reshape(-1), v.reshape(-1)[:1]]),
                 "dtype": lambda: v.astype(np.float64),
                 "strided": lambda: np.repeat(v.reshape(-1), 2)[::2],
                 "unaligned": lambda: relayout(v, "unaligned"),
                 "read-only output": lambda: np.frombuffer(v.tobytes(), np.float32),
                 "list": lambda: v.tolist(),
                 "missing": lambda: None}[damage]()
    if damage == "read-only output" and target != "ws":
        return  # inputs may be read-only
    if damage == "missing" and target == "b_ih":
        return  # biases are optional
    if damage == "dtype" and target == "x":
        return  # x decides the call's dtype: then every other array is the mismatch
    with pytest.raises((ValueError, TypeError), match=r"_kernels: "):
        call(a)


def test_kernel_wrappers_refuse_a_missing_plan():
    """A plan of None reached C as a NULL plan before (a segfault): now a TypeError."""
    from rnnfuse import _kernels
    x = np.ones((2, 1, 3), np.float32)
    w_ih, w_hh = np.ones((4, 3), np.float32), np.ones((4, 4), np.float32)
    with pytest.raises(TypeError, match="plan"):
        _kernels.workspace_size("rnn", None, 3, 4, True)
    with pytest.raises(TypeError, match="plan"):
        _kernels.forward("rnn", x, None, None, w_ih, w_hh, None, None, None,
                         np.zeros(100, np.float32), 3, 4, True)
    *_, ctx = F.rnn_forward(x, None, w_ih, w_hh, None, None)
    ctx.plan = None
    with pytest.raises(TypeError, match="plan"):
        F.rnn_backward(None, None, ctx)



def test_kernel_wrappers_refuse_sizes_the_weights_do_not_have():
    """An empty batch pins neither I nor H through x or y: the weights' shapes must."""
    from rnnfuse import _kernels
    plan = _kernels.Plan(np.zeros(0, np.int64), 3, False)
    x = np.zeros((3, 0, 4), np.float32)
    w_ih, w_hh = np.ones((5, 4), np.float32), np.ones((5, 5), np.float32)
    for I, H in ((4, 5), (2**40, 5), (4, 6)):
        ws = np.zeros(max(_kernels.workspace_size("rnn", plan, 4, 5, False), 0), np.float32)
        if (I, H) == (4, 5):
            _kernels.forward("rnn", x, None, None, w_ih, w_hh, None, None, plan, ws, I, H, False)
            continue
        with pytest.raises(ValueError, match=r"_kernels: w_ih and w_hh must be"):
            _kernels.forward("rnn", x, None, None, w_ih, w_hh, None, None, plan, ws, I, H, False)


def test_lengths_changed_after_forward_do_not_reach_backward():
    """The plan keeps its own lengths: the caller's array may change before backward."""
    c = make_case("lstm", 6, 4, 3, 5, np.float64)
    lengths = np.array([6, 2, 4, 0], np.int64)
    *_, ctx = F.lstm_forward(c["x"], None, None, c["w_ih"], c["w_hh"], None, None,
                             lengths=lengths, reverse=True)
    *_, ctx2 = F.lstm_forward(c["x"], None, None, c["w_ih"], c["w_hh"], None, None,
                              lengths=lengths.copy(), reverse=True)
    lengths[:] = [0, 6, 6, 6]
    dy = np.ones((6, 4, 5))
    for got, want in zip(F.lstm_backward(dy, None, None, ctx), F.lstm_backward(dy, None, None, ctx2)):
        assert (got is None and want is None) or np.array_equal(got, want)


def test_a_refused_backward_leaves_its_ctx_usable():
    c = make_case("gru", 3, 2, 4, 5, np.float32)
    *_, ctx = F.gru_forward(c["x"], None, c["w_ih"], c["w_hh"], None, None)
    w_hh, ctx.w_hh = ctx.w_hh, ctx.w_hh[:, :4].copy()
    with pytest.raises(ValueError, match="w_hh"):
        F.gru_backward(None, None, ctx)
    ctx.w_hh = w_hh
    dx, *_ = F.gru_backward(None, np.ones((2, 5), np.float32), ctx)
    assert np.isfinite(dx).all() and dx.any()


# ---------------------------------------------------------------- 2. every kernel, once
# (the sanitizer/valgrind subset: every cell, option, dtype, direction, batch kind)

@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch", ["dense", "ragged", "big"])
def test_every_kernel_once(cell, option, dtype, reverse, batch):
    # "big" passes the inference chunk (1024 packed rows), the register tiles (6 rows x 16
    # or 32 columns) and odd sizes everywhere.
    T, B, I, H, lengths = {
        "dense": (4, 3, 5, 7, None),
        "ragged": (6, 5, 3, 17, np.array([6, 0, 3, 6, 1])),
        "big": (150, 13, 9, 33, np.arange(13) * 11 + 18),
    }[batch]
    c = make_case(cell, T, B, I, H, dtype, seed=7, lengths=lengths)
    got = run(F, cell, option, c, reverse)
    want = run(R, cell, option, c, reverse)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")
    infer = run(F, cell, option, c, reverse, need_ctx=False)[0]
    assert_identical(infer, got[0], "inference")


# ---------------------------------------------------------------- 3. threads

def test_gil_is_released_during_a_kernel():
    """A Python thread keeps running while a long kernel call is in C."""
    c = make_case("lstm", 1000, 48, 32, 128, np.float64)  # ~0.15 s here: long enough to tell
    forward(F, "lstm", None, c, need_ctx=False)  # warm up
    stamps, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    forward(F, "lstm", None, c, need_ctx=False)
    t1 = time.perf_counter()
    done.set()
    th.join()
    inside = [t for t in stamps if t0 <= t <= t1]
    gaps = np.diff([t0] + inside + [t1])
    assert t1 - t0 > 0.05, "the call is too short to tell"
    assert gaps.max() < 0.5 * (t1 - t0), f"ticker stalled {gaps.max():.3f}s of {t1 - t0:.3f}s"


def _run_concurrently(jobs, threads, rounds):
    """Every job `rounds` times on each of `threads` Python threads at once, each thread
    in its own order: {(thread, round, job): run's result}."""
    results, errors = {}, []

    def worker(tid):
        try:
            for r in range(rounds):
                for j in range(len(jobs)):
                    i = (j + 5 * tid + r) % len(jobs)
                    cell, option, c, rev = jobs[i]
                    results[(tid, r, i)] = run(F, cell, option, c, rev)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    assert len(results) == threads * rounds * len(jobs)
    return results


def test_threads_on_shared_weights_match_serial():
    """Several threads call every kernel at once on shared weights: bitwise as serial."""
    from threadpoolctl import threadpool_limits
    jobs = []
    for k, (cell, option) in enumerate(CELLS * 4):
        dtype = DTYPES[k % 2]
        lengths = np.array([9, 3, 0, 9, 5, 9, 1][: 7]) if k % 3 else None
        c = make_case(cell, 9, 7, 6, 20, dtype, seed=k, lengths=lengths)
        jobs.append((cell, option, c, bool(k % 2)))
    # shared weights: every job of a cell and dtype uses the same weight arrays
    shared = {}
    for cell, option, c, _ in jobs:
        key = (cell, c["x"].dtype)
        for w in ("w_ih", "w_hh", "b_ih", "b_hh"):
            c[w] = shared.setdefault(key + (w,), c[w])
        for w in ("w_ih", "w_hh", "b_ih", "b_hh"):
            c[w].flags.writeable = False
    with threadpool_limits(1):
        serial = [run(F, cell, option, c, rev) for cell, option, c, rev in jobs]
        results = _run_concurrently(jobs, threads=4, rounds=6)
    for (tid, r, i), (outs, grads) in results.items():
        assert_identical(outs + grads, serial[i][0] + serial[i][1], f"thread {tid} job {i}")


def _shared_loops_case(cell, seed):
    """Big enough that the time loops are shared among two threads (see
    test_functional.test_time_loops_on_two_threads_give_the_numbers_of_one)."""
    lengths = np.random.default_rng(seed).integers(0, 31, size=40)
    return make_case(cell, 30, 40, 16, 128 if cell == "lstm" else 256, np.float32, seed=seed,
                     lengths=lengths)


def test_callers_sharing_the_thread_pool_match_serial():
    """Python threads whose calls want the kernels' thread pool at once: one gets it, the
    others run their parts on their own thread; every result is bitwise the serial one."""
    from threadpoolctl import threadpool_limits
    jobs = [(cell, option, _shared_loops_case(cell, k), bool(k % 2))
            for k, (cell, option) in enumerate(CELLS)]
    with threadpool_limits(2):
        serial = [run(F, cell, option, c, rev) for cell, option, c, rev in jobs]
        results = _run_concurrently(jobs, threads=3, rounds=3)
    for (tid, r, i), (outs, grads) in results.items():
        outs_serial, grads_serial = serial[i]
        # the weight gradients and dx come from BLAS, whose own threads may split them
        # differently when calls overlap: compare what the time loops alone produce
        assert_identical(outs + grads[1:2], outs_serial + grads_serial[1:2],
                         f"thread {tid} job {i}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_thread_pool():
    """After the parent has used the pool, a forked child's shared time loops neither hang
    on the parent's workers (they are not in the child) nor give other numbers."""
    from threadpoolctl import threadpool_limits
    c = _shared_loops_case("lstm", 7)
    with threadpool_limits(2):
        expected = forward(F, "lstm", None, c, need_ctx=False)[0]
        pid = os.fork()
        if pid == 0:  # the child: exit status says whether it matched
            ok = False
            try:
                with threadpool_limits(2):
                    got = forward(F, "lstm", None, c, need_ctx=False)[0]
                ok = all(np.array_equal(a, b) for a, b in zip(got, expected))
            finally:
                os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in a kernel call")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child's numbers differ"


@pytest.mark.skipif(UNDER_SANITIZER, reason="instrumentation adds its own globals")
def test_no_writable_global_state_in_the_extension():
    """No C globals that a call could write: nm lists no data/bss symbol in the extension
    beyond Cython's own (its module state and the runtime, filled at import),
    NumPy's C API table (filled once by import_array), the toolchain's (libgcc's CPU
    model, set once by the CPU check), the thread pool's (threads.c: every
    field guarded by its mutexes, tested by the two tests above), the calling thread's
    own thread count (threads.c's thread_cap: thread-local, so each thread's alone) and a
    pool worker's slot (worker_slot: thread-local, written once by the worker itself)."""
    import re
    import shutil

    from rnnfuse import _kernels
    if shutil.which("nm") is None:
        pytest.skip("nm not available")
    out = subprocess.run(["nm", "--defined-only", _kernels.__file__], capture_output=True,
                         text=True, check=True).stdout
    allowed = re.compile(r"^(_*[pP]yx|__pyx|PyArray_API$|_DYNAMIC$|_GLOBAL_OFFSET_TABLE_$|__TMC_END__$|"
                         r"__cpu_model$|__cpu_features2?$|__do_global_dtors|__dso_handle$|"
                         r"__frame_dummy|completed\.\d+$|main_interpreter_id\.\d+$|"
                         r"pool$|atfork_once$|thread_cap$|worker_slot$|"
                         r"(contiguous|generic|indirect|indirect_contiguous|strided)$)")
    mutable = [p[2] for p in (line.split() for line in out.splitlines())
               if len(p) == 3 and p[1] in "bBdD" and not allowed.match(p[2])]
    assert not mutable, f"writable globals in the kernels: {mutable}"


# ---------------------------------------------------------------- 4. memory

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_repeated_forward_backward_keeps_memory_flat():
    n = 300 if UNDER_SANITIZER else 1500
    cases = [(cell, option, make_case(cell, 20, 4, 8, 16, dtype, seed=1,
                                      lengths=np.array([20, 7, 0, 13])))
             for cell, option in CELLS for dtype in DTYPES]

    def loop(k):
        for i in range(k):
            cell, option, c = cases[i % len(cases)]
            run(F, cell, option, c, reverse=bool(i & 2), need_ctx=bool(i % 3))

    loop(200)
    gc.collect()
    tracemalloc.start()
    rss0, traced0 = _rss_bytes(), tracemalloc.get_traced_memory()[0]
    loop(n)
    gc.collect()
    traced1, rss1 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    tracemalloc.stop()
    # One LSTM training workspace here is ~40 KB: a leak of one per call would be 60 MB.
    assert traced1 - traced0 < 256 * 1024, f"traced memory grew {traced1 - traced0} B"
    if not UNDER_SANITIZER:  # ASan's quarantine keeps freed blocks resident for a while
        assert rss1 - rss0 < 8 * 2**20, f"resident memory grew {(rss1 - rss0) / 2**20:.1f} MiB"


@pytest.mark.parametrize("cell,option", CELLS)
def test_ctx_memory_is_freed_when_dropped_or_used(cell, option):
    c = make_case(cell, 200, 8, 4, 32, np.float64, lengths=np.arange(8) * 20 + 50)
    F.release_workspace()  # a spare kept from an earlier call would be taken, not allocated
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        outs, ctx = forward(F, cell, option, c)
        held = tracemalloc.get_traced_memory()[0] - base
        out_bytes = sum(a.nbytes for a in outs)
        assert held - out_bytes > 200 * 8 * 32 * 8  # the ctx holds the saved steps
        del ctx
        assert tracemalloc.get_traced_memory()[0] - base < out_bytes + 64 * 1024
        outs2, ctx = forward(F, cell, option, c)
        grads = backward(F, cell, c, ctx)
        F.release_workspace()  # the workspace went to the thread's spare: freed on request
        kept = tracemalloc.get_traced_memory()[0] - base - sum(
            a.nbytes for a in outs + outs2 + grads if a is not None)
        assert kept < 64 * 1024, f"a used ctx still holds {kept} B"
    finally:
        tracemalloc.stop()


def _inference_extra(cell, option, T, B, I, H, dtype, lengths, reverse):
    """Peak memory of an inference forward beyond its outputs (NumPy allocations)."""
    c = make_case(cell, T, B, I, H, dtype, lengths=lengths)
    c["h0"] = c["c0"] = None
    forward(F, cell, option, c, reverse, need_ctx=False)  # warm any cache
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        outs, ctx = forward(F, cell, option, c, reverse, need_ctx=False)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert ctx is None
    return peak - sum(a.nbytes for a in outs)


@pytest.mark.parametrize("cell,option", [("lstm", None), ("gru", False), ("rnn", "relu")])
@pytest.mark.parametrize("ragged,reverse", [(False, False), (True, True)])
def test_inference_workspace_does_not_grow_with_T(cell, option, ragged, reverse):
    """need_ctx=False: beyond its outputs, a forward allocates a workspace bounded by
    B*H states plus one chunk of max(B, 1024) packed rows and the packed weights, whatever T
    (plus the batch plan, 3 int64 per step)."""
    B, I, H, dtype = 4, 8, 16, np.float32
    G, item = GATES[cell], np.dtype(dtype).itemsize
    extras = {}
    for T in (1000, 8000):
        lengths = np.arange(B) * (T // 8) + T // 2 if ragged else None
        lengths = None if lengths is None else np.minimum(lengths, T)
        extras[T] = _inference_extra(cell, option, T, B, I, H, dtype, lengths, reverse)
    rows = max(B, 1024)
    packed = -(-G * H // 16) * 16 * (2 * H + I)  # W_hh^T (the GRU may pack two parts), W_ih^T
    bound = item * (G * H + rows * (G * H + I) + 4 * B * H + 3 * B * G * H + packed) \
        + 3 * 8 * (8000 + 2) + 8 * B + 16 * 1024
    for T, extra in extras.items():
        assert extra <= bound, f"T={T}: {extra} B beyond the outputs (bound {bound})"
    assert extras[8000] - extras[1000] <= 3 * 8 * 7000 + 4096  # only the plan grows


# ---------------------------------------------------------------- 5. sizes

def test_impossible_sizes_raise_memory_error():
    """Zero-stride views let a small object stand for a huge x or weight: the contiguous
    copy (or the workspace) cannot be allocated, and the call raises MemoryError."""
    z = np.float32(0)
    w_hh, w_ih = np.zeros((8, 2), np.float32), np.zeros((8, 2**10), np.float32)
    huge_x = np.broadcast_to(z, (2**20, 2**20, 2**10))  # 4 PiB
    with pytest.raises(MemoryError):
        F.lstm_forward(huge_x, None, None, w_ih, w_hh, None, None, need_ctx=False)
    H = 2**24  # w_hh (4H, H): 4 PiB
    x = np.zeros((2, 1, 1), np.float32)
    with pytest.raises(MemoryError):
        F.lstm_forward(x, None, None, np.broadcast_to(z, (4 * H, 1)),
                       np.broadcast_to(z, (4 * H, H)), None, None)
    # and the process carries on
    assert F.rnn_forward(x, None, np.ones((1, 1), np.float32), np.ones((1, 1), np.float32),
                         None, None)[0].shape == (2, 1, 1)


@pytest.mark.skipif(UNDER_SANITIZER or sys.platform != "linux",
                    reason="RLIMIT_AS cannot be used with ASan's shadow memory")
def test_workspace_that_cannot_be_allocated_raises_memory_error():
    """Under an address-space limit, a call whose workspace does not fit raises MemoryError
    before the kernel runs, leaves its inputs alone, and the next (smaller) call works."""
    code = textwrap.dedent("""
        import resource, numpy as np
        from rnnfuse import functional as F
        rng = np.random.default_rng(0)
        T, B, I, H = 4096, 64, 4, 256            # training workspace ~ 1.7 GB of float32
        x = rng.standard_normal((T, B, I), dtype=np.float32)
        w_ih = rng.standard_normal((4 * H, I), dtype=np.float32)
        w_hh = rng.standard_normal((4 * H, H), dtype=np.float32) / 16
        x0, w0 = x.copy(), w_hh.copy()
        F.lstm_forward(x[:8], None, None, w_ih, w_hh, None, None)   # load everything first
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 600 * 2**20, hard))
        try:
            F.lstm_forward(x, None, None, w_ih, w_hh, None, None)
        except MemoryError:
            print("MemoryError")
        assert np.array_equal(x, x0) and np.array_equal(w_hh, w0)
        y, h, c, _ = F.lstm_forward(x, None, None, w_ih, w_hh, None, None, need_ctx=False)
        assert np.isfinite(y).all() and y.shape == (T, B, H)
        print("ok")
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["MemoryError", "ok"], p.stdout + p.stderr[-2000:]


BIG = pytest.mark.skipif(os.environ.get("RNNFUSE_BIG_TESTS") != "1",
                         reason="needs ~10-20 GB of memory: set RNNFUSE_BIG_TESTS=1")


def _avail_bytes():
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@BIG
@pytest.mark.parametrize("need_ctx", [False, True])
def test_indices_beyond_2_31(need_ctx):
    """T*B*G*H (training) or T*B*H (y itself, inference) beyond 2**31 elements: the last
    batch rows, whose elements sit past 2**31, agree with the same rows run alone.
    (Inference needs ~10 GB and ~50 s; training ~19 GB.)"""
    T, B, I, H = 2**12, 2**13 + 3, 1, 64    # T*B*H = 2**31 + 786432
    if need_ctx:
        B = 2**11 + 5                        # T*B*4H > 2**31; ws ~ 7*T*B*H floats
    need = (T * B * H * (8 if need_ctx else 1) + T * B * I * 2) * 4 * 1.15
    if _avail_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free memory")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, B, I), dtype=np.float32)
    w_ih = rng.standard_normal((4 * H, I), dtype=np.float32)
    w_hh = (rng.standard_normal((4 * H, H)) / 8).astype(np.float32)
    lengths = np.full(B, T)
    lengths[-3:] = [T - 1, T // 2, 1]        # ragged: the plan sorts them to the end
    y, h_n, c_n, ctx = F.lstm_forward(x, None, None, w_ih, w_hh, None, None, lengths=lengths,
                                      need_ctx=need_ctx)
    assert T * B * H * (4 if need_ctx else 1) > 2**31
    rows = [0, B - 4, B - 3, B - 2, B - 1]
    dy = rng.standard_normal((T, len(rows), H), dtype=np.float32) if need_ctx else None
    if need_ctx:
        full_dy = np.zeros((T, B, H), np.float32)
        full_dy[:, rows] = dy
        grads = F.lstm_backward(full_dy, None, None, ctx)
        del full_dy, ctx
    ys, hs, cs, ctx1 = F.lstm_forward(np.ascontiguousarray(x[:, rows]), None, None, w_ih, w_hh,
                                      None, None, lengths=lengths[rows], need_ctx=need_ctx)
    # Not bitwise: the rows per step differ, so the micro-kernel's row tiles (and their
    # split sums) differ; an index error would show as garbage, not as rounding.
    for got, want in ((y[:, rows], ys), (h_n[rows], hs), (c_n[rows], cs)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    if need_ctx:
        g1 = F.lstm_backward(dy, None, None, ctx1)
        np.testing.assert_allclose(grads[0][:, rows], g1[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grads[3], g1[3], rtol=1e-3, atol=1e-3)  # dw_ih: same rows


# ---------------------------------------------------------------- 6. determinism

DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, sys, numpy as np
    from threadpoolctl import threadpool_limits
    from rnnfuse import functional as F
    threads = int(sys.argv[1])
    h = hashlib.sha256()
    for k, (cell, opt) in enumerate([("lstm", None), ("gru", True), ("gru", False),
                                     ("rnn", "tanh"), ("rnn", "relu")]):
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(k)
            T, B, I, H, G = 24, 48, 40, 72, {"lstm": 4, "gru": 3, "rnn": 1}[cell]
            r = lambda *s: (rng.standard_normal(s) / 8).astype(dtype)
            x, w_ih, w_hh, b = r(T, B, I), r(G * H, I), r(G * H, H), r(G * H)
            lengths = rng.integers(0, T + 1, B)
            for rev in (False, True):
                kw = dict(lengths=lengths, reverse=rev)
                with threadpool_limits(threads):
                    if cell == "lstm":
                        *outs, ctx = F.lstm_forward(x, r(B, H), r(B, H), w_ih, w_hh, b, b, **kw)
                        grads = F.lstm_backward(r(T, B, H), r(B, H), r(B, H), ctx)
                    else:
                        extra = ({"linear_before_reset": opt} if cell == "gru"
                                 else {"nonlinearity": opt})
                        fwd = getattr(F, cell + "_forward")
                        *outs, ctx = fwd(x, r(B, H), w_ih, w_hh, b, None, **kw, **extra)
                        grads = getattr(F, cell + "_backward")(r(T, B, H), r(B, H), ctx)
                for a in list(outs) + list(grads):
                    if a is not None:
                        h.update(a.tobytes())
    print(h.hexdigest())
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_identical_run_after_run(threads):
    """Same inputs, same thread count: identical bits in one process and across processes
    (fresh allocations, other addresses and alignments)."""
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(v, None)
    digests = set()
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(threads)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        digests.add(p.stdout.strip())
    assert len(digests) == 1, digests
    # and in this process, twice, with other live allocations in between
    ns = {}
    exec(compile("def main(argv):\n" + textwrap.indent(
        DETERMINISM_SCRIPT.replace("sys.argv", "argv").replace("print(", "return ("), "    "),
        "<determinism>", "exec"), ns)
    junk = [np.empty(n) for n in (7, 33, 1000)]
    a = ns["main"]([None, str(threads)])
    junk.append(np.empty(12345))
    b = ns["main"]([None, str(threads)])
    assert a == b and a in digests


# ---------------------------------------------------------------- 7. numerical edges

@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", ["+", "-", "mixed"])
def test_huge_preactivations_saturate_without_nan(cell, option, dtype, sign):
    """Pre-activations of +-1e4 (through x, the biases and the state): finite, saturated
    gates and finite gradients in both dtypes, and the reference's values."""
    T, B, I, H = 4, 3, 3, 5
    c = make_case(cell, T, B, I, H, dtype, seed=11)
    rng = np.random.default_rng(12)
    s = {"+": 1.0, "-": -1.0, "mixed": None}[sign]

    def big(shape):
        sg = s if s is not None else rng.choice([-1.0, 1.0], size=shape)
        return (1e4 * sg * np.ones(shape)).astype(dtype)

    c["b_ih"] = big(c["b_ih"].shape)
    c["x"] = (c["x"] * 1e3).astype(dtype)
    c["c0"] = big(c["c0"].shape)
    if option != "relu":
        c["h0"] = big(c["h0"].shape)
    with np.errstate(over="ignore", invalid="ignore"):
        got = run(F, cell, option, c, reverse=True)
        want = run(R, cell, option, c, reverse=True)
    for a in got[0] + got[1]:
        if a is not None:
            assert np.all(np.isfinite(a)), "non-finite value from saturation"
    if cell == "lstm" or option == "tanh":  # (a GRU carries its huge h0 along)
        assert np.all(np.abs(got[0][0]) <= 1)
    assert_close(got[0], want[0], dtype, "forward")
    # Gradients through saturated gates are tiny differences of large terms: compare
    # against the reference's scale only (both are finite, checked above).
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_and_inf_stay_in_their_sequence(cell, option, bad, reverse):
    """A non-finite x[t, b] reaches only sequence b's later steps (in its direction), its
    h_n/c_n, and the weight/bias gradients (sums over all rows); every other row's outputs
    and dx, dh0, dc0 are bitwise those of the clean run. In padding it changes nothing."""
    T, B, I, H = 6, 4, 3, 5
    lengths = np.array([6, 4, 6, 2])
    c = make_case(cell, T, B, I, H, np.float64, seed=3, lengths=lengths)
    clean = run(F, cell, option, c, reverse)
    dirty = dict(c, x=c["x"].copy())
    dirty["x"][2, 1, 0] = bad                  # step 2 of row 1 (length 4)
    dirty["x"][5, 3, 1] = bad                  # padding of row 3 (length 2)
    with np.errstate(invalid="ignore", over="ignore"):
        got = run(F, cell, option, dirty, reverse)
    (y, h_n, *c_n), (dx, dh0, *rest) = got
    n = len(got[0])
    others = [0, 2, 3]
    np.testing.assert_array_equal(y[:, others], clean[0][0][:, others])
    for k in range(1, n):
        np.testing.assert_array_equal(got[0][k][others], clean[0][k][others])
    np.testing.assert_array_equal(dx[:, others], clean[1][0][:, others])
    for k in range(1, n):  # dh0 (dc0)
        np.testing.assert_array_equal(got[1][k][others], clean[1][k][others])
    before = slice(0, 2) if not reverse else slice(3, 4)  # steps the value cannot reach
    np.testing.assert_array_equal(y[before, 1], clean[0][0][before, 1])
    if bad != bad:  # NaN: it does reach row 1's state from its step on
        assert np.isnan(y[2, 1]).any() and np.isnan(h_n[1]).any()
    np.testing.assert_array_equal(y[4:, 1], 0)  # padding stays zero


def test_nan_in_padding_of_upstream_gradient_is_ignored():
    c = make_case("lstm", 5, 3, 2, 4, np.float64, lengths=np.array([5, 2, 0]))
    clean = run(F, "lstm", None, c)
    c["dy"] = c["dy"].copy()
    c["dy"][3:, 1] = np.nan
    c["dy"][:, 2] = np.inf
    got = run(F, "lstm", None, c)
    for a, b in zip(got[1], clean[1]):
        np.testing.assert_array_equal(a, b)
