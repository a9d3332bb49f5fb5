"""Checks of the GPU backend, shared by tests/test_gpu.py (a real GPU, cupy
arrays) and tests/test_gpu_emulated.py (the kernels run on the host by
tests/cuda_emu, numpy arrays standing in for device memory).

A check takes a ``Device``: how to put numpy data on the device and read it
back, how to make RunningStats there, and how to run the CPU backend for a
comparison.

Tolerances: the reference table (fastbn._reference.TOLERANCE), plus bfloat16,
which only the GPU has: one bfloat16 unit in the last place of 1 (2**-7), as
the float16 entry is about one float16 ulp of 1.

What is compared with what:
- y, dx: the data dtype's entry, against the float64 reference;
- running statistics, dweight, dbias: the parameter dtype's entry;
- ctx.mean / ctx.invstd: the data dtype's entry.  The GPU computes the
  statistics with float arithmetic per element for float32 / float16 /
  bfloat16 data (merged in double), so they are accurate to the data's
  precision, not to float64 as the CPU's.
- the backward is diffed against the reference backward given the forward's
  own ctx.mean / ctx.invstd: the reference backward takes the statistics as
  inputs, and with them the backward kernels are held to the table (their
  sums are double).  The difference of the forward statistics is checked
  above; through sum(dy) it would otherwise show in dweight.
- against the CPU backend: the same table (both sides are within it of the
  reference, in practice far closer to each other).
"""

import contextlib

import numpy as np

import fastbn
from fastbn import _reference as R

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:          # pragma: no cover - ml_dtypes comes with jax / cupy 14
    BF16 = None

TOLERANCE = dict(R.TOLERANCE)
if BF16 is not None:
    TOLERANCE[BF16] = (2.0**-7, 2.0**-7)

C = 5
SHAPES = {2: (37, C), 3: (6, C, 13), 4: (4, C, 7, 3), 5: (3, C, 4, 3, 5)}
DTYPES = [np.float16, np.float32, np.float64]


def violation(got, ref, dtype):
    """max(|got - ref| / (atol + rtol |ref|)), NaN where ref is NaN (as
    fastbn._reference.max_violation, with the bfloat16 entry)."""
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.size == 0:
        return 0.0
    if (np.isnan(got) != np.isnan(ref)).any():
        return np.inf
    with np.errstate(invalid="ignore"):
        err = np.where(np.isnan(ref), 0.0, np.abs(got - ref))
    return float(np.max(err / (atol + rtol * np.abs(np.nan_to_num(ref)))))


def close(got, ref, dtype, what):
    v = violation(got, ref, dtype)
    assert v <= 1.0, (f"{what}: max error is {v:.3g} x the {np.dtype(dtype).name} "
                      f"tolerance {TOLERANCE[np.dtype(dtype)]}")


def pdtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def make_x(rng, shape, dtype, offset=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


class Device:
    """How the checks reach a GPU.  Subclasses: a real one (cupy) and the
    emulator (numpy)."""

    name = "gpu"

    def put(self, a):
        """A C-contiguous numpy array on the device."""
        raise NotImplementedError

    def get(self, a):
        """A device array as numpy."""
        raise NotImplementedError

    def running_stats(self, C, **kw):
        raise NotImplementedError

    @contextlib.contextmanager
    def cpu(self):
        """Run fastbn's CPU backend inside (for comparisons)."""
        yield

    def layout_input(self, x0, layout):
        """(device array, axis, numpy array of the same layout) from a
        channels-first numpy array.  layouts: "cf" channels-first, axis=1;
        "cl-strided" the same logical shape with channels-last strides, axis=1;
        "cl" channels-last shape, axis=-1."""
        if layout == "cf":
            return self.put(np.ascontiguousarray(x0)), 1, x0
        perm = (0, *range(2, x0.ndim), 1)
        nhwc = np.ascontiguousarray(x0.transpose(perm))
        if layout == "cl-strided":
            inv = tuple(np.argsort(perm))
            return self.put(nhwc).transpose(inv), 1, nhwc.transpose(inv)
        return self.put(nhwc), -1, nhwc


def forward_backward_case(dev, rng, mode, layout, rank, dtype, affine, shape=None,
                          offset=3.0, scale=2.0):
    """One op x layout x rank x dtype x affine case (the matrix of
    tests/test_kernels.py) against the reference and the CPU backend."""
    shape = SHAPES[rank] if shape is None else shape
    C_ = shape[1]
    x0 = make_x(rng, shape, dtype, offset=offset, scale=scale)
    x, axis, xnp = dev.layout_input(x0, layout)
    pdt = pdtype(dtype)
    w = rng.standard_normal(C_).astype(pdt) if affine != "none" else None
    b = rng.standard_normal(C_).astype(pdt) if affine == "both" else None
    rm0 = rng.standard_normal(C_)
    rv0 = rng.uniform(0.5, 3.0, C_)
    training = mode != "infer"
    use_stats = mode != "train-nostats"

    def stats_on(device_stats):
        if not use_stats:
            return None
        st = dev.running_stats(C_, momentum=0.3, dtype=pdt) if device_stats else \
            fastbn.RunningStats(C_, momentum=0.3, dtype=pdt)
        st.load_state_dict({"running_mean": rm0, "running_var": rv0,
                            "num_batches_tracked": np.int64(4)})
        return st

    stats = stats_on(True)
    rm = None if stats is None else dev.get(stats._mean).astype(np.float64)
    rv = None if stats is None else dev.get(stats._var).astype(np.float64)
    wd = None if w is None else dev.put(w)
    bd = None if b is None else dev.put(b)

    y, ctx = fastbn.forward(x, wd, bd, stats, training=training, axis=axis)
    ref = R.forward(xnp, w, b, rm, rv, training=training, momentum=0.3,
                    num_batches_tracked=4, axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype and y.strides == x.strides
    expected_layout = "nchw" if layout == "cf" and len(shape) > 2 else "nhwc"
    assert ctx.layout == expected_layout
    yh = dev.get(y)
    close(yh, ref.y, dtype, "y")
    close(dev.get(ctx.mean), ref.mean, dtype, "ctx.mean")
    close(dev.get(ctx.invstd), ref.invstd, dtype, "ctx.invstd")
    if stats is not None:
        close(dev.get(stats._mean), ref.running_mean, pdt, "running_mean")
        close(dev.get(stats._var), ref.running_var, pdt, "running_var")
        assert stats.num_batches_tracked == ref.num_batches_tracked

    dy0 = make_x(rng, shape, dtype)
    dy, _, dynp = dev.layout_input(dy0, layout)
    dx, dw, db = fastbn.backward(dy, ctx)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.strides == x.strides
    gmean = dev.get(ctx.mean)
    ginvstd = dev.get(ctx.invstd)
    rdx, rdw, rdb = R.backward(dynp, xnp, gmean, ginvstd, w, training=training, axis=axis)
    dxh = dev.get(dx)
    close(dxh, rdx, dtype, "dx")
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype
        close(dev.get(dw), rdw, pdt, "dweight")
    if b is None:
        assert db is None
    else:
        close(dev.get(db), rdb, pdt, "dbias")

    # the CPU backend on the same data
    with dev.cpu():
        cstats = stats_on(False)
        cy, cctx = fastbn.forward(xnp, w, b, cstats, training=training, axis=axis)
        cdx, cdw, cdb = fastbn.backward(dynp, cctx)
    close(yh, cy, dtype, "y vs CPU")
    close(dxh, cdx, dtype, "dx vs CPU")
    if stats is not None:
        close(dev.get(stats._mean), cstats.mean, pdt, "running_mean vs CPU")
        close(dev.get(stats._var), cstats.var, pdt, "running_var vs CPU")
    if w is not None and mode == "infer":        # same statistics on both sides
        close(dev.get(dw), cdw, pdt, "dweight vs CPU")
    if b is not None:
        close(dev.get(db), cdb, pdt, "dbias vs CPU")


def running_stats_case(dev, rng, shape, axis, dtype, momentum, steps=5):
    """Several training steps: running statistics against the reference
    iterated, and against the CPU backend after the same steps."""
    C_ = shape[axis]
    pdt = pdtype(dtype)
    st = dev.running_stats(C_, momentum=momentum, dtype=pdt)
    rm, rv, count = np.zeros(C_), np.ones(C_), 0
    xs = [make_x(rng, shape, dtype, offset=1.0 + k, scale=1.0 + 0.5 * k) for k in range(steps)]
    for x in xs:
        fastbn.forward(dev.put(x), stats=st, axis=axis)
        ref = R.forward(x, running_mean=rm, running_var=rv, momentum=momentum,
                        num_batches_tracked=count, axis=axis)
        rm, rv, count = ref.running_mean, ref.running_var, ref.num_batches_tracked
    assert st.num_batches_tracked == steps
    close(dev.get(st._mean), rm, pdt, "running_mean")
    close(dev.get(st._var), rv, pdt, "running_var")
    with dev.cpu():
        cst = fastbn.RunningStats(C_, momentum=momentum, dtype=pdt)
        for x in xs:
            fastbn.forward(x, stats=cst, axis=axis)
    close(dev.get(st._mean), cst.mean, pdt, "running_mean vs CPU")
    close(dev.get(st._var), cst.var, pdt, "running_var vs CPU")


def determinism_case(dev, rng, shape, axis, dtype):
    """The same call twice gives the same bits (fixed merge order)."""
    x = dev.put(make_x(rng, shape, dtype, offset=2.0))
    dy = dev.put(make_x(rng, shape, dtype))
    C_ = shape[axis]
    pdt = pdtype(dtype)
    w = dev.put(rng.standard_normal(C_).astype(pdt))
    b = dev.put(rng.standard_normal(C_).astype(pdt))
    runs = []
    for _ in range(2):
        st = dev.running_stats(C_, dtype=pdt)
        y, ctx = fastbn.forward(x, w, b, st, axis=axis)
        dx, dw, db = fastbn.backward(dy, ctx)
        runs.append([dev.get(a) for a in (y, ctx.mean, ctx.invstd, st._mean, st._var, dx, dw,
                                          db)])
    for a, b_ in zip(*runs):
        assert a.tobytes() == b_.tobytes()


def large_case(dev, rng, shape, axis, dtype, offset=-2.0):
    """Shapes that split channels over blocks (channels-first, small C) or use
    several channel tiles and row splits (channels-last)."""
    x = make_x(rng, shape, dtype, offset=offset)
    C_ = shape[axis]
    pdt = pdtype(dtype)
    w = rng.standard_normal(C_).astype(pdt)
    b = rng.standard_normal(C_).astype(pdt)
    st = dev.running_stats(C_, dtype=pdt)
    y, ctx = fastbn.forward(dev.put(x), dev.put(w), dev.put(b), st, axis=axis)
    ref = R.forward(x, w, b, np.zeros(C_), np.ones(C_), axis=axis)
    close(dev.get(y), ref.y, dtype, "y")
    close(dev.get(ctx.mean), ref.mean, dtype, "ctx.mean")
    close(dev.get(st._var), ref.running_var, pdt, "running_var")
    dy = make_x(rng, shape, dtype)
    dx, dw, db = fastbn.backward(dev.put(dy), ctx)
    rdx, rdw, rdb = R.backward(dy, x, dev.get(ctx.mean), dev.get(ctx.invstd), w, axis=axis)
    close(dev.get(dx), rdx, dtype, "dx")
    close(dev.get(dw), rdw, pdt, "dweight")
    close(dev.get(db), rdb, pdt, "dbias")


def kernel_case(dev, gpu, rng, layout, dtype, training=True, affine=True, momentum=0.1,
                shape=None, guard=0):
    """Call the backend's entry points directly (as _api would) on kernel
    views, with every output allocated by the test: covers dtypes the public
    API does not take yet (bfloat16).  ``guard`` > 0 surrounds every output
    with that many sentinel elements, checked afterwards (emulator: catches
    out-of-bounds writes)."""
    dtype = np.dtype(dtype)
    pdt = pdtype(dtype)
    if shape is None:
        shape = (6, C, 40) if layout == "nchw" else (150, C)
    C_ = shape[1]
    x = make_x(rng, shape, np.float64, offset=1.5, scale=2.0).astype(dtype)
    dy = make_x(rng, shape, np.float64).astype(dtype)
    w = rng.uniform(0.5, 2.0, C_).astype(pdt) if affine else None
    b = rng.standard_normal(C_).astype(pdt) if affine else None
    rm0 = rng.standard_normal(C_).astype(pdt)
    rv0 = rng.uniform(0.5, 2.0, C_).astype(pdt)
    outs = []

    def out(n_or_shape, dt):
        shape_ = (n_or_shape,) if isinstance(n_or_shape, int) else tuple(n_or_shape)
        n = int(np.prod(shape_))
        buf = np.empty(n + 2 * guard, dt)
        buf.view(np.uint8)[...] = 0x5A
        host = buf.copy()
        d = dev.put(buf)
        outs.append((d, host))
        return d[guard:guard + n].reshape(shape_)

    xd, dyd = dev.put(x), dev.put(dy)
    wd = None if w is None else dev.put(w)
    bd = None if b is None else dev.put(b)
    rm, rv = dev.put(rm0.copy()), dev.put(rv0.copy())
    y = out(shape, dtype)
    mean, invstd = out(C_, np.float64), out(C_, np.float64)
    if training:
        getattr(gpu, "forward_train_" + layout)(xd, y, wd, bd, mean, invstd, rm, rv, momentum,
                                                1e-5, 0)
    else:
        getattr(gpu, "forward_infer_" + layout)(xd, y, wd, bd, mean, invstd, rm, rv, 1e-5, 0)
    dx = out(shape, dtype)
    dw = None if w is None else out(C_, pdt)
    db = None if b is None else out(C_, pdt)
    getattr(gpu, "backward_" + layout)(xd, dyd, dx, mean, invstd, wd, dw, db, training, 0)

    # the reference, with the channel axis where the kernel view has it
    axis = 1
    ref = R.forward(x, w, b, rm0.astype(np.float64), rv0.astype(np.float64), training=training,
                    momentum=momentum, axis=axis)
    close(dev.get(y), ref.y, dtype, "y")
    close(dev.get(mean), ref.mean, dtype, "mean")
    close(dev.get(invstd), ref.invstd, dtype, "invstd")
    if training:
        close(dev.get(rm), ref.running_mean, pdt, "running_mean")
        close(dev.get(rv), ref.running_var, pdt, "running_var")
    else:
        assert np.array_equal(dev.get(rm), rm0) and np.array_equal(dev.get(rv), rv0)
    rdx, rdw, rdb = R.backward(dy, x, dev.get(mean), dev.get(invstd), w, training=training,
                               axis=axis)
    close(dev.get(dx), rdx, dtype, "dx")
    if w is not None:
        close(dev.get(dw), rdw, pdt, "dweight")
        close(dev.get(db), rdb, pdt, "dbias")
    if guard:
        for d, host in outs:
            got = dev.get(d).view(np.uint8)
            n = guard * d.dtype.itemsize
            assert np.array_equal(got[:n], host.view(np.uint8)[:n]), "write before an output"
            assert np.array_equal(got[-n:], host.view(np.uint8)[-n:]), "write after an output"


def nonfinite_case(dev, rng, shape, axis, dtype, where, value):
    """NaN / Inf stay in their channel; the GPU agrees with the CPU on which
    values are not finite and, elsewhere, with the table."""
    C_ = shape[axis]
    x = make_x(rng, shape, dtype)
    dy = make_x(rng, shape, dtype)
    target = dy if where == "dy" else x
    ch = np.moveaxis(target, axis, -1)[..., 1]
    idx = 0 if where == "x-first" else ch.size - 1 if where == "x-last" else ch.size // 2
    ch[np.unravel_index(idx, ch.shape)] = value
    pdt = pdtype(dtype)
    w = np.linspace(0.5, 2.0, C_).astype(pdt)
    b = np.linspace(-1.0, 1.0, C_).astype(pdt)
    for training in (True, False):
        st = dev.running_stats(C_, dtype=pdt)
        y, ctx = fastbn.forward(dev.put(x), dev.put(w), dev.put(b), st, training=training,
                                axis=axis)
        dx, dw, db = fastbn.backward(dev.put(dy), ctx)
        got = [dev.get(a) for a in (y, dx, dw, db, st._mean, st._var)]
        with dev.cpu():
            cst = fastbn.RunningStats(C_, dtype=pdt)
            cy, cctx = fastbn.forward(x, w, b, cst, training=training, axis=axis)
            cdx, cdw, cdb = fastbn.backward(dy, cctx)
        want = [cy, cdx, cdw, cdb, cst.mean, cst.var]
        names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
        for g, c, name in zip(got, want, names):
            g = np.asarray(g, np.float64)
            c = np.asarray(c, np.float64)
            assert np.array_equal(np.isfinite(g), np.isfinite(c)), f"{name}: non-finite pattern"
            keep = np.isfinite(c)
            dt = dtype if name in ("y", "dx") else pdt
            if name in ("dweight",) and training:
                continue              # depends on the statistics' precision (see module doc)
            close(np.where(keep, g, 0.0), np.where(keep, c, 0.0), dt, name + " vs CPU")
