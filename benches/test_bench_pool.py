"""One timestep of many sessions: a stream pool stepping them together against one stream
per session stepped one after another.

Per shape, the time of one step of every session: "pool" is one ``pool.step(ids, x)`` over
all sessions (one kernel call per layer); "streams" is ``stream.step(x[i:i+1])`` for each
session's own stream. Both are checked once, outside the timed calls, against the layer's
whole-sequence forward. Run: ``pytest benches/test_bench_pool.py``; --quick keeps the
first shape. The ratio of the two medians is the pool's gain.
"""
import time

import numpy as np
import pytest

import rnnfuse
from rnnfuse import bench

pytest.importorskip("pytest_benchmark")

# (cell, sessions, input, hidden, layers)
SHAPES = [("lstm", 256, 64, 128, 1), ("gru", 256, 64, 128, 1), ("lstm", 64, 64, 128, 2)]
IMPLS = ("pool", "streams")
STEPS = 4  # steps run once to check the implementation against the whole sequence


def _layer(cell, I, H, L):
    cls = {"lstm": rnnfuse.LSTM, "gru": rnnfuse.GRU, "rnn": rnnfuse.RNN}[cell]
    return cls(I, H, num_layers=L, seed=0).eval()


def _stepper(impl, layer, n):
    """A function x (n, I) -> y (n, H) stepping n sessions, each keeping its state."""
    if impl == "pool":
        pool = layer.stream_pool(n)
        ids = np.array([pool.open() for _ in range(n)], np.int64)
        return lambda x: pool.step(ids, x)
    streams = [layer.stream(1) for _ in range(n)]

    def step(x):
        return np.concatenate([s.step(x[i:i + 1]) for i, s in enumerate(streams)])
    return step


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from conftest import quick
        shapes = SHAPES[:1] if quick(metafunc.config) else SHAPES
        metafunc.parametrize(("shape", "impl"),
                             [pytest.param(s, i, id=f"{s[0]}-n{s[1]}-I{s[2]}-H{s[3]}-L{s[4]}-{i}")
                              for s in shapes for i in IMPLS])


def test_sessions_step(benchmark, shape, impl, bench_threads, bench_budget):
    cell, n, I, H, L = shape
    layer = _layer(cell, I, H, L)
    x = np.random.default_rng(0).standard_normal((STEPS, n, I)).astype(np.float32)
    want, _ = layer.forward(x)
    step = _stepper(impl, layer, n)
    got = np.stack([step(x[t]) for t in range(STEPS)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    step = _stepper(impl, layer, n)  # fresh states for the timed steps
    benchmark.group = f"sessions {cell} n={n} I={I} H={H} layers={L}"
    benchmark.extra_info.update(impl=impl, cell=cell, sessions=n, I=I, H=H, layers=L,
                                threads=bench_threads)
    x0 = x[0]
    if getattr(benchmark, "disabled", False):
        benchmark(step, x0)
        return
    t = time.perf_counter()
    for _ in range(10):
        step(x0)
    rounds, iterations = bench.plan_rounds((time.perf_counter() - t) / 10, bench_budget,
                                           max_rounds=2000, min_sample=1e-4)
    benchmark.pedantic(step, args=(x0,), rounds=rounds, iterations=iterations, warmup_rounds=1)
