"""fastbn against torch.nn.functional.batch_norm / torch.nn.BatchNormNd (CPU).

torch is a second opinion, not the oracle (that is fastbn._reference), so the
tolerances here are looser than the reference table: both sides round.
float16 is compared with torch computing in float32 on the same
float16-rounded inputs.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastbn  # noqa: E402

TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
DTYPES = [np.float16, np.float32, np.float64]
TORCH_DTYPE = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
               np.dtype(np.float64): torch.float64}
C = 3
SHAPES = {2: (13, C), 3: (4, C, 7), 4: (3, C, 5, 4), 5: (2, C, 3, 4, 5)}
# layouts: "cf" channels-first contiguous, axis=1; "cl" the same logical NC... shape
# with torch channels_last / channels_last_3d memory (axis=1, passed straight
# in); "nhwc" a channels-last shape with axis=-1.
LAYOUTS = [(r, lay) for r in (2, 3, 4, 5) for lay in ("cf", "cl", "nhwc")
           if not (r == 2 and lay != "cf")]


def _id(v):
    if isinstance(v, tuple):
        return f"rank{v[0]}-{v[1]}"
    if isinstance(v, type) or isinstance(v, np.dtype):
        return np.dtype(v).name
    return None


def pdtype(dtype):
    """Parameter / statistics dtype that fastbn uses for a data dtype."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def rng_for(*key):
    import zlib
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def tt(a):
    """A torch tensor owning a copy of numpy array ``a``."""
    return torch.from_numpy(np.array(a, copy=True))


def cf_to_layout(t, layout):
    """(tensor to give fastbn, axis) from a contiguous channels-first tensor."""
    if layout == "cf":
        return t, 1
    if layout == "cl":
        if t.ndim == 4:
            out = t.contiguous(memory_format=torch.channels_last)
            assert out.is_contiguous(memory_format=torch.channels_last)
        elif t.ndim == 5:
            out = t.contiguous(memory_format=torch.channels_last_3d)
            assert out.is_contiguous(memory_format=torch.channels_last_3d)
        else:   # rank 3: NCL shape with NLC strides
            out = t.transpose(1, 2).contiguous().transpose(1, 2)
        return out, 1
    return t.movedim(1, -1).contiguous(), -1


def to_cf(t, axis):
    """The channels-first logical view of a fastbn input/output."""
    return t if axis == 1 else t.movedim(-1, 1)


def same_layout(a, b):
    """Same shape and the same strides on every axis longer than 1 (the strides
    of length-1 axes are meaningless and fastbn may choose them differently:
    an (N, C, 1, 1) input takes the (M, C) path)."""
    assert a.shape == b.shape
    sa = [s for s, n in zip(a.stride(), a.shape) if n > 1]
    sb = [s for s, n in zip(b.stride(), b.shape) if n > 1]
    assert sa == sb, (a.stride(), b.stride(), tuple(a.shape))
    formats = [torch.contiguous_format]
    formats += {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(a.ndim, [])
    for fmt in formats:
        assert a.is_contiguous(memory_format=fmt) == b.is_contiguous(memory_format=fmt), fmt


def close(got, ref, dtype, what=""):
    tol = TOL[np.dtype(dtype)]
    g = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    r = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float64)
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol, err_msg=what)


def data(rng, shape, dtype, offset=1.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def params(rng, affine, dtype):
    if not affine:
        return None, None
    pdt = pdtype(dtype)
    return (tt(rng.uniform(0.5, 2.0, C).astype(pdt)), tt(rng.standard_normal(C).astype(pdt)))


def make_stats(rng, dtype):
    """(RunningStats with random state, running_mean tensor, running_var tensor)
    holding the same (rounded) values."""
    pdt = pdtype(dtype)
    rm = rng.standard_normal(C).astype(pdt)
    rv = rng.uniform(0.5, 3.0, C).astype(pdt)
    st = fastbn.RunningStats(C, momentum=0.1, dtype=pdt)
    st.load_state_dict({"running_mean": rm, "running_var": rv,
                        "num_batches_tracked": np.int64(2)})
    return st, tt(rm), tt(rv)


def up(t):
    """torch computes float16 cases in float32 on the same rounded values."""
    if t is None:
        return None
    return t.float() if t.dtype == torch.float16 else t


# ----------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rank_layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_torch(training, rank_layout, dtype, affine):
    rank, layout = rank_layout
    rng = rng_for("fwd", training, rank, layout, np.dtype(dtype).name, affine)
    x_cf = tt(data(rng, SHAPES[rank], dtype))
    x, axis = cf_to_layout(x_cf, layout)
    w, b = params(rng, affine, dtype)
    st, rm, rv = make_stats(rng, dtype)
    rm0, rv0 = rm.clone(), rv.clone()

    y, ctx = fastbn.forward(x, w, b, st, training=training, axis=axis)
    ref = F.batch_norm(up(x_cf), rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)

    assert isinstance(y, torch.Tensor)
    assert y.dtype == x.dtype
    same_layout(y, x)
    close(to_cf(y, axis), ref, dtype, "y")
    if training:
        # torch updated rm/rv in place with the same momentum rule
        assert not torch.equal(rm, rm0)
        close(torch.from_numpy(st.mean), rm, dtype, "running_mean")
        close(torch.from_numpy(st.var), rv, dtype, "running_var")
        assert st.num_batches_tracked == 3
    else:
        assert torch.equal(torch.from_numpy(st.mean), rm0)
        assert torch.equal(torch.from_numpy(st.var), rv0)
        assert st.num_batches_tracked == 2


@pytest.mark.parametrize("dtype", [np.float16], ids=_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_forward_matches_torch_half(training, dtype):
    """Also against torch's own half-precision CPU batch_norm (where supported)."""
    rng = rng_for("half", training)
    x = tt(data(rng, (4, C, 6, 5), dtype))
    w, b = params(rng, True, dtype)
    st, rm, rv = make_stats(rng, dtype)
    try:
        ref = F.batch_norm(x, rm, rv, w, b, training=training)
    except RuntimeError as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch has no half CPU batch_norm here: {e}")
    assert ref.dtype == torch.float16
    y, _ = fastbn.forward(x, w, b, st, training=training)
    assert y.dtype == torch.float16
    close(y, ref, dtype, "y vs torch half")


# ----------------------------------------------------------------------------
# running statistics over several steps, against the torch module

TORCH_BN = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=_id)
@pytest.mark.parametrize("momentum", [0.1, 1.0, None], ids=["m0.1", "m1.0", "mNone"])
@pytest.mark.parametrize("rank_layout", LAYOUTS, ids=_id)
def test_running_stats_after_steps_match_torch(rank_layout, momentum, dtype):
    rank, layout = rank_layout
    rng = rng_for("steps", rank, layout, momentum, np.dtype(dtype).name)
    tdt = TORCH_DTYPE[np.dtype(dtype)]
    mod = getattr(torch.nn, TORCH_BN[rank])(C, momentum=momentum, dtype=tdt).train()
    st = fastbn.RunningStats(C, momentum=momentum, dtype=dtype)
    for step in range(4):
        # a different offset per step so the cumulative average is not trivial
        x_cf = tt(data(rng, SHAPES[rank], dtype, offset=step - 1.0, scale=1.0 + step))
        x, axis = cf_to_layout(x_cf, layout)
        y, _ = fastbn.forward(x, stats=st, axis=axis)
        with torch.no_grad():
            ref = mod(x_cf)
        close(to_cf(y, axis), ref, dtype, f"y step {step}")
    close(st.mean, mod.running_mean, dtype, "running_mean")
    close(st.var, mod.running_var, dtype, "running_var")
    assert st.num_batches_tracked == int(mod.num_batches_tracked) == 4
    # and both now agree in eval
    x_cf = tt(data(rng, SHAPES[rank], dtype))
    x, axis = cf_to_layout(x_cf, layout)
    y, _ = fastbn.forward(x, stats=st, axis=axis, training=False)
    with torch.no_grad():
        ref = mod.eval()(x_cf)
    close(to_cf(y, axis), ref, dtype, "eval y")


def test_momentum_none_uses_loaded_count():
    """Cumulative average continues from a loaded num_batches_tracked, as torch does."""
    rng = rng_for("cma-load")
    mod = torch.nn.BatchNorm2d(C, momentum=None)
    with torch.no_grad():
        for _ in range(3):
            mod(tt(data(rng, (4, C, 3, 3), np.float32)))
    st = fastbn.RunningStats(C, momentum=None)
    st.load_state_dict({k: v for k, v in mod.state_dict().items() if k != "weight" and k != "bias"})
    assert st.num_batches_tracked == 3
    for _ in range(2):
        x = tt(data(rng, (4, C, 3, 3), np.float32, offset=5.0))
        fastbn.forward(x, stats=st)
        with torch.no_grad():
            mod(x)
    close(st.mean, mod.running_mean, np.float32)
    close(st.var, mod.running_var, np.float32)
    assert st.num_batches_tracked == int(mod.num_batches_tracked) == 5


# ----------------------------------------------------------------------------
# backward against autograd

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rank_layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_autograd(training, rank_layout, dtype, affine):
    rank, layout = rank_layout
    rng = rng_for("bwd", training, rank, layout, np.dtype(dtype).name, affine)
    x_cf = tt(data(rng, SHAPES[rank], dtype))
    dy_cf = tt(data(rng, SHAPES[rank], dtype, offset=0.3, scale=1.0))
    x, axis = cf_to_layout(x_cf, layout)
    dy, _ = cf_to_layout(dy_cf, layout)
    w, b = params(rng, affine, dtype)
    st, rm, rv = make_stats(rng, dtype)

    y, ctx = fastbn.forward(x, w, b, st, training=training, axis=axis)
    dx, dw, db = fastbn.backward(dy, ctx)

    xg = up(x_cf).clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True) if affine else None
    bg = b.clone().requires_grad_(True) if affine else None
    ref = F.batch_norm(xg, rm, rv, wg, bg, training=training, eps=1e-5)
    ref.backward(up(dy_cf))

    close(to_cf(y, axis), ref, dtype, "y")
    assert isinstance(dx, torch.Tensor)
    assert dx.dtype == x.dtype
    same_layout(dx, x)
    close(to_cf(dx, axis), xg.grad, dtype, "dx")
    if affine:
        assert isinstance(dw, torch.Tensor) and isinstance(db, torch.Tensor)
        assert dw.dtype == w.dtype and db.dtype == b.dtype
        close(dw, wg.grad, dtype, "dweight")
        close(db, bg.grad, dtype, "dbias")
    else:
        assert dw is None and db is None


# ----------------------------------------------------------------------------
# odd sizes

ODD = [
    ((2, 1, 97), 1),          # C = 1, long spatial
    ((1, 3, 97), 1),          # N = 1
    ((5, 3, 1, 1), 1),        # spatial 1 (the (M, C) path)
    ((3, 3, 3, 3), 1),
    ((2, 1, 1, 97), 1),
    ((2, 3, 1, 97), "cl"),    # channels_last, odd spatial
    ((3, 1, 3, 3), "cl"),     # channels_last, C = 1
    ((1, 3, 1, 1, 97), "cl3d"),
    ((97, 3), 1),
    ((2, 1), 1),              # n = 2 per channel, C = 1
    ((3, 97, 1), -1),         # NLC with C = 1
    ((2, 1, 3, 3), -1),       # NHWC, C = 3, W = 1
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=_id)
@pytest.mark.parametrize("shape,kind", ODD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_sizes_match_torch(training, shape, kind, dtype):
    rng = rng_for("odd", training, shape, kind, np.dtype(dtype).name)
    xt = tt(data(rng, shape, dtype))
    dyt = tt(data(rng, shape, dtype, offset=-0.2, scale=0.7))
    if kind == "cl":            # dy in x's memory layout, as backward requires
        cl = torch.channels_last
        x, dy, axis = xt.contiguous(memory_format=cl), dyt.contiguous(memory_format=cl), 1
    elif kind == "cl3d":
        cl = torch.channels_last_3d
        x, dy, axis = xt.contiguous(memory_format=cl), dyt.contiguous(memory_format=cl), 1
    else:
        x, dy, axis = xt, dyt, kind
    x_cf, dy_cf = to_cf(xt, axis), to_cf(dyt, axis)
    Cn = x_cf.shape[1]
    pdt = pdtype(dtype)
    w = tt(rng.uniform(0.5, 2.0, Cn).astype(pdt))
    b = tt(rng.standard_normal(Cn).astype(pdt))
    st = fastbn.RunningStats(Cn, dtype=pdt)
    st.load_state_dict({"running_mean": rng.standard_normal(Cn).astype(pdt),
                        "running_var": rng.uniform(0.5, 2, Cn).astype(pdt)})
    rm, rv = tt(st.mean), tt(st.var)

    y, ctx = fastbn.forward(x, w, b, st, training=training, axis=axis)
    dx, dw, db = fastbn.backward(dy, ctx)

    xg = x_cf.clone().requires_grad_(True)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = F.batch_norm(xg, rm, rv, wg, bg, training=training)
    ref.backward(dy_cf)
    same_layout(y, x)
    same_layout(dx, x)
    close(to_cf(y, axis), ref, dtype, "y")
    close(st.mean, rm, dtype, "running_mean")
    close(st.var, rv, dtype, "running_var")
    close(to_cf(dx, axis), xg.grad, dtype, "dx")
    close(dw, wg.grad, dtype, "dweight")
    close(db, bg.grad, dtype, "dbias")


def test_n_equals_one_raises_like_torch():
    x = tt(np.arange(1, 4, dtype=np.float32).reshape(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.forward(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x, None, None, training=True)
    # inference with n == 1 is fine for both
    st = fastbn.RunningStats(3)
    y, _ = fastbn.forward(x, stats=st, training=False)
    close(y, F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False), np.float32)


# ----------------------------------------------------------------------------
# the layer, trained side by side with torch.nn.BatchNorm2d

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_layer_trains_like_torch_batchnorm2d(momentum, channels_last):
    rng = rng_for("layer", momentum, channels_last)
    Cn, shape, lr = 4, (3, 4, 5, 6), 0.1
    bn = fastbn.BatchNorm(Cn, momentum=momentum)
    mod = torch.nn.BatchNorm2d(Cn, momentum=momentum)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = tt(data(rng, shape, np.float32, offset=step, scale=1 + step)).contiguous(memory_format=fmt)
        dy = tt(data(rng, shape, np.float32, offset=0.1, scale=0.5)).contiguous(memory_format=fmt)
        y = bn.forward(x)
        dx = bn.backward(dy)
        xg = x.clone().requires_grad_(True)
        ref = mod(xg)
        mod.zero_grad()
        ref.backward(dy)
        assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
        assert y.stride() == x.stride() and dx.stride() == x.stride()
        close(y, ref, np.float32, f"y step {step}")
        close(dx, xg.grad, np.float32, f"dx step {step}")
        close(bn.grad_weight, mod.weight.grad, np.float32, f"dweight step {step}")
        close(bn.grad_bias, mod.bias.grad, np.float32, f"dbias step {step}")
        # the same SGD step on both sides, each with its own gradients
        bn.weight -= lr * bn.grad_weight
        bn.bias -= lr * bn.grad_bias
        with torch.no_grad():
            mod.weight -= lr * mod.weight.grad
            mod.bias -= lr * mod.bias.grad
        close(bn.weight, mod.weight, np.float32, "weight")
        close(bn.bias, mod.bias, np.float32, "bias")
    close(bn.stats.mean, mod.running_mean, np.float32, "running_mean")
    close(bn.stats.var, mod.running_var, np.float32, "running_var")
    assert bn.stats.num_batches_tracked == int(mod.num_batches_tracked) == 3
    bn.eval()
    mod.eval()
    x = tt(data(rng, shape, np.float32)).contiguous(memory_format=fmt)
    with torch.no_grad():
        close(bn.forward(x), mod(x), np.float32, "eval y")
