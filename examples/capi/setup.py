"""Build the C-API example in place: cd examples/capi && python setup.py build_ext --inplace

Needs rnnfuse installed, Cython>=3 and a C compiler, and no rnnfuse header or library: the
module takes the functions from rnnfuse._kernels when it is imported. Every .pyx in this
directory is built (the tests add their harness to a copy of it).
"""
import os
from glob import glob
from importlib.util import find_spec

from Cython.Build import cythonize
from setuptools import setup

# rnnfuse/capi.pxd, from the directory that holds the installed package.
site = os.path.dirname(os.path.dirname(find_spec("rnnfuse").origin))
setup(ext_modules=cythonize(sorted(glob("*.pyx")), include_path=[site],
                            compiler_directives={"language_level": 3}))
