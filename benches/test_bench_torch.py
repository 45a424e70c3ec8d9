"""rnnfuse.torch against torch.nn at the shapes of real models, inference (no_grad) and a
training step (forward and backward of a summed output).

- 2-layer LSTM and GRU of 128 and 200 units, batch_first, B=128, T=24, I=1 (a forecaster
  over a window of one series);
- 2-layer LSTM of 200 units, B=20, T=35, I=200 (the small word-level language model);
- LSTMCell, GRUCell and RNNCell(128), one step at B=1 and B=16 (a step of a decoder or
  a controller; training unrolls 5 steps);
- one step of generation at B=1 with LSTM(128): module.stream's step against
  nn.LSTMCell, rnnfuse.torch.LSTMCell and a one-step rnnfuse.torch.LSTM call
  (test_torch_step);
- the models (not the cells) under torch.compile(fullgraph=True) too (impl "compiled"),
  and in the "variants" report models with rnnfuse's cell variants, eager and compiled.

Each pair is checked against torch.nn once (same parameters) before anything is timed.
Run: ``pytest benches/test_bench_torch.py``; --quick keeps the first shape. Skipped
without PyTorch. The interleaved reports (thread CPU time, for a loaded machine):
``python benches/test_bench_torch.py [budget] [cells|compile|variants]``.
"""
import time

import pytest

from rnnfuse import bench

pytest.importorskip("pytest_benchmark")

# (kind, layers, hidden, batch, steps, input); steps None: a cell's single step
SHAPES = [("LSTM", 2, 128, 128, 24, 1), ("LSTM", 2, 200, 128, 24, 1),
          ("GRU", 2, 128, 128, 24, 1), ("GRU", 2, 200, 128, 24, 1),
          ("LSTM", 2, 200, 20, 35, 200)] + [
    (cell, 1, 128, B, None, 128) for cell in ("LSTMCell", "GRUCell", "RNNCell")
    for B in (1, 16)]
CELL_STEPS = 5  # a cell's training step unrolls this many steps
MODES = ("inference", "training")
IMPLS = ("rnnfuse", "torch", "compiled")


def _impls(shape):
    """The implementations of a shape: the cells are not compiled."""
    return IMPLS if shape[4] is not None else IMPLS[:2]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from conftest import quick
        shapes = SHAPES[:1] if quick(metafunc.config) else SHAPES
        metafunc.parametrize(
            ("shape", "mode", "impl"),
            [pytest.param(s, m, i, id=f"{s[0]}-L{s[1]}-H{s[2]}-B{s[3]}-T{s[4]}-I{s[5]}-{m}-{i}")
             for s in shapes for m in MODES for i in _impls(s)])


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


def _compiled(torch, module):
    """torch.compile(module, fullgraph=True), with Dynamo's caches emptied first: every
    instance shares the forward's code object, whose recompile limit the grid would hit."""
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True)


def _output(out):
    """The tensor to compare and to sum: y for the RNNs, h for the cells."""
    return out[0]


def _call(module, x, mode, torch, steps=CELL_STEPS, call=None, optimizer=None):
    """A run of mode: inference, or a training step (zero_grad, forward, backward of the
    summed output, and optimizer.step() if given). steps: a cell's unrolled steps. call:
    what runs the forward (module itself, or a compiled module)."""
    call = module if call is None else call
    if mode == "inference":
        def run():
            with torch.no_grad():
                return call(x)
        return run

    def run():
        module.zero_grad(set_to_none=True)
        _output(_unrolled(call, x, steps)).sum().backward()
        if optimizer is not None:
            optimizer.step()
    return run


def _unrolled(module, x, steps=CELL_STEPS):
    """module(x), or for a cell ``steps`` steps of it over x."""
    if not type(module).__name__.endswith("Cell"):
        return module(x)
    state = module(x)
    for _ in range(steps - 1):
        state = module(x, state)
    return state if isinstance(state, tuple) else (state,)


def test_torch_module(benchmark, shape, mode, impl, bench_threads, bench_budget):
    try:
        torch = bench._import_torch(bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    ref, ours, x = _pair(torch, shape)
    call = _compiled(torch, ours) if impl == "compiled" else ours
    with torch.no_grad():
        torch.testing.assert_close(_output(call(x)), _output(ref(x)), rtol=1e-4, atol=1e-5)
    run = _call(ref if impl == "torch" else ours, x, mode, torch, call=call)

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


STEP_IMPLS = ("stream", "rnnfuse_cell", "torch_cell", "rnnfuse_lstm")


def _step_calls(torch):
    """One step of generation, B=1, LSTM(128), each way (impl -> callable), checked
    against nn.LSTMCell's."""
    import rnnfuse.torch as rt
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(128, 128)
    cell = rt.LSTMCell.from_torch(ref)
    lstm = rt.LSTM(128, 128).eval()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(lstm, name + "_l0").data = getattr(ref, name).data
    x, zeros = torch.randn(1, 128), torch.zeros(1, 128)
    stream = lstm.stream(1)
    calls = {"stream": lambda: stream.step(x),
             "rnnfuse_cell": lambda: cell(x, (zeros, zeros))[0],
             "torch_cell": lambda: ref(x, (zeros, zeros))[0],
             "rnnfuse_lstm": lambda: lstm(x[None], (zeros[None], zeros[None]))[0][0]}
    with torch.no_grad():
        for impl in STEP_IMPLS:
            torch.testing.assert_close(calls[impl](), calls["torch_cell"](), rtol=1e-4,
                                       atol=1e-5)
    stream.reset()
    return calls


@pytest.mark.parametrize("impl", STEP_IMPLS)
def test_torch_step(benchmark, impl, bench_threads, bench_budget):
    """One step of generation, B=1, LSTM(128), no_grad: module.stream's step against
    nn.LSTMCell, rnnfuse.torch.LSTMCell and a one-step rnnfuse.torch.LSTM call."""
    try:
        torch = bench._import_torch(bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    step = _step_calls(torch)[impl]
    benchmark.group = "torch one generation step, LSTM(128), B=1"
    benchmark.extra_info.update(impl=impl, threads=bench_threads)

    def run():
        with torch.no_grad():
            step()
    if getattr(benchmark, "disabled", False):
        benchmark(run)
        return
    rounds, iterations = bench.plan_rounds(2e-5, bench_budget, max_rounds=2000,
                                           min_sample=1e-4)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)


REPORT_HIDDEN = (64, 128, 256)  # the cells' sizes in the report
# a cell's modes in the report: (name, mode, unrolled steps)
REPORT_CELL_MODES = (("inference", "inference", 1), ("train 1 call", "training", 1),
                     (f"train {CELL_STEPS} steps", "training", CELL_STEPS))


def _measure(fns, budget):
    """bench.measure on the thread's CPU time: a one-thread run on a loaded machine."""
    return bench.measure(fns, budget, min_rounds=10, max_rounds=1000, clock=time.thread_time)


def _cells_report(budget):
    """The cells at each of REPORT_HIDDEN and the generation step, each pair interleaved,
    1 thread: one line per case, median microseconds per step (of thread CPU time) and
    torch.nn's / rnnfuse's."""
    torch = bench._import_torch(1)
    for kind, _, _, B, _, _ in (s for s in SHAPES if s[4] is None):
        for H in REPORT_HIDDEN:
            for name, mode, steps in REPORT_CELL_MODES:
                ref, ours, x = _pair(torch, (kind, 1, H, B, None, H))
                got = _measure({"rnnfuse": _call(ours, x, mode, torch, steps),
                                "torch": _call(ref, x, mode, torch, steps)}, budget)
                ours_us, ref_us = (got[k][0] / steps * 1e6 for k in ("rnnfuse", "torch"))
                print(f"{kind:8s} H={H:<3d} B={B:<2d} {name:13s} rnnfuse {ours_us:7.1f} us  "
                      f"torch.nn {ref_us:7.1f} us  {ref_us / ours_us:5.2f}x", flush=True)
    calls = _step_calls(torch)
    with torch.no_grad():
        got = _measure(calls, budget)
    for impl, (t, _) in got.items():
        print(f"step {impl:13s} {t * 1e6:7.1f} us  nn.LSTMCell / this "
              f"{got['torch_cell'][0] / t:5.2f}x")


def _compile_report(budget):
    """The models eager and under torch.compile(fullgraph=True), interleaved, 1 thread:
    a training step without and with an SGD step (which changes the weights, so that
    both repack them), and inference; eager's time / compiled's."""
    torch = bench._import_torch(1)
    for shape in (s for s in SHAPES if s[4] is not None):
        _, ours, x = _pair(torch, shape)
        kind, L, H, B, T, I = shape
        _eager_and_compiled(torch, ours, x, f"{kind} L={L} H={H} B={B} T={T} I={I}", budget)


# the cell variants in the compile report, at the word-level language model's shape
VARIANT_SHAPE = (2, 200, 20, 35, 200)
COMPILED_VARIANTS = (("LSTM", dict(layer_norm=True, zoneout=0.1)),
                     ("LSTM", dict(proj_size=100)),
                     ("GRU", dict(layer_norm=True, recurrent_dropout=0.2)))


def _variants_report(budget):
    """The compile report of models with cell variants (COMPILED_VARIANTS)."""
    import rnnfuse.torch as rt
    torch = bench._import_torch(1)
    L, H, B, T, I = VARIANT_SHAPE
    for kind, kw in COMPILED_VARIANTS:
        torch.manual_seed(0)
        ours = getattr(rt, kind)(I, H, num_layers=L, batch_first=True, **kw)
        label = f"{kind} {','.join(f'{k}={v}' for k, v in kw.items())} L={L} H={H} B={B} T={T}"
        _eager_and_compiled(torch, ours, torch.randn(B, T, I), label, budget)


def _eager_and_compiled(torch, ours, x, label, budget):
    """One model's lines of the compile report."""
    compiled = _compiled(torch, ours)
    for name, mode, sgd in (("train", "training", False), ("train+SGD", "training", True),
                            ("inference", "inference", False)):
        optimizer = torch.optim.SGD(ours.parameters(), lr=1e-9) if sgd else None
        runs = {"eager": _call(ours, x, mode, torch, optimizer=optimizer),
                "compiled": _call(ours, x, mode, torch, call=compiled, optimizer=optimizer)}
        for run in runs.values():  # compiles, and warms both
            run()
        got = _measure(runs, budget)
        eager, comp = (got[k][0] * 1e3 for k in ("eager", "compiled"))
        print(f"{label} {name:9s} eager {eager:8.3f} ms  compiled {comp:8.3f} ms  "
              f"eager/compiled {eager / comp:5.3f}", flush=True)


if __name__ == "__main__":  # python benches/test_bench_torch.py [budget] [cells|compile|variants]
    import sys
    report = {"cells": _cells_report, "compile": _compile_report, "variants": _variants_report}
    which = sys.argv[2:] or list(report)
    for name in which:
        report[name](float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)
