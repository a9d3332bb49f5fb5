"""The plain lane (``_cpu.forward_plain`` / ``_cpu.backward_plain``): plain
numpy calls skip _api's general path.  It must give the same bits as the
general path, take exactly the calls it is meant for, and hand everything
else (including every invalid call) to the general path untouched.

``check_finite=True`` always takes the general path, which makes it the
control: it checks the input, then runs the same kernels.
"""

import numpy as np
import pytest

import fastbn
from fastbn import _cpu

CASES = [
    ((6, 5, 4, 3), 1, np.float32),          # channels-first kernel
    ((6, 4, 3, 5), -1, np.float32),         # channels-last, axis=-1
    ((6, 4, 3, 5), 3, np.float64),          # channels-last, axis=ndim-1
    ((40, 7), 1, np.float16),               # rank 2: (M, C)
    ((9, 5, 1, 1), 1, np.float32),          # S == 1: (M, C) memory
    ((3, 4, 2, 3, 5), 1, np.float64),       # rank 5
    ((64, 16, 8, 8), 1, np.float32),        # several channel blocks
]


def _pdtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _pair(rng, shape, axis, dtype, affine, training, with_out):
    """(lane result, general result) of forward + backward on the same data."""
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(_pdtype(dtype)) if affine else None
    b = rng.standard_normal(C).astype(_pdtype(dtype)) if affine else None
    results = []
    for general in (False, True):
        stats = fastbn.RunningStats(C, dtype=_pdtype(dtype))
        stats.mean[...] = 0.25
        stats.var[...] = 1.5
        out = np.full_like(x, 7) if with_out else None
        dxo = np.full_like(x, 9) if with_out else None
        y, ctx = fastbn.forward(x, w, b, stats, training=training, axis=axis, out=out,
                                check_finite=general)
        assert bool(ctx.plain) is (not general)
        dx, dw, db = fastbn.backward(dy, ctx, out=dxo, check_finite=general)
        if with_out:
            assert y is out and dx is dxo
        results.append((y, ctx.mean, ctx.invstd, stats.mean, stats.var, stats.num_batches_tracked,
                        dx, dw, db, ctx.layout))
    return results


@pytest.mark.parametrize("shape,axis,dtype", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("with_out", [False, True], ids=["alloc", "out"])
def test_lane_gives_the_general_paths_bits(rng, shape, axis, dtype, training, affine,
                                           with_out):
    lane, general = _pair(rng, shape, axis, dtype, affine, training, with_out)
    for got, want in zip(lane, general):
        if got is None or isinstance(got, (int, str)):
            assert got == want
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)      # bit for bit (NaN-free data)


def test_lane_in_place_forms(rng):
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    stats = fastbn.RunningStats(3)
    ref, _ = fastbn.forward(x, stats=stats, training=False, check_finite=True)
    xc = x.copy()
    y, ctx = fastbn.forward(xc, stats=stats, training=False, out=xc)      # out=x
    assert y is xc and ctx.plain and ctx.x is None
    np.testing.assert_array_equal(y, ref)
    # backward in place (out=dy) after a plain training forward
    _, ctx = fastbn.forward(x, stats=stats)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want, _, _ = fastbn.backward(dy, ctx, check_finite=True)
    dx, _, _ = fastbn.backward(dy, ctx, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, want)


@pytest.mark.parametrize("make", [
    lambda x: x[:, :, ::2],                         # not contiguous
    lambda x: x.astype(x.dtype.newbyteorder()),     # byte-swapped (general path: TypeError)
    lambda x: np.ma.masked_array(x),                # subclass (general path: TypeError)
    lambda x: np.asfortranarray(x),                 # Fortran order
], ids=["strided", "swapped", "masked", "fortran"])
def test_lane_declines_unusual_x(rng, make):
    x = make(rng.standard_normal((4, 3, 6, 5)).astype(np.float32))
    assert _cpu.forward_plain(x, None, None, None, None, None, 0.0, 1e-5, True, 1, 1) is None
    try:
        _, ctx = fastbn.forward(x)
    except TypeError:
        return
    assert not ctx.plain


@pytest.mark.parametrize("kw", [
    dict(weight=np.ones(3, np.float64)),            # not x's parameter dtype
    dict(weight=np.ones(6, np.float32)[::2]),       # strided
    dict(bias=np.ones(4, np.float32)),              # wrong length (general: ValueError)
    dict(axis=2),                                   # not a channel axis (general: ValueError)
    dict(out=np.empty((4, 3, 6, 5), np.float64)),   # wrong dtype (general: TypeError)
    dict(out=np.empty((4, 3, 6, 5), np.float32)[..., ::-1]),
    dict(training=False),                           # inference without stats
])
def test_lane_declines_unusual_arguments(rng, kw):
    """The lane returns None (nothing written); the general path then serves or
    raises as it always did."""
    x = rng.standard_normal((4, 3, 6, 5)).astype(np.float32)
    args = dict(weight=None, bias=None, out=None, training=True, axis=1)
    args.update(kw)
    out = args["out"]
    before = None if out is None else out.copy()
    hit = _cpu.forward_plain(x, out, args["weight"], args["bias"], None, None, 0.0, 1e-5,
                             args["training"], args["axis"], 1)
    assert hit is None
    if out is not None:
        np.testing.assert_array_equal(out, before)


def test_lane_declines_overlap_and_keeps_out(rng):
    x = rng.standard_normal((4, 3, 6, 5)).astype(np.float32)
    buf = np.zeros(x.size + 8, np.float32)
    out = buf[4:4 + x.size].reshape(x.shape)
    xs = buf[:x.size].reshape(x.shape)
    xs[...] = x
    keep = buf.copy()
    assert _cpu.forward_plain(xs, out, None, None, None, None, 0.0, 1e-5, True, 1, 1) is None
    np.testing.assert_array_equal(buf, keep)
    with pytest.raises(ValueError, match="out:"):
        fastbn.forward(xs, out=out)
    # out=x while training: the general path's error, nothing written
    with pytest.raises(ValueError, match="out:"):
        fastbn.forward(x, out=x)


def test_backward_general_path_after_a_plain_forward(rng):
    """A plain forward keeps x itself; a backward that the lane declines (here a
    non-contiguous dy) views it for the kernels as the general path needs."""
    x = rng.standard_normal((5, 4, 6, 7)).astype(np.float32)
    _, ctx = fastbn.forward(x, np.ones(4, np.float32), None)
    assert ctx.plain
    dy = rng.standard_normal((5, 4, 6, 14)).astype(np.float32)[..., ::2]
    got = fastbn.backward(dy, ctx)
    want = fastbn.backward(np.ascontiguousarray(dy), ctx)
    for g, w in zip(got, want):
        if w is not None:
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="dy:"):          # still the general path's checks
        fastbn.backward(dy[:, :2], ctx)
