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
    # the README's "variance right to about 1e-7" (var is about 1): a one-pass
    # E[x^2] - E[x]^2 without the shift errs by about 1e-5 on these data
    assert np.max(np.abs(1.0 / ctx.invstd**2 - 1e-5 - (1.0 / ref.invstd**2 - 1e-5))) < 1e-6
    assert np.max(np.abs(stats.var - (1.0 / ref.invstd**2 - 1e-5) * n / (n - 1))) < 1e-6
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
    dy = make_x(rng, x.shape, np.float32)
    dx, dw, db = fastbn.backward(dy, ctx)
    assert np.all(np.isfinite(dx)) and np.isfinite(dw).all() and dw[1] == 0.0
    ref = R.forward(x, w, b, axis=axis)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, axis=axis)
    assert_close(dx, rdx, np.float32, "dx")
    assert_close(dw, rdw, np.float32, "dweight")
    assert_close(db, rdb, np.float32, "dbias")


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
    dx, _, _ = fastbn.backward(dy, ctx)
    ref = R.forward(ro)
    assert_close(dx, R.backward(dy, ro, ref.mean, ref.invstd)[0], np.float64, "dx")


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
    dy = np.empty_like(x)                       # dy in x's memory layout
    dy[...] = make_x(rng, shape, np.float32)
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
    assert_close(dx, rdx, np.float16, "dx")
    assert_close(dw, rdw, np.float16, "dweight")
    assert_close(db, rdb, np.float16, "dbias")


def test_single_spatial_element_keeps_strides(rng):
    x = make_x(rng, (5, 3, 1, 1), np.float32)
    y, ctx = fastbn.forward(x)
    assert ctx.layout == "nhwc" and y.strides == x.strides
    assert_close(y, R.forward(x).y, np.float32, "y")


# ----------------------------------------------------------------------------
# NaN / Inf: per channel, as IEEE arithmetic would

def _channels(a, axis, C):
    """(rows, C) float64 view of a result, channel last."""
    return np.moveaxis(np.asarray(a, np.float64), axis, -1).reshape(-1, C)


NONFINITE_CASES = [
    ((4, 5, 6, 7), 1, "cf"),          # channels-first kernel
    ((4, 5, 6, 7), 1, "cl"),          # channels-last strides, axis=1
    ((4, 6, 7, 5), -1, "cf"),         # channels-last shape
    ((3, 5, 150, 120), 1, "cf"),      # several chunks per channel, threads
    ((64, 30, 30, 5), -1, "cf"),      # many row chunks
    ((300, 5), 1, "cf"),              # rank 2
]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["x-first", "x-last", "dy"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis,layout", NONFINITE_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_non_finite_stays_in_its_channel(rng, shape, axis, layout, dtype, where, value):
    C = 5
    x = make_x(rng, shape, dtype)
    if layout == "cl":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = np.empty_like(x)
    dy[...] = make_x(rng, shape, dtype)
    target = dy if where == "dy" else x
    ch = np.moveaxis(target, axis, -1)[..., 1]          # a view of channel 1
    flat_index = 0 if where == "x-first" else ch.size - 1 if where == "x-last" else ch.size // 2
    ch[np.unravel_index(flat_index, ch.shape)] = value  # x-first: the kernels' shift element
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = np.linspace(0.5, 2.0, C).astype(pdt)
    b = np.linspace(-1.0, 1.0, C).astype(pdt)
    ref_stats = fastbn.RunningStats(C, dtype=pdt)
    for training in (True, False):
        stats = fastbn.RunningStats(C, dtype=pdt)
        y, ctx = fastbn.forward(x, w, b, stats, training=training, axis=axis)
        dx, dw, db = fastbn.backward(dy, ctx)
        got = {"y": _channels(y, axis, C), "dx": _channels(dx, axis, C),
               "dweight": dw[None], "dbias": db[None], "running_mean": stats.mean[None],
               "running_var": stats.var[None], "ctx.mean": ctx.mean[None]}
        bad = {k: ~np.isfinite(np.asarray(v, np.float64)).all(axis=0) for k, v in got.items()}
        for k, flags in bad.items():
            assert not flags[[0, 2, 3, 4]].any(), f"{k}: a non-finite value left channel 1"
        # and the other channels are exactly what clean data gives
        clean = x
        if where != "dy":
            clean = x.copy(order="K")                   # same memory layout, same kernel
            np.moveaxis(clean, axis, -1)[..., 1] = 0
        cy, cctx = fastbn.forward(clean, w, b, ref_stats if not training else None,
                                  training=training, axis=axis)
        if where != "dy":
            assert np.array_equal(_channels(y, axis, C)[:, [0, 2, 3, 4]],
                                  _channels(cy, axis, C)[:, [0, 2, 3, 4]])
        else:
            cdy = dy.copy(order="K")
            np.moveaxis(cdy, axis, -1)[..., 1] = 0
            cdx, cdw, cdb = fastbn.backward(cdy, ctx)
            others = [0, 2, 3, 4]
            assert np.array_equal(_channels(dx, axis, C)[:, others],
                                  _channels(cdx, axis, C)[:, others])
            assert np.array_equal(dw[others], cdw[others])
            assert np.array_equal(db[others], cdb[others])
        # the poisoned channel: as IEEE arithmetic on the formulas would
        if where == "dy":
            assert not np.isfinite(db[1]) and not np.isfinite(dw[1])
            if training:                     # dbias enters every dx of the channel
                assert not np.isfinite(got["dx"][:, 1]).any()
            else:                            # dx = dy * w * invstd, element by element
                assert np.isfinite(got["dx"][:, 1]).sum() == got["dx"].shape[0] - 1
        elif training:                       # the batch mean is NaN/Inf: all of y
            assert np.isnan(got["y"][:, 1]).all()
            # Inf anywhere, the first element too (the kernels' shift: shift_at),
            # gives the channel a mean of that Inf, as PyTorch
            if np.isnan(value):
                assert np.isnan(stats.mean[1]) and np.isnan(ctx.mean[1])
            else:
                assert stats.mean[1] == value and ctx.mean[1] == value
        else:                                # running statistics: only that element
            assert np.isfinite(got["y"][:, 1]).sum() == got["y"].shape[0] - 1


def test_check_finite_refuses_before_the_update(rng):
    x = make_x(rng, (4, 3, 5, 5), np.float32)
    stats = fastbn.RunningStats(3, momentum=None)
    fastbn.forward(x, stats=stats)
    x[2, 1, 3, 3] = np.inf
    before = (stats.mean.tobytes(), stats.var.tobytes(), stats.num_batches_tracked)
    out = np.full_like(x, 5.0)
    with pytest.raises(ValueError, match=r"^x: expected finite values .* got 1 NaN or Inf"):
        fastbn.forward(x, stats=stats, out=out, check_finite=True)
    assert (stats.mean.tobytes(), stats.var.tobytes(), stats.num_batches_tracked) == before
    assert (out == 5.0).all()
    fastbn.forward(x, stats=stats)                   # off by default: propagates
    assert np.isinf(stats.mean[1]) or np.isnan(stats.mean[1])
    assert np.isfinite(stats.mean[[0, 2]]).all()


# ----------------------------------------------------------------------------
# empty batches (N = 0) and zero-size spatial dimensions: as PyTorch 2.13

EMPTY = [((0, 3, 4, 4), 1), ((2, 3, 0, 4), 1), ((0, 3), 1), ((0, 3, 1, 1), 1),
         ((2, 0, 5, 3), -1), ((0, 4, 3), -1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", EMPTY, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_empty_batch(shape, axis, training, dtype):
    C = shape[axis]
    pdt = np.float64 if dtype == np.float64 else np.float32
    x = np.zeros(shape, dtype)
    stats = fastbn.RunningStats(C, dtype=pdt, momentum=None)
    stats.load_state_dict({"running_mean": np.arange(C, dtype=float),
                           "running_var": np.arange(C) + 1.0,
                           "num_batches_tracked": np.int64(2)})
    w = np.ones(C, pdt)
    b = np.zeros(C, pdt)
    y, ctx = fastbn.forward(x, w, b, stats, training=training, axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    # running mean / var are untouched; the batch is counted (as torch.nn.BatchNorm*)
    assert np.array_equal(stats.mean, np.arange(C)) and np.array_equal(stats.var, np.arange(C) + 1)
    assert stats.num_batches_tracked == (3 if training else 2)
    if training:
        assert np.isnan(ctx.mean).all() and np.isnan(ctx.invstd).all()     # mean of nothing
    else:
        assert np.array_equal(ctx.mean, np.arange(C))
    dx, dw, db = fastbn.backward(np.zeros_like(x), ctx)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert np.array_equal(dw, np.zeros(C)) and np.array_equal(db, np.zeros(C))
    assert dw.dtype == pdt
    out = np.empty_like(x)
    assert fastbn.forward(x, stats=stats, training=training, axis=axis, out=out)[0] is out
    fastbn.forward(x, training=True, axis=axis)         # no stats: fine too


def test_empty_batch_matches_torch():
    torch = pytest.importorskip("torch")
    mod = torch.nn.BatchNorm2d(3, momentum=None)
    bn = fastbn.BatchNorm(3, momentum=None)
    rng = np.random.default_rng(0)
    for n in (4, 0, 4):           # an empty batch between two real ones
        x = rng.standard_normal((n, 3, 2, 2)).astype(np.float32) + n
        with torch.no_grad():
            ref = mod(torch.from_numpy(x.copy()))
        y = bn.forward(x)
        assert y.shape == tuple(ref.shape)
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)
    assert bn.stats.num_batches_tracked == int(mod.num_batches_tracked) == 3
    np.testing.assert_allclose(bn.stats.mean, mod.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.stats.var, mod.running_var.numpy(), rtol=1e-6)
    xt = torch.zeros(0, 3, 2, 2, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    torch.nn.functional.batch_norm(xt, None, None, w, bias, training=True).sum().backward()
    _, ctx = fastbn.forward(np.zeros((0, 3, 2, 2), np.float32), np.ones(3, np.float32),
                            np.zeros(3, np.float32))
    _, dw, db = fastbn.backward(np.zeros((0, 3, 2, 2), np.float32), ctx)
    assert np.array_equal(dw, w.grad.numpy()) and np.array_equal(db, bias.grad.numpy())


# ----------------------------------------------------------------------------
# dy layout

def test_dy_in_the_other_layout_is_refused_non_contiguous_dy_is_copied(rng):
    x = make_x(rng, (4, 3, 5, 6), np.float32)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = make_x(rng, x.shape, np.float32)
    dy_cl = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    ref = R.forward(x)
    rdx = R.backward(dy, x, ref.mean, ref.invstd)[0]
    for xx, wrong, right in ((x, dy_cl, dy), (x_cl, dy, dy_cl)):
        _, ctx = fastbn.forward(xx)
        with pytest.raises(ValueError, match=r"^dy: expected x's memory layout"):
            fastbn.backward(wrong, ctx)
        assert_close(fastbn.backward(right, ctx)[0], rdx, np.float32, "dx")
        # neither layout: copied once, any strides
        odd = np.empty((4, 3, 5, 12), np.float32)[..., ::2]
        odd[...] = dy
        assert_close(fastbn.backward(odd, ctx)[0], rdx, np.float32, "dx (strided dy)")
    # (N, C, 1, 1): both layouts are the same memory, nothing to refuse
    x1 = make_x(rng, (5, 3, 1, 1), np.float32)
    _, ctx = fastbn.forward(x1)
    fastbn.backward(np.ascontiguousarray(x1.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), ctx)
