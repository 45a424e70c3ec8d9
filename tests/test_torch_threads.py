"""rnnfuse.torch on PyTorch's thread count (torch.set_num_threads, OMP_NUM_THREADS), and
data-parallel training with torch.distributed (two gloo processes on the loopback).
Skipped cleanly when PyTorch is not installed."""
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import rnnfuse.torch as rt  # noqa: E402
from rnnfuse import _kernels, functional as F  # noqa: E402


def _blas_threads():
    """The thread count of the BLAS that the kernels call."""
    outer = _kernels.set_threads(0)  # threads() then reads the BLAS's
    try:
        return _kernels.threads()
    finally:
        _kernels.set_threads(outer)


@pytest.fixture
def spy_threads(monkeypatch):
    """Records (kernel threads, BLAS threads) at every forward and backward of functional."""
    seen = []
    for name in ("_forward", "_checked_forward", "_backward"):
        def spy(*args, _original=getattr(F, name), **kwargs):
            seen.append((_kernels.threads(), _blas_threads()))
            return _original(*args, **kwargs)
        monkeypatch.setattr(F, name, spy)
    return seen


def _run_everything(model, x):
    """Eager inference, eager training, and the operators under torch.func: outputs and
    gradients."""
    with torch.no_grad():
        y = model(x)[0]
    model.zero_grad()
    model(x)[0].square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = dict(model.named_parameters())
    grad_op = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,))[0].sum())
    return [y, *grads, *grad_op(params).values()]


def test_kernels_run_on_torchs_thread_count(spy_threads):
    torch.manual_seed(0)
    model = rt.LSTM(5, 8, num_layers=2, dtype=torch.float64)
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    before, blas = torch.get_num_threads(), _kernels.threads()
    results = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results[n] = _run_everything(model, x)
            assert spy_threads and all(k == n for k, _ in spy_threads), (n, spy_threads)
            assert all(b == min(n, blas) for _, b in spy_threads), (n, spy_threads)
            spy_threads.clear()
    finally:
        torch.set_num_threads(before)
    assert _kernels.threads() == blas and _blas_threads() == blas  # restored after calls
    for a, b in zip(results[1], results[3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_omp_num_threads_sets_the_kernels_threads():
    code = ("import torch, rnnfuse.torch\n"
            "from rnnfuse import _kernels\n"
            "assert torch.get_num_threads() == 1 and _kernels.threads() == 1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OPENBLAS_NUM_THREADS", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_set_threads_is_per_thread_and_checked():
    import threading
    previous = _kernels.set_threads(3)
    try:
        assert _kernels.threads() == 3
        other = []
        t = threading.Thread(target=lambda: other.append(_kernels.threads()))
        t.start()
        t.join()
        assert other[0] != 3 or _blas_threads() == 3  # another thread follows the BLAS
    finally:
        assert _kernels.set_threads(previous) == 3
    with pytest.raises(ValueError, match=r"n must be >= 0 \(0: follow the BLAS\), got -1"):
        _kernels.set_threads(-1)


def test_set_blas_threads_sets_the_count_the_kernels_follow():
    blas = _blas_threads()
    try:
        assert _kernels.set_blas_threads(1) is True
        assert _blas_threads() == _kernels.threads() == 1
    finally:
        _kernels.set_blas_threads(blas)
    assert _blas_threads() == blas
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        _kernels.set_blas_threads(0)


# ---------------------------------------------------------------- DistributedDataParallel

STEPS, BATCH = 3, 8


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, 4, generator=g), torch.randn(BATCH, 5, generator=g)


def _model():
    torch.manual_seed(0)
    return rt.LSTM(4, 5, num_layers=2, batch_first=True)


def _train(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        y, _ = model(x)
        # the mean over the whole batch: DDP averages the ranks' gradients
        torch.nn.functional.mse_loss(y[:, -1], target).backward()
        opt.step()


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, target = _data()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        _train(model, x[rows], target[rows])
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = _model()
    _train(whole, *_data())
    for name, want in whole.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6, msg=name)
