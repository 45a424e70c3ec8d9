"""Comparisons the kernel tests share: kernels against the NumPy reference, and analytic
gradients against central finite differences (float64)."""
import zlib

import numpy as np
import pytest

from rnnfuse import _kernels

def stable_seed(*key):
    """A seed from a test's parameters, the same in every process (hash() of a str is
    salted per process, so a failure it drew could not be rerun)."""
    return zlib.crc32(repr(key).encode())


TOL = {np.float32: 1e-5, np.float64: 1e-10}  # relative, kernels against the reference
EPS = 1e-6

_SIMD = _kernels.simd_path()  # "baseline", "AVX2+FMA" or "AVX2+FMA, AVX-512F"
PATHS = ["avx512"] * ("AVX-512F" in _SIMD) + ["avx2"] * (_SIMD != "baseline") + ["portable"]


@pytest.fixture(params=PATHS)
def kernel(request):
    """Runs a test once on each code path this CPU has (importing it is enough)."""
    before = _kernels.kernel()
    _kernels.set_kernel(request.param)
    yield request.param
    _kernels.set_kernel(before)


def assert_close(got, want, dtype, what="", tol=None):
    """Each array of got within tol (TOL[dtype]) of want's, relative to want's largest value
    (in float32 to at least 1, the inputs' scale: a gradient that is a sum cancelling to ~0
    keeps float32's absolute rounding error, which no kernel can avoid); None for None."""
    tol = TOL[dtype] if tol is None else tol
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"{what}[{k}]: expected None"
            continue
        assert a.dtype == b.dtype == dtype, f"{what}[{k}]: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{what}[{k}]: shape {a.shape} vs {b.shape}"
        floor = 1.0 if dtype == np.float32 else np.finfo(dtype).tiny
        scale = max(np.max(np.abs(b)), floor) if b.size else 1.0
        err = np.max(np.abs(a.astype(np.float64) - b)) / scale if b.size else 0.0
        assert err <= tol, f"{what}[{k}]: relative error {err:.2e}"


def central_difference(loss, a, idx, eps=EPS):
    """d loss() / d a[idx]: loss() reads a, whose entry is put back afterwards."""
    old = a[idx]
    a[idx] = old + eps
    up = loss()
    a[idx] = old - eps
    down = loss()
    a[idx] = old
    return (up - down) / (2 * eps)


def assert_gradient(grad, loss, a, idx, what=None, rtol=1e-7):
    """grad, the analytic d loss() / d a[idx], within rtol of the central difference."""
    fd = central_difference(loss, a, idx)
    assert abs(grad - fd) <= rtol * max(1.0, abs(fd)), (what, idx, grad, fd)
