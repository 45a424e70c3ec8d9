"""One timestep of a streamed layer (layer.stream().step): the per-call cost for small layers.

Side by side per shape: the rnnfuse stream, the same step through the whole-sequence API
(layer.forward on a length-1 sequence with the state carried), and PyTorch's module on a
length-1 sequence with its state carried (when installed). Each is checked against the
whole-sequence forward once, outside the timed calls. Run: ``pytest benches/``; --quick
keeps the first shape.
"""
import time

import numpy as np
import pytest

import rnnfuse
from rnnfuse import bench

pytest.importorskip("pytest_benchmark")

# (cell, batch, input, hidden, layers)
SHAPES = [("lstm", 1, 32, 32, 1), ("gru", 1, 32, 32, 1), ("rnn", 1, 32, 32, 1),
          ("lstm", 1, 64, 128, 2), ("lstm", 8, 64, 256, 1)]
IMPLS = ("stream", "forward", "torch")
STEPS = 16  # steps run once to check the implementation against the whole sequence


def _layer(cell, I, H, L):
    cls = {"lstm": rnnfuse.LSTM, "gru": rnnfuse.GRU, "rnn": rnnfuse.RNN}[cell]
    return cls(I, H, num_layers=L, seed=0).eval()


def _stepper(impl, layer, B, threads):
    """A function x_t -> y_t that keeps the state between calls."""
    if impl == "stream":
        return layer.stream(B).step
    if impl == "forward":
        state = [None]

        def step(x):
            y, state[0] = layer.forward(x[None], state[0])
            return y[0]
        return step
    torch = bench._import_torch(threads)
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[type(layer).__name__]
    module = cls(layer.input_size, layer.hidden_size, layer.num_layers)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    hx = [None]

    def step(x):
        with torch.no_grad():
            y, hx[0] = module(torch.from_numpy(x)[None], hx[0])
        return y[0].numpy()
    return step


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from conftest import quick
        shapes = SHAPES[:1] if quick(metafunc.config) else SHAPES
        metafunc.parametrize(("shape", "impl"),
                             [pytest.param(s, i, id=f"{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}-L{s[4]}-{i}")
                              for s in shapes for i in IMPLS])


def test_step(benchmark, shape, impl, bench_threads, bench_budget):
    cell, B, I, H, L = shape
    layer = _layer(cell, I, H, L)
    try:
        step = _stepper(impl, layer, B, bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    x = np.random.default_rng(0).standard_normal((STEPS, B, I)).astype(np.float32)
    want, _ = layer.forward(x)
    got = np.stack([step(x[t]) for t in range(STEPS)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    benchmark.group = f"step {cell} B={B} I={I} H={H} layers={L}"
    benchmark.extra_info.update(impl=impl, cell=cell, B=B, I=I, H=H, layers=L,
                                threads=bench_threads)
    x0 = x[0]
    if getattr(benchmark, "disabled", False):
        benchmark(step, x0)
        return
    t = time.perf_counter()
    for _ in range(100):
        step(x0)
    rounds, iterations = bench.plan_rounds((time.perf_counter() - t) / 100, bench_budget,
                                           max_rounds=2000, min_sample=1e-4)
    benchmark.pedantic(step, args=(x0,), rounds=rounds, iterations=iterations, warmup_rounds=1)


# The variants a stream runs with weights or state of their own: (cell, batch, input,
# hidden, layers, options); each beside the plain cell of the same sizes.
VARIANT_SHAPES = [("lstm", 1, 256, 256, 1, {}), ("lstm", 1, 256, 256, 1, {"layer_norm": True}),
                  ("lstm", 1, 256, 256, 1, {"proj_size": 128}),
                  ("gru", 1, 256, 256, 1, {}), ("gru", 1, 256, 256, 1, {"layer_norm": True})]


@pytest.mark.parametrize("variant", VARIANT_SHAPES,
                         ids=[f"{v[0]}-B{v[1]}-I{v[2]}-H{v[3]}-L{v[4]}-"
                              + ("-".join(f"{k}={o}" for k, o in v[5].items()) or "plain")
                              for v in VARIANT_SHAPES])
def test_variant_stream_step(benchmark, variant, bench_budget):
    cell, B, I, H, L, opts = variant
    cls = {"lstm": rnnfuse.LSTM, "gru": rnnfuse.GRU}[cell]
    layer = cls(I, H, num_layers=L, seed=0, **opts).eval()
    stream = layer.stream(B)
    x = np.random.default_rng(0).standard_normal((STEPS, B, I)).astype(np.float32)
    want, _ = layer.forward(x)
    np.testing.assert_array_equal(np.stack([stream.step(x[t]) for t in range(STEPS)]), want)

    benchmark.group = f"stream step {cell} B={B} I={I} H={H} layers={L} (variants)"
    benchmark.extra_info.update(cell=cell, B=B, I=I, H=H, layers=L, **opts)
    x0 = x[0]
    if getattr(benchmark, "disabled", False):
        benchmark(stream.step, x0)
        return
    t = time.perf_counter()
    for _ in range(100):
        stream.step(x0)
    rounds, iterations = bench.plan_rounds((time.perf_counter() - t) / 100, bench_budget,
                                           max_rounds=2000, min_sample=1e-4)
    benchmark.pedantic(stream.step, args=(x0,), rounds=rounds, iterations=iterations,
                       warmup_rounds=1)
