"""The GPU backend's pure-Python parts, without a GPU or CuPy: launch
geometry, the module source and its template instances, lazy imports."""

import itertools
import os
import subprocess
import sys

import pytest

from fastbn import _gpu
from fastbn._gpu import (MAX_GRID, MAX_LANES, MAX_SPLITS, MAX_THREADS, MIN_ROWS, MIN_VECTORS,
                         REDUCE_TILE_BYTES,
                         launch_geometry)

H200_SMS = 132


def _check_limits(geo, layout, shape):
    """Every grid / block dimension within CUDA's limits and the kernels'
    contract (fastbn/cuda/fastbn.cuh)."""
    gx, gy, gz = geo.grid
    bx, by, bz = geo.block
    assert 1 <= gx <= MAX_GRID[0] and 1 <= gy <= MAX_GRID[1] and gz == 1
    assert bx >= 1 and by >= 1 and bz == 1
    assert bx * by <= MAX_THREADS <= 1024
    assert bx <= 1024 and by <= 1024
    assert geo.splits == gy and 1 <= geo.splits <= MAX_SPLITS
    assert geo.vec in (0, 1)
    if layout == "nchw":
        assert by == 1 and bx % 32 == 0          # whole warps: shuffles
        assert gx == shape[1]
    else:
        assert bx <= MAX_LANES


SHAPES_NCHW = [(N, C, S) for N, C, S in itertools.product(
    (0, 1, 2, 7, 64, 4096), (1, 3, 16, 256, 2048, 100_000), (1, 2, 7, 49, 64, 3136, 50_176))]
SHAPES_NHWC = [(M, C) for M, C in itertools.product(
    (0, 1, 2, 37, 1000, 200_704, 10**9), (1, 3, 4, 8, 16, 96, 160, 600, 2048, 100_000))]


@pytest.mark.parametrize("sm_count", [1, 4, 132])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_every_grid_dimension_within_cuda_limits(itemsize, sm_count):
    for shape in SHAPES_NCHW:
        for aligned in (True, False):
            _check_limits(launch_geometry("nchw", shape, itemsize, sm_count, aligned=aligned),
                          "nchw", shape)
    for shape in SHAPES_NHWC:
        for aligned in (True, False):
            _check_limits(launch_geometry("nhwc", shape, itemsize, sm_count, aligned=aligned),
                          "nhwc", shape)


def test_nchw_small_c_splits_channels_to_fill_the_device():
    # (64, 3, 224, 224) float32: three channels must not mean three blocks
    g = launch_geometry("nchw", (64, 3, 224 * 224), 4, H200_SMS)
    assert g.grid[0] == 3 and g.splits > 1
    assert g.grid[0] * g.splits >= H200_SMS * 4 - 3       # about one wave of blocks
    assert g.block == (MAX_THREADS, 1, 1) and g.vec == 1
    # and never below MIN_VECTORS vectors per thread
    vectors = 64 * 224 * 224 // 4
    assert vectors // g.splits >= MAX_THREADS * MIN_VECTORS
    # C = 1, small N*S: split only as far as the work allows
    g = launch_geometry("nchw", (2, 1, 150 * 120), 4, H200_SMS)
    assert g.splits == 2 * 150 * 120 // 4 // (MAX_THREADS * MIN_VECTORS)


def test_nchw_large_c_is_one_block_per_channel():
    g = launch_geometry("nchw", (64, 2048, 49), 4, H200_SMS)
    assert g.grid == (2048, 1, 1)
    assert g.vec == 0                                        # 49 % 4 != 0
    g = launch_geometry("nchw", (64, 256, 3136), 2, H200_SMS)
    assert g.grid == (256, 3, 1) and g.vec == 1              # 8 halves per vector


def test_nchw_vector_path_needs_alignment_and_whole_vectors():
    assert launch_geometry("nchw", (8, 16, 64), 4, 8).vec == 1
    assert launch_geometry("nchw", (8, 16, 64), 4, 8, aligned=False).vec == 0
    assert launch_geometry("nchw", (8, 16, 66), 4, 8).vec == 0
    assert launch_geometry("nchw", (8, 16, 66), 8, 8).vec == 1   # doubles: pairs
    assert launch_geometry("nchw", (8, 16, 68), 2, 8).vec == 0   # halves: 8 per vector


def test_nhwc_two_dimensional_grid():
    # (32*56*56, 256) float32: 64 vector lanes -> two tiles of 32 lanes
    g = launch_geometry("nhwc", (32 * 56 * 56, 256), 4, H200_SMS)
    assert g.vec == 1 and g.grid[0] == 2 and g.block == (32, 8, 1)
    assert g.splits > 1 and g.grid[0] * g.splits >= H200_SMS * 4 - 1
    # the reductions' narrower tiles: float32, 16 lanes of 16 bytes, 16 rows
    # of threads (the last block of a tile merges 132 splits, 9 in a row per
    # thread); float16, 8 lanes and 32 rows (66 splits, 3 in a row)
    g = launch_geometry("nhwc", (32 * 56 * 56, 256), 4, H200_SMS,
                        tile_bytes=REDUCE_TILE_BYTES[4])
    assert g.grid == (4, 132, 1) and g.block == (16, 16, 1)
    g = launch_geometry("nhwc", (32 * 56 * 56, 256), 2, H200_SMS,
                        tile_bytes=REDUCE_TILE_BYTES[2])
    assert g.grid == (4, 132, 1) and g.block == (8, 32, 1)
    # lanes spread evenly over the tiles: 600 float32 channels = 150 lanes
    g = launch_geometry("nhwc", (4000, 600), 4, H200_SMS)
    assert g.grid[0] == 5 and g.block[0] == 30
    # scalar accesses: up to 32 lanes of 4 bytes
    g = launch_geometry("nhwc", (4000, 601), 4, H200_SMS)
    assert g.vec == 0 and g.block[0] == 32 and g.grid[0] == 19
    # small C: one tile, tall blocks
    g = launch_geometry("nhwc", (100_000, 3), 4, H200_SMS)
    assert g.vec == 0 and g.grid[0] == 1 and g.block == (3, MAX_THREADS // 3, 1)
    # rows per thread never below MIN_ROWS
    g = launch_geometry("nhwc", (1000, 16), 4, H200_SMS)
    assert 1000 // g.splits >= g.block[1] * MIN_ROWS


def test_tiny_tensors():
    g = launch_geometry("nchw", (2, 5, 3), 4, H200_SMS)
    assert g.grid == (5, 1, 1) and g.block == (32, 1, 1)
    g = launch_geometry("nchw", (0, 5, 3), 4, H200_SMS)        # empty batch: still launchable
    assert g.grid == (5, 1, 1) and g.block == (32, 1, 1)
    g = launch_geometry("nhwc", (3, 5), 2, H200_SMS)
    assert g.grid == (1, 1, 1) and g.block == (5, 3, 1)
    g = launch_geometry("nhwc", (0, 5), 4, H200_SMS)
    assert g.grid == (1, 1, 1) and g.block == (5, 1, 1)


def test_geometry_follows_the_device():
    small = launch_geometry("nchw", (64, 4, 50176), 4, 8)
    big = launch_geometry("nchw", (64, 4, 50176), 4, H200_SMS)
    assert small.splits < big.splits
    low = launch_geometry("nchw", (64, 4, 50176), 4, H200_SMS, blocks_per_sm=2)
    assert low.splits < big.splits


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        launch_geometry("ncw", (1, 2, 3), 4, 8)
    with pytest.raises(ValueError, match="itemsize"):
        launch_geometry("nchw", (1, 2, 3), 3, 8)
    with pytest.raises(ValueError, match="channels"):
        launch_geometry("nchw", (1, 2**31, 3), 4, 8)


# ----------------------------------------------------------------------------
# the module source and its instances

def test_name_expressions_cover_every_kernel_and_dtype():
    names = _gpu.name_expressions()
    assert len(names) == len(set(names)) == 6 * 4
    assert _gpu.kernel_name("fbn_stats_nchw", "float16") == "fbn_stats_nchw<__half, float>"
    assert _gpu.kernel_name("fbn_ew_nhwc", "float64") == "fbn_ew_nhwc<double, double>"
    assert _gpu.kernel_name("fbn_gsum_nchw", "bfloat16") == "fbn_gsum_nchw<__nv_bfloat16, double>"
    assert _gpu.kernel_name("fbn_gsum_nhwc", "float32") == "fbn_gsum_nhwc<float, double>"
    src = _gpu.source()
    for kernel in ("fbn_stats_nchw", "fbn_stats_nhwc", "fbn_ew_nchw", "fbn_ew_nhwc",
                   "fbn_gsum_nchw", "fbn_gsum_nhwc"):
        assert f"\n{kernel}(" in src, kernel


def test_source_inlines_local_headers_once():
    src = _gpu.source()
    cuda = os.path.join(os.path.dirname(_gpu.__file__), "cuda")
    for name in sorted(os.listdir(cuda)):
        if name.endswith(".cu"):
            assert f"// ---- {name}" in src
    assert '#include "' not in src
    assert src.count("#define FASTBN_CUDA_FASTBN_CUH") == 1


def test_importing_fastbn_and_the_backend_module_compiles_and_imports_nothing():
    code = ("import sys, fastbn; assert 'fastbn._gpu' not in sys.modules; "
            "import fastbn._gpu as g; g.launch_geometry('nchw', (2, 3, 4), 4, 8); "
            "g.source(); g.name_expressions(); "
            "assert 'cupy' not in sys.modules, 'cupy imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_gpu_backend_without_cupy_is_a_clear_type_error(monkeypatch):
    from fastbn import _dispatch
    monkeypatch.setitem(sys.modules, "cupy", None)           # import cupy -> ImportError
    monkeypatch.setattr(_dispatch, "_BACKENDS", {})
    with pytest.raises(TypeError, match=r"install fastbn\[gpu\]"):
        _dispatch.backend("gpu")
    with pytest.raises(TypeError, match=r"install fastbn\[gpu\]"):
        _dispatch.precompile()


def test_one_split_when_the_reread_fits_in_l2():
    """Channels-first, C >= the SM count: one split (one fused launch) when the
    bytes read twice fit in the L2, the usual splits when they do not."""
    shape, l2 = (256, 256, 196), 60 * 2**20
    nbytes = 256 * 256 * 196 * 4
    assert launch_geometry("nchw", shape, 4, H200_SMS).splits > 1
    assert launch_geometry("nchw", shape, 4, H200_SMS, fuse_bytes=nbytes, l2_bytes=l2).splits == 1
    assert launch_geometry("nchw", shape, 4, H200_SMS, fuse_bytes=2 * nbytes,
                           l2_bytes=l2).splits > 1
    # too few channels to fill the device with one block each: split anyway
    small_c = (256, 64, 784)
    assert launch_geometry("nchw", small_c, 4, H200_SMS, fuse_bytes=1 << 20,
                           l2_bytes=l2).splits > 1
