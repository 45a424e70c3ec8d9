"""rnnfuse.show_config(): what this build is and what it runs on."""
import platform
import sys

from . import _kernels
from ._version import __version__


def config():
    """The build and runtime facts as a dict (what show_config prints)."""
    from threadpoolctl import threadpool_info

    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, the one the kernels call)

    return {
        "rnnfuse": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "compile_args": _kernels.compile_args(),
        "simd_path": _kernels.simd_path(),
        "kernel": _kernels.kernel(),
        "kernel_threads": _kernels.threads(),
        "threadpools": [
            {k: info.get(k) for k in ("user_api", "internal_api", "version",
                                      "architecture", "num_threads", "filepath")}
            for info in threadpool_info()
        ],
    }


def show_config():
    """Print the version, compiler flags, the vectorized path active on this CPU, the
    micro-kernel of our products and its thread count, and the BLAS libraries with their
    thread counts (via threadpoolctl)."""
    cfg = config()
    for key in ("rnnfuse", "python", "platform", "compile_args", "simd_path", "kernel",
                "kernel_threads"):
        print(f"{key + ':':16}{cfg[key]}")
    print("threadpools:")
    for pool in cfg["threadpools"]:
        print(f"  - {pool['internal_api']} {pool['version']} ({pool['user_api']}), "
              f"{pool['num_threads']} threads, kernel {pool['architecture']}: {pool['filepath']}")
