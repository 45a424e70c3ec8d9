"""functional.Prepacked: an inference forward on weights copied and packed once.

The oracle is the plain forward with need_ctx=False on the same weights (itself tested
against the reference): a prepacked call must give its bits exactly, since the kernels read
the same packed panels either way, only packed at another time.
"""
import threading

import numpy as np
import pytest

from rnnfuse import _kernels
from rnnfuse import functional as F

CELLS = [("lstm", {}), ("gru", {"linear_before_reset": True}),
         ("gru", {"linear_before_reset": False}), ("rnn", {"nonlinearity": "tanh"}),
         ("rnn", {"nonlinearity": "relu"})]
CELL_IDS = ["lstm", "gru_lbr", "gru_orig", "rnn_tanh", "rnn_relu"]


def problem(cell, dtype, T, B, I, H, seed=0):
    rng = np.random.default_rng(seed)
    G = _kernels.GATES[cell]

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)
    w = dict(w_ih=normal(G * H, I, scale=0.3), w_hh=normal(G * H, H, scale=0.3),
             b_ih=normal(G * H), b_hh=normal(G * H))
    x = normal(T, B, I)
    states = [normal(B, H, scale=0.5) for _ in range(2 if cell == "lstm" else 1)]
    return x, states, w


def plain(cell, opts, x, states, w, **kw):
    """The unpacked forward's outputs, without its ctx."""
    fwd = getattr(F, f"{cell}_forward")
    out = fwd(x, *states, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], need_ctx=False,
              **opts, **kw)
    return out[:-1]


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert g.tobytes() == e.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell, opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("T, B, I, H", [(6, 3, 5, 7), (3, 9, 200, 256)])  # small and large path
def test_prepacked_gives_the_plain_forwards_bits(cell, opts, dtype, T, B, I, H):
    x, states, w = problem(cell, dtype, T, B, I, H)
    f = F.Prepacked(cell, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
    assert_bitwise(f(x, *states), plain(cell, opts, x, states, w))
    assert_bitwise(f(x), plain(cell, opts, x, [None] * len(states), w))
    lengths = np.random.default_rng(1).integers(0, T + 1, B)
    for reverse in (False, True):
        assert_bitwise(f(x, *states, lengths=lengths, reverse=reverse),
                       plain(cell, opts, x, states, w, lengths=lengths, reverse=reverse))


def test_prepacked_without_biases_and_with_peepholes():
    x, states, w = problem("lstm", np.float32, 5, 4, 6, 8)
    f = F.Prepacked("lstm", w["w_ih"], w["w_hh"])
    want = F.lstm_forward(x, *states, w["w_ih"], w["w_hh"], None, None, need_ctx=False)
    assert_bitwise(f(x, *states), want[:3])
    peep = np.random.default_rng(2).standard_normal(24).astype(np.float32)
    f = F.Prepacked("lstm", w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], peepholes=peep)
    assert_bitwise(f(x, *states), plain("lstm", {}, x, states, w, peepholes=peep))


@pytest.mark.parametrize("cell, opts", CELLS[:2], ids=CELL_IDS[:2])
def test_prepacked_is_a_snapshot_of_the_weights(cell, opts):
    """Later in-place changes of the arrays it was made from (an optimizer's step) cannot
    reach it: it answers for the weights it was made with, never a mix."""
    x, states, w = problem(cell, np.float32, 4, 3, 6, 8)
    before = {k: v.copy() for k, v in w.items()}
    f = F.Prepacked(cell, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
    for a in w.values():
        a -= 0.1 * np.ones_like(a)  # in place, as optimizers update parameters
    got = f(x, *states)
    assert_bitwise(got, plain(cell, opts, x, states, before))
    assert got[0].tobytes() != plain(cell, opts, x, states, w)[0].tobytes()
    g = F.Prepacked(cell, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
    assert_bitwise(g(x, *states), plain(cell, opts, x, states, w))


def test_prepacked_calls_read_the_packed_weights():
    """The kernels take the packed panels, not the copies beside them: packed from other
    weights, a call gives those weights' outputs (so a call packs nothing anew)."""
    x, states, w = problem("gru", np.float32, 4, 3, 6, 8)
    _, _, other = problem("gru", np.float32, 4, 3, 6, 8, seed=5)
    f = F.Prepacked("gru", w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    f._packed = _kernels.pack_weights(other["w_ih"], other["w_hh"], 3, True)
    mixed = dict(w, w_ih=other["w_ih"], w_hh=other["w_hh"])
    assert_bitwise(f(x, *states), plain("gru", {}, x, states, mixed))


def test_prepacked_copies_cannot_be_written():
    _, _, w = problem("rnn", np.float64, 2, 2, 3, 4)
    f = F.Prepacked("rnn", w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    for a in (f._w_ih, f._w_hh, f._b_ih, f._b_hh, f._packed):
        assert not a.flags.writeable
        assert not np.shares_memory(a, w["w_ih"]) and not np.shares_memory(a, w["w_hh"])


@pytest.fixture
def restore_kernel():
    before = _kernels.kernel()
    yield
    _kernels.set_kernel(before)


@pytest.mark.parametrize("cell, opts", [CELLS[0], CELLS[2]], ids=["lstm", "gru_orig"])
def test_prepacked_serves_every_kernel_path(cell, opts, restore_kernel):
    """Packed under one code path, called under another: the packed layout is the same on
    every path, so the call gives that path's own bits."""
    x, states, w = problem(cell, np.float32, 5, 7, 9, 16)
    f = F.Prepacked(cell, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
    for path in ("portable", None):
        _kernels.set_kernel(path)
        assert_bitwise(f(x, *states), plain(cell, opts, x, states, w))


def test_prepacked_calls_from_several_threads():
    x, states, w = problem("lstm", np.float32, 20, 8, 32, 64)
    f = F.Prepacked("lstm", w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    want = plain("lstm", {}, x, states, w)
    results = [None] * 4

    def run(k):
        results[k] = [f(x, *states) for _ in range(5)]
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for calls in results:
        for got in calls:
            assert_bitwise(got, want)


def test_prepacked_refusals():
    x, (h0, c0), w = problem("lstm", np.float32, 3, 2, 5, 4)
    wi, wh, bi, bh = w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]
    with pytest.raises(ValueError, match="cell must be one of"):
        F.Prepacked("lstmp", wi, wh)
    with pytest.raises(TypeError, match="w_ih must have dtype float32 or float64"):
        F.Prepacked("lstm", wi.astype(np.int32), wh)
    with pytest.raises(TypeError, match="w_hh must have dtype float32"):
        F.Prepacked("lstm", wi, wh.astype(np.float64))
    with pytest.raises(ValueError, match="w_ih must be 2-D"):
        F.Prepacked("lstm", wi[None], wh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(4\*hidden_size"):
        F.Prepacked("lstm", wi, wh[:, :3])
    with pytest.raises(ValueError, match=r"b_ih must have shape \(16,\)"):
        F.Prepacked("lstm", wi, wh, bi[:3])
    with pytest.raises(ValueError, match="peepholes are an LSTM option"):
        F.Prepacked("gru", wi[:12], wh[:12], peepholes=np.zeros(12, np.float32))
    with pytest.raises(ValueError, match=r"peepholes must have shape \(12,\)"):
        F.Prepacked("lstm", wi, wh, peepholes=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        F.Prepacked("rnn", wi[:4], wh[:4], nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="linear_before_reset must be a bool"):
        F.Prepacked("gru", wi[:12], wh[:12], linear_before_reset="yes")
    f = F.Prepacked("lstm", wi, wh, bi, bh)
    with pytest.raises(TypeError, match=r"x must have dtype float32 \(the weights'\), got "
                                        "float64"):
        f(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"x must have input_size 5 \(the weights'\)"):
        f(x[:, :, :4])
    with pytest.raises(ValueError, match="x must be 3-D"):
        f(x[0])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4\)"):
        f(x, h0[:1])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
        f(x, h0, c0, lengths=[1, 4])
    with pytest.raises(TypeError):
        f(x, h0, c0, [1, 2])  # lengths is keyword-only
    g = F.Prepacked("gru", wi[:12], wh[:12])
    with pytest.raises(ValueError, match="c0 is the LSTM's cell state; a gru has none"):
        g(x, h0, c0)


def test_bench_times_prepacked_beside_rnnfuse_on_the_cpu_clock(capsys):
    from rnnfuse import bench
    argv = ["--quick", "--cells", "lstm", "--impls", "prepacked", "--budget", "0.01",
            "--clock", "cpu"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU time of the one thread" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("lstm")]
    assert [line[1] for line in lines] == ["inference", "training"] * 2
    for line in lines:  # training: prepacked does not apply ("-")
        assert (line[5] == "-") == (line[1] == "training")
