"""CI check of the CUDA sources without a GPU: nvcc compiles every
fastbn/cuda/*.cu on its own, and the whole module exactly as _gpu.py hands it
to CuPy with every template instance of its name_expressions instantiated,
for sm_90 (the target, Hopper) and sm_80 (an older architecture).  A syntax
or template error fails here instead of at the first GPU call.  Skipped where
nvcc is not installed."""

import os
import shutil
import subprocess

import pytest

from fastbn import _gpu

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")

ARCHS = ("sm_90", "sm_80")
CUDA_DIR = os.path.join(os.path.dirname(_gpu.__file__), "cuda")


def _module_source():
    """The module source plus host code taking the address of every name
    expression (which makes nvcc instantiate it, as NVRTC does for CuPy)."""
    names = _gpu.name_expressions()
    refs = ",\n".join(f"    (const void*)&{n}" for n in names)
    return (_gpu.source() + "\n\nconst void* const fbn_instances[] = {\n" + refs + "\n};\n"
            f"const void* fbn_instance(int i) {{ return fbn_instances[i % {len(names)}]; }}\n")


def test_every_cuda_file_compiles(tmp_path):
    module = tmp_path / "module.cu"
    module.write_text(_module_source())
    jobs = []
    for arch in ARCHS:
        jobs.append((f"module ({len(_gpu.name_expressions())} instances), {arch}", module, arch))
        for name in sorted(os.listdir(CUDA_DIR)):
            if name.endswith(".cu"):
                jobs.append((f"{name}, {arch}", os.path.join(CUDA_DIR, name), arch))
    # All at once: the module compiles take most of the time.
    procs = [(what, subprocess.Popen(
        [NVCC, "-std=c++17", "-ptx", f"-arch={arch}", str(src), "-o", os.devnull],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for what, src, arch in jobs]
    failures = []
    for what, p in procs:
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0 or "warning" in out.lower():
            failures.append(f"--- {what}: rc {p.returncode}\n{out[-4000:]}")
    assert not failures, "\n".join(failures)
