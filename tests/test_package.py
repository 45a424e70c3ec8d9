"""The installed package: version, configuration report, command line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _best_kernel():
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if not ("avx2" in flags and "fma" in flags):
        return "portable"
    return "avx512" if "avx512f" in flags else "avx2"


def test_simd_path_matches_cpu():
    want = {"portable": "baseline", "avx2": "AVX2+FMA", "avx512": "AVX2+FMA, AVX-512F"}
    assert _kernels.simd_path() == want[_best_kernel()]


def test_kernel_follows_the_cpu_and_the_switch():
    """The vector code runs exactly where the CPU has it, unless RNNFUSE_KERNEL says
    otherwise."""
    assert _kernels.kernel() == (os.environ.get("RNNFUSE_KERNEL") or _best_kernel())
    code = "from rnnfuse import _kernels; print(_kernels.kernel())"
    out = subprocess.run([sys.executable, "-c", code],
                         env={**os.environ, "RNNFUSE_KERNEL": "portable"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "portable"
    bad = subprocess.run([sys.executable, "-c", code],
                         env={**os.environ, "RNNFUSE_KERNEL": "fastest"},
                         capture_output=True, text=True, check=True)
    assert "RNNFUSE_KERNEL must be one of" in bad.stderr and "RuntimeWarning" in bad.stderr
    assert bad.stdout.strip() == _best_kernel()


def test_command_line_config_runs_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rnnfuse", "config"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "simd_path:" in out


def test_gemm_floor_runs_and_checks_its_buffer():
    import numpy as np
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


# ---------------------------------------------------------------- packaging

PACKAGE_DIR = Path(rnnfuse.__file__).parent
TYPING_FILES = ("py.typed", "_kernels.pyi")


def test_typing_files_ship_with_the_package():
    """py.typed marks the package as typed (PEP 561); _kernels.pyi types the compiled
    module. Both lie beside the package and are named in its package data and MANIFEST."""
    for name in TYPING_FILES:
        assert (PACKAGE_DIR / name).is_file(), name
    root = PACKAGE_DIR.parent.parent
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not running from a source tree")
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((root / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]["rnnfuse"]
    assert "py.typed" in data and "*.pyi" in data
    manifest = (root / "MANIFEST.in").read_text()
    assert "src/rnnfuse/*.pyi" in manifest and "src/rnnfuse/py.typed" in manifest
    assert config["project"]["license-files"] == ["LICENSE"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "rnnfuse._version.__version__"}


def test_kernels_stub_matches_the_compiled_module():
    """Every class and function _kernels.pyi declares exists in the compiled module, as a
    class or a callable, and its classes' methods and properties exist too."""
    import ast
    tree = ast.parse((PACKAGE_DIR / "_kernels.pyi").read_text())
    declared = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name != "__getattr__":
            assert callable(getattr(_kernels, node.name)), node.name
            declared += 1
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_kernels, node.name)
            assert isinstance(cls, type), node.name
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    assert hasattr(cls, member.name), f"{node.name}.{member.name}"
            declared += 1
        elif isinstance(node, ast.AnnAssign):
            assert hasattr(_kernels, node.target.id), node.target.id
            declared += 1
    assert declared >= 8


@pytest.mark.skipif(os.environ.get("RNNFUSE_WHEEL_TESTS") != "1",
                    reason="builds a wheel (a minute): set RNNFUSE_WHEEL_TESTS=1; CI runs "
                           "tools/check_wheel.sh")
def test_wheel_carries_typing_files_and_license(tmp_path):
    import zipfile
    root = PACKAGE_DIR.parent.parent
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not running from a source tree")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(root)], check=True)
    wheel, = tmp_path.glob("rnnfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in TYPING_FILES + ("_version.py",):
        assert f"rnnfuse/{name}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"rnnfuse-{rnnfuse.__version__}.dist-info/METADATA" in names
