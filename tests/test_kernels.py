"""Every mode x layout x rank x dtype x affine option against the float64 reference."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R

from .conftest import assert_close, make_x, param_dtype

C = 5
SHAPES = {2: (37, C), 3: (6, C, 13), 4: (4, C, 7, 3), 5: (3, C, 4, 3, 5)}
DTYPES = [np.float16, np.float32, np.float64]


def _layout_input(x, layout):
    """(array to pass, axis, logical channels-first array for the reference).

    layouts: "cf" channels-first contiguous with axis=1; "cl-strided" the same
    logical shape with channels-last strides (axis=1); "cl" channels-last shape
    with axis=-1."""
    if layout == "cf":
        return x, 1
    perm = (0, *range(2, x.ndim), 1)
    nhwc = np.ascontiguousarray(x.transpose(perm))
    if layout == "cl-strided":
        return nhwc.transpose(np.argsort(perm)), 1
    return nhwc, -1


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["cf", "cl-strided", "cl"])
@pytest.mark.parametrize("mode", ["train-stats", "train-nostats", "infer"])
def test_forward_backward_match_reference(rng, mode, layout, rank, dtype, affine):
    x0 = make_x(rng, SHAPES[rank], dtype, offset=3.0, scale=2.0)
    x, axis = _layout_input(x0, layout)
    pdt = param_dtype(dtype)
    w = rng.standard_normal(C).astype(pdt) if affine != "none" else None
    b = rng.standard_normal(C).astype(pdt) if affine == "both" else None
    rm0 = rng.standard_normal(C)
    rv0 = rng.uniform(0.5, 3.0, C)
    stats = None
    if mode != "train-nostats":
        stats = fastbn.RunningStats(C, momentum=0.3, dtype=pdt)
        stats.load_state_dict({"running_mean": rm0, "running_var": rv0,
                               "num_batches_tracked": np.int64(4)})
        rm0 = stats.mean.astype(np.float64)       # as rounded into the buffers
        rv0 = stats.var.astype(np.float64)
    training = mode != "infer"

    y, ctx = fastbn.forward(x, w, b, stats, training=training, axis=axis)
    ref = R.forward(x, w, b, rm0 if stats else None, rv0 if stats else None,
                    training=training, momentum=0.3, num_batches_tracked=4, axis=axis)

    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.strides == x.strides                  # output keeps the input's layout
    assert ctx.layout == ("nchw" if layout == "cf" and rank > 2 else "nhwc")
    assert_close(y, ref.y, dtype, "y")
    assert_close(ctx.mean, ref.mean, np.float64, "ctx.mean")
    assert_close(ctx.invstd, ref.invstd, np.float64, "ctx.invstd")
    if stats is not None:
        assert_close(stats.mean, ref.running_mean, pdt, "running_mean")
        assert_close(stats.var, ref.running_var, pdt, "running_var")
        assert stats.num_batches_tracked == ref.num_batches_tracked

    dy = np.empty_like(x)                          # dy in x's memory layout
    dy[...] = make_x(rng, x.shape, dtype)
    dx, dw, db = fastbn.backward(dy, ctx)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, training=training, axis=axis)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.strides == x.strides
    assert_close(dx, rdx, dtype, "dx")
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype
        assert_close(dw, rdw, pdt, "dweight")
    if b is None:
        assert db is None
    else:
        assert_close(db, rdb, pdt, "dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [
    ((2, 1, 150, 120), 1),      # C = 1, several chunks per channel: split path
    ((3, 2, 101, 97), 1),       # C below the thread count
    ((5, 70, 9, 11), 1),        # many channels: per-channel fused path
    ((40, 9, 11, 600), -1),     # channels-last, more than one channel block
    ((4000, 3), 1),             # rank 2, many row chunks
    ((37, 2048), 1),            # rows of 8 KiB and more: statistics in 8 row parts
])
def test_large_shapes_match_reference(rng, shape, axis, dtype):
    x = make_x(rng, shape, dtype, offset=-2.0)
    Cn = shape[axis]
    w = rng.standard_normal(Cn).astype(dtype)
    b = rng.standard_normal(Cn).astype(dtype)
    stats = fastbn.RunningStats(Cn, dtype=dtype)
    y, ctx = fastbn.forward(x, w, b, stats, axis=axis)
    ref = R.forward(x, w, b, np.zeros(Cn), np.ones(Cn), axis=axis)
    assert_close(y, ref.y, dtype, "y")
    assert_close(stats.var, ref.running_var, dtype, "running_var")
    dy = make_x(rng, shape, dtype)
    dx, dw, db = fastbn.backward(dy, ctx)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, axis=axis)
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dweight")
    assert_close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((2, 3, 5, 7), 1), ((2, 5, 7, 3), -1), ((2, 40), 1),
                                        ((16, 16, 8, 8), 1), ((64, 300), 1)])
@pytest.mark.parametrize("offset", [1e4, -300.0])
def test_training_dx_far_from_zero(rng, shape, axis, dtype, offset):
    """Training dx of float32 / float16 subtracts the mean (float16: the mean
    rounded to float32) before the b term, dx = a dy + (b (x - mean) + k);
    data whose mean is 1e4 or 1e6 of its spread, at batch size 2 where dx
    nearly cancels, meet the tolerance."""
    scale = 1e-2 if dtype == np.float32 else 1.0
    x = make_x(rng, shape, dtype, offset=offset, scale=scale)
    Cn = shape[axis]
    w = rng.standard_normal(Cn).astype(np.float32)
    y, ctx = fastbn.forward(x, w, None, axis=axis)
    dy = make_x(rng, shape, dtype)
    dx, dw, _ = fastbn.backward(dy, ctx)
    ref = R.forward(x, w, None, np.zeros(Cn), np.ones(Cn), axis=axis)
    rdx, rdw, _ = R.backward(dy, x, ref.mean, ref.invstd, w, axis=axis)
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, np.float32, "dweight")


@pytest.mark.parametrize("axis,shape", [
    (1, (2, 7, 1)), (1, (4, 5, 9)),     # runs of 1 and short runs (fbn_dx8)
    (1, (1, 6, 64)),                    # streamed: the span writers
    (-1, (2, 256)), (-1, (2, 2048)),    # streamed: fbn_cl_dx_nt; else fbn_tew
    (-1, (4, 64)), (-1, (2, 40)),       # streamed: columns in registers (8, 5 vectors)
    (-1, (6, 3, 24)),
])
@pytest.mark.parametrize("threshold", [0, 1 << 62], ids=["streamed", "cached"])
def test_float32_training_dx_one_ulp_apart(stream_threshold, axis, shape, threshold):
    """Every float32 training dx kernel keeps x - mean apart from the constant
    where the mean is far from zero.  Each even channel holds two float32
    neighbours from -1e4 up (a spread of one ulp: the mean is 2e7 of its
    standard deviations from zero), dy lies in the span of 1 and xhat, and eps
    is 1e-12: dx is what is left of a cancellation by about 2.5e5.  Folding
    the mean into the constant, a dy + (b x + (k - b mean)), left dx 2e-4 off
    (1.95x the float32 tolerance; the hypothesis 'thorough' profile found it);
    the centred form is far inside.  Odd channels hold 0.75 and 1.25 (their
    mean 4 standard deviations from zero: folded), so that the calls mix both
    forms."""
    stream_threshold(threshold)
    C = shape[axis]
    n = int(np.prod(shape)) // C
    far = np.arange(C) % 2 == 0
    lo = np.where(far, np.float32(-1e4) + 3 * np.arange(C), 0.75).astype(np.float32)
    hi = np.where(far, np.nextafter(lo, np.float32(np.inf)), lo + 0.5).astype(np.float32)
    s = np.where(np.arange(n) % 2 == 1, 1, -1)[:, None]              # +-1, balanced
    rows = shape if axis == -1 else (shape[0], *shape[2:], C)
    x = np.where(s > 0, hi, lo).astype(np.float32).reshape(rows)
    dy = np.broadcast_to(0.5 + s, (n, C)).astype(np.float32).reshape(rows)   # 1.5, -0.5
    if axis == 1:
        x, dy = (np.ascontiguousarray(np.moveaxis(a, -1, 1)) for a in (x, dy))
    w = np.where(np.arange(C) % 2 == 0, 1.5, -0.75).astype(np.float32)
    shift = np.where(far, 1e4, 0.0).reshape((C,) + (1,) * (x.ndim - 1 - axis % x.ndim))
    xs = x.astype(np.float64) + shift                     # exact in float64
    ref = R.forward(xs, w, eps=1e-12, axis=axis)
    rdx, _, _ = R.backward(dy, xs, ref.mean, ref.invstd, w, axis=axis)
    assert np.abs(np.compress(far, rdx, axis)).max() < (         # it cancels
        1e-3 * np.abs(dy).max() * ref.invstd.max())
    for nt in (1, 2):
        _, ctx = fastbn.forward(x, w, None, eps=1e-12, axis=axis, num_threads=nt)
        dx, _, _ = fastbn.backward(dy, ctx, num_threads=nt)
        assert_close(dx, rdx, np.float32, "dx")


@pytest.mark.parametrize("axis,shape", [
    (1, (1, 3, 5)), (1, (4, 5, 9)),     # runs (fbn_dx8)
    (1, (1, 6, 80)),                    # streamed: the span writers
    (-1, (5, 40)), (-1, (10, 256)),     # fbn_tew, fbn_cl_dx_nt
    (-1, (5, 2100)),                    # channel tiles (nhwc_tiled)
])
@pytest.mark.parametrize("threshold", [0, 1 << 62], ids=["streamed", "cached"])
def test_float32_training_dx_about_the_unrounded_mean(rng, stream_threshold, axis, shape,
                                                       threshold):
    """The batch mean of float32 data far from zero with a spread of a few
    ulps rounds to ulp(mean) in float64 (9e-13 near 1e4), a relative error of
    2e-9 in every x - mean here, which the training dx's cancellation
    amplifies (dy random, eps 1e-12, no weight: one value an ulp below four
    others at -1e4 gave dx 2.0x the float32 tolerance off; the hypothesis
    'thorough' profile found it).  The forward keeps that rounding error
    (ctx.mean_lo) and the backward works about mean + mean_lo.  Channel c
    sits at -1e4 + 3c; the reference gets each channel's values less its
    base, exactly."""
    stream_threshold(threshold)
    C = shape[axis]
    n = int(np.prod(shape)) // C
    base = (np.float32(-1e4) + 3 * np.arange(C)).astype(np.float32)
    below = np.nextafter(base, np.float32(-np.inf))
    rows = shape if axis == -1 else (shape[0], *shape[2:], C)
    x = np.where((np.arange(n) % 5 == 4)[:, None], below, base).astype(np.float32).reshape(rows)
    dy = rng.standard_normal(rows).astype(np.float32)
    xs = x.astype(np.float64) - base          # each channel's values 0 and -ulp, exactly
    if axis == 1:
        x, dy, xs = (np.ascontiguousarray(np.moveaxis(a, -1, 1)) for a in (x, dy, xs))
    ref = R.forward(xs, eps=1e-12, axis=axis)
    rdx, _, _ = R.backward(dy, xs, ref.mean, ref.invstd, axis=axis)
    for nt in (1, 2):
        _, ctx = fastbn.forward(x, eps=1e-12, axis=axis, num_threads=nt)
        assert ctx.mean_lo is not None and np.any(ctx.mean_lo != 0)
        dx, _, _ = fastbn.backward(dy, ctx, num_threads=nt)
        assert_close(dx, rdx, np.float32, "dx")


@pytest.mark.parametrize("axis,shape", [
    (1, (4, 3, 5, 5)), (1, (64, 3, 40, 40)),    # channels-first: runs, spans
    (-1, (50, 9)), (-1, (300, 256)),            # channels-last: fbn_tew, a block of rows
    (-1, (8, 2100)),                            # channel tiles (nhwc_tiled)
])
@pytest.mark.parametrize("threshold", [0, 1 << 62], ids=["streamed", "cached"])
def test_float64_training_y_about_the_unrounded_mean(rng, stream_threshold, axis, shape,
                                                     threshold):
    """float64 data at 1e4 with a spread of 1e-3: the batch mean rounds to
    ulp(1e4) = 1.8e-12, an error of up to 9e-13 in every x - mean and up to
    1.8e-9 in y once scaled by w invstd (w up to 2, invstd 1e3), where the
    float64 tolerance is 1e-12 (before the fix: 240-550x it).  The forward's
    constant takes the rounding error back (b - a mean_lo), so y is about the
    unrounded mean, as the backward is (ctx.mean_lo), and so is the
    reference's (test_reference: against 60-digit decimals)."""
    stream_threshold(threshold)
    C = shape[axis]
    x = 1e4 + 1e-3 * rng.standard_normal(shape)
    w = rng.uniform(0.5, 2.0, C)
    b = rng.standard_normal(C)
    ref = R.forward(x, w, b, axis=axis)
    for nt in (1, 2):
        y, ctx = fastbn.forward(x, w, b, axis=axis, num_threads=nt)
        assert ctx.mean_lo is not None and np.any(ctx.mean_lo != 0)
        assert_close(y, ref.y, np.float64, "y")


STREAM_BYTES = 16 << 20     # fastbn/_cpu.pyx FASTBN_STREAM_BYTES (channels-last forward: half)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout,S,C", [("nchw", 33, 7), ("nchw", 1000, 7),
                                        ("nhwc", 9, 5), ("nhwc", 1, 2051)])
@pytest.mark.parametrize("misalign", [3], ids=lambda m: f"shift{m}")
def test_streamed_output_has_the_same_bits(rng, dtype, layout, S, C, misalign):
    """At the default threshold: outputs of 16 MiB or more (channels-last
    forward: 8 MiB) are written by the streaming writers (aligned vectors
    across run or row boundaries); each
    element must get the bits the ordinary path gives.  Inference is
    element-wise, so the same call on small slices of the batch (below the
    threshold) is the control.  misalign shifts y off the 64-byte grid by that
    many elements.  (Every op, shape and alignment, with the threshold moved:
    test_streaming_and_ordinary_stores_give_the_same_bits.)"""
    dtype = np.dtype(dtype)
    N = STREAM_BYTES // (1 if layout == "nchw" else 2) // (C * S * dtype.itemsize) + 1
    shape = (N, C, S) if layout == "nchw" else (N, S, C)
    axis = 1 if layout == "nchw" else -1
    x = make_x(rng, shape, dtype, offset=1.5)
    stats = fastbn.RunningStats(C, dtype=param_dtype(dtype))
    stats.mean[...] = rng.standard_normal(C)
    stats.var[...] = rng.uniform(0.5, 2, C)
    w = rng.uniform(0.5, 2, C).astype(param_dtype(dtype))
    b = rng.standard_normal(C).astype(param_dtype(dtype))
    buf = np.empty(x.size + 64, dtype)
    y = buf[misalign:misalign + x.size].reshape(x.shape)
    for nt in (1, 2):
        y[...] = 0
        _, ctx = fastbn.forward(x, w, b, stats, training=False, out=y, num_threads=nt,
                                axis=axis)
        assert ctx.layout == layout
        step = max(1, (1 << 20) // (C * S * dtype.itemsize))
        for n0 in range(0, N, step):
            part, _ = fastbn.forward(x[n0:n0 + step], w, b, stats, training=False, axis=axis)
            np.testing.assert_array_equal(y[n0:n0 + step], part)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis", [1, -1])
def test_streamed_training_forward_matches_reference(rng, dtype, axis):
    dtype = np.dtype(dtype)
    C, S = 5, 49
    N = STREAM_BYTES // (C * S * dtype.itemsize) + 3
    x = make_x(rng, (N, C, S) if axis == 1 else (N, S, C), dtype, offset=-2.0)
    w = rng.uniform(0.5, 2, C).astype(param_dtype(dtype))
    b = rng.standard_normal(C).astype(param_dtype(dtype))
    ys = [fastbn.forward(x, w, b, num_threads=nt, axis=axis)[0] for nt in (1, 2)]
    np.testing.assert_array_equal(ys[0], ys[1])
    ref = R.forward(x, w, b, np.zeros(C), np.ones(C), axis=axis)
    assert_close(ys[0], ref.y, dtype, "y")


@pytest.fixture
def stream_threshold():
    """Set the streaming-store threshold for one test (restored after)."""
    from fastbn import _cpu

    old = _cpu._set_stream_bytes(16 << 20)
    _cpu._set_stream_bytes(old)
    yield _cpu._set_stream_bytes
    _cpu._set_stream_bytes(old)


def _store_case(rng, shape, axis, dtype):
    """(dtype, C, x, dy, weight, bias) for the store-kind tests below."""
    dtype = np.dtype(dtype)
    C = shape[axis]
    x = make_x(rng, shape, dtype, offset=0.75)
    dy = make_x(rng, shape, dtype)
    w = rng.uniform(0.5, 2, C).astype(param_dtype(dtype))
    b = rng.standard_normal(C).astype(param_dtype(dtype))
    return dtype, C, x, dy, w, b


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((3, 5, 8, 40), 1), ((6, 5, 3, 70), -1),
                                        ((9, 3, 2048), -1), ((8200, 64), 1)])
def test_outputs_off_the_element_grid_take_ordinary_stores(rng, stream_threshold, dtype,
                                                            shape, axis):
    """y and dx at an address that is not a multiple of the itemsize (numpy
    allows such views: aligned=False).  The streaming writers store aligned
    vectors from an element-aligned head, so there a streamed output faulted
    (SIGSEGV, every op, layout and dtype); it takes ordinary stores, with the
    bits of an aligned output."""
    dtype, C, x, dy, w, b = _store_case(rng, shape, axis, dtype)

    def off_grid():
        raw = np.zeros(x.nbytes + 64, np.uint8)
        a = raw[1:1 + x.nbytes].view(dtype).reshape(shape)
        assert not a.flags.aligned
        return a

    stream_threshold(0)                                  # every output streamed
    for nt in (1, 2):
        got, want = [], []
        for out, res in ((off_grid, got), (lambda: None, want)):
            stats = fastbn.RunningStats(C, dtype=param_dtype(dtype))
            y, ctx = fastbn.forward(x, w, b, stats, axis=axis, out=out(), num_threads=nt)
            dx, _, _ = fastbn.backward(dy, ctx, out=out(), num_threads=nt)
            yi, ictx = fastbn.forward(x, w, b, stats, axis=axis, training=False, out=out(),
                                      num_threads=nt)
            edx, _, _ = fastbn.backward(dy, ictx, out=out(), num_threads=nt)
            res += [y.copy(), dx.copy(), yi.copy(), edx.copy()]
        for g, r in zip(got, want):
            assert g.tobytes() == r.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [
    ((3, 5, 8, 4), 1), ((4, 3, 7, 7), 1), ((2, 9, 11, 3), 1), ((5, 4, 100), 1),
    ((2, 6, 5, 5), 1), ((4, 3, 2, 2), 1),              # runs shorter than the span minimum
    ((6, 5, 3, 7), -1), ((4, 3, 3, 16), -1), ((3, 2, 2, 37), -1), ((40, 3), 1),
    ((64, 16, 8, 8), 1), ((64, 8, 8, 16), -1),          # several blocks / row blocks
    ((5, 7, 32), -1),           # an odd row (since fbn_cl_ntv, coefficients in
                                # registers; (4, 8, 200) below takes fbn_cl_nt2)
    ((7, 5, 256), -1),          # the same with 512-byte float16 rows, a line a step
                                # (fbn_cl_nt2l_f16)
    ((3, 5, 7, 48), -1), ((2, 9, 64), -1), ((3, 7, 24), -1),   # coefficients in registers
    ((3, 7, 96), -1), ((5, 3, 128), -1),    # (fbn_cl_ntv: periods of 3, 4, 3, 6 and 8
                                            # float32 vectors)
    ((2, 3, 1100), -1),                                 # dx columns larger than L1
    ((9, 3, 2048), -1),         # rows of 8 KiB and more: four quarter-blocks at once
                                # (fbn_cl_nt4) and the rows left over
    ((3, 100, 250), -1),        # 1000-byte float32 rows: four rows a step below the
                                # threshold (in cache), one at a time above
    ((8200, 64), 1),            # eval-mode backward in one loop (fbn_evf), nine row
                                # chunks shared by 2 threads, lines across chunk ends
    ((80, 9, 49), 1),           # channels-first eval-mode dx run by run after each
                                # run's sums (fbn_span_ag), vectors across runs, the
                                # channels split 4 / 5 between 2 threads (35,280
                                # elements: from 32 Ki a second thread joins)
])
@pytest.mark.parametrize("misalign", [0, 1, 5], ids=lambda m: f"shift{m}")
def test_streaming_and_ordinary_stores_give_the_same_bits(rng, stream_threshold, dtype,
                                                          shape, axis, misalign):
    """Every kernel that can stream its output (forward element-wise, training
    dx) gives the same bits with streaming stores (threshold 0) as with
    ordinary ones (threshold out of reach), for y and dx at any alignment,
    run lengths below and above the span writers' minimum, 1 and 2 threads.
    The threshold also sets the channels-last row step (fbn_rstep).

    Eval-mode backward too (dx = a dy, which streams through the forward's
    writers as (dy - (+0)) a + (-0)): with weights of both signs and zeros of
    both signs in dy, its dx keeps the sign of a dy's zeros, bit for bit."""
    dtype, C, x, dy, w, b = _store_case(rng, shape, axis, dtype)
    wn = (w * np.where(np.arange(C) % 3 == 1, -1, 1)).astype(w.dtype)   # both signs
    dz = dy.copy()
    dz.flat[::5] = 0.0
    dz.flat[2::7] = -0.0
    results = []
    # out of reach (the channels-last eval-mode backward in two phases), 0
    # (everything streamed), and three times x's bytes: the channels-last
    # eval-mode backward then runs its sums and dx in one loop with ordinary
    # stores (dx below the streaming threshold), and the channels-last
    # training dx takes ordinary stores a row a step (fbn_rstep: x, y and dy
    # outgrow the cache)
    for threshold in (1 << 62, 0, 3 * x.nbytes):
        stream_threshold(threshold)
        for nt in (1, 2):
            stats = fastbn.RunningStats(C, dtype=param_dtype(dtype))
            buf = np.zeros(3 * x.size + 48, dtype)
            y = buf[misalign:misalign + x.size].reshape(shape)
            dx = buf[x.size + 16 + misalign:2 * x.size + 16 + misalign].reshape(shape)
            edx = buf[2 * x.size + 32 + misalign:3 * x.size + 32 + misalign].reshape(shape)
            _, ctx = fastbn.forward(x, w, b, stats, axis=axis, out=y, num_threads=nt)
            fastbn.backward(dy, ctx, out=dx, num_threads=nt)
            yi, ictx = fastbn.forward(x, wn, b, stats, axis=axis, training=False,
                                      num_threads=nt)
            _, edw, edb = fastbn.backward(dz, ictx, out=edx, num_threads=nt)
            _, nctx = fastbn.forward(x, None, None, stats, axis=axis, training=False,
                                     num_threads=nt)
            ndx, _, _ = fastbn.backward(dz, nctx, num_threads=nt)
            results.append((y.copy(), dx.copy(), yi, edx.copy(), edw, edb, ndx))
            zero = dz == 0
            a_neg = np.broadcast_to(np.signbit(wn).reshape([-1 if d == axis % x.ndim else 1
                                                            for d in range(x.ndim)]), shape)
            np.testing.assert_array_equal(np.signbit(edx[zero]),
                                          np.signbit(dz[zero]) ^ a_neg[zero])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout,shape", [
    ("nchw", (3, 5, 40)), ("nchw", (4, 70, 196)), ("nchw", (2, 3, 9000)),
    ("nhwc", (37, 5)), ("nhwc", (300, 64)), ("nhwc", (2000, 256)), ("nhwc", (40, 2048)),
])
@pytest.mark.parametrize("threshold", [0, 1 << 62], ids=["streamed", "cached"])
def test_eval_backward_sums_are_the_training_sums(rng, stream_threshold, dtype, layout,
                                                  shape, threshold):
    """The eval-mode backward reduces each chunk and writes its dx in one pass
    (nchw_eval_fused / nhwc_eval_fused); its dweight and dbias come from the
    same chunk partials as the training backward's, so with the same mean and
    invstd they are the same bits, at 1 and 2 threads."""
    from fastbn import _cpu

    stream_threshold(threshold)
    C = shape[1]
    pdt = param_dtype(dtype)
    x = make_x(rng, shape, dtype, offset=2.0)
    dy = make_x(rng, shape, dtype)
    mean = rng.standard_normal(C) + 2.0
    invstd = rng.uniform(0.5, 2.0, C)
    w = rng.standard_normal(C).astype(pdt)
    kernel = _cpu.backward_nchw if layout == "nchw" else _cpu.backward_nhwc
    out = {}
    for training in (True, False):
        for nt in (1, 2):
            dx, dw, db = np.empty_like(x), np.empty(C, pdt), np.empty(C, pdt)
            kernel(x, dy, dx, mean, invstd, w, dw, db, training, nt)
            out[training, nt] = (dx, dw, db)
    a = (w.astype(np.float64) * invstd).astype(
        np.float64 if dtype == np.float64 else np.float32)
    want_dx = (dy * a.reshape((1, C, 1) if layout == "nchw" else (1, C))).astype(dtype)
    for nt in (1, 2):
        np.testing.assert_array_equal(out[False, nt][1].view(np.uint8),
                                      out[True, 1][1].view(np.uint8))
        np.testing.assert_array_equal(out[False, nt][2].view(np.uint8),
                                      out[True, 1][2].view(np.uint8))
        np.testing.assert_array_equal(out[False, nt][0], want_dx)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("C", [8, 24, 48, 64])
def test_channel_sums_do_not_depend_on_the_tile_path(rng, dtype, C):
    """Channels-last sums: each channel is summed in one lane, in an order set by
    the rows alone.  A tile of at most 64 channels in whole groups of 8 keeps its
    sums in registers (fbn_tsumsr); one more channel sends the same rows down the
    other paths (under 64: each group walks the rows on its own; 64 and more: the
    sums in L1).  The first C channels must come out with the same bits either
    way: statistics, output, gradient sums and dx.  1003 rows: one row chunk for
    both widths, with rows left over after the K parts."""
    dtype = np.dtype(dtype)
    M = 1003
    x = make_x(rng, (M, C + 1), dtype, offset=3.0)
    dy = make_x(rng, (M, C + 1), dtype)
    w = rng.uniform(0.5, 2, C + 1).astype(param_dtype(dtype))
    b = rng.standard_normal(C + 1).astype(param_dtype(dtype))
    xs, dys = np.ascontiguousarray(x[:, :C]), np.ascontiguousarray(dy[:, :C])
    for nt in (1, 2):
        y1, ctx1 = fastbn.forward(x, w, b, axis=-1, num_threads=nt)
        y0, ctx0 = fastbn.forward(xs, w[:C], b[:C], axis=-1, num_threads=nt)
        dx1, dw1, db1 = fastbn.backward(dy, ctx1, num_threads=nt)
        dx0, dw0, db0 = fastbn.backward(dys, ctx0, num_threads=nt)
        for got, want in [(ctx0.mean, ctx1.mean[:C]), (ctx0.invstd, ctx1.invstd[:C]),
                          (y0, y1[:, :C]), (dw0, dw1[:C]), (db0, db1[:C]),
                          (dx0, dx1[:, :C])]:
            np.testing.assert_array_equal(got, want)


def _at_offset(shape, dtype, offset):
    """An empty array whose data starts `offset` bytes past a 4 KiB boundary."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(n + 8192, np.uint8)
    start = (-buf.ctypes.data) % 4096 + offset
    return buf[start:start + n].view(dtype).reshape(shape)


def _placed(a, offset):
    """A copy of a whose data starts `offset` bytes past a 4 KiB boundary."""
    out = _at_offset(a.shape, a.dtype, offset)
    out[...] = a
    return out


def _placed_inputs(rng, shape, dtype, offset, axis=-1):
    """x (offset by `offset`), dy, weight and bias for channels on `axis`, x
    and dy on a 4 KiB boundary: (x as made, x, dy, w, b)."""
    C = shape[axis]
    x0 = make_x(rng, shape, dtype, offset=offset)
    pdt = param_dtype(dtype)
    w = rng.uniform(0.5, 2, C).astype(pdt)
    b = rng.standard_normal(C).astype(pdt)
    return x0, _placed(x0, 0), _placed(make_x(rng, shape, dtype), 0), w, b


def _run_placed(x, dy, w, b, y_off, axis=-1):
    """Forward (training, then inference) of x and backward of dy, channels on
    `axis`, one thread, into y and dx that start y_off bytes past a 4 KiB
    boundary: [y, dx, dweight, dbias] of each mode."""
    C = x.shape[axis]
    out = []
    for training in (True, False):
        stats = fastbn.RunningStats(C, dtype=w.dtype)
        stats.var[...] = 1.5
        y = _at_offset(x.shape, x.dtype, y_off)
        dx = _at_offset(x.shape, x.dtype, y_off)
        _, ctx = fastbn.forward(x, w, b, stats, training=training, out=y, axis=axis,
                                num_threads=1)
        _, dw, db = fastbn.backward(dy, ctx, out=dx, num_threads=1)
        out += [y.copy(), dx.copy(), dw, db]
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_outputs_do_not_depend_on_placement_modulo_4k(rng, dtype):
    """Channels-last rows of 4 KiB, in cache: the element-wise loops take rows
    two at a time instead of four when y starts up to two lines after x (or dy)
    modulo 4 KiB (fbn_set_crowd), and four otherwise.  37 rows: pairs and a
    last single row.  Every output must have the same bits either way, and
    match the reference."""
    dtype = np.dtype(dtype)
    C = 4096 // dtype.itemsize
    shape = (37, C)
    x0, x, dy, w, b = _placed_inputs(rng, shape, dtype, 1.5)
    results = [_run_placed(x, dy, w, b, y_off)
               for y_off in (0, 64, 1024)]                 # crowded, crowded, not
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b_.view(np.uint8))
    ref = R.forward(x0.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                    training=True, axis=-1)
    assert_close(results[0][0], ref.y, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [
    (7, 5, 100),        # one span, coefficients loaded per vector (fbn_cl_nt)
    (4, 8, 200),        # two half-blocks at once (fbn_cl_nt2; float16 fbn_cl_nt2l_f16)
    (3, 7, 96),         # coefficients in registers (fbn_cl_ntv)
    (9, 3, 2048),       # four quarter-blocks at once (fbn_cl_nt4) and rows left over
    (2, 3, 1024),       # 4 KiB float32 rows: columns placed against y (col_phase)
], ids=lambda s: "x".join(map(str, s)))
def test_streamed_forward_walks_either_way_with_the_same_bits(rng, stream_threshold,
                                                              dtype, shape):
    """The channels-last streaming writers walk down the addresses when y
    starts up to 2 KiB after x modulo 4 KiB, and up otherwise
    (fbn_walk_down), with their heads and tails apart.  At every placement
    (y from 0 to a line short of 4 KiB after x, at misaligned elements too)
    every output of the forward and backward in both modes (the eval-mode dx
    is the forward's writer on dy) must give the bits of the ordinary-store
    pass, and y match the reference."""
    dtype = np.dtype(dtype)
    x0, x, dy, w, b = _placed_inputs(rng, shape, dtype, 0.75)
    stream_threshold(1 << 62)
    want = _run_placed(x, dy, w, b, 0)
    stream_threshold(0)
    for y_off in (0, 2, 16, 64 + 6, 1024, 2040, 2048, 3000, 4032, 4094):
        y_off -= y_off % dtype.itemsize
        for a, b_ in zip(want, _run_placed(x, dy, w, b, y_off)):
            np.testing.assert_array_equal(a.view(np.uint8), b_.view(np.uint8))
    ref = R.forward(x0.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                    training=True, axis=-1)
    assert_close(want[0], ref.y, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [
    (5, 7, 40),         # runs of 40: vectors straddle runs at varying lanes
    (3, 4, 32),         # the shortest streamed runs (SPAN_MIN)
    (2, 3, 1000),       # long runs, several lines each
], ids=lambda s: "x".join(map(str, s)))
def test_channels_first_streamed_forward_walks_either_way_with_the_same_bits(
        rng, stream_threshold, dtype, shape):
    """The channels-first streaming writer (fbn_span_nt) walks down the
    addresses when y starts just after x modulo 4 KiB (up to 2 KiB; float16,
    a whole line a step, up to 256 bytes), and up otherwise, with the head
    and tail apart and vectors across run boundaries.  At every placement all
    outputs of the forward and backward in both modes (and the eval-mode dx
    without affine parameters, the writer on dy) must give the bits of the
    ordinary-store pass, and y match the reference."""
    dtype = np.dtype(dtype)
    x0, x, dy, w, b = _placed_inputs(rng, shape, dtype, 0.75, axis=1)

    def run(y_off):
        plain = fastbn.RunningStats(shape[1], dtype=w.dtype)
        _, ctx = fastbn.forward(x, stats=plain, training=False, num_threads=1)
        dx = _at_offset(shape, dtype, y_off)
        fastbn.backward(dy, ctx, out=dx, num_threads=1)
        return _run_placed(x, dy, w, b, y_off, axis=1) + [dx]

    stream_threshold(1 << 62)
    want = run(0)
    stream_threshold(0)
    for y_off in (0, 2, 16, 64 + 6, 200, 1024, 2040, 2048, 3000, 4032, 4094):
        y_off -= y_off % dtype.itemsize
        for a, b_ in zip(want, run(y_off)):
            np.testing.assert_array_equal(a.view(np.uint8), b_.view(np.uint8))
    ref = R.forward(x0.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                    training=True, axis=1)
    assert_close(want[0], ref.y, dtype)
