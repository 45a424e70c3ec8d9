"""rnnfuse.torch against torch.nn at the shapes of real models, inference (no_grad) and a
training step (forward and backward of a summed output).

- 2-layer LSTM and GRU of 128 and 200 units, batch_first, B=128, T=24, I=1 (a forecaster
  over a window of one series);
- 2-layer LSTM of 200 units, B=20, T=35, I=200 (the small word-level language model);
- LSTMCell(128), one step at B=1 (a step of a decoder or a controller).

Each pair is checked against torch.nn once (same parameters) before anything is timed.
Run: ``pytest benches/test_bench_torch.py``; --quick keeps the first shape. Skipped
without PyTorch.
"""
import time

import pytest

from rnnfuse import bench

pytest.importorskip("pytest_benchmark")

# (kind, layers, hidden, batch, steps, input); steps None: a cell's single step
SHAPES = [("LSTM", 2, 128, 128, 24, 1), ("LSTM", 2, 200, 128, 24, 1),
          ("GRU", 2, 128, 128, 24, 1), ("GRU", 2, 200, 128, 24, 1),
          ("LSTM", 2, 200, 20, 35, 200), ("LSTMCell", 1, 128, 1, None, 128)]
MODES = ("inference", "training")
IMPLS = ("rnnfuse", "torch")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from conftest import quick
        shapes = SHAPES[:1] if quick(metafunc.config) else SHAPES
        metafunc.parametrize(
            ("shape", "mode", "impl"),
            [pytest.param(s, m, i, id=f"{s[0]}-L{s[1]}-H{s[2]}-B{s[3]}-T{s[4]}-I{s[5]}-{m}-{i}")
             for s in shapes for m in MODES for i in IMPLS])


def _pair(torch, shape):
    """(torch.nn module, rnnfuse.torch module with the same parameters, input)."""
    import rnnfuse.torch as rt
    kind, L, H, B, T, I = shape
    torch.manual_seed(0)
    if T is None:
        ref = getattr(torch.nn, kind)(I, H)
        x = torch.randn(B, I)
    else:
        ref = getattr(torch.nn, kind)(I, H, num_layers=L, batch_first=True)
        x = torch.randn(B, T, I)
    ours = getattr(rt, kind).from_torch(ref)
    return ref, ours, x


def _output(out):
    """The tensor to compare and to sum: y for the RNNs, h for the cells."""
    return out[0]


def _call(module, x, mode, torch):
    if mode == "inference":
        def run():
            with torch.no_grad():
                return module(x)
        return run

    def run():
        module.zero_grad(set_to_none=True)
        _output(module(x)).sum().backward()
    return run


def test_torch_module(benchmark, shape, mode, impl, bench_threads, bench_budget):
    try:
        torch = bench._import_torch(bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    ref, ours, x = _pair(torch, shape)
    with torch.no_grad():
        torch.testing.assert_close(_output(ours(x)), _output(ref(x)), rtol=1e-4, atol=1e-5)
    run = _call(ours if impl == "rnnfuse" else ref, x, mode, torch)

    kind, L, H, B, T, I = shape
    benchmark.group = f"torch {kind} L={L} H={H} B={B} T={T} I={I} {mode}"
    benchmark.extra_info.update(impl=impl, mode=mode, kind=kind, layers=L, H=H, B=B, T=T,
                                I=I, threads=bench_threads)
    if getattr(benchmark, "disabled", False):
        benchmark(run)
        return
    t = time.perf_counter()
    for _ in range(3):
        run()
    rounds, iterations = bench.plan_rounds((time.perf_counter() - t) / 3, bench_budget,
                                           max_rounds=2000, min_sample=1e-4)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)
