"""Inputs that break naive kernels, and the documented error cases."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R

from .conftest import assert_close, make_x


@pytest.mark.parametrize("shape", [(1, 3, 97), (3, 1, 1), (97, 1), (2, 3, 1, 1), (1, 2, 3, 5, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_sizes(rng, shape, dtype):
    x = make_x(rng, shape, dtype)
    y, ctx = fastbn.forward(x)
    ref = R.forward(x)
    assert_close(y, ref.y, dtype, "y")
    dy = make_x(rng, shape, dtype)
    dx, _, _ = fastbn.backward(dy, ctx)
    assert_close(dx, R.backward(dy, x, ref.mean, ref.invstd)[0], dtype, "dx")


@pytest.mark.parametrize("axis", [1, -1])
def test_variance_survives_large_mean_float32(rng, axis):
    shape = (64, 3, 40, 40) if axis == 1 else (64, 40, 40, 3)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    stats = fastbn.RunningStats(3, momentum=1.0)
    y, ctx = fastbn.forward(x, stats=stats, axis=axis)
    ref = R.forward(x, axis=axis)              # float64 from the same float32 values
    n = x.size // 3
    assert np.max(np.abs(1.0 / ctx.invstd**2 - 1e-5 - (1.0 / ref.invstd**2 - 1e-5))) < 1e-4
    assert np.max(np.abs(stats.var - (1.0 / ref.invstd**2 - 1e-5) * n / (n - 1))) < 1e-4
    assert np.max(np.abs(stats.mean - ref.mean)) <= 1e-3   # float32 ulp(1e4) = 9.8e-4
    assert_close(y, ref.y, np.float32, "y")


@pytest.mark.parametrize("axis", [1, -1])
def test_constant_channel(rng, axis):
    x = make_x(rng, (4, 3, 5, 5), np.float32)
    x[:, 1] = 7.25                              # channel 1 constant
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    w = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([0.5, -1.5, 2.0], np.float32)
    stats = fastbn.RunningStats(3, momentum=1.0)
    y, ctx = fastbn.forward(x, w, b, stats, axis=axis)
    yc = np.moveaxis(y, axis, 0)[1]
    assert np.all(yc == np.float32(-1.5))       # exactly the bias
    assert stats.var[1] == 0.0 and stats.mean[1] == np.float32(7.25)
    dx, dw, db = fastbn.backward(make_x(rng, x.shape, np.float32), ctx)
    assert np.all(np.isfinite(dx)) and np.isfinite(dw).all() and dw[1] == 0.0


def test_non_contiguous_and_read_only_inputs(rng):
    base = make_x(rng, (6, 4, 10, 12), np.float64)
    for x in (base[:, :, ::2], base[::2], base[:, :, :, 3:9], np.asfortranarray(base),
              base[:, :, ::-1]):
        y, ctx = fastbn.forward(x)
        ref = R.forward(np.ascontiguousarray(x))
        assert_close(y, ref.y, np.float64, "y")
        dy = make_x(rng, x.shape, np.float64)[..., ::-1]       # odd strides for dy too
        dx, _, _ = fastbn.backward(dy, ctx)
        assert_close(dx, R.backward(dy, x, ref.mean, ref.invstd)[0], np.float64, "dx")
    ro = base.copy()
    ro.flags.writeable = False
    y, ctx = fastbn.forward(ro)
    assert_close(y, R.forward(ro).y, np.float64, "y")
    dy = make_x(rng, ro.shape, np.float64)
    dy.flags.writeable = False
    fastbn.backward(dy, ctx)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_out_buffers(rng, layout):
    shape = (4, 6, 5, 5)
    x = make_x(rng, shape, np.float32)
    axis = 1
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    out = np.empty_like(x)                      # empty_like keeps the strides
    y, ctx = fastbn.forward(x, out=out, axis=axis)
    assert y is out
    assert_close(out, R.forward(x).y, np.float32, "y")
    dy = make_x(rng, shape, np.float32)
    dy = np.empty_like(x) if False else dy.copy(order="K")
    dxo = np.empty_like(x)
    dx, _, _ = fastbn.backward(dy, ctx, out=dxo)
    assert dx is dxo
    ref = R.forward(x)
    rdx = R.backward(dy, x, ref.mean, ref.invstd)[0]
    # dx may overwrite dy in place
    dy2 = np.empty_like(x)
    dy2[...] = dy
    dx2, _, _ = fastbn.backward(dy2, ctx, out=dy2)
    assert dx2 is dy2
    assert np.array_equal(dx2, dxo)
    assert_close(dxo, rdx, np.float32, "dx")


def test_in_place_inference(rng):
    x = make_x(rng, (4, 3, 6, 6), np.float32)
    stats = fastbn.RunningStats(3)
    stats.load_state_dict({"running_mean": np.array([0.1, -0.2, 0.3]),
                           "running_var": np.array([0.9, 1.1, 1.3])})
    ref = R.forward(x, None, None, stats.mean, stats.var, training=False)
    y, ctx = fastbn.forward(x, None, None, stats, training=False, out=x)
    assert y is x
    assert_close(x, ref.y, np.float32, "y")
    with pytest.raises(ValueError, match="out"):
        fastbn.forward(x, stats=stats, training=True, out=x)


@pytest.mark.parametrize("momentum", [1.0, 0.0, 0.5])
def test_momentum_extremes(rng, momentum):
    x = make_x(rng, (8, 3, 4, 4), np.float64)
    stats = fastbn.RunningStats(3, momentum=momentum, dtype=np.float64)
    fastbn.forward(x, stats=stats)
    ref = R.forward(x, None, None, np.zeros(3), np.ones(3), momentum=momentum)
    np.testing.assert_allclose(stats.mean, ref.running_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.var, ref.running_var, rtol=1e-12)
    if momentum == 1.0:
        np.testing.assert_allclose(stats.var, np.moveaxis(x, 1, -1).reshape(-1, 3).var(0, ddof=1))


def test_errors_are_clear_and_change_nothing(rng):
    x = make_x(rng, (1, 3, 1, 1), np.float32)
    stats = fastbn.RunningStats(3)
    before = stats.state_dict()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.forward(x, stats=stats)
    y, _ = fastbn.forward(x, stats=stats, training=False)   # inference is fine
    with pytest.raises(ValueError, match="stats"):
        fastbn.forward(x, training=False)
    x = make_x(rng, (4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="weight.*3"):
        fastbn.forward(x, np.ones(4, np.float32), stats=stats)
    with pytest.raises(TypeError, match="weight.*float32.*float64"):
        fastbn.forward(x, np.ones(3, np.float64), stats=stats)
    with pytest.raises(TypeError, match="x: expected dtype"):
        fastbn.forward(x.astype(np.int32), stats=stats)
    with pytest.raises(ValueError, match="x: expected 2 to 5"):
        fastbn.forward(x[0, 0], stats=stats)
    with pytest.raises(ValueError, match="eps"):
        fastbn.forward(x, stats=stats, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        fastbn.forward(x, stats=stats, eps=float("nan"))
    with pytest.raises(ValueError, match="axis"):
        fastbn.forward(x, stats=stats, axis=0)
    with pytest.raises(TypeError, match="stats"):
        fastbn.forward(x, stats=fastbn.RunningStats(3, dtype=np.float64))
    with pytest.raises(ValueError, match="out: expected shape"):
        fastbn.forward(x, stats=stats, out=np.empty((4, 3, 6), np.float32))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable"):
        fastbn.forward(x, stats=stats, out=ro)
    with pytest.raises(TypeError, match="x: expected an array"):
        fastbn.forward(x.tolist())
    after = stats.state_dict()
    for k in before:
        assert np.array_equal(before[k], after[k])
    _, ctx = fastbn.forward(x)
    with pytest.raises(ValueError, match="dy: expected shape"):
        fastbn.backward(x[:2], ctx)
    with pytest.raises(TypeError, match="dy: expected dtype"):
        fastbn.backward(x.astype(np.float64), ctx)
    with pytest.raises(TypeError, match="ctx"):
        fastbn.backward(x, None)


def test_float16_with_float16_weights(rng):
    x = make_x(rng, (4, 3, 6, 6), np.float16)
    w = rng.standard_normal(3).astype(np.float16)
    b = rng.standard_normal(3).astype(np.float16)
    y, ctx = fastbn.forward(x, w, b)
    ref = R.forward(x, w, b)
    assert_close(y, ref.y, np.float16, "y")
    dx, dw, db = fastbn.backward(x, ctx)
    assert dw.dtype == np.float16 and db.dtype == np.float16
    rdx, rdw, rdb = R.backward(x, x, ref.mean, ref.invstd, w)
    assert_close(dw, rdw, np.float16, "dweight")


def test_single_spatial_element_keeps_strides(rng):
    x = make_x(rng, (5, 3, 1, 1), np.float32)
    y, ctx = fastbn.forward(x)
    assert ctx.layout == "nhwc" and y.strides == x.strides
    assert_close(y, R.forward(x).y, np.float32, "y")
