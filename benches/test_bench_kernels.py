"""The kernels against the reference and the peers, on the benchmark grid.

For each cell (LSTM, GRU, RNN tanh), inference (forward only) and training step (forward +
backward), float32 and float64, each shape of rnnfuse.bench.GRID (one of them ragged): one
benchmark per implementation (rnnfuse, rnnfuse prepacked (inference), the NumPy reference,
PyTorch and ONNX Runtime when installed), grouped by case so they sit side by side. Each checks its result against the
reference once, outside the timed calls. Run: ``pytest benches/``; the grid, the switches
(--quick, threads, budget) and the parametrization are in conftest.py.
"""
import time

import pytest

from rnnfuse import bench

pytest.importorskip("pytest_benchmark")


def test_kernel(benchmark, case, impl, bench_threads, bench_budget):
    try:
        fn = bench.runner(impl, case, bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    t = time.perf_counter()
    result = fn()  # also the warm-up
    t = time.perf_counter() - t
    err = bench.check(case, impl, result)  # raises if the result is wrong
    del result

    benchmark.group = case.group
    benchmark.extra_info.update(impl=impl, cell=case.cell, mode=case.mode, dtype=case.dtype,
                                T=case.shape.T, B=case.shape.B, I=case.shape.I,
                                H=case.shape.H, ragged=case.shape.ragged,
                                threads=bench_threads, max_rel_err=err)
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once, time nothing
        benchmark(fn)
        return
    t = min(t, bench.time_once(fn))  # the first call may include one-off setup
    rounds, iterations = bench.plan_rounds(t, bench_budget)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
