"""Build the fastbn._cpu extension.

Environment switches:
  FASTBN_OPENMP=0       build without OpenMP (every kernel runs on one thread)
  FASTBN_MARCH=<arch>   -march value (default "native": this machine's vector
                        units; use e.g. "x86-64-v3" for a wheel that runs elsewhere,
                        or "" for the compiler's default)
"""
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _flags():
    compile_args, link_args = [], []
    if sys.platform == "win32":
        compile_args.append("/O2")
        if os.environ.get("FASTBN_OPENMP", "1") != "0":
            compile_args.append("/openmp")
        return compile_args, link_args
    compile_args += ["-O3", "-fno-math-errno", "-mprefer-vector-width=512"]
    march = os.environ.get("FASTBN_MARCH", "native")
    if march:
        compile_args.append(f"-march={march}")
    if os.environ.get("FASTBN_OPENMP", "1") != "0":
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args


compile_args, link_args = _flags()
extensions = [
    Extension(
        "fastbn._cpu",
        ["fastbn/_cpu.pyx"],
        include_dirs=[numpy.get_include(), "fastbn"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    )
)
