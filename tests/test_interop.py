"""Array interop: torch / JAX tensors in, the same kind out, through DLPack
without copies; numpy corner cases (negative strides, read-only); and that
importing fastbn pulls in no framework."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R
from fastbn._reference import max_violation

C = 3


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def data(rng, shape, dtype=np.float32, offset=0.7, scale=1.5):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def pdtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def within(got, ref, dtype, what=""):
    v = max_violation(got, ref, dtype)
    assert v <= 1.0, f"{what}: {v:.3g} x the {np.dtype(dtype).name} tolerance"


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def as_np(t):
    """numpy view of a torch tensor (zero-copy)."""
    return np.from_dlpack(t.detach())


def base_ptr(a):
    return a.__array_interface__["data"][0]


# ----------------------------------------------------------------------------
# torch in, torch out

def _torch_layouts(torch):
    """(name, tensor maker from a channels-first numpy array, axis)."""
    cl = torch.channels_last
    cl3 = torch.channels_last_3d
    return {
        "nchw": (lambda a: torch.from_numpy(a.copy()), 1, 4),
        "channels_last": (lambda a: torch.from_numpy(a.copy()).contiguous(memory_format=cl), 1, 4),
        "ncdhw": (lambda a: torch.from_numpy(a.copy()), 1, 5),
        "channels_last_3d": (lambda a: torch.from_numpy(a.copy()).contiguous(memory_format=cl3), 1, 5),
        "ncl-nlc-strides": (lambda a: torch.from_numpy(a.copy()).transpose(1, 2).contiguous()
                            .transpose(1, 2), 1, 3),
        "nc": (lambda a: torch.from_numpy(a.copy()), 1, 2),
        "nhwc-axis-1": (lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 1, -1))),
                        -1, 4),
        # a logical NHWC shape whose memory is NCHW: the channels-first kernel, in place
        "nhwc-shape-nchw-memory": (lambda a: torch.from_numpy(a.copy()).permute(0, 2, 3, 1), -1, 4),
    }


SHAPE = {2: (11, C), 3: (4, C, 6), 4: (3, C, 4, 5), 5: (2, C, 3, 4, 2)}
LAYOUT_NAMES = ["nchw", "channels_last", "ncdhw", "channels_last_3d", "ncl-nlc-strides", "nc",
                "nhwc-axis-1", "nhwc-shape-nchw-memory"]
NO_COPY_LAYOUT = {"nchw": "nchw", "channels_last": "nhwc", "ncdhw": "nchw",
                  "channels_last_3d": "nhwc", "ncl-nlc-strides": "nhwc", "nc": "nhwc",
                  "nhwc-axis-1": "nhwc", "nhwc-shape-nchw-memory": "nchw"}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_in_torch_out_no_copy(torch, training, name, dtype):
    make, axis, rank = _torch_layouts(torch)[name]
    rng = rng_for("t-io", training, name, np.dtype(dtype).name)
    x_np = data(rng, SHAPE[rank], dtype)
    x = make(x_np)
    pdt = pdtype(dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2, C).astype(pdt))
    b = torch.from_numpy(rng.standard_normal(C).astype(pdt))
    st = fastbn.RunningStats(C, dtype=pdt)
    st.load_state_dict({"running_mean": rng.standard_normal(C), "running_var": rng.uniform(0.5, 2, C)})
    rm0, rv0 = st.mean.astype(np.float64), st.var.astype(np.float64)

    y, ctx = fastbn.forward(x, w, b, st, training=training, axis=axis)

    assert type(y) is torch.Tensor
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert y.device == x.device
    if name == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert not y.is_contiguous()
    if name == "channels_last_3d":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        assert not y.is_contiguous()
    # x was read in place: the kernel view is x's own memory
    assert ctx.layout == NO_COPY_LAYOUT[name]
    assert np.shares_memory(as_np(x), ctx.x)
    assert base_ptr(ctx.x) == x.data_ptr()
    assert y.data_ptr() != x.data_ptr()
    ref = R.forward(as_np(x), w.numpy(), b.numpy(), rm0, rv0, training=training, axis=axis)
    within(as_np(y), ref.y, dtype, "y")

    dy = make(data(rng, SHAPE[rank], dtype, offset=0.0))
    dx, dw, db = fastbn.backward(dy, ctx)
    assert type(dx) is torch.Tensor and dx.dtype == x.dtype and dx.stride() == x.stride()
    assert type(dw) is torch.Tensor and type(db) is torch.Tensor
    assert dw.dtype == w.dtype and db.dtype == b.dtype and dw.shape == (C,) and db.shape == (C,)
    rdx, rdw, rdb = R.backward(as_np(dy), as_np(x), ref.mean, ref.invstd, w.numpy(),
                               training=training, axis=axis)
    within(as_np(dx), rdx, dtype, "dx")
    within(dw.numpy(), rdw, pdt, "dweight")
    within(db.numpy(), rdb, pdt, "dbias")


def test_torch_float16_weight_gives_float16_grads(torch):
    rng = rng_for("f16w")
    x = torch.from_numpy(data(rng, (4, C, 5), np.float16))
    w = torch.from_numpy(rng.uniform(0.5, 2, C).astype(np.float16))
    b = torch.from_numpy(rng.standard_normal(C).astype(np.float16))
    y, ctx = fastbn.forward(x, w, b)
    dx, dw, db = fastbn.backward(torch.ones_like(x), ctx)
    assert y.dtype == dx.dtype == torch.float16
    assert dw.dtype == db.dtype == torch.float16
    assert type(dw) is torch.Tensor


def test_torch_out_is_zero_copy(torch):
    rng = rng_for("out")
    x = torch.from_numpy(data(rng, (3, C, 4, 5))).contiguous(memory_format=torch.channels_last)
    w = torch.from_numpy(rng.uniform(0.5, 2, C).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(C).astype(np.float32))
    expected, _ = fastbn.forward(x, w, b)

    out = torch.full_like(x, float("nan"))            # keeps channels_last
    assert out.is_contiguous(memory_format=torch.channels_last)
    ptr = out.data_ptr()
    y, ctx = fastbn.forward(x, w, b, out=out)
    assert y is out
    assert out.data_ptr() == ptr
    assert not torch.isnan(out).any()
    assert torch.equal(out, expected)

    dy = torch.from_numpy(data(rng, (3, C, 4, 5))).contiguous(memory_format=torch.channels_last)
    dx_expected, dw_e, db_e = fastbn.backward(dy, ctx)
    dx_out = torch.full_like(x, float("nan"))
    dx, dw, db = fastbn.backward(dy, ctx, out=dx_out)
    assert dx is dx_out and torch.equal(dx_out, dx_expected)
    assert torch.equal(dw, dw_e) and torch.equal(db, db_e)
    # in place into dy itself
    dy2 = dy.clone()
    dx2, _, _ = fastbn.backward(dy2, ctx, out=dy2)
    assert dx2 is dy2 and torch.equal(dy2, dx_expected)


def test_torch_out_checks(torch):
    rng = rng_for("out-checks")
    x = torch.from_numpy(data(rng, (3, C, 4, 5))).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out"):          # channels-first out for channels_last x
        fastbn.forward(x, out=torch.empty(3, C, 4, 5))
    with pytest.raises(TypeError, match="out"):
        fastbn.forward(x, out=torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(TypeError, match="out"):           # numpy out for torch x
        fastbn.forward(x, out=np.empty((3, C, 4, 5), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        fastbn.forward(x, out=x)
    # in-place eval is allowed
    st = fastbn.RunningStats(C)
    x2 = x.clone()
    y, _ = fastbn.forward(x2, stats=st, training=False, out=x2)
    assert y is x2


def test_torch_stats_like_share_memory(torch):
    rng = rng_for("like")
    x = torch.from_numpy(data(rng, (4, C, 5)))
    st = fastbn.RunningStats(C, like=x)
    assert type(st.mean) is torch.Tensor and type(st.var) is torch.Tensor
    m_before = st.mean.clone()
    fastbn.forward(x, stats=st)
    assert not torch.equal(st.mean, m_before)          # updated in place, seen through torch
    ref = R.forward(x.numpy(), running_mean=np.zeros(C), running_var=np.ones(C))
    within(st.mean.numpy(), ref.running_mean, np.float32, "running_mean")
    sd = st.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    assert int(sd["num_batches_tracked"]) == 1


def test_torch_requires_grad_is_rejected(torch):
    x = torch.from_numpy(data(rng_for("rg"), (4, C, 5)))
    with pytest.raises(TypeError, match="grad"):
        fastbn.forward(x.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="grad"):
        fastbn.forward(x, torch.nn.Parameter(torch.ones(C)))
    y, ctx = fastbn.forward(x)
    with pytest.raises(TypeError, match="grad"):
        fastbn.backward(torch.ones_like(x).requires_grad_(True), ctx)


def test_torch_bfloat16_is_rejected(torch):
    x = torch.from_numpy(data(rng_for("bf16"), (4, C, 5))).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        fastbn.forward(x)
    x32 = x.float()
    with pytest.raises(TypeError, match="bfloat16"):
        fastbn.forward(x32, torch.ones(C, dtype=torch.bfloat16))


def test_mixing_array_kinds_is_rejected(torch):
    rng = rng_for("mix")
    x_np = data(rng, (4, C, 5))
    x_t = torch.from_numpy(x_np.copy())
    with pytest.raises(TypeError, match="weight"):
        fastbn.forward(x_np, torch.ones(C))
    with pytest.raises(TypeError, match="bias"):
        fastbn.forward(x_np, np.ones(C, np.float32), torch.zeros(C))
    with pytest.raises(TypeError, match="weight"):
        fastbn.forward(x_t, np.ones(C, np.float32))
    _, ctx = fastbn.forward(x_t)
    with pytest.raises(TypeError, match="dy"):
        fastbn.backward(np.ones_like(x_np), ctx)


def test_torch_neg_view_and_storage_offset(torch):
    rng = rng_for("neg-offset")
    base = torch.from_numpy(data(rng, (6, C, 4, 5)))
    sl = base[2:]                                       # nonzero storage offset
    y, ctx = fastbn.forward(sl)
    assert np.shares_memory(ctx.x, as_np(sl))
    within(y.numpy(), R.forward(sl.numpy()).y, np.float32, "offset view")
    nv = torch._neg_view(sl)
    assert nv.is_neg()
    y, _ = fastbn.forward(nv)
    within(y.numpy(), R.forward(-sl.numpy()).y, np.float32, "neg view")


# ----------------------------------------------------------------------------
# numpy corner cases

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_numpy_negative_strides(training):
    rng = rng_for("negstride", training)
    x0 = data(rng, (3, C, 7, 5))
    x = x0[:, :, ::-1]
    assert x.strides[2] < 0
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    st = fastbn.RunningStats(C)
    y, ctx = fastbn.forward(x, w, b, st, training=training)
    assert not np.shares_memory(ctx.x, x0)                   # copied into a positive layout
    ref = R.forward(x, w, b, np.zeros(C), np.ones(C), training=training)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all(s > 0 for s in y.strides)
    within(y, ref.y, np.float32, "y")
    within(st.mean, ref.running_mean, np.float32, "running_mean")
    within(st.var, ref.running_var, np.float32, "running_var")
    dy = data(rng, (3, C, 7, 5))[:, ::-1]                    # negative strides on C
    dx, dw, db = fastbn.backward(dy, ctx)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, training=training)
    within(dx, rdx, np.float32, "dx")
    within(dw, rdw, np.float32, "dweight")
    within(db, rdb, np.float32, "dbias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_numpy_read_only_inputs(training):
    rng = rng_for("readonly", training)
    x = data(rng, (4, C, 3, 5))
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    dy = data(rng, (4, C, 3, 5))
    for a in (x, w, b, dy):
        a.setflags(write=False)
    st = fastbn.RunningStats(C)
    y, ctx = fastbn.forward(x, w, b, st, training=training)
    ref = R.forward(x, w, b, np.zeros(C), np.ones(C), training=training)
    within(y, ref.y, np.float32, "y")
    assert np.shares_memory(ctx.x, x)                        # read in place, not copied
    dx, dw, db = fastbn.backward(dy, ctx)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, training=training)
    within(dx, rdx, np.float32, "dx")
    within(dw, rdw, np.float32, "dweight")
    within(db, rdb, np.float32, "dbias")
    ro_out = np.empty_like(x)
    ro_out.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        fastbn.forward(x, w, b, out=ro_out)


# ----------------------------------------------------------------------------
# JAX (skips where JAX is not installed)

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jax_in_jax_out(training):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    rng = rng_for("jax", training)
    x_np = data(rng, (3, C, 4, 5))
    w_np = rng.uniform(0.5, 2, C).astype(np.float32)
    b_np = rng.standard_normal(C).astype(np.float32)
    x, w, b = jnp.asarray(x_np), jnp.asarray(w_np), jnp.asarray(b_np)
    st = fastbn.RunningStats(C)
    y, ctx = fastbn.forward(x, w, b, st, training=training)
    assert isinstance(y, jax.Array)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = R.forward(x_np, w_np, b_np, np.zeros(C), np.ones(C), training=training)
    within(np.asarray(y), ref.y, np.float32, "y")
    dy_np = data(rng, (3, C, 4, 5))
    dx, dw, db = fastbn.backward(jnp.asarray(dy_np), ctx)
    assert isinstance(dx, jax.Array) and isinstance(dw, jax.Array) and isinstance(db, jax.Array)
    rdx, rdw, rdb = R.backward(dy_np, x_np, ref.mean, ref.invstd, w_np, training=training)
    within(np.asarray(dx), rdx, np.float32, "dx")
    within(np.asarray(dw), rdw, np.float32, "dweight")
    within(np.asarray(db), rdb, np.float32, "dbias")


def test_jax_out_is_rejected():
    pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(data(rng_for("jax-out"), (4, C, 5)))
    with pytest.raises(ValueError, match="writable"):
        fastbn.forward(x, out=jnp.zeros_like(x))


def test_jax_bfloat16_is_rejected():
    pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(data(rng_for("jax-bf16"), (4, C, 5))).astype(jnp.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        fastbn.forward(x)


# ----------------------------------------------------------------------------
# import hygiene

def test_import_pulls_in_no_framework():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    code = (
        "import sys, numpy as np, fastbn\n"
        "x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)\n"
        "y, ctx = fastbn.forward(x, stats=fastbn.RunningStats(3))\n"
        "fastbn.backward(np.ones_like(y), ctx)\n"
        "fastbn.BatchNorm(3).forward(x)\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'cupy', 'scipy'))\n"
        "print(repr(bad))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
