"""int8 inference (rnnfuse.quantized, layer.quantized()).

The int8 product is checked exactly against a NumPy integer reference (the same
quantization, int32 sums, the same float32 rescale), on every code path; the quantized
layers against their float32 layers within the stated error (max |y_int8 - y_float32| <=
0.05 on layers of PyTorch's initialisation and unit-normal inputs).
"""
import numpy as np
import pytest

from rnnfuse import _kernels
from rnnfuse.layers import GRU, LSTM, RNN, Linear
from rnnfuse.quantized import QuantizedGRU, QuantizedLSTM, quantize

HAVE_AVX2 = _kernels.simd_path() != "baseline"
HAVE_AVX512 = "AVX-512F" in _kernels.simd_path()
HAVE_VNNI = _kernels.set_int8_vnni(True)
# the int8 products' code paths: (kernel, VNNI instructions on or off); AVX-512 VNNI runs
# only on the avx512 kernel, AVX-VNNI (or, without it, plain AVX2) on the avx2 kernel
PATHS = ([("avx512", True)] if HAVE_AVX512 and HAVE_VNNI else []) \
    + ([("avx2", True)] if HAVE_VNNI else []) + ([("avx2", False)] if HAVE_AVX2 else []) \
    + [("portable", False)]
CELLS = [(LSTM, {}), (GRU, {"linear_before_reset": True}),
         (GRU, {"linear_before_reset": False}), (RNN, {"nonlinearity": "tanh"}),
         (RNN, {"nonlinearity": "relu"})]
CELL_IDS = ["lstm", "gru_lbr", "gru_orig", "rnn_tanh", "rnn_relu"]
MAX_ERROR = 0.05


def _use(path):
    _kernels.set_kernel(path[0])
    _kernels.set_int8_vnni(path[1])


@pytest.fixture(params=PATHS, ids=["-".join(map(str, p)) for p in PATHS])
def path(request):
    before = _kernels.kernel()
    _use(request.param)
    yield request.param
    _kernels.set_kernel(before)
    _kernels.set_int8_vnni(True)


ACT_MAX, WEIGHT_MAX = 63, 63  # 7 bits each


def np_quantize(a, qmax=ACT_MAX):
    """Rows of a (float32) as int8 in [-qmax, qmax] and their scales, as documented in
    rnnfuse.quantized."""
    a = np.asarray(a, np.float32)
    amax = np.abs(a).max(axis=1)
    finite = np.isfinite(a).all(axis=1)
    usable = amax >= np.float32(qmax) / np.finfo(np.float32).max  # qmax / amax is finite
    safe = np.where(finite & usable, amax, np.float32(1))
    inv = np.float32(qmax) / safe
    q = np.clip(np.rint(a * inv[:, None]), -qmax, qmax)
    q = np.where((finite & usable)[:, None], q, 0).astype(np.int8)
    scales = np.where(finite, np.where(usable, amax / np.float32(qmax), 0), np.nan)
    return q, scales.astype(np.float32)


def np_product(a, w, c=None):
    """a @ w.T on int8 rows: int32 sums, then c + acc * (scale_a * scale_w) in float32."""
    qa, sa = np_quantize(a)
    qw, sw = np_quantize(w, WEIGHT_MAX)
    acc = qa.astype(np.int64) @ qw.astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2**31
    out = acc.astype(np.int32).astype(np.float32) * (sa[:, None] * sw[None, :])
    return out if c is None else c + out


@pytest.mark.parametrize("K", [37, 64, 75])
def test_quantize_rows_matches_numpy(path, K):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, K)).astype(np.float32) * 3
    a[1] = 0                      # a zero row: scale 0
    a[2, :4] = [63, -31.5, 0.5, 1.5]  # exact ties round half to even
    a[3, 5] = np.inf              # non-finite rows: zeros, scale NaN
    a[4, K - 1] = np.nan
    a[5, K - 1] = 1e6             # the largest in the vectors' tail
    a = np.concatenate([a, np.zeros((1, K), np.float32)])
    a[6, ::3] = 2e-39             # subnormal: 63 / max overflows, so zeros, scale 0
    q, s = _kernels.q8_quantize(a)
    q_ref, s_ref = np_quantize(a)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert list(q[2, :4]) == [63, -32, 0, 2]
    assert np.isnan(s[3]) and np.isnan(s[4]) and s[1] == 0 == s[6] and not q[6].any()


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 37, 19), (4, 8, 8), (7, 129, 33),
                                   (1, 512, 64), (13, 64, 200)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_int8_product_is_exactly_the_integer_reference(path, M, K, N, accumulate):
    rng = np.random.default_rng(M * 1000 + K + N)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.uniform(-1, 1, (N, K)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32) if accumulate else None
    np.testing.assert_array_equal(_kernels.q8_product(a, w, c), np_product(a, w, c))


def test_int8_product_extremes_do_not_saturate(path):
    """Every a at +-63 (a + 64 at 127 or 1) and every w at +-63: two pairs of (a + 64) w
    sum to +-32004, within int16's range; the reference says what exact is."""
    K = 256
    a = np.array([[1, -1] * (K // 2), [1] * K, [-1] * K], np.float32)
    w = np.array([[1, -1] * (K // 2), [-1] * K, [1] * K], np.float32)
    np.testing.assert_array_equal(_kernels.q8_product(a, w), np_product(a, w))
    assert _kernels.q8_product(a, w)[0, 0] == pytest.approx(K)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (9, 37, 19), (3, 130, 40)])
def test_int8_product_without_its_buffer_is_the_same(M, K, N):
    """The slow way taken when the rows' buffer cannot be allocated: the same integers."""
    rng = np.random.default_rng(K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    a[M // 2] = 0  # a zero row among the others
    a[-1, 0] = np.inf if M > 2 else a[-1, 0]  # a non-finite one: NaN outputs
    w = rng.uniform(-1, 1, (N, K)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32)
    for acc in (None, c):
        got = _kernels.q8_product(a, w, acc, unbuffered=True)
        np.testing.assert_array_equal(got, np_product(a, w, acc))
        np.testing.assert_array_equal(got, _kernels.q8_product(a, w, acc))


def test_int8_product_long_rows(path):
    """Rows longer than any fixed buffer would hold (the rows' buffer is sized from K)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 20_000)).astype(np.float32)
    w = rng.uniform(-1, 1, (18, 20_000)).astype(np.float32)
    np.testing.assert_array_equal(_kernels.q8_product(a, w), np_product(a, w))


def test_quantized_layer_large_input_size_close_to_float32():
    """A row of 20,000 adds up 20,000 roundings: its error grows as sqrt(K), here 0.11
    (0.043 with 8-bit weights and activations), so the bound is three times the layers'
    usual one."""
    layer = RNN(20_000, 8, seed=0).eval()
    x = np.random.default_rng(4).standard_normal((3, 2, 20_000)).astype(np.float32) * 0.1
    q = layer.quantized()
    assert np.abs(q(x)[0] - layer(x)[0]).max() <= 3 * MAX_ERROR
    stream = q.stream(2)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(3)]), q(x)[0])


def test_int8_product_same_bits_on_every_path():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((9, 70)).astype(np.float32)
    w = rng.standard_normal((30, 70)).astype(np.float32)
    before, got = _kernels.kernel(), []
    try:
        for p in PATHS:
            _use(p)
            got.append(_kernels.q8_product(a, w))
    finally:
        _kernels.set_kernel(before)
        _kernels.set_int8_vnni(True)
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


def _layer(cls, kw, seed=0, **more):
    layer = cls(12, 24, seed=seed, **kw, **more)
    return layer.eval()


@pytest.mark.parametrize("cls,kw", CELLS, ids=CELL_IDS)
def test_quantized_layer_close_to_float32(path, cls, kw):
    rng = np.random.default_rng(3)
    layer = _layer(cls, kw, num_layers=2)
    q = layer.quantized()
    x = rng.standard_normal((15, 5, 12)).astype(np.float32)
    lengths = np.array([15, 3, 0, 9, 15])
    state = layer(x[:1])[1]  # some nonzero initial state in the layer's form
    y, s = layer(x, state, lengths)
    yq, sq = q(x, state, lengths)
    assert np.abs(yq - y).max() <= MAX_ERROR
    for a, b in zip(s if isinstance(s, tuple) else (s,), sq if isinstance(sq, tuple) else (sq,)):
        assert np.abs(a - b).max() <= MAX_ERROR
    assert np.all(yq[3:, 1] == 0) and np.all(yq[:, 2] == 0)  # padding stays zero
    assert np.abs(yq - y).max() > 0  # it is int8


def test_quantized_bidirectional_batch_first_close_to_float32(path):
    rng = np.random.default_rng(4)
    layer = _layer(LSTM, {}, bidirectional=True, batch_first=True, bias=False)
    q = quantize(layer)
    x = rng.standard_normal((3, 11, 12)).astype(np.float32)
    y, (h, c) = layer(x, lengths=[11, 4, 7])
    yq, (hq, cq) = q(x, lengths=[11, 4, 7])
    assert yq.shape == y.shape == (3, 11, 48)
    assert max(np.abs(yq - y).max(), np.abs(hq - h).max(), np.abs(cq - c).max()) <= MAX_ERROR


def test_quantized_layer_larger_sizes_close_to_float32():
    rng = np.random.default_rng(5)
    layer = LSTM(128, 256, seed=5).eval()
    x = rng.standard_normal((30, 4, 128)).astype(np.float32)
    assert np.abs(layer.quantized()(x)[0] - layer(x)[0]).max() <= MAX_ERROR


@pytest.mark.parametrize("cls,kw", CELLS, ids=CELL_IDS)
def test_quantized_rows_do_not_depend_on_the_batch(path, cls, kw):
    rng = np.random.default_rng(6)
    q = _layer(cls, kw).quantized()
    x = rng.standard_normal((9, 13, 12)).astype(np.float32)
    y = q(x)[0]
    for b in (0, 6, 12):
        np.testing.assert_array_equal(q(x[:, b:b + 1])[0][:, 0], y[:, b])


def test_quantized_layer_keeps_int8_weights_and_float_biases():
    layer = _layer(GRU, {})
    q = layer.quantized()
    assert isinstance(q, QuantizedGRU) and repr(q) == "QuantizedGRU(12, 24)"
    assert sorted(q.named_parameters()) == ["bias_hh_l0", "bias_ih_l0"]
    assert q._packed[0].dtype == np.uint8
    floats = layer._params["weight_ih_l0"].nbytes + layer._params["weight_hh_l0"].nbytes
    assert q._packed[0].nbytes < floats / 2
    layer._params["weight_hh_l0"][:] = 0  # the quantized copy does not follow the layer
    x = np.ones((2, 1, 12), np.float32)
    assert not np.array_equal(q(x)[0], layer(x)[0])


def test_quantized_layer_refusals():
    layer = _layer(LSTM, {})
    q = layer.quantized()
    x = np.ones((2, 1, 12), np.float32)
    with pytest.raises(TypeError, match="only float32 layers can be quantized"):
        LSTM(3, 4, dtype=np.float64).quantized()
    with pytest.raises(TypeError, match="quantize takes an LSTM, GRU or RNN layer"):
        quantize(Linear(3, 4))
    with pytest.raises(TypeError, match="quantize takes"):
        quantize(q)
    with pytest.raises(ValueError, match="inference only: it cannot be put in training"):
        q.train()
    with pytest.raises(ValueError, match="need_grad=False"):
        q(x, need_grad=True)
    with pytest.raises(RuntimeError, match="inference only: it has no backward"):
        q.backward(None)
    with pytest.raises(RuntimeError, match="quantize it again"):
        q.load_state_dict({})
    with pytest.raises(TypeError, match="dtype float32"):
        q(x.astype(np.float64))
    with pytest.raises(ValueError, match="input_size"):
        q(np.ones((2, 1, 5), np.float32))
    with pytest.raises(ValueError, match="lengths must lie"):
        q(x, lengths=[3])
    assert isinstance(q, QuantizedLSTM) and q.eval() is q and not q.training


VARIANTS = [(LSTM, {"peepholes": True}), (LSTM, {"zoneout": 0.3}),
            (LSTM, {"peepholes": True, "zoneout": 0.2}),
            (GRU, {"linear_before_reset": True, "zoneout": 0.25}),
            (GRU, {"linear_before_reset": False, "zoneout": 0.25}),
            (RNN, {"nonlinearity": "tanh", "zoneout": 0.4})]
VARIANT_IDS = ["lstm_peep", "lstm_zoneout", "lstm_peep_zoneout", "gru_lbr_zoneout",
               "gru_orig_zoneout", "rnn_zoneout"]


def _variant_layer(cls, kw, **more):
    """An eval layer with the variants of kw, its peepholes (which start at zero) drawn."""
    layer = _layer(cls, kw, **more)
    rng = np.random.default_rng(5)
    for name, w in layer._params.items():
        if name.startswith("weight_peep"):
            w[...] = rng.uniform(-1, 1, w.shape)
    return layer


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=VARIANT_IDS)
def test_quantized_variants_close_to_float32(path, cls, kw):
    """Peepholes and eval's zoneout carried into the int8 layer: bidirectional, stacked,
    ragged, from a given state."""
    layer = _variant_layer(cls, kw, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 4, 12)).astype(np.float32)
    lengths = [7, 3, 0, 5]
    state = layer(x[:3])[1]
    y, s = layer(x, state, lengths=lengths)
    yq, sq = layer.quantized()(x, state, lengths=lengths)
    s, sq = (s, sq) if isinstance(s, tuple) else ((s,), (sq,))
    error = max(np.abs(a - b).max() for a, b in zip((y, *s), (yq, *sq)))
    assert error <= MAX_ERROR
    plain = _layer(cls, {k: v for k, v in kw.items() if k == "linear_before_reset"},
                   num_layers=2, bidirectional=True)  # the variants move y far more
    assert np.abs(plain(x, state, lengths=lengths)[0] - y).max() > 3 * error


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=VARIANT_IDS)
def test_quantized_variants_stream_and_pool_match_forward(path, cls, kw):
    q = _variant_layer(cls, kw, num_layers=2).quantized()
    x = np.random.default_rng(8).standard_normal((5, 3, 12)).astype(np.float32)
    y = q(x)[0]
    stream = q.stream(3)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(5)]), y)
    pool = q.stream_pool(4)
    ids = [pool.open() for _ in range(3)]
    got = np.stack([pool.step(ids[::-1], x[t][::-1]) for t in range(5)])
    np.testing.assert_array_equal(got[:, ::-1], y)


def np_q8_lstm(x, w_ih, w_hh, bias, peep, p):
    """A NumPy int8 LSTM forward (zero initial state): np_product's products, then the gate
    math with ONNX's peepholes (i, o, f) and eval's zoneout p."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    sig = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))
    h, c, ys = np.zeros((B, H), np.float32), np.zeros((B, H), np.float32), []
    proj = np_product(x.reshape(T * B, I), w_ih).reshape(T, B, 4 * H)
    for t in range(T):
        a = np_product(h, w_hh, proj[t]).astype(np.float64) + bias
        gi, gf, gg, go = (a[:, k * H:(k + 1) * H] for k in range(4))
        i, f = sig(gi + peep[:H] * c), sig(gf + peep[2 * H:] * c)
        c_new = f * c + i * np.tanh(gg)
        h_new = sig(go + peep[H:2 * H] * c_new) * np.tanh(c_new)
        c = (p * c + (1 - p) * c_new).astype(np.float32)
        h = (p * h + (1 - p) * h_new).astype(np.float32)
        ys.append(h)
    return np.stack(ys), h, c


def test_q8_lstm_peepholes_zoneout_against_numpy(path):
    layer = _variant_layer(LSTM, {"peepholes": True, "zoneout": 0.3})
    x = np.random.default_rng(9).standard_normal((6, 5, 12)).astype(np.float32)
    w = {n.rsplit("_l", 1)[0]: v for n, v in layer._params.items()}
    want = np_q8_lstm(x, w["weight_ih"], w["weight_hh"],
                      w["bias_ih"].astype(np.float64) + w["bias_hh"], w["weight_peep"], 0.3)
    y, (h, c) = layer.quantized()(x)
    for got, ref in zip((y, h[0], c[0]), want):
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_q8_forward_refuses_foreign_packed():
    layer = _layer(RNN, {})
    q = layer.quantized()
    x = np.ones((2, 1, 12), np.float32)
    plan = _kernels.Plan(np.array([2], np.int64), 2, False)
    ws = _kernels.aligned_empty(_kernels.workspace_size("rnn", plan, 12, 24, False),
                                np.float32)
    floats = _kernels.pack_weights(layer._params["weight_ih_l0"],
                                   layer._params["weight_hh_l0"], 1, False)
    for bad in (floats, q._packed[0][:-1], np.zeros_like(q._packed[0])):
        with pytest.raises(ValueError, match="q8_pack_weights' array"):
            _kernels.q8_forward("rnn", x, None, None, bad, None, None, plan, ws, 12, 24)
    with pytest.raises(ValueError, match="q8_pack_weights' array"):  # other sizes
        _kernels.q8_forward("lstm", x, None, None, q._packed[0], None, None, plan, ws, 12, 24)
    with pytest.raises(ValueError, match="peepholes are an LSTM option; rnn has none"):
        _kernels.q8_forward("rnn", x, None, None, q._packed[0], None, None, plan, ws, 12, 24,
                            False, np.zeros(72, np.float32))


@pytest.mark.parametrize("cls,kw", CELLS, ids=CELL_IDS)
def test_quantized_stream_and_pool_match_forward_bit_for_bit(path, cls, kw):
    rng = np.random.default_rng(7)
    q = _layer(cls, kw, num_layers=2).quantized()
    x = rng.standard_normal((6, 3, 12)).astype(np.float32)
    state = q(x[:2])[1]
    y = q(x, state)[0]
    stream = q.stream(3, state)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(6)]), y)
    pool = q.stream_pool(5)
    parts = state if isinstance(state, tuple) else (state,)
    ids = [pool.open(tuple(p[:, b:b + 1] for p in parts) if len(parts) == 2
                     else parts[0][:, b:b + 1]) for b in range(3)]
    got = [pool.step(ids, x[0])]
    pool.close(ids[1])  # the others go on alone, with the same numbers
    got += [pool.step([ids[0], ids[2]], x[t][[0, 2]]) for t in range(1, 6)]
    np.testing.assert_array_equal(got[0], y[0])
    np.testing.assert_array_equal(np.stack(got[1:]), y[1:, [0, 2]])


def test_quantized_stream_refusals():
    q = _layer(LSTM, {}).quantized()
    with pytest.raises(ValueError, match="bidirectional layer cannot be streamed"):
        _layer(LSTM, {}, bidirectional=True).quantized().stream()
    weights = q._stream_weights()
    with pytest.raises(TypeError, match="int8 weights run float32 only"):
        _kernels.Stream("lstm", False, np.float64, 1, weights, int8=True)
    bad = [[weights[0][0], 11, None, None]]
    with pytest.raises(ValueError, match="q8_pack_weights' array"):
        _kernels.StreamPool("lstm", False, np.float32, 2, bad, int8=True)
    with pytest.raises(ValueError, match="q8_pack_weights' array"):
        _kernels.Stream("gru", False, np.float32, 1, weights, int8=True)
    with pytest.raises(ValueError, match="b_ih"):
        _kernels.Stream("lstm", False, np.float32, 1,
                        [[weights[0][0], 12, np.zeros(3, np.float32), None]], int8=True)


def test_charlm_quantized_bpc_within_002_of_float32():
    from rnnfuse.apps import charlm
    text = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40
    vocab = charlm.Vocab(text)
    ids = vocab.encode(text)
    model = charlm.char_model(vocab.size, "lstm", 32, 2, embed=8, seed=0)
    rng = np.random.default_rng(1)
    for p in model.parameters():  # weights moved off their initialisation
        p += rng.normal(scale=0.3, size=p.shape).astype(p.dtype)
    task = charlm.CharLM(model, ids[:1000], ids[1000:], k=8, batch_size=2, rng=rng)
    model.train()
    float32, int8 = task.quantized_bpc()
    assert model.training and task.model is model  # left as it was
    assert float32 == pytest.approx(task.quantized_bpc()[0])
    assert abs(int8 - float32) <= 0.02 and int8 != float32


def test_charlm_command_reports_int8_bits_per_char(tmp_path):
    import json
    import subprocess
    import sys
    text = tmp_path / "tiny.txt"
    text.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 60)
    r = subprocess.run([sys.executable, "-m", "rnnfuse", "charlm", "--text", str(text),
                        "--epochs", "1", "--hidden", "16", "--embed", "8", "--batch", "4",
                        "--bptt", "16", "--quiet", "--sample", "0", "--quantize", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "int8 weights" in r.stdout
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(last["int8_bpc"] - last["eval_bpc"]) <= 0.02


def test_quantized_forward_same_bits_at_any_thread_count():
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(8)
    q = LSTM(32, 128, seed=8).eval().quantized()
    x = rng.standard_normal((20, 24, 32)).astype(np.float32)
    with threadpool_limits(1):
        one = q(x)[0]
    with threadpool_limits(2):
        assert _kernels.threads() == 2 or pytest.skip("the BLAS runs one thread here")
        np.testing.assert_array_equal(q(x)[0], one)


@pytest.mark.parametrize("I,H,B", [(1, 1, 3), (64, 256, 96)])
def test_quantized_threads_quantize_rows_in_their_own_scratch(I, H, B):
    """Each thread of an int8 call quantizes its rows in its own part of the call's
    workspace (whose room for float weights is too small for that at tiny sizes): the
    same bits on one thread and on several."""
    rng = np.random.default_rng(9)
    q = LSTM(I, H, seed=9).eval().quantized()
    x = rng.standard_normal((4, B, I)).astype(np.float32)
    before = _kernels.set_threads(1)
    try:
        one = q(x)[0]
        _kernels.set_threads(8)
        np.testing.assert_array_equal(q(x)[0], one)
    finally:
        _kernels.set_threads(before)


# ---------------------------------------------------------------- the projected LSTM

def _proj_layer(I=12, H=24, P=10, peepholes=False, seed=0, **more):
    """An eval LSTM with proj_size P, its peepholes (which start at zero) drawn."""
    layer = LSTM(I, H, proj_size=P, peepholes=peepholes, seed=seed, **more).eval()
    rng = np.random.default_rng(seed + 1)
    for name, w in layer._params.items():
        if name.startswith("weight_peep"):
            w[...] = rng.uniform(-1, 1, w.shape)
    return layer


def np_q8_lstmp(x, h, c, w_ih, w_hh, w_hr, bias, peep):
    """A NumPy int8 projected LSTM forward: np_product's products, W_hr's on m = o tanh(c)
    quantized per row, the gate math in float64 with ONNX's peepholes (i, o, f)."""
    T, B, I = x.shape
    H = w_hr.shape[1]
    sig = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))  # noqa: E731
    ys = []
    proj = np_product(x.reshape(T * B, I), w_ih).reshape(T, B, 4 * H)
    for t in range(T):
        a = np_product(h, w_hh, proj[t]).astype(np.float64) + bias
        gi, gf, gg, go = (a[:, k * H:(k + 1) * H] for k in range(4))
        i, f = sig(gi + peep[:H] * c), sig(gf + peep[2 * H:] * c)
        c = (f * c + i * np.tanh(gg)).astype(np.float32)
        m = (sig(go + peep[H:2 * H] * c) * np.tanh(c)).astype(np.float32)
        h = np_product(m, w_hr)
        ys.append(h)
    return np.stack(ys), h, c


@pytest.mark.parametrize("peepholes", [False, True])
def test_q8_projected_lstm_against_numpy(path, peepholes):
    """Every product of the projected LSTM (x W_ih^T, h W_hh^T and m W_hr^T) is the
    integer reference's; the gate math differs by its activations only."""
    layer = _proj_layer(peepholes=peepholes)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 5, 12)).astype(np.float32)
    h0 = rng.standard_normal((5, 10)).astype(np.float32)
    c0 = rng.standard_normal((5, 24)).astype(np.float32)
    w = {n.rsplit("_l", 1)[0]: v for n, v in layer._params.items()}
    peep = w.get("weight_peep", np.zeros(72, np.float32))
    want = np_q8_lstmp(x, h0, c0, w["weight_ih"], w["weight_hh"], w["weight_hr"],
                       w["bias_ih"].astype(np.float64) + w["bias_hh"], peep)
    y, (h, c) = layer.quantized()(x, (h0[None], c0[None]))
    assert y.shape == (6, 5, 10) and h.shape == (1, 5, 10) and c.shape == (1, 5, 24)
    for got, ref in zip((y, h[0], c[0]), want):
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("M,H,P", [(1, 24, 10), (9, 256, 128), (13, 37, 5)])
def test_int8_projection_product_same_bits_on_every_path(M, H, P):
    """The projection's product m (M, H) W_hr^T (P of H) is the integer reference's on
    every code path."""
    rng = np.random.default_rng(M + H + P)
    m = rng.uniform(-1, 1, (M, H)).astype(np.float32)
    w_hr = (rng.uniform(-1, 1, (P, H)) / np.sqrt(H)).astype(np.float32)
    before = _kernels.kernel()
    try:
        for p in PATHS:
            _use(p)
            np.testing.assert_array_equal(_kernels.q8_product(m, w_hr), np_product(m, w_hr))
    finally:
        _kernels.set_kernel(before)
        _kernels.set_int8_vnni(True)


@pytest.mark.parametrize("T,B,I,H,P", [(100, 32, 128, 256, 128), (100, 64, 256, 512, 256)])
def test_quantized_projection_close_to_float32_at_bench_shapes(T, B, I, H, P):
    layer = LSTM(I, H, proj_size=P, seed=0).eval()
    x = np.random.default_rng(11).standard_normal((T, B, I)).astype(np.float32)
    y, (h, c) = layer(x)
    yq, (hq, cq) = layer.quantized()(x)
    error = max(np.abs(yq - y).max(), np.abs(hq - h).max(), np.abs(cq - c).max())
    assert 0 < error <= MAX_ERROR


@pytest.mark.parametrize("peepholes", [False, True])
def test_quantized_projection_variants_close_to_float32(path, peepholes):
    """Stacked, bidirectional, batch_first, ragged, from a given state, without bias."""
    layer = _proj_layer(peepholes=peepholes, num_layers=2, bidirectional=True,
                        batch_first=True, bias=not peepholes)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 7, 12)).astype(np.float32)
    lengths = [7, 3, 0, 5]
    state = layer(x[:, :3])[1]
    assert state[0].shape == (4, 4, 10) and state[1].shape == (4, 4, 24)
    y, s = layer(x, state, lengths=lengths)
    q = layer.quantized()
    yq, sq = q(x, state, lengths=lengths)
    assert yq.shape == y.shape == (4, 7, 20)
    error = max(np.abs(a - b).max() for a, b in zip((y, *s), (yq, *sq)))
    assert 0 < error <= MAX_ERROR
    assert np.all(yq[1, 3:] == 0) and np.all(yq[2] == 0)  # padding stays zero
    names = ["bias_hh", "bias_ih"] * (not peepholes) + ["weight_peep"] * peepholes
    assert sorted(q.named_parameters()) == sorted(f"{n}_l{k}{d}" for n in names
                                                  for k in range(2) for d in ("", "_reverse"))


def test_quantized_projection_rows_do_not_depend_on_the_batch(path):
    q = _proj_layer(num_layers=2).quantized()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((9, 13, 12)).astype(np.float32)
    lengths = np.array([9, 4, 9, 0, 2, 9, 7, 1, 9, 3, 5, 9, 6])
    for reverse in (False, True):
        q_dir = _proj_layer(bidirectional=True).quantized() if reverse else q
        y, (h, c) = q_dir(x, lengths=lengths)
        for b in (0, 1, 6, 12):
            y1, (h1, c1) = q_dir(x[:, b:b + 1], lengths=lengths[b:b + 1])
            np.testing.assert_array_equal(y1[:, 0], y[:, b])
            np.testing.assert_array_equal(h1[:, 0], h[:, b])
            np.testing.assert_array_equal(c1[:, 0], c[:, b])


@pytest.mark.parametrize("peepholes", [False, True])
def test_quantized_projection_stream_and_pool_match_forward(path, peepholes):
    q = _proj_layer(peepholes=peepholes, num_layers=2).quantized()
    rng = np.random.default_rng(14)
    x = rng.standard_normal((6, 3, 12)).astype(np.float32)
    state = q(x[:2])[1]
    y, (h, c) = q(x, state)
    stream = q.stream(3, state)
    assert stream.proj_size == 10
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(6)]), y)
    np.testing.assert_array_equal(stream.state[0], h)
    np.testing.assert_array_equal(stream.state[1], c)
    pool = q.stream_pool(5)
    ids = [pool.open((state[0][:, b:b + 1], state[1][:, b:b + 1])) for b in range(3)]
    got = [pool.step(ids[::-1], x[0][::-1])[::-1]]
    pool.close(ids[1])  # the others go on alone, with the same numbers
    got += [pool.step([ids[2], ids[0]], x[t][[2, 0]])[::-1] for t in range(1, 6)]
    np.testing.assert_array_equal(got[0], y[0])
    np.testing.assert_array_equal(np.stack(got[1:]), y[1:, [0, 2]])
    for k, part in enumerate(pool.state(ids[2])):
        np.testing.assert_array_equal(part[:, 0], (h, c)[k][:, 2])


def test_quantized_projection_threads_use_their_own_scratch():
    """The projected forward's workspace has room for every thread's quantized rows, at
    tiny sizes too, and threads that run different products at once (W_hh's, K = P, and
    W_hr's, K = H; a thread does not wait for the others between steps) quantize into
    buffers of their own: the same bits on one thread and on several, call after call."""
    rng = np.random.default_rng(15)
    for I, H, P, T, B in ((1, 2, 1, 4, 3), (64, 256, 128, 50, 32)):
        q = LSTM(I, H, proj_size=P, seed=15).eval().quantized()
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        before = _kernels.set_threads(1)
        try:
            one = q(x)[0]
            for n in (2, 8) * 5:
                _kernels.set_threads(n)
                np.testing.assert_array_equal(q(x)[0], one)
        finally:
            _kernels.set_threads(before)


def test_quantized_projection_refusals():
    layer = _proj_layer()
    q = layer.quantized()
    p = {n.rsplit("_l", 1)[0]: v for n, v in layer._params.items()}
    w_ih, w_hh, w_hr = p["weight_ih"], p["weight_hh"], p["weight_hr"]
    with pytest.raises(ValueError, match=r"only the LSTM \(G=4\) has a projection w_hr"):
        _kernels.q8_pack_weights(w_ih[:72], w_hh[:72], 3, True, w_hr)
    with pytest.raises(ValueError, match="w_ih, w_hh and w_hr must be"):
        _kernels.q8_pack_weights(w_ih, w_hh, 4, False, w_hr[:, :10])  # P = H
    with pytest.raises(ValueError, match="w_ih, w_hh and w_hr must be"):
        _kernels.q8_pack_weights(w_ih, w_hh, 4, False, w_hr[0])
    with pytest.raises(TypeError, match="made from float32 weights, got .* w_hr float64"):
        _kernels.q8_pack_weights(w_ih, w_hh, 4, False, w_hr.astype(np.float64))
    x = np.ones((2, 1, 12), np.float32)
    plan = _kernels.Plan(np.array([2], np.int64), 2, False)
    ws = _kernels.aligned_empty(_kernels.lstmp_workspace_size(plan, 12, 24, 10, False),
                                np.float32)
    plain = LSTM(12, 24, seed=0).quantized()._packed[0]
    for bad, P in ((plain, 10), (q._packed[0], 0), (q._packed[0], 9)):
        with pytest.raises(ValueError, match="q8_pack_weights' array for G=4, H=24, I=12"):
            _kernels.q8_forward("lstm", x, None, None, bad, None, None, plan, ws, 12, 24,
                                False, None, None, P)
    with pytest.raises(ValueError, match=r"a projection \(P=10\) runs the LSTM without "
                                         "zoneout only, got lstm with zoneout"):
        _kernels.q8_forward("lstm", x, None, None, q._packed[0], None, None, plan, ws, 12,
                            24, False, None, 0.5, 10)
    with pytest.raises(ValueError, match=r"a projection \(P=10\) runs the LSTM"):
        _kernels.q8_forward("gru", x, None, None, q._packed[0], None, None, plan, ws, 12,
                            24, False, None, None, 10)
    with pytest.raises(ValueError, match="ws must be"):  # a plain LSTM's workspace
        _kernels.q8_forward("lstm", x, None, None, q._packed[0], None, None, plan,
                            ws[:_kernels.workspace_size("lstm", plan, 12, 24, False)], 12,
                            24, False, None, None, 10)
    with pytest.raises(ValueError, match=r"state\[h\] must have shape \(1, 1, 10\)"):
        q(x, (np.zeros((1, 1, 24), np.float32), np.zeros((1, 1, 24), np.float32)))


def test_quantized_projection_stream_refusals():
    q = _proj_layer(num_layers=2).quantized()
    weights = q._stream_weights()
    assert [w[1] for w in weights] == [12, 10]  # the second layer takes P inputs
    with pytest.raises(ValueError, match="q8_pack_weights' array"):  # no proj_size
        _kernels.Stream("lstm", False, np.float32, 1, weights, int8=True)
    with pytest.raises(ValueError, match="layer 1's input size is 24, expected 10"):
        _kernels.StreamPool("lstm", False, np.float32, 2,
                            [weights[0], [weights[1][0], 24, *weights[1][2:]]], int8=True,
                            proj_size=10)
    with pytest.raises(ValueError, match="q8_pack_weights' array"):  # another P
        _kernels.Stream("lstm", False, np.float32, 1, weights[:1], int8=True, proj_size=9)
    with pytest.raises(ValueError, match="zoneout is not supported with proj_size"):
        _kernels.Stream("lstm", False, np.float32, 1, weights, int8=True, zoneout=0.1,
                        proj_size=10)
    with pytest.raises(ValueError, match="proj_size runs the LSTM without layer_norm"):
        _kernels.Stream("gru", True, np.float32, 1, weights, int8=True, proj_size=10)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 1, 10\)"):
        q.stream(1, (np.zeros((2, 1, 24), np.float32), np.zeros((2, 1, 24), np.float32)))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 1, 10\)"):
        q.stream_pool(2).open((np.zeros((2, 1, 24), np.float32),
                               np.zeros((2, 1, 24), np.float32)))
