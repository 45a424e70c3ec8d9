"""The one CPU-feature decision: every code path in one process.

_kernels.set_kernel chooses the AVX2+FMA code (with AVX-512F products, or without) or the
portable code for the products, the pointwise passes and the activations alike. Here
every cell, option and dtype runs on each path: against the NumPy reference, bitwise the
same when run again on the same path, and really switched (float32 gives other bits on
the portable path, as its activations and products differ; the AVX-512F products give
the AVX2 products' bits, as they promise).
"""
import os

import numpy as np
import pytest

import rnnfuse
from rnnfuse import _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R

CELLS = [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"), ("rnn", "relu")]
TOL = {np.float32: 1e-5, np.float64: 1e-10}
HAVE_AVX2 = _kernels.simd_path() != "baseline"
HAVE_AVX512 = "AVX-512F" in _kernels.simd_path()
PATHS = ["avx512"] * HAVE_AVX512 + ["avx2"] * HAVE_AVX2 + ["portable"]


@pytest.fixture
def restore_kernel():
    before = _kernels.kernel()
    yield
    _kernels.set_kernel(before)


def _case(cell, dtype, seed):
    rng = np.random.default_rng(seed)
    T, B, I, H = 9, 7, 11, 37  # partial register tiles and panels, several 8-unit vectors
    G = _kernels.GATES[cell]
    r = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    s = 1 / np.sqrt(H)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    return dict(x=r(T, B, I), h0=r(B, H), c0=r(B, H), w_ih=r(G * H, I, s=s),
                w_hh=r(G * H, H, s=s), b_ih=r(G * H, s=s), b_hh=r(G * H, s=s),
                lengths=lengths, dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H))


def _run(module, cell, option, c):
    """Forward and backward; every output and gradient in one tuple."""
    w = (c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"])
    if cell == "lstm":
        *out, ctx = module.lstm_forward(c["x"], c["h0"], c["c0"], *w, lengths=c["lengths"])
        return (*out, *module.lstm_backward(c["dy"], c["dh_n"], c["dc_n"], ctx))
    if cell == "gru":
        *out, ctx = module.gru_forward(c["x"], c["h0"], *w, lengths=c["lengths"],
                                       linear_before_reset=option)
        return (*out, *module.gru_backward(c["dy"], c["dh_n"], ctx))
    *out, ctx = module.rnn_forward(c["x"], c["h0"], *w, lengths=c["lengths"],
                                   nonlinearity=option)
    return (*out, *module.rnn_backward(c["dy"], c["dh_n"], ctx))


def _assert_close(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        floor = 1.0 if dtype == np.float32 else np.finfo(dtype).tiny
        err = np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), floor)
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_paths_in_one_process(cell, option, dtype, restore_kernel):
    case = _case(cell, dtype, seed=len(cell) + (option is True))
    ref = _run(R, cell, option, {k: v.astype(np.float64) if v.dtype != np.int64 else v
                                 for k, v in case.items()})
    results = {}
    for path in PATHS:
        _kernels.set_kernel(path)
        assert _kernels.kernel() == path
        first, again = _run(F, cell, option, case), _run(F, cell, option, case)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)  # the same path: the same bits
        _assert_close(first, ref, dtype)
        results[path] = first
    if HAVE_AVX2 and dtype == np.float32:  # the switch took: other bits
        assert any(not np.array_equal(a, b)
                   for a, b in zip(results["avx2"], results["portable"]))
    if HAVE_AVX512:  # the same chains over k, twice as wide
        for a, b in zip(results["avx512"], results["avx2"], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not HAVE_AVX512, reason="no AVX-512F")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 20])
@pytest.mark.parametrize("H", [8, 37, 200])
def test_avx512_products_give_the_avx2_bits(B, H, dtype, restore_kernel):
    """Every tile shape of the AVX-512F product (rows left over from whole tiles: 1-5; a
    step's rows in tiles of even height: 8 = 4+4, 13 = 5+4+4, 20 = 5+5+5+5, the next
    panel group fetched ahead; panel groups of 8 and what is left of them; a partial last
    panel), in the steps, the projection and the gradient products: bitwise the AVX2
    product's numbers."""
    rng = np.random.default_rng(B * 1000 + H)
    T, I = 5, 19
    r = lambda *shape: (rng.standard_normal(shape) / np.sqrt(H)).astype(dtype)  # noqa: E731
    x, w_ih, w_hh, b = r(T, B, I), r(4 * H, I), r(4 * H, H), r(4 * H)
    dy = r(T, B, H)
    got = {}
    for path in ("avx2", "avx512"):
        _kernels.set_kernel(path)
        y, h, c, ctx = F.lstm_forward(x, None, None, w_ih, w_hh, b, b, reverse=True)
        got[path] = (y, h, c, *F.lstm_backward(dy, None, None, ctx))
    for a, b_ in zip(got["avx2"], got["avx512"], strict=True):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,option", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_steps_gradients_do_not_depend_on_the_batch(path, cell, option, dtype,
                                                       restore_kernel):
    """A step's few rows read the weights in place for dx, many rows pack them first: each
    row's outputs and gradients (but the weights', sums over the rows) are the same bits
    either way (I: whole panels and a partial one)."""
    _kernels.set_kernel(path)
    I, H, G = 37, 21, _kernels.GATES[cell]
    rng = np.random.default_rng(4)
    r = lambda *shape: (rng.standard_normal(shape) / np.sqrt(H)).astype(dtype)  # noqa: E731
    big = dict(x=r(1, 20, I), h0=r(20, H), c0=r(20, H), w_ih=r(G * H, I), w_hh=r(G * H, H),
               b_ih=r(G * H), b_hh=r(G * H), lengths=None, dy=r(1, 20, H), dh_n=r(20, H),
               dc_n=r(20, H))
    whole = _run(F, cell, option, big)
    for B in (1, 3, 16):
        small = dict(big, **{k: big[k][:B] for k in ("h0", "c0", "dh_n", "dc_n")},
                     **{k: big[k][:, :B] for k in ("x", "dy")})
        got = _run(F, cell, option, small)
        for a, b in zip(got[:-4], whole[:-4], strict=True):  # the last four: the weights'
            np.testing.assert_array_equal(a, b[:, :B] if a.ndim == 3 else b[:B])


@pytest.mark.parametrize("path", PATHS)
def test_stream_matches_forward_on_either_path(path, restore_kernel):
    _kernels.set_kernel(path)
    layer = rnnfuse.GRU(5, 19, num_layers=2, dtype=np.float32, seed=1)
    x = np.random.default_rng(2).standard_normal((6, 3, 5)).astype(np.float32)
    y, _ = layer.forward(x)
    s = layer.stream(batch_size=3)
    np.testing.assert_array_equal(np.stack([s.step(x_t) for x_t in x]), y)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_activations_follow_the_path(name, restore_kernel):
    a = np.linspace(-12, 12, 4097, dtype=np.float32)
    x = a.astype(np.float64)
    want = 1 / (1 + np.exp(-x)) if name == "sigmoid" else np.tanh(x)
    got = {}
    for path in PATHS:
        _kernels.set_kernel(path)
        got[path] = a.copy()
        _kernels.activation(name, got[path])
        np.testing.assert_allclose(got[path], want, rtol=4 * np.finfo(np.float32).eps,
                                   atol=1e-30)
    if HAVE_AVX2:  # the vector approximations and libm round some values apart
        assert not np.array_equal(got["avx2"], got["portable"])


def test_set_kernel_refuses_what_cannot_run(restore_kernel):
    for bad in ("", "fast", "AVX2"):
        with pytest.raises(ValueError, match="kernel must be"):
            _kernels.set_kernel(bad)
    with pytest.raises(TypeError, match="str or None"):
        _kernels.set_kernel(1)
    for name, runs in (("avx2", HAVE_AVX2), ("avx512", HAVE_AVX512)):
        if not runs:
            with pytest.raises(ValueError, match="this CPU cannot run it"):
                _kernels.set_kernel(name)
    _kernels.set_kernel("portable")
    assert _kernels.kernel() == "portable"
    _kernels.set_kernel(None)  # the default chooser: RNNFUSE_KERNEL, then the CPU
    assert _kernels.kernel() == (os.environ.get("RNNFUSE_KERNEL") or PATHS[0])


def test_packed_weights_work_at_any_alignment():
    """The kernels read packed weights from their array's first element, with unaligned
    loads: a copy off a cache line gives the same bits."""
    rng = np.random.default_rng(0)
    w_ih, w_hh = rng.standard_normal((16, 3)), rng.standard_normal((16, 4))
    packed = _kernels.pack_weights(w_ih, w_hh, 4, True)
    assert packed.ctypes.data % 64 == 0
    shifted = _kernels.aligned_empty(packed.size + 2, packed.dtype)[2:]  # 16 bytes off a line
    shifted[:] = packed
    x = rng.standard_normal((2, 1, 3))
    run = lambda p: F._forward("lstm", x, (None, None), w_ih, w_hh, None, None, None,  # noqa: E731
                               False, None, False, packed=p)[:2]
    for got, want in zip(run(shifted), run(None)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cell,G,lbr,other", [
    ("gru", 3, True, dict(lbr=False)), ("gru", 3, False, dict(lbr=True)),
    ("lstm", 4, True, dict(I=2)), ("lstm", 4, True, dict(H=2)), ("lstm", 4, True, dict(G=1))])
def test_packed_weights_of_another_layout_are_refused(cell, G, lbr, other):
    """A packed array says what it was packed for; the GRU's two layouts differ."""
    rng = np.random.default_rng(1)
    I, H = 3, 4
    w_ih, w_hh = rng.standard_normal((G * H, I)), rng.standard_normal((G * H, H))
    ok = _kernels.pack_weights(w_ih, w_hh, G, lbr)
    x = rng.standard_normal((2, 1, I))
    run = lambda p: F._forward(cell, x, (None,) * (2 if cell == "lstm" else 1),  # noqa: E731
                               w_ih, w_hh, None, None, None, False, lbr, False, packed=p)
    np.testing.assert_array_equal(run(ok)[0], run(None)[0])
    k = dict(G=G, H=H, I=I, lbr=lbr)
    k.update(other)
    wrong = _kernels.pack_weights(rng.standard_normal((k["G"] * k["H"], k["I"])),
                                  rng.standard_normal((k["G"] * k["H"], k["H"])), k["G"],
                                  k["lbr"])
    same_size = np.zeros_like(ok)  # the tag decides, whatever the size
    same_size[:min(ok.size, wrong.size)] = wrong[:min(ok.size, wrong.size)]
    with pytest.raises(ValueError, match=f"packed must be pack_weights' array for G={G}, "
                                         f"H={H}, I={I}"):
        run(same_size)
