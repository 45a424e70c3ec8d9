"""The kernels' own sigmoid and tanh: error bound against the correctly rounded result,
saturation, and NaN/inf, on each code path. (float32 takes a vectorized polynomial on the
AVX2 and AVX-512 paths, 8 and 16 lanes with the same bits, and libm on the portable one;
float64 is libm on all.)"""
import numpy as np
import pytest

from rnnfuse import _kernels

from checks import PATHS, kernel  # noqa: F401 (kernel: a fixture, each code path this CPU has)

# The AVX2 path: the bounds documented in csrc/vmath.h. The portable path: libm's (glibc's
# tanhf is within 2 ulp).
MAX_ULP = {"avx2": {"sigmoid": 3, "tanh": 1}, "portable": {"sigmoid": 3, "tanh": 2}}
MAX_ULP["avx512"] = MAX_ULP["avx2"]


def apply(name, x):
    a = np.array(x, copy=True)
    _kernels.activation(name, a)
    return a


def exact(name, x):
    x = x.astype(np.float64)
    if name == "tanh":
        return np.tanh(x)
    return np.exp(-np.logaddexp(0.0, -x))  # sigmoid without overflow


def ulp_error(got, want64):
    want = want64.astype(np.float32)  # correctly rounded (float64 is exact enough here)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want)).astype(np.float64)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_float32_error_bound(name, kernel):
    grid = np.arange(-20, 20, 2.0**-12, dtype=np.float32)
    tiny = np.geomspace(1e-30, 1, 2000, dtype=np.float32)
    edges = np.array([0.625, -0.625, 88.72, -88.72, 87.3, -87.3, 103, -103, 1e-38, 9.0, 17.0],
                     np.float32)
    x = np.concatenate([grid, tiny, -tiny, edges, np.nextafter(edges, np.float32(0))])
    err = ulp_error(apply(name, x), exact(name, x))
    worst = x[np.argmax(err)]
    assert err.max() <= MAX_ULP[kernel][name], f"{name}: {err.max()} ulp at x={worst!r}"


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_float64_is_accurate(name):
    x = np.linspace(-40, 40, 100001)
    got = apply(name, x)
    # exact() itself is off by ~|x| 1e-16 relative for sigmoid (through logaddexp)
    np.testing.assert_allclose(got, exact(name, x), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturation_and_special_values(dtype, kernel):
    x = np.array([1e4, -1e4, np.inf, -np.inf, np.nan, 0.0, -0.0, 800.0, -800.0], dtype)
    s, t = apply("sigmoid", x), apply("tanh", x)
    np.testing.assert_array_equal(s[:4], [1, 0, 1, 0])
    np.testing.assert_array_equal(t[:4], [1, -1, 1, -1])
    assert np.isnan(s[4]) and np.isnan(t[4])
    assert s[5] == 0.5 and t[5] == 0 and np.signbit(t[6])
    np.testing.assert_array_equal(s[7:], [1, 0])
    np.testing.assert_array_equal(t[7:], [1, -1])


@pytest.mark.skipif("avx512" not in PATHS, reason="no AVX-512F")
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sixteen_lanes_give_the_bits_of_eight(name):
    x = np.concatenate([np.arange(-100, 100, 2.0**-9, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40], np.float32)])
    got = {}
    try:
        for path in ("avx2", "avx512"):
            _kernels.set_kernel(path)
            got[path] = apply(name, x)
    finally:
        _kernels.set_kernel(None)
    np.testing.assert_array_equal(got["avx2"].view(np.int32), got["avx512"].view(np.int32))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 33])
def test_every_length_and_no_write_past_the_end(n, kernel):
    buf = np.full(n + 8, 5.0, np.float32)
    x = np.linspace(-3, 3, n, dtype=np.float32)
    buf[:n] = x
    _kernels.activation("tanh", buf[:n])
    np.testing.assert_allclose(buf[:n], np.tanh(x), rtol=1e-6)
    assert np.all(buf[n:] == 5.0)
