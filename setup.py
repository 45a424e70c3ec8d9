"""Build the C kernels and their Cython boundary as one extension, rnnfuse._kernels.

Environment switches (read at build time):
  RNNFUSE_DEBUG=1     Cython bounds/wraparound checks on, C built with -O1 -g and assertions.
  RNNFUSE_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (implies RNNFUSE_DEBUG);
                      run the tests with LD_PRELOAD=$(gcc -print-file-name=libasan.so).
"""
import os
import sys
from glob import glob

import numpy
from setuptools import Extension, setup

debug = os.environ.get("RNNFUSE_DEBUG") == "1"
sanitize = os.environ.get("RNNFUSE_SANITIZE") == "1"
debug = debug or sanitize

# -O3 but never -ffast-math/-Ofast: NaN and inf must propagate, and a fast-math shared
# object would change the denormal handling of the whole process. -ffp-contract=off: no
# a*b+c fused behind our back, so the AVX2 and portable copies of a pointwise pass, a
# stream and a forward, compute the same roundings (ISO C's default, said explicitly).
compile_args = ["-std=c11", "-O1" if debug else "-O3", "-fno-math-errno", "-ffp-contract=off"]
link_args = []
if debug:
    compile_args += ["-g", "-UNDEBUG"]
if sanitize:
    # Python's default -fwrapv would hide signed-overflow reports.
    flags = ["-fsanitize=address,undefined", "-fno-wrapv", "-fno-omit-frame-pointer"]
    compile_args += flags
    link_args += flags
if sys.platform == "win32":
    compile_args, link_args = ["/O2"], []
# threads.c: dladdr/dlopen and pthreads (part of libc since glibc 2.34, apart before)
libraries = ["dl", "pthread"] if sys.platform.startswith("linux") else []

kernels = Extension(
    "rnnfuse._kernels",
    sources=["src/rnnfuse/_kernels.pyx"] + sorted(glob("csrc/*.c")),
    include_dirs=["csrc", numpy.get_include()],  # the stream's step uses NumPy's C API
    depends=sorted(glob("csrc/*.h")) + sorted(glob("csrc/*.c")),  # rebuild on any change
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=libraries,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                   ("RNNFUSE_COMPILE_ARGS", '"' + " ".join(compile_args) + '"')],
)
kernels.cython_directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
}

setup(ext_modules=[kernels])
