import os
import tempfile
import zlib

import numpy as np
import pytest

# CuPy writes a kernel cache under HOME on import; keep test runs self-contained.
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastbn-cupy-cache"))


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible across runs, distinct per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_x(rng, shape, dtype, *, offset=0.0, scale=1.0):
    """Random normal data (never all zeros) in ``dtype``."""
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def param_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def assert_close(got, ref, dtype, what=""):
    from fastbn._reference import TOLERANCE, max_violation

    v = max_violation(got, ref, dtype)
    assert v <= 1.0, (f"{what}: max error is {v:.3g} x the {np.dtype(dtype).name} "
                      f"tolerance {TOLERANCE[np.dtype(dtype)]}")
