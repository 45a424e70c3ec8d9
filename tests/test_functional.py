"""The C kernels (rnnfuse.functional) against the NumPy reference, and their boundary.

One test, two backends: every cell, option, dtype and ragged batch runs through both and
must agree (float64 to 1e-10 relative, float32 to 1e-5). The reference itself is checked
by finite differences in test_reference.py.
"""
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnfuse import _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R

from checks import assert_close, kernel, stable_seed  # tests/checks.py
from layouts import relayout  # tests/layouts.py

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
CELLS = [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"), ("rnn", "relu")]


def make_case(cell, T, B, I, H, dtype, seed=0, lengths=None, biases=(True, True),
              states=True, upstream=True):
    """Random weights (scale ~1/sqrt(H)), inputs and upstream gradients for one call."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    s = 1 / np.sqrt(H)
    return dict(
        x=r(T, B, I), h0=r(B, H) if states else None, c0=r(B, H) if states else None,
        w_ih=r(G * H, I, scale=s), w_hh=r(G * H, H, scale=s),
        b_ih=r(G * H, scale=s) if biases[0] else None,
        b_hh=r(G * H, scale=s) if biases[1] else None,
        lengths=lengths,
        dy=r(T, B, H) if upstream else None, dh_n=r(B, H) if upstream else None,
        dc_n=r(B, H) if upstream else None)


def run(module, cell, option, case, reverse=False, need_ctx=True):
    """Forward then backward; returns (forward outputs, gradients) as tuples."""
    c = case
    weights = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    if cell == "lstm":
        y, h_n, c_n, ctx = module.lstm_forward(c["x"], c["h0"], c["c0"], *weights,
                                               lengths=c["lengths"], reverse=reverse,
                                               need_ctx=need_ctx)
        outs = (y, h_n, c_n)
        grads = module.lstm_backward(c["dy"], c["dh_n"], c["dc_n"], ctx) if need_ctx else ()
    elif cell == "gru":
        y, h_n, ctx = module.gru_forward(c["x"], c["h0"], *weights, lengths=c["lengths"],
                                         reverse=reverse, linear_before_reset=option,
                                         need_ctx=need_ctx)
        outs = (y, h_n)
        grads = module.gru_backward(c["dy"], c["dh_n"], ctx) if need_ctx else ()
    else:
        y, h_n, ctx = module.rnn_forward(c["x"], c["h0"], *weights, lengths=c["lengths"],
                                         reverse=reverse, nonlinearity=option,
                                         need_ctx=need_ctx)
        outs = (y, h_n)
        grads = module.rnn_backward(c["dy"], c["dh_n"], ctx) if need_ctx else ()
    return tuple(outs), tuple(grads)


def check_against_reference(cell, option, case, dtype, reverse, tol=None):
    got = run(F, cell, option, case, reverse)
    want = run(R, cell, option, case, reverse)
    assert_close(got[0], want[0], dtype, "forward", tol)
    assert_close(got[1], want[1], dtype, "backward", tol)
    return got


# ---------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("cell,option", [("lstm", None), ("gru", False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_wide_input_projection_in_panel_blocks_matches_reference(cell, option, dtype):
    """An input wide enough that W_ih is projected in several blocks of panels (each about
    512 KiB, kept in L2), the last one partial: the reference's numbers."""
    T, B, I, H = 3, 8, 1200, 70  # 4H = 280 columns: 18 panels of 1200 rows, 6 a block
    check_against_reference(cell, option, make_case(cell, T, B, I, H, dtype, seed=8), dtype,
                            reverse=False)


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths", [None, "ragged", "short"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("optional", ["all", "none", "b_ih only", "b_hh only"])
def test_matches_reference(cell, option, dtype, lengths, reverse, optional):
    T, B, I, H = 7, 5, 3, 6
    lens = {None: None, "ragged": np.array([7, 0, 3, 7, 1]), "short": np.array([2, 5, 4, 1, 3])}
    biases = {"all": (True, True), "none": (False, False),
              "b_ih only": (True, False), "b_hh only": (False, True)}[optional]
    given = optional == "all"
    case = make_case(cell, T, B, I, H, dtype, seed=stable_seed(cell, lengths) % 1000,
                     lengths=lens[lengths], biases=biases, states=given, upstream=given)
    check_against_reference(cell, option, case, dtype, reverse)


@settings(max_examples=60, deadline=None)
@given(data=st.data(),
       cell_option=st.sampled_from(CELLS),
       dtype=st.sampled_from([np.float32, np.float64]),
       T=st.integers(1, 6), B=st.integers(1, 5), I=st.integers(1, 9), H=st.integers(1, 17),
       reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(data, cell_option, dtype, T, B, I, H, reverse, seed):
    cell, option = cell_option
    lengths = data.draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    case = make_case(cell, T, B, I, H, dtype, seed=seed, lengths=lengths)
    # float64 to 1e-9 here: the random sizes saturate activations (H=1 scales the weights
    # to ~1), where 1 - h^2 turns a last-ulp difference between libm's tanh and NumPy's
    # own (a SIMD tanh on AVX-512 CPUs) into a relative error of a few 1e-10
    check_against_reference(cell, option, case, dtype, reverse,
                            tol=1e-9 if dtype == np.float64 else None)


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_matches_training_forward_bitwise(cell, option, reverse, dtype, threads):
    """The inference forward projects chunks of 1024 packed rows, shared among the BLAS's
    threads; the training forward all rows at once, on one thread: the same numbers."""
    from threadpoolctl import threadpool_limits
    T, B = 300, 9  # past the chunk, and wide enough (G*H*I) to be shared by threads
    lengths = np.random.default_rng(1).integers(T // 4, T + 1, size=B)
    lengths[2] = T
    case = make_case(cell, T, B, 520, 64, dtype, lengths=lengths)
    train_outs, _ = run(F, cell, option, case, reverse)
    with threadpool_limits(threads):
        infer_outs, _ = run(F, cell, option, case, reverse, need_ctx=False)
    for a, b in zip(infer_outs, train_outs):
        np.testing.assert_array_equal(a, b)
    assert_close(infer_outs, run(R, cell, option, case, reverse, need_ctx=False)[0],
                 dtype, "inference")


def test_need_ctx_false_returns_no_ctx():
    case = make_case("gru", 3, 2, 2, 3, np.float32)
    y, h_n, ctx = F.gru_forward(case["x"], None, case["w_ih"], case["w_hh"], None, None,
                                need_ctx=False)
    assert ctx is None and y.shape == (3, 2, 3) and h_n.shape == (2, 3)


@pytest.mark.parametrize("cell,option", CELLS)
def test_padding_is_zero_and_final_state_is_last_valid(cell, option):
    case = make_case(cell, 6, 4, 3, 5, np.float64, lengths=np.array([6, 2, 0, 4]))
    (y, h_n, *rest), grads = run(F, cell, option, case)
    for b, n in enumerate(case["lengths"]):
        assert np.all(y[n:, b] == 0)
        np.testing.assert_array_equal(h_n[b], y[n - 1, b] if n else case["h0"][b])
        np.testing.assert_array_equal(grads[0][n:, b], 0)  # dx at padding
    np.testing.assert_array_equal(grads[1][2], case["dh_n"][2])  # length 0: dh0 = dh_n


# ---------------------------------------------------------------- memory layout

@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_non_contiguous_inputs(cell, option, layout):
    case = make_case(cell, 5, 3, 4, 6, np.float64, lengths=np.array([5, 2, 4]))
    want = run(F, cell, option, case)

    def relayout(a):
        if a is None or a.ndim == 0:
            return a
        if layout == "fortran":
            return np.asfortranarray(a)
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]

    odd = {k: relayout(v) for k, v in case.items()}
    assert not odd["x"].flags.c_contiguous
    got = run(F, cell, option, odd)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell,option", CELLS)
def test_inputs_are_not_modified(cell, option):
    case = make_case(cell, 4, 3, 2, 5, np.float32, lengths=np.array([4, 1, 3], np.int64))
    before = {k: None if v is None else v.copy() for k, v in case.items()}
    run(F, cell, option, case, reverse=True)
    for k, v in case.items():
        if v is not None:
            np.testing.assert_array_equal(v, before[k], err_msg=k)
            assert v.flags.writeable, f"{k} was made read-only"


def test_read_only_inputs():
    case = make_case("lstm", 3, 2, 2, 3, np.float64)
    for v in case.values():
        if v is not None:
            v.flags.writeable = False
    got = run(F, "lstm", None, case)
    assert_close(got[1], run(R, "lstm", None, case)[1], np.float64)


def test_array_like_inputs():
    case = make_case("rnn", 3, 2, 2, 3, np.float64)
    want = run(F, "rnn", "tanh", case)
    lists = {k: None if v is None else v.tolist() for k, v in case.items()}
    got = run(F, "rnn", "tanh", lists)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- empty sizes

@pytest.mark.parametrize("cell,option", CELLS)
def test_zero_steps(cell, option):
    case = make_case(cell, 0, 3, 2, 4, np.float64)
    (y, h_n, *c_n), grads = run(F, cell, option, case)
    assert y.shape == (0, 3, 4)
    np.testing.assert_array_equal(h_n, case["h0"])
    dx, dh0, *rest = grads
    assert dx.shape == (0, 3, 2)
    np.testing.assert_array_equal(dh0, case["dh_n"])
    dw_ih, dw_hh, db_ih, db_hh = rest[-4:]
    for g in (dw_ih, dw_hh, db_ih, db_hh):
        np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("cell,option", CELLS)
def test_zero_batch(cell, option):
    case = make_case(cell, 4, 0, 2, 3, np.float32, lengths=np.zeros(0, np.int64))
    (y, h_n, *_), grads = run(F, cell, option, case)
    assert y.shape == (4, 0, 3) and h_n.shape == (0, 3)
    assert grads[0].shape == (4, 0, 2)
    np.testing.assert_array_equal(grads[-4], 0)  # dw_ih


# ---------------------------------------------------------------- bad input

def lstm_args(**change):
    case = make_case("lstm", 4, 3, 2, 5, np.float32)
    args = dict(x=case["x"], h0=case["h0"], c0=case["c0"], w_ih=case["w_ih"],
                w_hh=case["w_hh"], b_ih=case["b_ih"], b_hh=case["b_hh"])
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,message", [
    (dict(x=np.ones((4, 3, 2), np.int64)), TypeError, "x must have dtype float32 or float64, got int64"),
    (dict(x=np.ones((4, 3, 2), np.float16)), TypeError, "x must have dtype float32 or float64, got float16"),
    (dict(x=np.ones((4, 3, 2), np.complex64)), TypeError, "x must have dtype float32 or float64"),
    (dict(x=None), TypeError, "x must be an array, got None"),
    (dict(x=np.ones((4, 3), np.float32)), ValueError, "x must be 3-D (T, B, input_size), got 2-D"),
    (dict(x=np.ones((4, 3, 0), np.float32)), ValueError, "x must have input_size > 0"),
    (dict(w_ih=np.ones((20, 2), np.float64)), TypeError, "w_ih must have dtype float32 (the dtype of x), got float64"),
    (dict(w_ih=np.ones((20, 3), np.float32)), ValueError, "w_ih must have shape (20, 2), got (20, 3)"),
    (dict(w_ih=np.ones(20, np.float32)), ValueError, "w_ih must be 2-D with shape (20, 2), got 1-D"),
    (dict(w_ih=None), TypeError, "w_ih must be an array, got None"),
    (dict(w_hh=np.ones((5, 5), np.float32)), ValueError, "w_hh must have shape (4*hidden_size, hidden_size)"),
    (dict(w_hh=np.ones((0, 0), np.float32)), ValueError, "hidden_size > 0"),
    (dict(w_hh=np.ones((20, 5), np.float64)), TypeError, "w_hh must have dtype float32"),
    (dict(b_ih=np.ones(19, np.float32)), ValueError, "b_ih must have shape (20,), got (19,)"),
    (dict(b_hh=np.ones(20, np.float64)), TypeError, "b_hh must have dtype float32"),
    (dict(h0=np.ones((3, 4), np.float32)), ValueError, "h0 must have shape (3, 5), got (3, 4)"),
    (dict(c0=np.ones((2, 5), np.float32)), ValueError, "c0 must have shape (3, 5), got (2, 5)"),
    (dict(c0=np.ones((3, 5), np.int32)), TypeError, "c0 must have dtype float32"),
    (dict(h0=np.array([[object()]])), TypeError, "h0 must have dtype float32"),
])
def test_forward_rejects_bad_arrays(change, error, message):
    args = lstm_args(**change)
    with pytest.raises(error) as info:
        F.lstm_forward(**args)
    assert message in str(info.value)


@pytest.mark.parametrize("lengths,error,message", [
    (np.array([1.0, 2.0, 3.0]), TypeError, "lengths must be integers, got dtype float64"),
    (np.array([True, False, True]), TypeError, "lengths must be integers, got dtype bool"),
    (np.array([1, 2]), ValueError, "lengths must have shape (3,) (one per batch row), got (2,)"),
    (np.array([[1, 2, 3]]), ValueError, "lengths must have shape (3,)"),
    (np.array([1, 5, 2]), ValueError, "lengths must lie in [0, T=4], got [5]"),
    (np.array([-1, 2, 2]), ValueError, "lengths must lie in [0, T=4], got [-1]"),
    ("abc", TypeError, "lengths must be integers"),
])
def test_forward_rejects_bad_lengths(lengths, error, message):
    with pytest.raises(error) as info:
        F.lstm_forward(**lstm_args(), lengths=lengths)
    assert message in str(info.value)


def test_lengths_accept_any_integer_dtype():
    args = lstm_args()
    a = F.lstm_forward(**args, lengths=np.array([4, 1, 2], np.uint8))
    b = F.lstm_forward(**args, lengths=[4, 1, 2])
    np.testing.assert_array_equal(a[0], b[0])


def test_options_are_checked():
    case = make_case("gru", 2, 1, 1, 2, np.float64)
    args = (case["x"], None, case["w_ih"], case["w_hh"], None, None)
    with pytest.raises(TypeError, match="linear_before_reset must be a bool, got str"):
        F.gru_forward(*args, linear_before_reset="yes")
    rnn = make_case("rnn", 2, 1, 1, 2, np.float64)
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        F.rnn_forward(rnn["x"], None, rnn["w_ih"], rnn["w_hh"], None, None,
                      nonlinearity="sigmoid")


@pytest.mark.parametrize("change,error,message", [
    (dict(dy=np.ones((4, 3, 4), np.float32)), ValueError, "dy must have shape (4, 3, 5), got (4, 3, 4)"),
    (dict(dy=np.ones((4, 3, 5), np.float64)), TypeError, "dy must have dtype float32"),
    (dict(dh_n=np.ones((3, 5, 1), np.float32)), ValueError, "dh_n must be 2-D with shape (3, 5)"),
    (dict(dc_n=np.ones((3, 5), np.int64)), TypeError, "dc_n must have dtype float32"),
])
def test_backward_rejects_bad_gradients(change, error, message):
    *_, ctx = F.lstm_forward(**lstm_args())
    grads = dict(dy=None, dh_n=None, dc_n=None)
    grads.update(change)
    with pytest.raises(error) as info:
        F.lstm_backward(grads["dy"], grads["dh_n"], grads["dc_n"], ctx)
    assert message in str(info.value)


def test_ctx_is_used_once():
    *_, ctx = F.lstm_forward(**lstm_args())
    F.lstm_backward(None, None, None, ctx)
    with pytest.raises(ValueError, match="ctx was already used by a backward call"):
        F.lstm_backward(None, None, None, ctx)


def test_ctx_of_another_cell_or_module_is_refused():
    case = make_case("gru", 2, 2, 2, 3, np.float64)
    *_, gru_ctx = F.gru_forward(case["x"], None, case["w_ih"], case["w_hh"], None, None)
    with pytest.raises(ValueError, match="ctx comes from gru_forward, but this is rnn_backward"):
        F.rnn_backward(None, None, gru_ctx)
    *_, ref_ctx = R.gru_forward(case["x"], None, case["w_ih"], case["w_hh"], None, None)
    with pytest.raises(TypeError, match="ctx must be the ctx returned by rnnfuse.functional.gru_forward"):
        F.gru_backward(None, None, ref_ctx)
    with pytest.raises(TypeError, match="got NoneType"):
        F.gru_backward(None, None, None)


def test_failed_backward_validation_keeps_ctx_usable():
    *_, ctx = F.lstm_forward(**lstm_args())
    with pytest.raises(ValueError):
        F.lstm_backward(np.ones((1, 1, 1), np.float32), None, None, ctx)
    assert F.lstm_backward(None, None, None, ctx)[0].shape == (4, 3, 2)


def training_ctx(cell, option, case, **variants):
    """A training forward's ctx (functional's forward of cell with this option)."""
    c = case
    args = (c["x"], c["h0"], *([c["c0"]] if cell == "lstm" else []), c["w_ih"], c["w_hh"],
            c["b_ih"], c["b_hh"], c["lengths"])
    if cell == "lstm":
        return F.lstm_forward(*args, **variants)[-1]
    forward = F.gru_forward if cell == "gru" else F.rnn_forward
    return forward(*args, False, option, **variants)[-1]


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("T,B,lengths", [(1, 3, None), (1, 20, None), (4, 5, [4, 1, 3, 0, 4]),
                                         (1, 2, [1, 0])])
@pytest.mark.parametrize("inputs,states", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("variant", [None, "zoneout", "layer_norm"])
def test_backward_without_the_input_or_state_gradients_keeps_the_others_bitwise(
        cell, option, T, B, lengths, inputs, states, variant):
    """inputs=False leaves dx out, states=False dh0 and dc0 (the kernels then skip what
    only they need: one step's few rows read neither W_ih nor W_hh); every other gradient
    keeps its bits. (B=20 takes the packed W_hh, B=3 W_hh read in place; T=4 carries dh
    through the steps.)"""
    if variant == "layer_norm" and (cell == "rnn" or option is False):
        pytest.skip("layer_norm is for the LSTM and the GRU with linear_before_reset")
    G, H = GATES[cell], 6
    case = make_case(cell, T, B, 5, H, np.float32, seed=stable_seed(cell, T, B),
                     lengths=None if lengths is None else np.array(lengths))
    rng = np.random.default_rng(7)
    variants = {None: {}, "zoneout": dict(zoneout=0.3),
                "layer_norm": dict(layer_norm=tuple(
                    1 + 0.1 * rng.standard_normal(n).astype(np.float32)
                    for n in ((G * H, G * H, H, H) if cell == "lstm" else (G * H, G * H))))}
    finals = [case["dh_n"], case["dc_n"]] if cell == "lstm" else [case["dh_n"]]
    full = F._backward(cell, case["dy"], finals, training_ctx(cell, option, case,
                                                              **variants[variant]))
    part = F._backward(cell, case["dy"], finals,
                       training_ctx(cell, option, case, **variants[variant]),
                       inputs=inputs, states=states)
    n_states = 2 if cell == "lstm" else 1
    for k, (got, want) in enumerate(zip(part, full)):
        left_out = (k == 0 and not inputs) or (1 <= k <= n_states and not states)
        if left_out:
            assert got is None, k
        else:
            np.testing.assert_array_equal(got, want, err_msg=str(k))


# ---------------------------------------------------------------- numerical edges

@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("lengths", [None, [4, 1, 0]])
@pytest.mark.parametrize("variant", ["plain", "peepholes", "zoneout", "recurrent_dropout"])
def test_backward_into_another_buffer_reads_ws_only(kernel, cell, option, lengths, variant):
    """_kernels.backward's out (rnnfuse.torch's operators take it): the kernels write into
    out, leave the saved state as the forward left it, and give the in-place backward's
    bits. out starts as NaN, so a read of what the backward did not write shows."""
    if variant == "peepholes" and cell != "lstm":
        pytest.skip("peepholes are an LSTM option")
    T, B, H = 4, 3, 5
    c = make_case(cell, T, B, 2, H, np.float64, seed=stable_seed(cell, option, variant),
                  lengths=lengths)
    rng = np.random.default_rng(7)
    mask = lambda *shape: (rng.random(shape) < 0.4).astype(np.float64)  # noqa: E731
    lstm = cell == "lstm"
    extra = {"plain": {}, "peepholes": dict(peep=rng.standard_normal(3 * H)),
             "zoneout": dict(zoneout=(mask(T, B, H), mask(T, B, H)) if lstm else mask(T, B, H)),
             "recurrent_dropout": dict(recurrent_dropout=2.5 * mask(B, H))}[variant]
    kernel_option = option == "relu" if cell == "rnn" else option
    states = (c["h0"], c["c0"]) if lstm else (c["h0"],)
    finals = [c["dh_n"], c["dc_n"]] if lstm else [c["dh_n"]]

    def ctx():
        return F._forward(cell, c["x"], states, c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"],
                          lengths, False, kernel_option, True, **extra)[2]

    want = F._backward(cell, c["dy"], finals, ctx())
    saved = ctx()
    ws = saved.ws
    kept = ws.copy()
    out = np.full_like(ws, np.nan)
    got = F._backward(cell, c["dy"], finals, saved, keep_spare=False, out=out)
    np.testing.assert_array_equal(ws, kept)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gates_stay_finite(cell, option, dtype):
    case = make_case(cell, 3, 2, 2, 3, dtype)
    case["x"] = (np.sign(case["x"]) * 1e4).astype(dtype)
    case["w_ih"] = np.sign(case["w_ih"]).astype(dtype)
    outs, grads = run(F, cell, option, case)
    for a in outs + grads:
        if option != "relu":  # relu is unbounded: 1e4 inputs overflow float32 honestly
            assert np.all(np.isfinite(a))


def test_nan_propagates_to_the_affected_row_only():
    case = make_case("lstm", 3, 2, 2, 3, np.float64)
    case["x"][1, 0, 0] = np.nan
    (y, h_n, c_n), _ = run(F, "lstm", None, case)
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1:, 0]))
    assert np.all(np.isfinite(y[:, 1])) and np.all(np.isfinite(h_n[1]))


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("B", [1, 2, 3, 6, 7, 13])
@pytest.mark.parametrize("H", [16, 33, 40])
def test_register_tile_edges_match_reference(cell, option, B, H):
    # The float32 step product works in tiles of 6 rows x 16 or 32 columns: cover whole and
    # partial tiles in both directions, ragged so the running rows shrink step by step.
    lengths = np.arange(B) % 4 + 2
    case = make_case(cell, 5, B, 7, H, np.float32, seed=B * H, lengths=lengths)
    check_against_reference(cell, option, case, np.float32, reverse=bool(B % 2))


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("H", [1, 5, 8, 12, 29, 32, 45, 72])
@pytest.mark.parametrize("biases", [(True, True), (False, False), (False, True)])
def test_one_pass_units_match_reference(cell, option, H, biases):
    # The float32 forward's pointwise code (AVX2) walks a row's units 32 at a time, then 8,
    # then a masked rest: cover each kind, absent biases included.
    case = make_case(cell, 4, 3, 6, H, np.float32, seed=H, lengths=np.array([4, 2, 3]),
                     biases=biases)
    check_against_reference(cell, option, case, np.float32, reverse=H % 2 == 1)


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("threads", [1, 2])
def test_repeatable_bitwise_at_each_thread_count(cell, option, threads):
    # BLAS may split the large products over threads: each thread count must agree with the
    # reference and repeat bitwise, run after run.
    from threadpoolctl import threadpool_limits
    lengths = np.full(64, 30)
    lengths[[3, 9]] = [0, 11]
    case = make_case(cell, 30, 64, 40, 96, np.float32, seed=threads, lengths=lengths)
    with threadpool_limits(threads):
        first = check_against_reference(cell, option, case, np.float32, reverse=True)
        again = run(F, cell, option, case, reverse=True)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_kernel_threads_follow_the_blas_limit():
    """The kernels' own parallel parts use the thread count of SciPy's BLAS, so that one
    threadpoolctl limit governs both."""
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(1):
        assert _kernels.threads() == 1
    with threadpool_limits(2):
        counts = [i["num_threads"] for i in threadpool_info()
                  if i["internal_api"] == "openblas" and "scipy.libs" in i["filepath"]]
        if not counts:
            pytest.skip("SciPy's BLAS here is not its bundled OpenBLAS")
        assert _kernels.threads() == counts[0] <= 2


def _two_threads():
    """threadpool_limits(2), skipping where the BLAS cannot run two threads here."""
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(2)
    if _kernels.threads() < 2:
        limits.restore_original_limits()
        pytest.skip("the BLAS here runs one thread")
    return limits


@pytest.mark.parametrize("lengths", [[30] * 64, list(range(64, 0, -1)), [0] * 20 + [9] * 44,
                                     [5] * 7, [40] * 3])
def test_time_loops_are_shared_in_whole_tiles(lengths):
    """Each thread runs every step of a range of sorted rows: the ranges tile the batch in
    whole register tiles (6 rows), balanced by the real steps they hold."""
    lengths = np.array(lengths, dtype=np.int64)
    plan = _kernels.Plan(lengths, int(lengths.max()), False)
    with _two_threads():
        ranges = plan.step_parts("lstm", 512)
    starts = [j0 for j0, _ in ranges]
    assert starts[0] == 0 and ranges[-1][1] == len(lengths)
    assert [j1 for _, j1 in ranges[:-1]] == starts[1:]
    assert all(j0 % 6 == 0 for j0 in starts)
    tiles = -(-int((lengths > 0).sum()) // 6)
    assert len(ranges) == min(2, max(tiles, 1))
    if len(ranges) == 2:  # the cut is the tile boundary nearest to half the real steps
        steps = np.cumsum(np.sort(lengths)[::-1])
        cut = ranges[1][0]
        best = min(range(0, len(lengths) + 1, 6),
                   key=lambda j: abs((steps[j - 1] if j else 0) - steps[-1] / 2))
        assert cut == best
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        assert plan.step_parts("lstm", 512) == [(0, len(lengths))]


def test_small_time_loops_stay_on_one_thread():
    plan = _kernels.Plan(np.full(64, 50, dtype=np.int64), 50, False)
    with _two_threads():
        assert plan.step_parts("rnn", 8) == [(0, 64)]


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_time_loops_on_two_threads_give_the_numbers_of_one(cell, option, dtype, reverse):
    """Forward (inference and training) and the backward's state gradients, which come from
    the time loops alone, are bitwise the same whether the loop runs on one thread or is
    shared by two."""
    from threadpoolctl import threadpool_limits

    T, B, H = 30, 40, 128 if cell == "lstm" else 256
    lengths = np.random.default_rng(2).integers(0, T + 1, size=B)
    lengths[5] = T
    case = make_case(cell, T, B, 16, H, dtype, seed=3, lengths=lengths)
    plan = _kernels.Plan(lengths.astype(np.int64), T, reverse)
    results = {}
    for threads in (1, 2):
        with (_two_threads() if threads == 2 else threadpool_limits(1)):
            assert len(plan.step_parts(cell, H)) == threads  # the loops really are shared
            outs, grads = run(F, cell, option, case, reverse)
            infer, _ = run(F, cell, option, case, reverse, need_ctx=False)
        dstates = grads[1:3] if cell == "lstm" else grads[1:2]
        results[threads] = outs + infer + dstates
    for a, b in zip(results[1], results[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ragged", [False, True])
def test_gradient_products_on_two_threads_give_the_numbers_of_one(cell, option, dtype, ragged):
    """The backward's weight and input gradients are products over every step's rows, on
    our product where its AVX2 kernel runs: blocked over the rows (512 floats, 256 doubles
    a block) and over columns (8 panels), their output rows shared among threads in whole
    tiles. Here with several blocks of both, partial panels and tiles, and enough work for
    two threads: the reference's numbers, and the same bits on one thread and on two."""
    if _kernels.kernel() == "portable":
        pytest.skip("the portable kernel leaves products this large to the BLAS")
    from threadpoolctl import threadpool_limits

    T, B, I = 50, 13, 130  # 650 rows, 130 columns of x
    H = {"lstm": 37, "gru": 53, "rnn": 120}[cell]  # G*H rows of dW: 148, 159, 120
    lengths = None
    if ragged:
        B *= 2
        lengths = np.random.default_rng(5).integers(0, T + 1, size=B)
    case = make_case(cell, T, B, I, H, dtype, seed=6, lengths=lengths)
    grads = {}
    for threads in (1, 2):
        with (_two_threads() if threads == 2 else threadpool_limits(1)):
            if threads == 1:
                grads[1] = check_against_reference(cell, option, case, dtype, reverse=ragged)[1]
            else:
                grads[2] = run(F, cell, option, case, reverse=ragged)[1]
    for a, b in zip(grads[1], grads[2]):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def address(a):
    return a.__array_interface__["data"][0]


def test_a_threads_next_call_reuses_its_workspace_and_gets_the_same_numbers():
    case = make_case("lstm", 40, 16, 32, 64, np.float32)  # a ~1.5 MB training workspace
    first = run(F, "lstm", None, case)
    spare = F._SPARE.ws
    assert spare is not None and spare.nbytes >= F._SPARE_MIN_BYTES
    assert address(spare) % 64 == 0  # kept from its cache-line start

    def same_spare():
        return (address(F._SPARE.ws), F._SPARE.ws.size) == (address(spare), spare.size)
    run(F, "lstm", None, make_case("lstm", 3, 2, 4, 5, np.float32))  # too small to take it
    assert same_spare()
    spare[...] = np.nan  # what the spare held does not leak into the call that takes it
    again = run(F, "lstm", None, case)
    assert same_spare()  # taken, filled anew, given back
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        np.testing.assert_array_equal(a, b)
    F.release_workspace()
    assert F._SPARE.ws is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_workspaces_and_packed_weights_start_on_a_cache_line(dtype):
    # NumPy aligns to 16 bytes; a panel row (64 bytes) must not straddle two cache lines.
    starts = {address(_kernels.aligned_empty(n, dtype)) % 64 for n in range(1, 300, 7)}
    assert starts == {0}
    big = _kernels.aligned_empty(1 << 18, dtype)
    assert big.size == 1 << 18 and big.dtype == dtype and big.flags.c_contiguous
    w_ih = np.ones((12, 5), dtype)
    w_hh = np.ones((12, 3), dtype)
    assert address(_kernels.pack_weights(w_ih, w_hh, 4, False)) % 64 == 0


def test_threads_keep_their_own_spare_workspace():
    case = make_case("gru", 40, 16, 32, 64, np.float64)
    want = run(F, "gru", True, case)
    F.release_workspace()
    got, spares = [], []

    def work():
        got.append(run(F, "gru", True, case))
        spares.append(F._SPARE.ws)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert F._SPARE.ws is None  # this thread's slot was not touched
    assert spares[0] is not spares[1]
    for result in got:
        for a, b in zip(want[0] + want[1], result[0] + result[1]):
            np.testing.assert_array_equal(a, b)


def test_changing_lengths_after_forward_does_not_reach_backward():
    lengths = np.array([4, 1, 3], np.int64)
    case = make_case("lstm", 4, 3, 2, 5, np.float64, lengths=lengths)
    want = run(F, "lstm", None, case)
    c = case
    *_, ctx = F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"], c["b_ih"],
                             c["b_hh"], lengths=lengths)
    lengths[:] = [4, 4, 4]  # the caller reuses their array before backward
    grads = F.lstm_backward(c["dy"], c["dh_n"], c["dc_n"], ctx)
    for a, b in zip(grads, want[1]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- small calls

def _spy_small_calls(monkeypatch):
    """Per kernel call, whether _kernels ran it from the arguments as given ("taken") or
    returned None, leaving them to functional.py's checks ("checked")."""
    seen = []
    for name in ("forward_small", "backward"):
        def spy(*args, real=getattr(_kernels, name), name=name):
            out = real(*args)
            seen.append((name, "checked" if out is None else "taken"))
            return out
        monkeypatch.setattr(_kernels, name, spy)
    return seen


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("optional", ["all", "none"])
def test_small_calls_give_the_checked_paths_numbers(monkeypatch, cell, option, dtype,
                                                    reverse, optional):
    """A small call whose arrays are already what the kernels take skips functional.py's
    checks; the same values in Fortran order go through them: the same bits."""
    full = optional == "all"
    case = make_case(cell, 7, 3, 5, 9, dtype, biases=(full, True), states=full,
                     upstream=full)
    seen = _spy_small_calls(monkeypatch)
    taken = run(F, cell, option, case, reverse=reverse)
    assert seen == [("forward_small", "taken"), ("backward", "taken")]
    del seen[:]
    odd = {k: v if v is None or v.ndim < 2 else np.asfortranarray(v) for k, v in case.items()}
    checked = run(F, cell, option, odd, reverse=reverse)
    assert seen[0] == ("forward_small", "checked")
    if full:  # dy in Fortran order: refused, converted, then taken
        assert seen[1:] == [("backward", "checked"), ("backward", "taken")]
    for a, b in zip(taken[0] + taken[1], checked[0] + checked[1]):
        if a is None:
            assert b is None
        else:
            assert a.dtype == dtype and a.flags.c_contiguous
            np.testing.assert_array_equal(a, b)
    assert F.release_workspace() is None


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize("change", ["subclass x", "subclass w_hh", "unaligned h0",
                                    "strided b_ih", "numpy bool reverse", "large"])
def test_small_calls_leave_other_arguments_to_the_checks(monkeypatch, change):
    """What the kernels do not take as it is goes through functional.py, which converts it
    (and explains what it refuses): the numbers of the same values as plain arrays."""
    case = make_case("gru", 6, 2, 3, 4, np.float32)
    reverse = False
    want = run(F, "gru", True, case)
    odd = dict(case)
    if change.startswith("subclass"):
        name = change.split()[1]
        odd[name] = case[name].view(_Sub)
    elif change == "unaligned h0":
        odd["h0"] = relayout(case["h0"], "unaligned")
    elif change == "strided b_ih":
        odd["b_ih"] = relayout(case["b_ih"], "strided")
    elif change == "numpy bool reverse":
        reverse = np.bool_(False)
    else:  # a training workspace of 1 MiB or more is kept for the next call instead
        odd = case = make_case("gru", 300, 16, 3, 16, np.float32)
        want = run(F, "gru", True, case)
    seen = _spy_small_calls(monkeypatch)
    got = run(F, "gru", True, odd, reverse=reverse)
    assert seen == [("forward_small", "checked"), ("backward", "taken")]
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        assert type(b) is np.ndarray
        np.testing.assert_array_equal(a, b)
    F.release_workspace()


def test_small_backward_refuses_a_tampered_ctx():
    case = make_case("rnn", 4, 2, 3, 5, np.float32)
    *_, ctx = F.rnn_forward(case["x"], None, case["w_ih"], case["w_hh"], None, None)
    ctx.hidden_size = 50  # dy of (4, 2, 50) would then be read: the buffers are re-checked
    with pytest.raises(ValueError, match="_kernels: "):
        F.rnn_backward(np.zeros((4, 2, 50), np.float32), None, ctx)
