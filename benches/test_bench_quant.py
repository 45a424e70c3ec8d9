"""int8 inference (layer.quantized()) against float32 and ONNX Runtime's int8 LSTM.

Side by side per shape, an LSTM in eval mode: rnnfuse float32 (``float32``), rnnfuse on
int8 weights (``int8``, 7 bits) and ONNX Runtime's com.microsoft DynamicQuantizeLSTM on the
same weights quantized per output row, symmetric, to 8 bits (``ort-int8``; skipped without
onnxruntime and onnx). Whole sequences at (T, B, I, H), and one streamed step at B=1 (the
float32 and int8 streams). Each implementation's output is checked before timing: int8
within 0.05 of float32 (ONNX Runtime's error is recorded in extra_info). Run:
``pytest benches/test_bench_quant.py``; --quick runs small shapes.
"""
import time

import numpy as np
import pytest

import rnnfuse
from rnnfuse import bench
from rnnfuse.onnx_weights import _ONNX_FROM_TORCH

pytest.importorskip("pytest_benchmark")

SEQUENCES = [(100, 32, 128, 256), (100, 64, 256, 512)]  # (T, B, I, H)
QUICK_SEQUENCES = [(10, 4, 32, 64)]
STEPS = [512]  # H (= I) of the streamed step, B = 1
QUICK_STEPS = [64]
IMPLS = ("float32", "int8", "ort-int8")
MAX_ERROR = 0.05


def _lstm(I, H):
    return rnnfuse.LSTM(I, H, seed=0).eval()


def _quantize_rows(w):
    """Symmetric int8 per row, 8 bits (rnnfuse's weights have 7): (q, scale)."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w * (np.float32(127) / np.where(amax > 0, amax, 1))[:, None]),
                -127, 127)
    return q.astype(np.int8), scale


def _ort_lstm(layer, threads):
    """A function x -> y running DynamicQuantizeLSTM on the layer's weights."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise bench.Unavailable("onnx and onnxruntime are not installed") from None
    H = layer.hidden_size
    order = np.concatenate([np.arange(H) + k * H for k in _ONNX_FROM_TORCH["lstm"]])
    p = layer.state_dict()
    inits = []
    for name, w in (("W", p["weight_ih_l0"][order]), ("R", p["weight_hh_l0"][order])):
        q, scale = _quantize_rows(w)  # ONNX's W: (D, input, 4H), one scale per 4H column
        inits += [numpy_helper.from_array(np.ascontiguousarray(q.T)[None], name),
                  numpy_helper.from_array(scale[None], f"{name}_scale"),
                  numpy_helper.from_array(np.zeros((1, 4 * H), np.int8), f"{name}_zero_point")]
    bias = np.concatenate([p["bias_ih_l0"][order], p["bias_hh_l0"][order]])[None]
    inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
    node = helper.make_node("DynamicQuantizeLSTM",
                            ["X", "W", "R", "B", "", "", "", "", "W_scale", "W_zero_point",
                             "R_scale", "R_zero_point"], ["Y"], domain="com.microsoft",
                            hidden_size=H)
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, None)
    y_info = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "int8_lstm", [x_info], [y_info], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(onnx.IR_VERSION, 8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"X": x})[0][:, 0]


def _runner(impl, layer, threads):
    if impl == "float32":
        return lambda x: layer(x)[0]
    if impl == "int8":
        q = layer.quantized()
        return lambda x: q(x)[0]
    return _ort_lstm(layer, threads)


def pytest_generate_tests(metafunc):
    from conftest import quick
    fast = quick(metafunc.config)
    if "sequence" in metafunc.fixturenames:
        shapes = QUICK_SEQUENCES if fast else SEQUENCES
        metafunc.parametrize(("sequence", "impl"),
                             [pytest.param(s, i, id=f"T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}-{i}")
                              for s in shapes for i in IMPLS])
    if "step_size" in metafunc.fixturenames:
        metafunc.parametrize(("step_size", "impl"),
                             [pytest.param(H, i, id=f"B1-H{H}-{i}")
                              for H in (QUICK_STEPS if fast else STEPS)
                              for i in ("float32", "int8")])


def _time(benchmark, fn, arg, budget, max_rounds=200):
    if getattr(benchmark, "disabled", False):
        benchmark(fn, arg)
        return
    t = time.perf_counter()
    fn(arg)
    rounds, iterations = bench.plan_rounds(time.perf_counter() - t, budget,
                                           max_rounds=max_rounds)
    benchmark.pedantic(fn, args=(arg,), rounds=rounds, iterations=iterations,
                       warmup_rounds=1)


def test_sequence(benchmark, sequence, impl, bench_threads, bench_budget):
    T, B, I, H = sequence
    layer = _lstm(I, H)
    try:
        run = _runner(impl, layer, bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    error = float(np.abs(run(x) - layer(x)[0]).max())
    if impl == "int8":
        assert error <= MAX_ERROR
    benchmark.group = f"int8 lstm T={T} B={B} I={I} H={H}"
    benchmark.extra_info.update(impl=impl, T=T, B=B, I=I, H=H, threads=bench_threads,
                                max_abs_error_vs_float32=error)
    _time(benchmark, run, x, bench_budget)


def test_step(benchmark, step_size, impl, bench_threads, bench_budget):
    H = step_size
    layer = _lstm(H, H)
    model = layer.quantized() if impl == "int8" else layer
    x = np.random.default_rng(0).standard_normal((8, 1, H)).astype(np.float32)
    stream = model.stream(1)
    got = np.stack([stream.step(x[t]) for t in range(len(x))])
    np.testing.assert_array_equal(got, model(x)[0])  # a stream is its forward, bit for bit
    assert np.abs(got - layer(x)[0]).max() <= MAX_ERROR
    benchmark.group = f"int8 lstm step B=1 I={H} H={H}"
    benchmark.extra_info.update(impl=impl, B=1, I=H, H=H, threads=bench_threads)
    _time(benchmark, stream.step, x[0], bench_budget, max_rounds=2000)


def main(budget=6.0, clock=time.perf_counter):
    """Interleaved medians of every implementation per shape, 1 thread (bench.measure):
    ``python benches/test_bench_quant.py [--clock cpu] [--budget S]``; the projected
    LSTM (proj_size = H/2) float32 and int8 too."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    for T, B, I, H in SEQUENCES:
        layer = _lstm(I, H)
        x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
        runs = {}
        for impl in IMPLS:
            try:
                runs[impl] = _runner(impl, layer, 1)
            except bench.Unavailable as e:
                print(f"{impl}: {e}")
        proj = rnnfuse.LSTM(I, H, proj_size=H // 2, seed=0).eval()
        runs["proj-float32"] = lambda x, m=proj: m(x)[0]
        runs["proj-int8"] = lambda x, m=proj.quantized(): m(x)[0]
        want = {k: (proj if k.startswith("proj") else layer)(x)[0] for k in runs}
        med = bench.measure({k: (lambda f=f: f(x)) for k, f in runs.items()}, budget,
                            clock=clock)
        print(f"T={T} B={B} I={I} H={H}: " + ", ".join(
            f"{k} {med[k][0] * 1e3:.2f} ms (max error {np.abs(f(x) - want[k]).max():.4f})"
            for k, f in runs.items()))
        print("  int8 speed-up: " + ", ".join(
            f"{med[k][0] / med['int8'][0]:.2f}x over {k}" for k in runs
            if not k.startswith("proj") and k != "int8")
            + f"; proj-int8 {med['proj-float32'][0] / med['proj-int8'][0]:.2f}x over "
            "proj-float32")
    for H in STEPS:
        layer = _lstm(H, H)
        x = np.random.default_rng(0).standard_normal((1, H)).astype(np.float32)
        steps = {"float32": layer.stream(1).step, "int8": layer.quantized().stream(1).step}
        med = bench.measure({k: (lambda f=f: f(x)) for k, f in steps.items()}, budget,
                            clock=clock)
        print(f"stream step B=1 I=H={H}: " + ", ".join(
            f"{k} {med[k][0] * 1e6:.1f} us" for k in steps)
            + f" (int8 {med['float32'][0] / med['int8'][0]:.2f}x float32)")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the CPU time of the one thread (a loaded machine)")
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds of timed rounds per shape (default 6)")
    args = ap.parse_args()
    main(args.budget, time.thread_time if args.clock == "cpu" else time.perf_counter)
