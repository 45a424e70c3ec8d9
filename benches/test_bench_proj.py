"""The LSTM with a projection (proj_size): a training step (forward + backward) of one
layer, float32, side by side per shape: rnnfuse's plain LSTM (``lstm``), rnnfuse with
proj_size (``lstm-proj``) and torch.nn.LSTM with the same proj_size and weights
(``torch-proj``; skipped without PyTorch). rnnfuse's projected step is checked against
torch's before timing where torch is installed. Run: ``pytest benches/test_bench_proj.py``;
interleaved medians at 1 thread: ``python benches/test_bench_proj.py``.
"""
import numpy as np
import pytest

import rnnfuse
from rnnfuse import bench

pytest.importorskip("pytest_benchmark")

SHAPES = [(100, 32, 128, 256, 128), (35, 20, 650, 650, 325)]  # T, B, I, H, P
QUICK_SHAPES = [(10, 4, 16, 32, 16)]
IMPLS = ("lstm", "lstm-proj", "torch-proj")


def _inputs(T, B, I, H, P):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    return x, rng.standard_normal((T, B, P)).astype(np.float32)


def _ours(I, H, P):
    layer = rnnfuse.LSTM(I, H, proj_size=P, seed=0)

    def step(x, dy):
        y, _ = layer(x)
        layer.backward(dy)
        return y
    return layer, step


def _runner(impl, shape, threads):
    """A training step x, dy -> y of impl at shape."""
    T, B, I, H, P = shape
    if impl == "lstm":
        plain = rnnfuse.LSTM(I, H, seed=0)
        dy_h = np.random.default_rng(1).standard_normal((T, B, H)).astype(np.float32)

        def plain_step(x, _):
            y, _ = plain(x)
            plain.backward(dy_h)
            return y
        return plain_step
    layer, step = _ours(I, H, P)
    if impl == "lstm-proj":
        return step
    torch = bench._import_torch(threads)
    m = torch.nn.LSTM(I, H, proj_size=P)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})

    def torch_step(x, dy):
        m.zero_grad(set_to_none=True)
        y, _ = m(torch.from_numpy(x))
        y.backward(torch.from_numpy(dy))
        return y.detach().numpy()
    return torch_step


def pytest_generate_tests(metafunc):
    from conftest import quick  # benches/conftest.py
    if "shape" in metafunc.fixturenames:
        shapes = QUICK_SHAPES if quick(metafunc.config) else SHAPES
        metafunc.parametrize(("shape", "impl"),
                             [pytest.param(s, i, id="T{}-B{}-I{}-H{}-P{}-".format(*s) + i)
                              for s in shapes for i in IMPLS])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_training_step(benchmark, shape, impl, bench_threads):
    try:
        run = _runner(impl, shape, bench_threads)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    x, dy = _inputs(*shape)
    if impl == "lstm-proj":
        try:
            theirs = _runner("torch-proj", shape, bench_threads)
            np.testing.assert_allclose(run(x, dy), theirs(x, dy), rtol=1e-3, atol=1e-4)
        except bench.Unavailable:
            pass
    benchmark.group = "lstm-proj-train-" + "-".join(map(str, shape))
    benchmark.extra_info.update(impl=impl, threads=bench_threads)
    benchmark.pedantic(run, args=(x, dy), rounds=7, iterations=1, warmup_rounds=1)


def main(budget=20.0):
    """Interleaved medians of the three per shape, 1 thread (bench.measure)."""
    import warnings
    warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
    try:
        bench._import_torch(1)  # first, so that the thread limit sees its pools too
    except bench.Unavailable:
        pass
    with bench.limit_threads(1):
        for shape in SHAPES:
            runs = {}
            for impl in IMPLS:
                try:
                    runs[impl] = _runner(impl, shape, 1)
                except bench.Unavailable as e:
                    print(f"{impl}: {e}")
            x, dy = _inputs(*shape)
            med = bench.measure({k: (lambda f=f: f(x, dy)) for k, f in runs.items()}, budget)
            base = med["lstm-proj"][0]
            print("T={} B={} I={} H={} P={}: ".format(*shape) + ", ".join(
                f"{k} {med[k][0] * 1e3:.1f} ms ({med[k][0] / base:.2f}x, n={med[k][1]})"
                for k in runs))


if __name__ == "__main__":
    main()
