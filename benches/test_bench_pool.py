"""One timestep of many sessions: a stream pool stepping them together against one stream
per session stepped one after another, and against PyTorch and ONNX Runtime called per
session (their state passed in and out) and over all sessions at once.

Per shape (rnnfuse.bench.SERVING_SHAPES), the time of one step of every session, for each
implementation of rnnfuse.bench.SERVING_IMPLS (peers skipped when not installed). Each is
checked once, outside the timed calls, against the layer's whole-sequence forward. Run:
``pytest benches/test_bench_pool.py``; --quick keeps the first shape. The ratio of the
streams' median to the pool's is the pool's gain; ``python -m rnnfuse bench --serving``
prints the same comparison as a table.
"""
import time

import numpy as np
import pytest

from rnnfuse import bench

pytest.importorskip("pytest_benchmark")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from conftest import quick
        shapes = bench.SERVING_SHAPES[:1] if quick(metafunc.config) else bench.SERVING_SHAPES
        metafunc.parametrize(
            ("shape", "impl"),
            [pytest.param(s, i, id=f"{s.cell}-n{s.sessions}-I{s.I}-H{s.H}-L{s.layers}-{i}")
             for s in shapes for i in bench.SERVING_IMPLS])


def test_sessions_step(benchmark, shape, impl, bench_threads, bench_budget):
    layer = bench.serving_layer(shape)
    x = np.random.default_rng(0).standard_normal((4, shape.sessions, shape.I)).astype(
        np.float32)
    try:
        step = bench.serving_stepper(impl, layer, shape.sessions, bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    bench.serving_check(impl, step, layer, x)

    benchmark.group = f"sessions {shape.label}"
    benchmark.extra_info.update(impl=impl, cell=shape.cell, sessions=shape.sessions,
                                I=shape.I, H=shape.H, layers=shape.layers,
                                threads=bench_threads)
    x0 = x[0]
    if getattr(benchmark, "disabled", False):
        benchmark(step, x0)
        return
    t = time.perf_counter()
    for _ in range(3):
        step(x0)
    rounds, iterations = bench.plan_rounds((time.perf_counter() - t) / 3, bench_budget,
                                           max_rounds=2000, min_sample=1e-4)
    benchmark.pedantic(step, args=(x0,), rounds=rounds, iterations=iterations, warmup_rounds=1)
