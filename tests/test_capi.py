"""The C-level API (rnnfuse.capi): the example in examples/capi and a test harness
(tests/_capi_harness.pyx) are built against the installed rnnfuse, then checked bitwise
against rnnfuse.functional and on every status code."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnfuse import functional as F

ROOT = Path(__file__).resolve().parents[1]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
CELLS = [("lstm", 0), ("gru", 1), ("gru", 0), ("rnn", 0), ("rnn", 1)]  # (cell, option)
DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(example module, harness module), built with the example's own setup.py."""
    d = tmp_path_factory.mktemp("capi")
    for src in (ROOT / "examples/capi/setup.py", ROOT / "examples/capi/lstm_capi.pyx",
                ROOT / "tests/_capi_harness.pyx"):
        shutil.copy(src, d)
    # The compiler needs no sanitizer runtime, even when the tests run under one.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    p = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"],
                       cwd=d, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("lstm_capi"), importlib.import_module("_capi_harness")
    finally:
        sys.path.remove(str(d))


@pytest.fixture(scope="module")
def h(built):
    return built[1]


def make_case(cell, T, B, I, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    r = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    w = 1 / np.sqrt(H)
    return dict(x=r(T, B, I), h0=r(B, H), c0=r(B, H), w_ih=r(G * H, I, s=w),
                w_hh=r(G * H, H, s=w), b_ih=r(G * H, s=w), b_hh=r(G * H, s=w),
                dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H))


def functional(cell, option, c, lengths, reverse, need_ctx, **variants):
    """(y, h_n[, c_n]), ctx from rnnfuse.functional."""
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    kw = dict(lengths=lengths, reverse=reverse, need_ctx=need_ctx, **variants)
    if cell == "lstm":
        y, h_n, c_n, ctx = F.lstm_forward(c["x"], c["h0"], c["c0"], *w, **kw)
        return (y, h_n, c_n), ctx
    if cell == "gru":
        y, h_n, ctx = F.gru_forward(c["x"], c["h0"], *w, linear_before_reset=bool(option), **kw)
    else:
        y, h_n, ctx = F.rnn_forward(c["x"], c["h0"], *w, nonlinearity=("tanh", "relu")[option],
                                    **kw)
    return (y, h_n), ctx


def functional_backward(cell, c, ctx):
    if cell == "lstm":
        return F.lstm_backward(c["dy"], c["dh_n"], c["dc_n"], ctx)
    dx, dh0, *rest = getattr(F, f"{cell}_backward")(c["dy"], c["dh_n"], ctx)
    return (dx, dh0, None, *rest)


def filled(shape, dtype):
    """An output buffer of NaNs: what the API does not write stays NaN."""
    return np.full(shape, np.nan, dtype)


def capi_forward(h, cell, option, c, lengths=None, reverse=False, train=False, variants=None,
                 **sizes):
    """status, (y, h_n, c_n), ctx through the harness (sizes: overrides of T, B, I, H;
    variants: rnnfuse_variants' fields, through rnnfuse_forward_ex_*)."""
    dtype = c["x"].dtype
    T, B, I = c["x"].shape
    H = c["w_hh"].shape[1]
    n = dict(dict(T=T, B=B, I=I, H=H), **sizes)
    outs = (filled((T, B, H), dtype), filled((B, H), dtype),
            filled((B, H), dtype) if cell == "lstm" else None)
    ctx = h.Ctx() if train else None
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    status = h.forward(dtype == np.float32, h.CELLS[cell], option, *outs, ctx, c["x"],
                       c["h0"], c["c0"] if cell == "lstm" else None, c["w_ih"], c["w_hh"],
                       c["b_ih"], c["b_hh"], lengths, int(reverse), n["T"], n["B"], n["I"],
                       n["H"], variants)
    return status, outs, ctx


def capi_grads(cell, c):
    """Gradient buffers (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh), NaN-filled."""
    dtype, (T, B, I), G, H = c["x"].dtype, c["x"].shape, GATES[cell], c["w_hh"].shape[1]
    return (filled((T, B, I), dtype), filled((B, H), dtype),
            filled((B, H), dtype) if cell == "lstm" else None, filled((G * H, I), dtype),
            filled((G * H, H), dtype), filled(G * H, dtype), filled(G * H, dtype))


def capi_backward(h, cell, c, ctx, grads, variant_grads=None):
    return h.backward(c["x"].dtype == np.float32, *grads, c["dy"], c["dh_n"],
                      c["dc_n"] if cell == "lstm" else None, ctx, variant_grads)


def assert_identical(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or np.isnan(g).all(), f"output {i} written"
        else:
            assert g.dtype == w.dtype and np.array_equal(g, w), f"output {i} differs"


# ---------------------------------------------------------------- the example

def test_example_predict_matches_functional_bitwise(built):
    example, _ = built
    c = make_case("lstm", 5, 3, 4, 6, np.float32, seed=1)
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    want = F.lstm_forward(c["x"], None, None, *w, need_ctx=False)[:3]
    assert_identical(example.predict(c["x"], *w), want)
    assert_identical(example.predict(c["x"], *w, repeat=3), want)


def test_example_predict_with_variants_matches_functional_bitwise(built):
    example, _ = built
    c = make_case("lstm", 5, 3, 4, 6, np.float32, seed=11)
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    peep = c["b_ih"][:18] * 3
    want = F.lstm_forward(c["x"], None, None, *w, peepholes=peep, zoneout=0.2,
                          need_ctx=False)[:3]
    assert_identical(example.predict_variants(c["x"], *w, peep, 0.2), want)
    with pytest.raises(RuntimeError, match=r"^rnnfuse: bad variant: .*zoneout must lie in"):
        example.predict_variants(c["x"], *w, peep, 1.5)


def test_example_train_step_matches_functional_bitwise(built):
    example, _ = built
    c = make_case("lstm", 5, 3, 4, 6, np.float32, seed=2)
    target = make_case("lstm", 5, 3, 6, 6, np.float32, seed=3)["x"]
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    loss, grads = example.train_step(c["x"], target, *w)
    y, _, _, ctx = F.lstm_forward(c["x"], None, None, *w)
    dy = y - target
    assert_identical(grads, F.lstm_backward(dy, None, None, ctx))
    assert loss == pytest.approx(0.5 * np.sum(dy.astype(np.float64) ** 2), rel=1e-6)


# ---------------------------------------------------------------- every cell and dtype

BATCHES = {  # T, B, I, H, lengths, reverse
    "dense": (4, 3, 5, 7, None, False),
    "ragged": (6, 5, 3, 17, [6, 0, 3, 6, 1], False),
    "ragged reverse": (6, 5, 3, 17, [6, 0, 3, 6, 1], True),
    "dense reverse": (3, 2, 4, 5, None, True),
    "T=0": (0, 3, 2, 4, None, False),
    "B=0": (4, 0, 2, 4, [], False),
}


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_functional_bitwise(h, cell, option, dtype, batch):
    T, B, I, H, lengths, reverse = BATCHES[batch]
    c = make_case(cell, T, B, I, H, dtype, seed=len(batch))
    if batch == "ragged":  # absent biases, initial states and upstream gradients too
        c.update(b_ih=None, h0=None, c0=None, dy=None, dc_n=None)
    if batch == "dense reverse":
        c.update(b_hh=None, dh_n=None)
    want, _ = functional(cell, option, c, lengths, reverse, need_ctx=False)
    status, got, _ = capi_forward(h, cell, option, c, lengths, reverse)
    assert status == h.CODES["OK"]
    assert_identical(got, want)

    want, ctx = functional(cell, option, c, lengths, reverse, need_ctx=True)
    status, got, cctx = capi_forward(h, cell, option, c, lengths, reverse, train=True)
    assert status == h.CODES["OK"] and not cctx.null
    assert_identical(got, want)
    grads = capi_grads(cell, c)
    assert capi_backward(h, cell, c, cctx, grads) == h.CODES["OK"]
    assert_identical(grads, functional_backward(cell, c, ctx))  # absent biases: unwritten
    cctx.free()


def test_lengths_are_copied_at_forward(h):
    """backward indexes time by the forward's lengths, whatever the caller does after."""
    c = make_case("gru", 5, 3, 2, 4, np.float64, seed=4)
    lengths = np.array([5, 2, 4], np.int64)
    want, ctx = functional("gru", 1, c, lengths, False, need_ctx=True)
    status, _, cctx = capi_forward(h, "gru", 1, c, lengths, train=True)
    lengths[:] = [0, 5, 5]
    grads = capi_grads("gru", c)
    assert status == 0 and capi_backward(h, "gru", c, cctx, grads) == 0
    assert_identical(grads, functional_backward("gru", c, ctx))


# ---------------------------------------------------------------- status codes

@pytest.mark.parametrize("change,code", [
    (dict(cell=0), "EARG"), (dict(cell=4), "EARG"), (dict(option=2), "EARG"),
    (dict(option=-1), "EARG"), (dict(reverse=2), "EARG"),
    (dict(T=-1), "ESIZE"), (dict(B=-1), "ESIZE"), (dict(I=0), "ESIZE"), (dict(H=0), "ESIZE"),
    (dict(I=2**31), "ESIZE"), (dict(H=2**31 // 4), "ESIZE"),      # 4H = 2^31
    (dict(H=2**31 // 4 - 1), "ENOMEM"),  # a valid size, but W_hh alone needs 2^60 elements
    (dict(T=2**40, B=2**40), "ENOMEM"),  # refused before any size is computed
    (dict(T=2**62, B=0), "ENOMEM"),  # an empty batch still plans every step
    (dict(y=None), "ENULL"), (dict(h_n=None), "ENULL"), (dict(c_n=None), "ENULL"),
    (dict(x=None), "ENULL"), (dict(w_ih=None), "ENULL"), (dict(w_hh=None), "ENULL"),
    (dict(lengths=[3, -1]), "ELENGTHS"), (dict(lengths=[4, 3]), "ELENGTHS"),
])
@pytest.mark.parametrize("train", [False, True])
def test_forward_refuses_bad_arguments_and_writes_nothing(h, change, code, train):
    T, B, I, H = 3, 2, 4, 5
    c = make_case("lstm", T, B, I, H, np.float32)
    a = dict(cell=h.CELLS["lstm"], option=0, y=filled((T, B, H), np.float32),
             h_n=filled((B, H), np.float32), c_n=filled((B, H), np.float32),
             ctx=h.Ctx() if train else None, x=c["x"], h0=c["h0"], c0=c["c0"],
             w_ih=c["w_ih"], w_hh=c["w_hh"], b_ih=c["b_ih"], b_hh=c["b_hh"], lengths=None,
             reverse=0, T=T, B=B, I=I, H=H)
    a.update(change)
    if a["lengths"] is not None:
        a["lengths"] = np.array(a["lengths"], np.int64)
    assert h.forward(True, **a) == h.CODES[code]
    for out in ("y", "h_n", "c_n"):
        assert a[out] is None or np.isnan(a[out]).all()
    assert not train or a["ctx"].null


def test_forward_of_a_gru_ignores_the_lstm_only_pointers(h):
    c = make_case("gru", 3, 2, 4, 5, np.float64)
    status, (y, h_n, _), _ = capi_forward(h, "gru", 1, c)  # c_n and c0 passed as NULL
    assert status == 0 and not np.isnan(y).any()


def test_workspace_that_cannot_be_allocated_is_enomem(h):
    """Sizes that pass every check but whose training workspace (4 PiB of gathered x: the
    reversed plan is not dense) cannot be allocated: ENOMEM before any buffer is touched."""
    c = make_case("rnn", 1, 1, 1, 1, np.float32)
    status, outs, ctx = capi_forward(h, "rnn", 0, c, reverse=True, train=True, B=2**20, I=2**30)
    assert status == h.CODES["ENOMEM"] and ctx.null
    assert np.isnan(outs[0]).all()


@pytest.mark.parametrize("cell,option", [("lstm", 0), ("rnn", 1)])
def test_backward_status_codes_and_ctx_lifetime(h, cell, option):
    c = make_case(cell, 3, 2, 4, 5, np.float32, seed=5)
    want, ctx = functional(cell, option, c, None, False, need_ctx=True)
    status, _, cctx = capi_forward(h, cell, option, c, train=True)
    assert status == 0
    grads = capi_grads(cell, c)
    f32 = True
    assert h.backward(f32, *grads, None, None, None, None) == h.CODES["ENULL"]  # ctx NULL
    assert h.backward(not f32, *grads, None, None, None, cctx) == h.CODES["EDTYPE"]
    required = [0, 1, 3, 4] + ([2] if cell == "lstm" else [])  # dx dh0 (dc0) dw_ih dw_hh
    for i in required:
        missing = [None if j == i else g for j, g in enumerate(grads)]
        assert h.backward(f32, *missing, None, None, None, cctx) == h.CODES["ENULL"]
    assert all(g is None or np.isnan(g).all() for g in grads)  # nothing written
    # The failed calls left ctx usable; the backward consumes it.
    assert capi_backward(h, cell, c, cctx, grads) == 0
    assert_identical(grads, functional_backward(cell, c, ctx))
    assert capi_backward(h, cell, c, cctx, capi_grads(cell, c)) == h.CODES["EUSED"]
    cctx.free()
    cctx.free()  # NULL: nothing to do


def test_backward_wants_no_bias_gradients(h):
    c = make_case("gru", 3, 2, 4, 5, np.float64, seed=6)
    _, ctx = functional("gru", 0, c, None, False, need_ctx=True)
    status, _, cctx = capi_forward(h, "gru", 0, c, train=True)
    grads = capi_grads("gru", c)[:5] + (None, None)
    assert status == 0 and capi_backward(h, "gru", c, cctx, grads) == 0
    assert_identical(grads[:5], functional_backward("gru", c, ctx)[:5])


def test_every_status_has_its_own_message(h):
    messages = {code: h.strerror(code) for code in h.CODES.values()}
    assert len(set(messages.values())) == len(h.CODES)
    assert all(m.startswith("rnnfuse: ") for m in messages.values())
    assert messages[h.CODES["ELENGTHS"]] == "rnnfuse: lengths must lie in [0, T]"
    assert h.strerror(1) == h.strerror(-99) == "rnnfuse: unknown status code"


# ---------------------------------------------------------------- variants (forward_ex)

VARIANT_KINDS = ["none", "peepholes", "zoneout p", "zoneout masks", "recurrent dropout",
                 "all"]


def variant_args(cell, kind, T, B, H, dtype, seed=7):
    """(functional's keywords, rnnfuse_variants' fields) of one kind of variant; "all":
    peepholes (LSTM), zoneout masks and recurrent dropout together."""
    rng = np.random.default_rng(seed)
    lstm = cell == "lstm"
    kw, v = {}, {}
    if kind == "peepholes" or (kind == "all" and lstm):
        kw["peepholes"] = v["peepholes"] = (0.5 * rng.standard_normal(3 * H)).astype(dtype)
    if kind == "zoneout p":
        kw["zoneout"] = v["zoneout"] = 0.3
    if kind in ("zoneout masks", "all"):
        z_h, z_c = ((rng.random((T, B, H)) < 0.3).astype(dtype) for _ in range(2))
        kw["zoneout"] = (z_h, z_c) if lstm else z_h
        v.update(zoneout_h=z_h, zoneout_c=z_c if lstm else None)
    if kind in ("recurrent dropout", "all"):
        m = ((rng.random((B, H)) >= 0.25) / 0.75).astype(dtype)
        kw["recurrent_dropout"] = v["recurrent_dropout"] = m
    return kw, v


@pytest.mark.parametrize("cell,option,kind", [
    (cell, option, kind) for cell, option in [("lstm", 0), ("gru", 1), ("gru", 0), ("rnn", 0)]
    for kind in VARIANT_KINDS if kind != "peepholes" or cell == "lstm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_variants_match_functional_bitwise(h, cell, option, dtype, kind):
    T, B, I, H, lengths, reverse = BATCHES["ragged reverse" if option else "dense"]
    c = make_case(cell, T, B, I, H, dtype, seed=8)
    kw, v = variant_args(cell, kind, T, B, H, dtype)
    want, _ = functional(cell, option, c, lengths, reverse, need_ctx=False, **kw)
    status, got, _ = capi_forward(h, cell, option, c, lengths, reverse, variants=v)
    assert status == h.CODES["OK"]
    assert_identical(got, want)

    want, ctx = functional(cell, option, c, lengths, reverse, need_ctx=True, **kw)
    status, got, cctx = capi_forward(h, cell, option, c, lengths, reverse, train=True,
                                     variants=v)
    assert status == h.CODES["OK"]
    assert_identical(got, want)
    grads, dpeep = capi_grads(cell, c), filled(3 * H, dtype)
    assert capi_backward(h, cell, c, cctx, grads, {"dpeepholes": dpeep}) == 0
    want = functional_backward(cell, c, ctx)
    assert_identical(grads + (dpeep,), want if "peepholes" in kw else want + (None,))


def test_zeroed_variants_are_the_plain_cell(h):
    c = make_case("lstm", 4, 3, 5, 7, np.float32, seed=9)
    _, plain, _ = capi_forward(h, "lstm", 0, c)
    status, got, _ = capi_forward(h, "lstm", 0, c, variants={})
    assert status == 0
    assert_identical(got, plain)


@pytest.mark.parametrize("cell,variants,code", [
    ("lstm", dict(version=0), "EVERSION"), ("lstm", dict(version=2), "EVERSION"),
    ("lstm", dict(zoneout=-0.1), "EVARIANT"), ("lstm", dict(zoneout=1.0), "EVARIANT"),
    ("gru", dict(zoneout=float("nan")), "EVARIANT"),
    ("rnn", dict(zoneout=float("inf")), "EVARIANT"),
    ("lstm", dict(zoneout=0.1, zoneout_h="mask"), "EVARIANT"),
    ("lstm", dict(zoneout=0.1, zoneout_c="mask"), "EVARIANT"),
    ("gru", dict(peepholes="peep"), "EVARIANT"), ("rnn", dict(zoneout_c="mask"), "EVARIANT"),
    ("lstm", dict(recurrent_dropout=-1.0), "EVARIANT"),
    ("gru", dict(recurrent_dropout=float("nan")), "EVARIANT"),
    ("rnn", dict(recurrent_dropout=float("inf")), "EVARIANT"),
])
@pytest.mark.parametrize("train", [False, True])
def test_bad_variants_are_refused_and_write_nothing(h, cell, variants, code, train):
    T, B, I, H = 3, 2, 4, 5
    c = make_case(cell, T, B, I, H, np.float32)
    arrays = {"mask": np.ones((T, B, H), np.float32), "peep": np.zeros(3 * H, np.float32)}
    v = {k: arrays.get(a, a) for k, a in variants.items()}
    if "recurrent_dropout" in v:  # one bad value in an otherwise good mask
        m = np.ones((B, H), np.float32)
        m[1, 3] = v["recurrent_dropout"]
        v["recurrent_dropout"] = m
    status, outs, ctx = capi_forward(h, cell, 1, c, train=train, variants=v)
    assert status == h.CODES[code]
    assert all(o is None or np.isnan(o).all() for o in outs)
    assert not train or ctx.null
    message = h.strerror(status)
    assert ("version" in message if code == "EVERSION" else
            "zoneout must lie in [0, 1)" in message and "LSTM only" in message)


def test_backward_of_peepholes_needs_somewhere_for_their_gradient(h):
    c = make_case("lstm", 3, 2, 4, 5, np.float64, seed=10)
    kw, v = variant_args("lstm", "peepholes", 3, 2, 5, np.float64)
    _, ctx = functional("lstm", 0, c, None, False, need_ctx=True, **kw)
    status, _, cctx = capi_forward(h, "lstm", 0, c, train=True, variants=v)
    grads, dpeep = capi_grads("lstm", c), filled(15, np.float64)
    assert status == 0
    assert capi_backward(h, "lstm", c, cctx, grads) == h.CODES["ENULL"]  # no _ex
    assert capi_backward(h, "lstm", c, cctx, grads, {}) == h.CODES["ENULL"]
    assert capi_backward(h, "lstm", c, cctx, grads,
                         {"version": 2, "dpeepholes": dpeep}) == h.CODES["EVERSION"]
    assert all(np.isnan(g).all() for g in grads + (dpeep,))  # nothing written, ctx usable
    assert capi_backward(h, "lstm", c, cctx, grads, {"dpeepholes": dpeep}) == 0
    assert_identical(grads + (dpeep,), functional_backward("lstm", c, ctx))
