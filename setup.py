"""Build the fastbn._cpu extension.

Environment switches:
  FASTBN_OPENMP=0       build without OpenMP (every kernel runs on one thread)
  FASTBN_MARCH=<arch>   -march value (default "native": this machine's vector
                        units; use e.g. "x86-64-v3" for a wheel that runs elsewhere,
                        or "" for the compiler's default)
"""
import os
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# GCC only, added where the compiler accepts them (probed).  _cpu.c is one large
# unit whose speed rests on inlining: the per-channel helpers and the kernels of
# _simd.h into the kernel drivers.  At GCC's default unit growth budget (40 %) a
# few more call sites made it stop inlining some of them (the per-channel helpers
# of 2be4790, put_cols among them): per-channel work of (16, 16384) 1.4x slower,
# channels-last 128x64x28x28 inference and backward 1.14-1.17x (A/B, 1 thread); at
# 80 % every one of them is inlined again and those times are back (0.93-1.08).
# Same bits either way.
GCC_ONLY_FLAGS = ["--param=inline-unit-growth=80"]


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


class BuildExt(build_ext):
    """build_ext that adds the GCC_ONLY_FLAGS the compiler accepts."""

    def build_extensions(self):
        extra = [f for f in GCC_ONLY_FLAGS if sys.platform != "win32" and self._accepts(f)]
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + extra
        super().build_extensions()

    def _accepts(self, flag):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("int main(void) { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag, "-Werror"])
            except Exception:
                return False
        return True


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
    cmdclass={"build_ext": BuildExt},
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
