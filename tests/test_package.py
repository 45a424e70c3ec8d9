"""The installed package: version, configuration report, command line."""
import re
import subprocess
import sys

import rnnfuse
from rnnfuse import _kernels


def test_version_is_written_in_one_place():
    """rnnfuse/_version.py is the one place: the package and its metadata both read it."""
    from importlib.metadata import version

    from rnnfuse import _version
    assert rnnfuse.__version__ == _version.__version__
    assert rnnfuse.__version__ == version("rnnfuse")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", rnnfuse.__version__)


def test_show_config_reports_build_and_blas(capsys):
    rnnfuse.show_config()
    out = capsys.readouterr().out
    assert f"rnnfuse:        {rnnfuse.__version__}" in out
    assert "-O3" in out or "-O1" in out
    assert "-ffast-math" not in out and "-Ofast" not in out
    assert f"simd_path:      {_kernels.simd_path()}" in out
    assert f"kernel:         {_kernels.kernel()}" in out
    assert re.search(r"blas .*\d+ threads", out, re.IGNORECASE)


def test_simd_path_matches_cpu():
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    want_v3 = "avx2" in flags and "fma" in flags
    assert _kernels.simd_path().startswith("x86-64-v3") == want_v3


def test_kernel_follows_the_cpu_and_the_switch():
    """The AVX2+FMA micro-kernel runs exactly where the CPU has both, unless
    RNNFUSE_KERNEL=portable."""
    import os
    want = "avx2" if _kernels.simd_path().startswith("x86-64-v3") else "portable"
    if os.environ.get("RNNFUSE_KERNEL") == "portable":
        want = "portable"
    assert _kernels.kernel() == want
    code = "from rnnfuse import _kernels; print(_kernels.kernel())"
    out = subprocess.run([sys.executable, "-c", code],
                         env={**os.environ, "RNNFUSE_KERNEL": "portable"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "portable"


def test_command_line_config_runs_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rnnfuse", "config"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "simd_path:" in out


def test_gemm_floor_runs_and_checks_its_buffer():
    import numpy as np
    import pytest
    buf = _kernels.gemm_floor_buffer("gru", 3, 2, 4, 5, np.float64)
    _kernels.gemm_floor("gru", 3, 2, 4, 5, buf, True)
    assert np.all(buf == 0)  # zeros in, zeros out: it ran the products on its own buffer
    with pytest.raises(ValueError, match="buf is too small"):
        _kernels.gemm_floor("gru", 3, 2, 4, 6, buf, True)


def test_fast_path_does_not_import_the_reference():
    code = ("import sys, rnnfuse, numpy as np; from rnnfuse import functional, LSTM; "
            "LSTM(2, 3).forward(np.ones((2, 1, 2), np.float32)); "
            "assert 'rnnfuse.reference' not in sys.modules; "
            "assert rnnfuse.reference.lstm_forward")
    subprocess.run([sys.executable, "-c", code], check=True)
