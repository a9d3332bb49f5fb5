"""The CUDA kernels (fastbn/cuda/*.cu) and the GPU backend (fastbn/_gpu.py),
run without a GPU: tests/cuda_emu compiles the kernel source for the host and
runs each CUDA thread as a fiber, and numpy arrays stand in for device memory.

This checks what can be checked off the device: indexing and vector paths,
the Welford / sum merges, the warp, block and last-block-done reductions
(including the counter reset), the coefficient tables, argument packing
against the kernel signatures, launch counts, and the numerics against the
float64 reference and the CPU backend.  Not checked here: memory ordering
between blocks, concurrency, speed (tests/test_gpu.py on a real GPU).

Skipped where the emulator cannot be built (no g++ or CUDA toolkit headers).
"""

import numpy as np
import pytest

import fastbn
from fastbn import _gpu
from fastbn import _reference as R

from . import cuda_emu
from . import gpu_checks as G

_WHY = cuda_emu.available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA emulator: {_WHY}")


class EmuDevice(G.Device):
    name = "emulated"

    def __init__(self, emu):
        self.emu = emu

    def put(self, a):
        return np.array(a, copy=True, order="C")

    def get(self, a):
        return np.asarray(a)

    def running_stats(self, C, **kw):
        return fastbn.RunningStats(C, **kw)

    def cpu(self):
        return self.emu.cpu()


@pytest.fixture(scope="module")
def built():
    cuda_emu.build()


@pytest.fixture
def emu(built, monkeypatch):
    return cuda_emu.Emulator(monkeypatch)


@pytest.fixture
def dev(emu):
    return EmuDevice(emu)


def _name(v):
    return np.dtype(v).name if isinstance(v, type) else None


# ----------------------------------------------------------------------------
# the reference matrix (as tests/test_kernels.py), and the CPU backend

@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["cf", "cl-strided", "cl"])
@pytest.mark.parametrize("mode", ["train-stats", "train-nostats", "infer"])
def test_forward_backward_match_reference(dev, rng, mode, layout, rank, dtype, affine):
    G.forward_backward_case(dev, rng, mode, layout, rank, dtype, affine)


@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("shape,axis", [
    ((2, 1, 150, 120), 1),      # C = 1: the channel is split over several blocks
    ((3, 2, 101, 97), 1),       # odd spatial size: scalar path, split channels
    ((5, 70, 9, 11), 1),        # many channels
    ((40, 9, 11, 600), -1),     # channels-last, several channel tiles and row splits
    ((4000, 3), 1),             # rank 2, C not a multiple of the vector width
])
def test_large_shapes_match_reference(dev, rng, shape, axis, dtype):
    G.large_case(dev, rng, shape, axis, dtype)


def test_large_offset(dev, rng):
    """1e4 + N(0, 1): the shift keeps float statistics exact enough."""
    for shape, axis in (((8, 3, 40, 40), 1), ((3000, 8), 1)):
        G.large_case(dev, rng, shape, axis, np.float32, offset=1e4)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cma"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("shape,axis", [((4, 3, 10, 12), 1), ((5, 6, 7, 8), -1)])
def test_running_stats_after_several_steps(dev, rng, shape, axis, dtype, momentum):
    G.running_stats_case(dev, rng, shape, axis, dtype, momentum)


@pytest.mark.parametrize("where", ["x-first", "x-last", "dy"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("shape,axis", [((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1),
                                        ((3, 5, 150, 120), 1), ((300, 5), 1)])
def test_non_finite_matches_cpu(dev, rng, shape, axis, where, value):
    G.nonfinite_case(dev, rng, shape, axis, np.float32, where, value)


def test_determinism_and_workspace_independence(dev, emu, rng):
    """Same bits twice, even when the workspaces hold other garbage between
    the calls (every value the kernels read there was written in the same
    call)."""
    for shape, axis in (((2, 3, 60, 70), 1), ((2000, 40), 1)):
        G.determinism_case(dev, rng, shape, axis, np.float32)
        x = G.make_x(rng, shape, np.float32, offset=1.0)
        dy = G.make_x(rng, shape, np.float32)
        outs = []
        for fill in (0.0, np.nan):
            y, ctx = fastbn.forward(x, axis=axis)
            for part, coef in emu.device.local.spaces.values():
                part[...] = fill
                coef[...] = fill
            dx, _, _ = fastbn.backward(dy, ctx)
            outs.append((y.tobytes(), dx.tobytes()))
        assert outs[0] == outs[1]


# ----------------------------------------------------------------------------
# the kernel entry points directly: bfloat16, vector / scalar paths, bounds

@pytest.mark.skipif(G.BF16 is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bfloat16_kernels(dev, rng, layout, training):
    G.kernel_case(dev, _gpu, rng, layout, G.BF16, training=training)
    G.kernel_case(dev, _gpu, rng, layout, G.BF16, training=training,
                  shape=(3, 7, 1000) if layout == "nchw" else (3000, 24))


@pytest.mark.parametrize("guard", [0, 3], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_kernel_entry_points_stay_in_bounds(dev, rng, layout, dtype, training, affine, guard):
    """Outputs surrounded by sentinels (guard elements before and after):
    nothing is written outside them, on the vector path (aligned) and the
    scalar path (misaligned outputs)."""
    G.kernel_case(dev, _gpu, rng, layout, dtype, training=training, affine=affine,
                  guard=guard + 8)
    G.kernel_case(dev, _gpu, rng, layout, dtype, training=training, affine=affine,
                  guard=guard + 8, shape=(2, 3, 4104) if layout == "nchw" else (3001, 16))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_empty_batch_kernels(dev, layout):
    """N = 0 (the API does not launch for it, but the kernels cope): the
    inference pass still reports the statistics used, the backward zero
    gradients."""
    shape = (0, 3, 4) if layout == "nchw" else (0, 3)
    x = np.zeros(shape, np.float32)
    rm = np.arange(3, dtype=np.float32)
    rv = np.arange(3, dtype=np.float32) + 1
    mean, invstd = np.full(3, 7.0), np.full(3, 7.0)
    getattr(_gpu, "forward_infer_" + layout)(x, x.copy(), None, None, mean, invstd, rm, rv,
                                             1e-5, 0)
    assert np.array_equal(mean, rm)
    assert np.allclose(invstd, 1 / np.sqrt(rv.astype(np.float64) + 1e-5), rtol=1e-15, atol=0)
    dw, db = np.full(3, 7.0, np.float32), np.full(3, 7.0, np.float32)
    getattr(_gpu, "backward_" + layout)(x, x, x.copy(), mean, invstd, np.ones(3, np.float32),
                                        dw, db, False, 0)
    assert not dw.any() and not db.any()


# ----------------------------------------------------------------------------
# launches, counters, geometry

def test_launch_counts(emu, rng):
    """Training forward: two launches (statistics, normalise), or one when
    the geometry has one split (the statistics kernel normalises too);
    inference: one; backward: two (sums, dx), or one with one split, or in
    eval mode without dweight / dbias."""
    w = np.ones(3, np.float32)
    stats = fastbn.RunningStats(3)
    log = emu.log

    def launches(fn):
        n = len(log)
        out = fn()
        return [name.split("<")[0] for name, _, _ in log[n:]], out

    for hw, splits in ((64, True), (20, False)):
        x = G.make_x(rng, (4, 3, hw, hw), np.float32)
        geo = _gpu.launch_geometry("nchw", (4, 3, hw * hw), 4, emu.device.sm_count)
        assert (geo.splits > 1) == splits
        two = ["fbn_ew_nchw"] if splits else []
        names, (y, ctx) = launches(lambda: fastbn.forward(x, w, None, stats))
        assert names == ["fbn_stats_nchw"] + two
        assert launches(lambda: fastbn.backward(x, ctx))[0] == ["fbn_gsum_nchw"] + two
        names, (y, ctx) = launches(lambda: fastbn.forward(x, w, None, stats, training=False))
        assert names == ["fbn_ew_nchw"]
        assert launches(lambda: fastbn.backward(x, ctx))[0] == ["fbn_gsum_nchw"] + two
        _, ctx = fastbn.forward(x, stats=stats, training=False)
        assert launches(lambda: fastbn.backward(x, ctx))[0] == ["fbn_ew_nchw"]


def test_counters_are_reset_by_the_last_block(emu, rng):
    for shape, axis in (((2, 2, 150, 120), 1), ((4000, 40), 1)):
        x = G.make_x(rng, shape, np.float32)
        n = len(emu.log)
        y, ctx = fastbn.forward(x, axis=axis)
        fastbn.backward(x, ctx)
        assert all(grid[1] > 1 for _, grid, _ in emu.log[n:]), "expected split grids"
        for counters in emu.device.counters.values():
            assert not counters.any()


def test_per_thread_default_streams_keep_counters_apart():
    """cudaStreamPerThread (CuPy's current stream under per-thread default
    streams) has one handle for a different stream in each thread: threads
    must not share its last-block counters, or two threads' kernels run at
    once on one array (a reset then leaves the other's count behind, and
    every later call merges early).  On any other stream they do share them:
    its kernels run in turn."""
    import threading

    from fastbn import _gpu

    for key, shared in ((_gpu.PER_THREAD_STREAM, False), (0, True), (12345, True)):
        dev = cuda_emu.make_device()
        dev.stream_key = lambda key=key: key
        got = []
        for _ in range(2):
            t = threading.Thread(target=lambda: got.append(dev.workspace(8, 8, 16)[2]))
            t.start()
            t.join()
        assert (got[0] is got[1]) is shared, key
        mine = dev.workspace(8, 8, 16)[2]
        assert dev.workspace(8, 8, 16)[2] is mine          # kept from call to call
        assert (mine is got[0]) is shared, key


def test_buffers_on_another_gpu_are_refused(monkeypatch):
    """Every array a GPU call touches must be on x's GPU (checked in the
    backend, before any launch); the emulator has one device, so cupy arrays
    are stood in for by objects with a device id."""
    from types import SimpleNamespace

    from fastbn import _gpu

    class Arr:
        def __init__(self, did):
            self.device = SimpleNamespace(id=did)

    monkeypatch.setattr(_gpu, "_cupy", lambda: SimpleNamespace(ndarray=Arr))
    x = Arr(0)
    _gpu._check_buffers(x, y=Arr(0), weight=None, running_mean=Arr(0))
    for name in ("y", "weight", "running_var", "dy", "dx"):
        with pytest.raises(TypeError, match=rf"^{name}: expected an array on x's GPU \(0\), "
                                            r"got one on GPU 1"):
            _gpu._check_buffers(x, **{name: Arr(1)})
    with pytest.raises(TypeError, match="^bias: expected a cupy array"):
        _gpu._check_buffers(x, bias=np.zeros(3))


def _forced(nchw_block, nchw_splits, nhwc_tx, nhwc_ty, nhwc_splits):
    """A launch_geometry replacement with the given (valid) shapes."""
    def geometry(layout, shape, itemsize, sm_count, *, aligned=True, blocks_per_sm=4, **_):
        width = 16 // itemsize
        if layout == "nchw":
            N, C, S = shape
            vec = aligned and S % width == 0
            return _gpu.Geometry((C, nchw_splits, 1), (nchw_block, 1, 1), int(vec), nchw_splits)
        M, C = shape
        vec = aligned and C % width == 0
        lanes = C // width if vec else C
        tx = min(nhwc_tx, lanes)
        tiles = -(-lanes // tx)
        return _gpu.Geometry((tiles, nhwc_splits, 1), (tx, nhwc_ty, 1), int(vec), nhwc_splits)
    return geometry


@pytest.mark.parametrize("forced", [
    (32, 1, 1, 1, 1),          # one warp per channel; one thread per channel-last tile
    (32, 7, 3, 5, 3),          # many splits of small blocks; odd tiles and rows
    (64, 3, 2, 128, 9),        # channels-last: tall blocks, more splits than rows allow
    (256, 13, 32, 8, 2),
    (128, 40, 7, 36, 40),      # more splits than a thread has elements
], ids=str)
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
def test_any_valid_geometry_gives_the_reference(built, monkeypatch, rng, forced, dtype):
    """The kernels do not depend on launch_geometry's choices: any grid and
    block within the kernels' contract give results within the table."""
    emu = cuda_emu.Emulator(monkeypatch, geometry=_forced(*forced))
    dev = EmuDevice(emu)
    for shape, layout in (((3, 4, 9, 12), "cf"), ((3, 4, 7, 5), "cf"), ((5, 16, 6, 7), "cl"),
                          ((2, 13, 5, 7), "cl"), ((50, 6), "cf")):
        for mode in ("train-stats", "infer"):
            G.forward_backward_case(dev, rng, mode, layout, len(shape), dtype, "both",
                                    shape=shape)


def test_launch_geometry_is_what_the_backend_uses(emu, rng):
    x = G.make_x(rng, (8, 3, 32, 32), np.float32)
    n = len(emu.log)
    fastbn.forward(x)
    geo = _gpu.launch_geometry("nchw", (8, 3, 1024), 4, emu.device.sm_count,
                               blocks_per_sm=emu.device.blocks_per_sm(
                                   (_gpu.kernel_name("fbn_stats_nchw", "float32"),
                                    _gpu.kernel_name("fbn_ew_nchw", "float32"))))
    assert [(g, b) for _, g, b in emu.log[n:]] == [(geo.grid, geo.block)] * 2


# ----------------------------------------------------------------------------
# in place

def test_in_place_inference_and_dx_into_dy(dev, rng):
    for shape, axis in (((4, 3, 5, 8), 1), ((30, 8), -1)):
        x = G.make_x(rng, shape, np.float32, offset=1.0)
        C_ = shape[axis]
        stats = fastbn.RunningStats(C_)
        stats.load_state_dict({"running_mean": np.linspace(0, 1, C_),
                               "running_var": np.linspace(1, 2, C_)})
        ref = R.forward(x, running_mean=np.linspace(0, 1, C_).astype(np.float32),
                        running_var=np.linspace(1, 2, C_).astype(np.float32), training=False,
                        axis=axis)
        x2 = x.copy()
        y, ctx = fastbn.forward(x2, stats=stats, training=False, axis=axis, out=x2)
        assert y is x2
        G.close(y, ref.y, np.float32, "y (in place)")
        _, ctx = fastbn.forward(x, stats=stats, axis=axis)
        dy = G.make_x(rng, shape, np.float32)
        want = fastbn.backward(dy, ctx)[0]
        dy2 = dy.copy()
        dx, _, _ = fastbn.backward(dy2, ctx, out=dy2)
        assert dx is dy2 and np.array_equal(dx, want)
