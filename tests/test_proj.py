"""The LSTM with a projection (PyTorch's proj_size, "LSTMP"): h_t = W_hr (o_t tanh(c_t)).

- the reference's gradients (dw_hr included) against float64 central finite differences;
- the kernels (every code path) against the reference: float32/64, ragged, reverse, B=1,
  inference (the training forward's bits, batch-invariant), with and without peepholes;
- layers: parameters named and shaped as torch.nn.LSTM's, stacked, bidirectional, ragged,
  against torch.nn.LSTM(proj_size=...) in outputs and every gradient where torch imports;
- every refusal, with its message.
"""
import numpy as np
import pytest

from rnnfuse import GRU, LSTM, RNN, _kernels
from rnnfuse import functional as F
from rnnfuse import reference as R
from checks import assert_close, assert_gradient  # tests/checks.py

_SIMD = _kernels.simd_path()  # "baseline", "AVX2+FMA" or "AVX2+FMA, AVX-512F"
PATHS = ["avx512"] * ("AVX-512F" in _SIMD) + ["avx2"] * (_SIMD != "baseline") + ["portable"]
NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "peepholes"]


@pytest.fixture(params=PATHS)
def kernel(request):
    before = _kernels.kernel()
    _kernels.set_kernel(request.param)
    yield request.param
    _kernels.set_kernel(before)


def make_case(T, B, I, H, P, dtype, seed=0, peepholes=False):
    """Random inputs, weights and upstream gradients of scale ~1."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    s = 1 / np.sqrt(H)
    args = dict(x=r(T, B, I), h0=r(B, P), c0=r(B, H), w_ih=r(4 * H, I, scale=s),
                w_hh=r(4 * H, P, scale=s), b_ih=r(4 * H, scale=s), b_hh=r(4 * H, scale=s),
                w_hr=r(P, H, scale=s), peepholes=r(3 * H) if peepholes else None)
    upstream = (r(T, B, P), r(B, P), r(B, H))
    return args, upstream


def forward(module, a, lengths=None, reverse=False, need_ctx=True):
    return module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                               a["b_hh"], lengths, reverse, need_ctx=need_ctx,
                               peepholes=a["peepholes"], w_hr=a["w_hr"])


def run(module, args, upstream, lengths=None, reverse=False):
    y, h_n, c_n, ctx = forward(module, args, lengths, reverse)
    return (y, h_n, c_n), module.lstm_backward(*upstream, ctx)


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("peepholes", [False, True])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([3, 0, 4], False),
                                             ([3, 0, 4], True)])
def test_reference_gradients_match_finite_differences(lengths, reverse, peepholes):
    args, upstream = make_case(4, 3, 2, 4, 2, np.float64, seed=1, peepholes=peepholes)

    def loss():
        y, h_n, c_n, _ = forward(R, args, lengths, reverse, need_ctx=False)
        return sum(np.sum(o * u) for o, u in zip((y, h_n, c_n), upstream))

    _, grads = run(R, args, upstream, lengths, reverse)
    names = NAMES if peepholes else NAMES[:-1]
    assert len(grads) == len(names)
    for name, grad in zip(names, grads):
        assert grad.shape == args[name].shape, name
        for idx in np.ndindex(args[name].shape):
            assert_gradient(grad[idx], loss, args[name], idx, name)


def test_reference_projection_follows_the_equations():
    """One step of one row written out: m = o tanh(c), h = W_hr m, y = h."""
    a, _ = make_case(1, 1, 2, 4, 3, np.float64, seed=2)
    H = 4
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    z = a["w_ih"] @ a["x"][0, 0] + a["b_ih"] + a["w_hh"] @ a["h0"][0] + a["b_hh"]
    i, f, o = sig(z[:H]), sig(z[H:2 * H]), sig(z[3 * H:])
    c = f * a["c0"][0] + i * np.tanh(z[2 * H:3 * H])
    h = a["w_hr"] @ (o * np.tanh(c))
    y, h_n, c_n, _ = forward(R, a)
    np.testing.assert_allclose(c_n[0], c, rtol=1e-13)
    np.testing.assert_allclose(y[0, 0], h, rtol=1e-13)
    np.testing.assert_array_equal(h_n[0], y[0, 0])


# ---------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths", [None, [7, 2, 0, 5, 7, 1, 7, 3]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("H,P", [(5, 3), (37, 20)])  # a partial vector; vectors and a tail
def test_kernels_match_reference(kernel, dtype, lengths, reverse, H, P):
    case = make_case(7, 8, 3, H, P, dtype, seed=H)
    got, want = run(F, *case, lengths, reverse), run(R, *case, lengths, reverse)
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_with_peepholes_match_reference(kernel, dtype):
    case = make_case(6, 7, 3, 19, 6, dtype, seed=4, peepholes=True)
    lengths = [6, 3, 0, 6, 1, 2, 5]
    got, want = run(F, *case, lengths, True), run(R, *case, lengths, True)
    assert len(got[1]) == 9
    assert_close(got[0], want[0], dtype, "forward")
    assert_close(got[1], want[1], dtype, "backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_of_one_and_inference(kernel, dtype):
    args, upstream = make_case(6, 1, 4, 9, 4, dtype, seed=3)
    got, want = run(F, args, upstream), run(R, args, upstream)
    assert_close(got[1], want[1], dtype, "backward")
    y, h_n, c_n, ctx = forward(F, args, need_ctx=False)
    assert ctx is None
    for g, w in zip((y, h_n, c_n), got[0]):  # inference: the training forward's bits
        np.testing.assert_array_equal(g, w)


def test_inference_is_batch_invariant(kernel):
    """A row's outputs are the same bits alone as among others, ragged."""
    args, _ = make_case(9, 13, 5, 33, 17, np.float32, seed=5)
    lengths = np.array([9, 4, 9, 0, 2, 9, 7, 1, 9, 3, 5, 9, 6])
    y, h_n, c_n, _ = forward(F, args, lengths, need_ctx=False)
    for b in (0, 1, 6, 12):
        one = dict(args, x=args["x"][:, b:b + 1], h0=args["h0"][b:b + 1],
                   c0=args["c0"][b:b + 1])
        y1, h1, c1, _ = forward(F, one, lengths[b:b + 1], need_ctx=False)
        np.testing.assert_array_equal(y1[:, 0], y[:, b])
        np.testing.assert_array_equal(h1[0], h_n[b])
        np.testing.assert_array_equal(c1[0], c_n[b])


def test_threads_give_the_same_bits():
    args, upstream = make_case(20, 64, 16, 64, 32, np.float32, seed=6)
    results = []
    for n in (1, 2):
        before = _kernels.set_threads(n)
        try:
            results.append(run(F, args, upstream, [20] * 60 + [5, 9, 0, 13]))
        finally:
            _kernels.set_threads(before)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        np.testing.assert_array_equal(a, b)


def test_empty_batch_and_all_padding():
    for B, lengths in ((0, None), (3, [0, 0, 0])):
        args, upstream = make_case(4, B, 3, 6, 2, np.float64, seed=7)
        got, want = run(F, args, upstream, lengths), run(R, args, upstream, lengths)
        assert_close(got[0], want[0], np.float64, "forward")
        assert_close(got[1], want[1], np.float64, "backward")


def test_projection_returns_dw_hr_eighth():
    args, upstream = make_case(3, 2, 3, 4, 2, np.float64)
    grads = run(F, args, upstream)[1]
    assert len(grads) == 8 and grads[7].shape == (2, 4)
