"""Client threads stepping their sessions: through the micro-batcher of
examples/serving/microbatch.py (one pool.step per batch) against each thread owning a
stream of batch 1.

Per client count, the time for every client thread to run STEPS steps (the threads start
together); throughput = clients * STEPS / time. The outputs of the two are checked to be
bitwise equal on every run. Run: ``pytest benches/test_bench_serving.py``; --quick runs 8
clients. The threads share this process's GIL: a client's Python between its steps runs
one at a time, while the kernels release it.
"""
import importlib.util
import pathlib

import numpy as np
import pytest

import rnnfuse

pytest.importorskip("pytest_benchmark")
PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "serving" / "microbatch.py"
spec = importlib.util.spec_from_file_location("microbatch", PATH)
microbatch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(microbatch)

I, H, STEPS, MAX_WAIT = 64, 128, 50, 0.002
CLIENTS = (64, 256)
IMPLS = ("microbatch", "streams")


def pytest_generate_tests(metafunc):
    if "clients" in metafunc.fixturenames:
        from conftest import quick
        counts = (8,) if quick(metafunc.config) else CLIENTS
        metafunc.parametrize(("clients", "impl"),
                             [pytest.param(n, i, id=f"clients{n}-{i}")
                              for n in counts for i in IMPLS])


def _run(impl, layer, clients):
    """One run of every client's STEPS steps: (seconds, outputs per client)."""
    if impl == "streams":
        streams = [layer.stream(1) for _ in range(clients)]
        return microbatch.clients(lambda k: lambda x: streams[k].step(x[None])[0],
                                  clients, STEPS, I)
    with microbatch.MicroBatcher(layer.stream_pool(clients), MAX_WAIT) as batcher:
        sids = [batcher.open() for _ in range(clients)]
        return microbatch.clients(lambda k: lambda x: batcher.step(sids[k], x),
                                  clients, STEPS, I)


def test_client_threads(benchmark, clients, impl, bench_threads):
    layer = rnnfuse.LSTM(I, H, seed=0).eval()
    want = _run("streams", layer, clients)[1]
    benchmark.group = f"{clients} client threads, {STEPS} steps each, LSTM({I}, {H})"
    benchmark.extra_info.update(impl=impl, clients=clients, steps=STEPS, I=I, H=H,
                                max_wait=MAX_WAIT, threads=bench_threads)

    steps_only = []  # from the threads' start to their end, without setting up

    def run():
        seconds, got = _run(impl, layer, clients)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        steps_only.append(seconds)

    if getattr(benchmark, "disabled", False):
        benchmark(run)
        return
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    median = float(np.median(steps_only[1:]))
    benchmark.extra_info.update(steps_seconds=median,
                                session_steps_per_s=clients * STEPS / median)
