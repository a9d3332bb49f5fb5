"""Run fastbn's CUDA kernels on the host, for tests on machines without a GPU.

``build()`` compiles the module source exactly as fastbn/_gpu.py hands it to
CuPy, plus emu.h (fibers for CUDA threads, barriers, shuffles, atomics), with
the host C++ compiler and the CUDA toolkit's headers (for __half and
__nv_bfloat16, whose conversions are host functions too).  ``emulated_gpu()``
then routes fastbn's GPU backend through it with numpy arrays standing in for
device memory: ``_gpu``'s own argument packing, geometry, workspaces and
dispatch run unchanged, and every launch's arguments are checked against the
kernel's parameter sizes the way CuPy would pack them (int -> 8 bytes,
float -> double, arrays -> pointers).
"""

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_include():
    """The CUDA toolkit's include directory, or None."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            return inc
    if os.path.exists("/usr/local/cuda/include/cuda_fp16.h"):
        return "/usr/local/cuda/include"
    return None


def available():
    """Why the emulator cannot be built here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "the emulator uses ucontext (Linux only)"
    if shutil.which("g++") is None:
        return "no g++"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h)"
    if not os.path.exists(os.path.join(HERE, "emu.h")):
        return "tests/cuda_emu/emu.h is missing"
    return None


_LIB = None


def build():
    """Compile (or reuse) the emulated module; returns (ctypes library, names)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    from fastbn import _gpu

    names = _gpu.name_expressions()
    src = ['#include "emu.h"', _gpu.source(), ""]
    src.append("extern \"C\" int emu_launch(int i, const unsigned* g, const unsigned* b, "
               "void** args, char* err, int errlen) {\n  switch (i) {")
    for i, n in enumerate(names):
        src.append(f"    case {i}: return emu::launch(&{n}, g, b, args, err, errlen);")
    src.append("  }\n  return 2;\n}")
    src.append("extern \"C\" int emu_arg_sizes(int i, int* out) {\n  switch (i) {")
    for i, n in enumerate(names):
        src.append(f"    case {i}: return emu::arg_sizes(&{n}, out);")
    src.append("  }\n  return -1;\n}")
    code = "\n".join(src)
    with open(os.path.join(HERE, "emu.h"), "rb") as f:
        key = hashlib.sha256(code.encode() + f.read()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), "fastbn-cuda-emu")
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"emu-{key}.so")
    if not os.path.exists(so):
        cpp = os.path.join(out_dir, f"emu-{key}.cpp")
        with open(cpp, "w") as f:
            f.write(code)
        tmp = so + f".{os.getpid()}.tmp"
        cmd = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-w",
               "-I", HERE, "-I", cuda_include(), cpp, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("building the CUDA emulator failed:\n" + proc.stderr[-5000:])
        os.replace(tmp, so)
    lib = ctypes.CDLL(so)
    lib.emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                               ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p),
                               ctypes.c_char_p, ctypes.c_int]
    lib.emu_arg_sizes.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    _LIB = (lib, names)
    return _LIB


class Kernel:
    """Stands in for a cupy.RawKernel."""

    num_regs = 64

    def __init__(self, lib, index, name, log):
        self.lib, self.index, self.name, self.log = lib, index, name, log
        sizes = (ctypes.c_int * 64)()
        n = lib.emu_arg_sizes(index, sizes)
        self.sizes = list(sizes[:n])

    def __call__(self, grid, block, args, shared_mem=0):
        if len(args) != len(self.sizes):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.sizes)} parameters")
        bufs = []
        for i, (a, size) in enumerate(zip(args, self.sizes)):
            # CuPy's packing (cupy/cuda/function.pyx, _pointer): arrays as
            # pointers, Python int -> int64, float -> float64, numpy scalars
            # by their own size.
            if isinstance(a, np.ndarray):
                raw = np.array([a.ctypes.data], np.uint64).tobytes()
            elif a is None:
                raise TypeError(f"{self.name}: argument {i} is None (pass 0 for NULL)")
            elif isinstance(a, int):
                raw = np.int64(a).tobytes()
            elif isinstance(a, float):
                raw = np.float64(a).tobytes()
            elif isinstance(a, np.generic):
                raw = a.tobytes()
            else:
                raise TypeError(f"{self.name}: unsupported argument {i}: {type(a).__name__}")
            if len(raw) != size:
                raise TypeError(f"{self.name}: argument {i} packs {len(raw)} bytes, the "
                                f"kernel parameter has {size}")
            bufs.append(ctypes.create_string_buffer(raw, len(raw)))
        argv = (ctypes.c_void_p * max(1, len(bufs)))(
            *[ctypes.cast(b, ctypes.c_void_p) for b in bufs])
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        err = ctypes.create_string_buffer(512)
        self.log.append((self.name, tuple(grid), tuple(block)))
        rc = self.lib.emu_launch(self.index, g, b, argv, err, 512)
        if rc != 0:
            raise RuntimeError(f"{self.name} grid={tuple(grid)} block={tuple(block)}: "
                               f"{err.value.decode()}")


class Module:
    """Stands in for the cupy.RawModule of _gpu._Device.compile()."""

    def __init__(self, log):
        lib, names = build()
        self.kernels = {n: Kernel(lib, i, n, log) for i, n in enumerate(names)}

    def get_function(self, name):
        return self.kernels[name]


def make_device(sm_count=4, log=None):
    """A _gpu._Device whose kernels run in the emulator and whose workspaces
    are numpy arrays."""
    from fastbn import _gpu

    class EmuDevice(_gpu._Device):
        def __init__(self):
            super().__init__(0, sm_count, 65536)
            self.log = [] if log is None else log

        def compile(self):
            return Module(self.log)

        def alloc(self, n, dtype, zero=False):
            # Garbage, not zeros, where the GPU would give garbage.
            if zero:
                return np.zeros(n, dtype)
            return np.frombuffer(b"\xab" * (n * np.dtype(dtype).itemsize), dtype).copy()

        def stream_key(self):
            return 0

    return EmuDevice()


class Emulator:
    """fastbn's GPU backend on the emulator, installed with a pytest monkeypatch:
    numpy arrays go to fastbn._gpu (whose kernels run here) while ``on`` is
    True, to the CPU backend inside ``cpu()``."""

    def __init__(self, monkeypatch, sm_count=4, geometry=None):
        from fastbn import _dispatch, _gpu

        self.device = make_device(sm_count)
        self.log = self.device.log
        self.on = True
        monkeypatch.setattr(_gpu, "_state", lambda x: self.device)
        monkeypatch.setattr(_gpu, "_ptr", lambda a: a.ctypes.data)
        monkeypatch.setattr(_gpu, "_check_buffers", lambda x, **kw: None)
        monkeypatch.setitem(_gpu.__dict__, "xp", np)   # (getattr would import cupy)
        if geometry is not None:
            monkeypatch.setattr(_gpu, "_geometry", geometry)
        real_backend = _dispatch.backend

        def backend(device):
            if device == "cpu" and self.on:
                return _gpu
            return real_backend(device)

        monkeypatch.setattr(_dispatch, "backend", backend)

    @contextlib.contextmanager
    def cpu(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True
