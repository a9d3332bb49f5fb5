"""fastbn/_simd.h compiles cleanly at every instruction-set level that
FASTBN_MARCH (setup.py) may ask for: the AVX-512 masked path, the generic
path (AVX2 or plain SSE2) and the portable float16 conversions.  Only `native`
is built and tested by the rest of the suite, so a helper defined for one path
but used by all (as the blends of the streaming writers once were) would
otherwise surface as a failed wheel build elsewhere."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

HEADER_DIR = Path(__file__).resolve().parent.parent / "fastbn"
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(
    CC is None or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs a C compiler targeting x86-64")


@pytest.mark.parametrize("flags", [
    ["-march=x86-64"],                          # SSE2 only: portable float16
    ["-march=x86-64-v2"],
    ["-march=x86-64-v3"],                       # AVX2 + F16C, no AVX-512
    ["-march=x86-64-v4"],                       # AVX-512: masked tails
    ["-march=native"],
    ["-march=native", "-DFASTBN_NO_FLOAT16"],
], ids=lambda f: " ".join(f))
def test_header_compiles(tmp_path, flags):
    src = tmp_path / "use.c"
    # Every static inline function is type-checked where it is defined; the
    # exported symbol keeps the translation unit from being empty.
    src.write_text('#include "_simd.h"\n'
                   'double fbn_probe(const float *x) { return fbn_hsum(fbn_ld8_f32(x)); }\n')
    cmd = [CC, *flags, "-O1", "-std=gnu11", "-Wall", "-Werror", "-Wno-psabi",
           "-Wno-unused-function", f"-I{HEADER_DIR}", "-c", str(src),
           "-o", str(tmp_path / "use.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
