"""pytest-benchmark suites of rnnfuse (not part of the default test run: ``pytest`` collects
tests/ only; run these with ``pytest benches/``).

Switches (command line, or environment for CI):
  --quick / RNNFUSE_BENCH_QUICK=1   the smoke grid (rnnfuse.bench.QUICK_GRID, float32 only);
                                    with --benchmark-disable each benchmark runs once
  --bench-threads N / RNNFUSE_BENCH_THREADS=N   threads for every implementation (default 1)
  --bench-budget S / RNNFUSE_BENCH_BUDGET=S     seconds of timed rounds per benchmark (default 0.5)

The timed rounds of each benchmark follow from one untimed call (rounds >= 3, each round
>= 1 ms), so a slow NumPy reference at the large shapes gets few rounds, not minutes.
"""
import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("rnnfuse benches")
    group.addoption("--quick", action="store_true", default=None,
                    help="smoke grid: the smallest shapes, float32 only "
                         "(also RNNFUSE_BENCH_QUICK=1)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="threads for every implementation (default 1; "
                         "also RNNFUSE_BENCH_THREADS)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed rounds per benchmark (default 0.5; "
                         "also RNNFUSE_BENCH_BUDGET)")


def _setting(config, option, env, convert, default):
    value = config.getoption(option)
    if value is None and os.environ.get(env, "") != "":
        value = convert(os.environ[env])
    return default if value is None else value


def quick(config):
    return bool(_setting(config, "--quick", "RNNFUSE_BENCH_QUICK",
                         lambda s: s.strip().lower() not in ("0", "false", "no"), False))


def threads(config):
    return _setting(config, "--bench-threads", "RNNFUSE_BENCH_THREADS", int, 1)


def budget(config):
    return _setting(config, "--bench-budget", "RNNFUSE_BENCH_BUDGET", float, 0.5)


def pytest_report_header(config):
    from threadpoolctl import threadpool_info
    import scipy.linalg  # noqa: F401  (loads the BLAS rnnfuse's kernels call)
    blas = ", ".join(f"{p['internal_api']} {p['version']} kernel {p.get('architecture')}"
                     for p in threadpool_info() if p["user_api"] == "blas")
    return (f"rnnfuse benches: {'quick' if quick(config) else 'full'} grid, "
            f"{threads(config)} thread(s), BLAS {blas}")


def pytest_generate_tests(metafunc):
    """Parametrize ``case, impl`` over the grid, case-major and implementation-minor, so
    the cached problem and reference result of a case serve all of its implementations."""
    if "case" not in metafunc.fixturenames:
        return
    from rnnfuse import bench
    if quick(metafunc.config):
        grid, dtypes = bench.QUICK_GRID, ("float32",)
    else:
        grid, dtypes = bench.GRID, bench.DTYPES
    params = [pytest.param(case, impl, id=f"{case.group}-{impl}")
              for case in bench.cases(grid, dtypes=dtypes) for impl in bench.IMPLS]
    metafunc.parametrize(("case", "impl"), params)


@pytest.fixture(scope="session")
def bench_threads(request):
    return threads(request.config)


@pytest.fixture(scope="session")
def bench_budget(request):
    return budget(request.config)


@pytest.fixture(scope="session", autouse=True)
def _limit_threads(bench_threads):
    """Every BLAS and OpenMP pool at ``bench_threads`` for the whole session. The peers are
    imported first so that threadpoolctl sees their pools too."""
    from rnnfuse import bench
    try:
        bench._import_torch(bench_threads)  # also sets torch's own thread count
    except bench.Unavailable:
        pass
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    with bench.limit_threads(bench_threads):
        yield
