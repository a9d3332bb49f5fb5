"""The GPU backend on a real GPU: cupy arrays and torch CUDA tensors through
the public API, diffed against the float64 reference and the CPU backend with
the same tolerance table (tests/gpu_checks.py says exactly what is compared
with what), running statistics over several steps, bit-for-bit determinism,
no host synchronisation on the hot path, the current stream.

Marked ``gpu``; skipped cleanly where CuPy is missing, ``cupy.is_available()``
is False, or the first use of the device raises (a CUDA runtime error)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _gpu_or_skip():
    try:
        import cupy as cp
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        pytest.skip(f"CuPy not usable: {type(exc).__name__}: {exc}", allow_module_level=True)
    try:
        if not cp.is_available():
            pytest.skip("cupy.is_available() is False (no GPU)", allow_module_level=True)
        if int(cp.arange(4).sum()) != 6:
            pytest.skip("the GPU gives wrong results", allow_module_level=True)
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and the like
        pytest.skip(f"GPU not usable: {type(exc).__name__}: {exc}", allow_module_level=True)
    return cp


cp = _gpu_or_skip()

import fastbn  # noqa: E402
from fastbn import _gpu  # noqa: E402
from fastbn import _reference as R  # noqa: E402

from . import gpu_checks as G  # noqa: E402


class CupyDevice(G.Device):
    name = "cupy"

    def put(self, a):
        a = np.ascontiguousarray(a)
        if a.dtype == G.BF16:
            try:
                return cp.asarray(a)
            except Exception as exc:  # noqa: BLE001 - a CuPy without bfloat16
                pytest.skip(f"this CuPy cannot hold bfloat16 arrays ({exc})")
        return cp.asarray(a)

    def get(self, a):
        return cp.asnumpy(a)

    def running_stats(self, C, **kw):
        return fastbn.RunningStats(C, like=cp.empty(0), **kw)


@pytest.fixture
def dev():
    return CupyDevice()


def _name(v):
    return np.dtype(v).name if isinstance(v, type) else None


def test_precompile():
    assert fastbn.precompile() == len(_gpu.name_expressions())
    assert fastbn.precompile(cp.cuda.Device().id) == len(_gpu.name_expressions())


# ----------------------------------------------------------------------------
# against the reference and the CPU backend

@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["cf", "cl-strided", "cl"])
@pytest.mark.parametrize("mode", ["train-stats", "train-nostats", "infer"])
def test_forward_backward_match_reference(dev, rng, mode, layout, rank, dtype, affine):
    G.forward_backward_case(dev, rng, mode, layout, rank, dtype, affine)


@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("shape,axis", [
    ((2, 1, 150, 120), 1),          # C = 1: split channel
    ((3, 2, 101, 97), 1),           # odd spatial size: scalar path
    ((5, 70, 9, 11), 1),
    ((40, 9, 11, 600), -1),         # channels-last, several tiles and row splits
    ((4000, 3), 1),
    ((16, 3, 224, 224), 1),         # input layer: small C, large S
    ((64, 512, 7, 7), 1),           # late layer: large C, odd S
    ((32, 28, 28, 128), -1),        # channels-last, many rows
    ((8, 2, 8, 300, 40), 1),        # rank 5, C = 2
])
def test_large_shapes_match_reference(dev, rng, shape, axis, dtype):
    G.large_case(dev, rng, shape, axis, dtype)


def test_large_offset(dev, rng):
    for shape, axis in (((8, 3, 40, 40), 1), ((3000, 8), 1)):
        G.large_case(dev, rng, shape, axis, np.float32, offset=1e4)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cma"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("shape,axis", [((4, 3, 10, 12), 1), ((5, 6, 7, 8), -1),
                                        ((8, 2, 64, 64), 1)])
def test_running_stats_after_several_steps(dev, rng, shape, axis, dtype, momentum):
    G.running_stats_case(dev, rng, shape, axis, dtype, momentum)


@pytest.mark.parametrize("where", ["x-first", "x-last", "dy"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape,axis", [((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1),
                                        ((3, 5, 150, 120), 1), ((300, 5), 1)])
def test_non_finite_matches_cpu(dev, rng, shape, axis, where, value):
    G.nonfinite_case(dev, rng, shape, axis, np.float32, where, value)


@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("shape,axis", [((2, 3, 60, 70), 1), ((16, 4, 128, 128), 1),
                                        ((2000, 40), 1), ((64, 30, 30, 64), -1)])
def test_same_bits_twice(dev, rng, shape, axis, dtype):
    G.determinism_case(dev, rng, shape, axis, dtype)


@pytest.mark.skipif(G.BF16 is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bfloat16_kernels(dev, rng, layout, training):
    G.kernel_case(dev, _gpu, rng, layout, G.BF16, training=training)
    G.kernel_case(dev, _gpu, rng, layout, G.BF16, training=training,
                  shape=(8, 3, 4096) if layout == "nchw" else (30000, 24))


@pytest.mark.parametrize("guard", [0, 3], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", G.DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_kernel_entry_points_stay_in_bounds(dev, rng, layout, dtype, training, guard):
    G.kernel_case(dev, _gpu, rng, layout, dtype, training=training, guard=guard + 8)
    G.kernel_case(dev, _gpu, rng, layout, dtype, training=training, guard=guard + 8,
                  shape=(2, 3, 40968) if layout == "nchw" else (30001, 16))


# ----------------------------------------------------------------------------
# streams and synchronisation

def test_no_host_synchronisation_on_the_hot_path(dev, rng):
    import cupyx
    x = dev.put(G.make_x(rng, (8, 16, 32, 32), np.float32, offset=1.0))
    dy = dev.put(G.make_x(rng, (8, 16, 32, 32), np.float32))
    w, b = cp.ones(16, cp.float32), cp.zeros(16, cp.float32)
    st = dev.running_stats(16)
    for _ in range(2):                       # the first call compiles and allocates
        y, ctx = fastbn.forward(x, w, b, st)
        fastbn.backward(dy, ctx)
        y, ctx = fastbn.forward(x, w, b, st, training=False)
        fastbn.backward(dy, ctx)
    with cupyx.allow_synchronize(False):
        y, ctx = fastbn.forward(x, w, b, st)
        fastbn.backward(dy, ctx)
        y, ctx = fastbn.forward(x, w, b, st, training=False)
        fastbn.backward(dy, ctx)


def test_launches_go_on_the_current_stream(dev, rng):
    x_np = G.make_x(rng, (4, 8, 64, 64), np.float32, offset=1.0)
    x = dev.put(x_np)
    want, _ = fastbn.forward(x)
    want = cp.asnumpy(want)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        xs = cp.asarray(x_np)
        for _ in range(3):
            y, ctx = fastbn.forward(xs)
            dx, _, _ = fastbn.backward(xs, ctx)
        ev = s.record()
    ev.synchronize()
    assert np.array_equal(cp.asnumpy(y), want)
    assert s.done


# ----------------------------------------------------------------------------
# torch CUDA tensors through DLPack

@pytest.fixture
def torch():
    t = pytest.importorskip("torch")
    if not t.cuda.is_available():
        pytest.skip("torch without CUDA")
    return t


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=_name)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_cuda_in_torch_cuda_out(torch, rng, training, memory, dtype):
    C_ = 6
    x_np = G.make_x(rng, (4, C_, 9, 10), dtype, offset=1.0, scale=2.0)
    x = torch.from_numpy(x_np.copy()).cuda()
    if memory == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pdt = G.pdtype(dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, C_).astype(pdt)).cuda()
    b = torch.from_numpy(rng.standard_normal(C_).astype(pdt)).cuda()
    st = fastbn.RunningStats(C_, dtype=pdt, like=cp.empty(0))
    st.load_state_dict({"running_mean": rng.standard_normal(C_),
                        "running_var": rng.uniform(0.5, 2.0, C_)})
    rm0, rv0 = cp.asnumpy(st._mean).astype(np.float64), cp.asnumpy(st._var).astype(np.float64)

    y, ctx = fastbn.forward(x, w, b, st, training=training)
    assert type(y) is torch.Tensor and y.device == x.device
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert ctx.x.data.ptr == x.data_ptr()                 # read in place, no copy
    assert ctx.layout == ("nhwc" if memory == "channels_last" else "nchw")
    ref = R.forward(x_np, w.cpu().numpy(), b.cpu().numpy(), rm0, rv0, training=training)
    G.close(y.cpu().numpy(), ref.y, dtype, "y")

    dy_np = G.make_x(rng, x_np.shape, dtype)
    dy = torch.from_numpy(dy_np).cuda()
    if memory == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    dx, dw, db = fastbn.backward(dy, ctx)
    assert type(dx) is torch.Tensor and dx.device == x.device and dx.stride() == x.stride()
    assert type(dw) is torch.Tensor and dw.dtype == w.dtype and dw.is_cuda
    rdx, rdw, rdb = R.backward(dy_np, x_np, cp.asnumpy(ctx.mean), cp.asnumpy(ctx.invstd),
                               w.cpu().numpy(), training=training)
    G.close(dx.cpu().numpy(), rdx, dtype, "dx")
    G.close(dw.cpu().numpy(), rdw, pdt, "dweight")
    G.close(db.cpu().numpy(), rdb, pdt, "dbias")


def test_torch_cuda_matches_torch_batch_norm(torch, rng):
    """A second opinion: torch's own CUDA batch norm (looser tolerance: both
    sides round)."""
    F = torch.nn.functional
    x = torch.from_numpy(G.make_x(rng, (8, 16, 20, 20), np.float32, offset=1.0)).cuda()
    w = torch.rand(16, device="cuda") + 0.5
    b = torch.randn(16, device="cuda")
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    ref = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    st = fastbn.RunningStats(16, like=cp.empty(0))
    y, _ = fastbn.forward(x, w, b, st)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_dlpack(st._mean), rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_dlpack(st._var), rv, rtol=1e-5, atol=1e-6)


def test_torch_bfloat16_cpu_stays_refused(torch):
    x = torch.zeros(4, 3, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        fastbn.forward(x)


# ----------------------------------------------------------------------------
# The API with GPU arrays: out=, strided dy, stats on the device.

def test_out_buffers(dev, rng):
    x = dev.put(G.make_x(rng, (4, 3, 5, 6), np.float32))
    out = cp.full_like(x, np.nan)
    y, ctx = fastbn.forward(x, out=out)
    assert y is out and not cp.isnan(out).any()


def test_non_contiguous_dy_is_copied(dev, rng):
    x = dev.put(G.make_x(rng, (4, 3, 5, 6), np.float32))
    _, ctx = fastbn.forward(x)
    dy = cp.empty((4, 3, 5, 12), cp.float32)[..., ::2]
    dy[...] = dev.put(G.make_x(rng, (4, 3, 5, 6), np.float32))
    dx, dw, db = fastbn.backward(dy, ctx)
    want = fastbn.backward(cp.ascontiguousarray(dy), ctx)
    for got, ref in zip((dx, dw, db), want):      # dw, db: None (no weight, no bias)
        assert (got is None and ref is None
                or cp.asnumpy(got).tobytes() == cp.asnumpy(ref).tobytes())


@pytest.mark.xfail(reason="bfloat16 does not cross DLPack into CuPy (no bfloat16 dtype); the "
                          "kernels have bfloat16 instances for when it does", strict=False)
def test_bfloat16_through_the_api(torch, rng):
    x = torch.randn(4, 3, 5, 6, device="cuda", dtype=torch.bfloat16)
    y, ctx = fastbn.forward(x)
    assert y.dtype == torch.bfloat16


def test_running_stats_like_a_torch_cuda_tensor(torch):
    x = torch.randn(4, 3, 5, 6, device="cuda")
    st = fastbn.RunningStats(3, like=x)
    fastbn.forward(x, stats=st)
    assert st.mean.is_cuda
