"""fastbn.BatchNorm: train/eval semantics, gradients against the float64
reference, options, and checkpoints (state_dict round trips, torch
checkpoints, rejected state dicts leave the layer untouched)."""

import zlib

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R
from fastbn._reference import TOLERANCE, max_violation

C = 4
KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def data(rng, shape, dtype=np.float32, offset=1.0, scale=2.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def within(got, ref, dtype, what=""):
    v = max_violation(got, ref, dtype)
    assert v <= 1.0, f"{what}: {v:.3g} x the {np.dtype(dtype).name} tolerance {TOLERANCE[np.dtype(dtype)]}"


def snapshot(bn):
    """Every byte of the layer's state."""
    snap = {}
    for k in ("weight", "bias"):
        a = getattr(bn, k)
        snap[k] = None if a is None else (a.dtype, a.shape, a.tobytes())
    if bn.stats is not None:
        snap["mean"] = bn.stats.mean.tobytes()
        snap["var"] = bn.stats.var.tobytes()
        snap["count"] = bn.stats.num_batches_tracked
    return snap


def trained_layer(seed, steps=3, **kw):
    rng = rng_for("trained", seed)
    bn = fastbn.BatchNorm(C, **kw)
    for _ in range(steps):
        bn.forward(data(rng, (3, C, 4, 5), bn.dtype))
        bn.backward(data(rng, (3, C, 4, 5), bn.dtype))
        if bn.affine:
            bn.weight -= 0.1 * bn.grad_weight
            bn.bias -= 0.1 * bn.grad_bias
    return bn


# ----------------------------------------------------------------------------
# modes

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_train_then_eval_semantics(dtype):
    rng = rng_for("train-eval", np.dtype(dtype).name)
    bn = fastbn.BatchNorm(C, momentum=0.2, dtype=dtype)
    assert bn.training
    bn.weight[...] = rng.uniform(0.5, 2, C)
    bn.bias[...] = rng.standard_normal(C)
    w, b = bn.weight.copy(), bn.bias.copy()
    rm, rv, count = np.zeros(C), np.ones(C), 0
    for step in range(3):
        x = data(rng, (3, C, 5, 2), dtype, offset=step)
        y = bn.forward(x)
        ref = R.forward(x, w, b, rm, rv, momentum=0.2, num_batches_tracked=count)
        rm, rv, count = ref.running_mean, ref.running_var, ref.num_batches_tracked
        within(y, ref.y, dtype, "train y")            # batch statistics
        within(bn.stats.mean, rm, dtype, "running_mean")
        within(bn.stats.var, rv, dtype, "running_var")
        assert bn.stats.num_batches_tracked == count == step + 1

    assert bn.eval() is bn and not bn.training
    before = snapshot(bn)
    x = data(rng, (3, C, 5, 2), dtype, offset=-3.0)
    y = bn.forward(x)
    ref = R.forward(x, w, b, bn.stats.mean, bn.stats.var, training=False)
    within(y, ref.y, dtype, "eval y")                 # running statistics
    assert snapshot(bn) == before                     # eval does not update anything
    dy = data(rng, x.shape, dtype)
    dx = bn.backward(dy)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, w, training=False)
    within(dx, rdx, dtype, "eval dx")
    within(bn.grad_weight, rdw, dtype, "eval dweight")
    within(bn.grad_bias, rdb, dtype, "eval dbias")

    assert bn.train() is bn and bn.training
    bn.forward(x)
    assert bn.stats.num_batches_tracked == 4
    bn.train(False)
    assert not bn.training
    assert bn(x).shape == x.shape                     # __call__ is forward


def test_track_running_stats_false_uses_batch_stats_in_eval():
    rng = rng_for("no-track")
    bn = fastbn.BatchNorm(C, track_running_stats=False)
    assert bn.stats is None
    x = data(rng, (4, C, 3, 3))
    y_train = bn.forward(x)
    bn.eval()
    y_eval = bn.forward(x)
    ref = R.forward(x, bn.weight, bn.bias)
    within(y_train, ref.y, np.float32, "train y")
    within(y_eval, ref.y, np.float32, "eval y")
    assert np.array_equal(y_train, y_eval)
    assert bn.stats is None
    # backward flows through the batch statistics in eval too
    dy = data(rng, x.shape)
    dx = bn.backward(dy)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, bn.weight, training=True)
    within(dx, rdx, np.float32, "dx")
    within(bn.grad_weight, rdw, np.float32, "dweight")
    assert list(bn.state_dict().keys()) == ["weight", "bias"]
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(data(rng, (1, C)))                 # eval still needs a batch


def test_affine_false_has_no_parameters_or_grads():
    rng = rng_for("no-affine")
    bn = fastbn.BatchNorm(C, affine=False)
    assert bn.weight is None and bn.bias is None
    x = data(rng, (3, C, 7))
    y = bn.forward(x)
    ref = R.forward(x, running_mean=np.zeros(C), running_var=np.ones(C))
    within(y, ref.y, np.float32, "y")
    dy = data(rng, x.shape)
    dx = bn.backward(dy)
    rdx, _, _ = R.backward(dy, x, ref.mean, ref.invstd)
    within(dx, rdx, np.float32, "dx")
    assert bn.grad_weight is None and bn.grad_bias is None
    assert list(bn.state_dict().keys()) == ["running_mean", "running_var", "num_batches_tracked"]


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError):
        fastbn.BatchNorm(C).backward(np.ones((2, C), np.float32))


# ----------------------------------------------------------------------------
# gradients and options

SHAPES = [((16, C), 1), ((3, C, 9), 1), ((2, C, 3, 5), 1), ((2, C, 2, 3, 3), 1),
          ((3, 9, C), -1), ((2, 3, 5, C), -1), ((2, 2, 3, 3, C), -1)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"axis{v}")
def test_grads_match_reference(shape, axis, dtype):
    rng = rng_for("grads", shape, axis, np.dtype(dtype).name)
    pdt = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    bn = fastbn.BatchNorm(C, axis=axis, dtype=pdt)
    bn.weight[...] = rng.uniform(0.5, 2, C)
    bn.bias[...] = rng.standard_normal(C)
    x = data(rng, shape, dtype)
    y = bn.forward(x)
    assert y.dtype == x.dtype and y.strides == x.strides
    ref = R.forward(x, bn.weight, bn.bias, np.zeros(C), np.ones(C), axis=axis)
    within(y, ref.y, dtype, "y")
    within(bn.stats.mean, ref.running_mean, pdt, "running_mean")
    within(bn.stats.var, ref.running_var, pdt, "running_var")
    dy = data(rng, shape, dtype, offset=0.0)
    dx = bn.backward(dy)
    rdx, rdw, rdb = R.backward(dy, x, ref.mean, ref.invstd, bn.weight, axis=axis)
    within(dx, rdx, dtype, "dx")
    assert isinstance(bn.grad_weight, np.ndarray) and bn.grad_weight.dtype == pdt
    within(bn.grad_weight, rdw, pdt, "grad_weight")
    within(bn.grad_bias, rdb, pdt, "grad_bias")


def test_axis_minus_one_layer_on_nhwc_equals_axis_one_on_nchw():
    rng = rng_for("nhwc-layer")
    x_nchw = data(rng, (3, C, 5, 6))
    x_nhwc = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    a = fastbn.BatchNorm(C, axis=-1)
    b = fastbn.BatchNorm(C, axis=1)
    for bn in (a, b):
        bn.weight[...] = np.arange(1, C + 1)
        bn.bias[...] = -0.5
    ya = a.forward(x_nhwc)
    yb = b.forward(x_nchw)
    assert ya.shape == x_nhwc.shape and ya.flags.c_contiguous
    assert a._ctx.layout == "nhwc" and np.shares_memory(a._ctx.x, x_nhwc)
    ref = R.forward(x_nhwc, a.weight, a.bias, axis=-1)
    within(ya, ref.y, np.float32, "nhwc y")
    within(ya.transpose(0, 3, 1, 2), yb, np.float32, "nhwc vs nchw")
    within(a.stats.mean, b.stats.mean, np.float32, "running_mean")
    within(a.stats.var, b.stats.var, np.float32, "running_var")
    dy = data(rng, x_nhwc.shape)
    dxa = a.backward(dy)
    dxb = b.backward(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
    rdx, rdw, rdb = R.backward(dy, x_nhwc, ref.mean, ref.invstd, a.weight, axis=-1)
    within(dxa, rdx, np.float32, "dx")
    within(a.grad_weight, rdw, np.float32, "dweight")
    within(a.grad_bias, rdb, np.float32, "dbias")
    within(dxa.transpose(0, 3, 1, 2), dxb, np.float32, "dx nhwc vs nchw")


def test_momentum_none_is_cumulative_average():
    rng = rng_for("cma")
    bn = fastbn.BatchNorm(C, momentum=None)
    assert bn.momentum is None
    rm, rv, count = np.zeros(C), np.ones(C), 0
    xs = [data(rng, (4, C, 3), offset=k, scale=1 + k) for k in range(5)]
    for x in xs:
        bn.forward(x)
        ref = R.forward(x, running_mean=rm, running_var=rv, momentum=None,
                        num_batches_tracked=count)
        rm, rv, count = ref.running_mean, ref.running_var, ref.num_batches_tracked
    within(bn.stats.mean, rm, np.float32, "running_mean")
    within(bn.stats.var, rv, np.float32, "running_var")
    assert bn.stats.num_batches_tracked == 5
    # a cumulative average of equal-size batches is the plain mean of the batch statistics
    batch_means = [x.astype(np.float64).mean(axis=(0, 2)) for x in xs]
    batch_vars = [x.astype(np.float64).var(axis=(0, 2), ddof=1) for x in xs]
    within(bn.stats.mean, np.mean(batch_means, axis=0), np.float32, "mean of means")
    within(bn.stats.var, np.mean(batch_vars, axis=0), np.float32, "mean of unbiased vars")


def test_layer_with_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = rng_for("layer-torch")
    bn = fastbn.BatchNorm(C)
    x_np = data(rng, (3, C, 4, 5))
    x = torch.from_numpy(x_np.copy()).contiguous(memory_format=torch.channels_last)
    y = bn.forward(x)
    assert type(y) is torch.Tensor and y.is_contiguous(memory_format=torch.channels_last)
    ref = R.forward(x_np, np.ones(C), np.zeros(C))
    within(y.numpy(), ref.y, np.float32, "y")
    dy_np = data(rng, x_np.shape)
    dx = bn.backward(torch.from_numpy(dy_np).contiguous(memory_format=torch.channels_last))
    assert type(dx) is torch.Tensor
    rdx, rdw, rdb = R.backward(dy_np, x_np, ref.mean, ref.invstd, np.ones(C))
    within(dx.numpy(), rdx, np.float32, "dx")
    assert isinstance(bn.grad_weight, np.ndarray) and isinstance(bn.grad_bias, np.ndarray)
    within(bn.grad_weight, rdw, np.float32, "grad_weight")
    within(bn.grad_bias, rdb, np.float32, "grad_bias")


# ----------------------------------------------------------------------------
# checkpoints

def test_state_dict_keys_and_copies():
    bn = trained_layer("keys")
    sd = bn.state_dict()
    assert list(sd.keys()) == KEYS
    for k in KEYS[:4]:
        assert isinstance(sd[k], np.ndarray) and sd[k].shape == (C,)
    assert int(sd["num_batches_tracked"]) == 3
    assert np.asarray(sd["num_batches_tracked"]).dtype == np.int64
    # copies: changing them does not touch the layer
    sd["weight"][...] = 123
    sd["running_mean"][...] = 123
    assert not (bn.weight == 123).any() and not (bn.stats.mean == 123).any()


@pytest.mark.parametrize("kw", [{}, {"dtype": np.float64}, {"momentum": None},
                                {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "float64", "cma", "noaffine", "notrack"])
def test_state_dict_npz_round_trip(tmp_path, kw):
    src = trained_layer(("npz", repr(kw)), **kw)
    sd = src.state_dict()
    path = tmp_path / "bn.npz"
    np.savez(path, **sd)
    dst = fastbn.BatchNorm(C, **kw)
    with np.load(path) as f:
        assert sorted(f.keys()) == sorted(sd.keys())
        dst.load_state_dict(f)                       # an NpzFile is a mapping
    assert snapshot(dst) == snapshot(src)
    got = dst.state_dict()
    assert list(got.keys()) == list(sd.keys())
    for k in sd:
        assert np.array_equal(got[k], sd[k]), k
        assert np.asarray(got[k]).dtype == np.asarray(sd[k]).dtype, k
    # and through a plain dict of loaded arrays
    dst2 = fastbn.BatchNorm(C, **kw)
    with np.load(path) as f:
        dst2.load_state_dict({k: f[k] for k in f.keys()})
    assert snapshot(dst2) == snapshot(src)
    # the loaded layer behaves like the source
    x = data(rng_for("npz-x", repr(kw)), (2, C, 3, 3), src.dtype)
    src.eval(), dst.eval()
    assert np.array_equal(src.forward(x), dst.forward(x))


def test_load_torch_batchnorm2d_state_dict_reproduces_eval():
    torch = pytest.importorskip("torch")
    rng = rng_for("torch-ckpt")
    mod = torch.nn.BatchNorm2d(C)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    for _ in range(4):
        x = torch.from_numpy(data(rng, (3, C, 4, 4)))
        loss = (mod(x) * torch.from_numpy(data(rng, (3, C, 4, 4)))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = mod.state_dict()
    assert list(sd.keys()) == KEYS
    bn = fastbn.BatchNorm(C)
    bn.load_state_dict(sd)
    assert bn.stats.num_batches_tracked == 4
    assert np.array_equal(bn.weight, mod.weight.detach().numpy())
    assert np.array_equal(bn.bias, mod.bias.detach().numpy())
    assert np.array_equal(bn.stats.mean, mod.running_mean.numpy())
    assert np.array_equal(bn.stats.var, mod.running_var.numpy())
    mod.eval()
    bn.eval()
    x = data(rng, (2, C, 5, 3))
    with torch.no_grad():
        ref = mod(torch.from_numpy(x.copy())).numpy()
    y = bn.forward(x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # and back: fastbn's state dict loads into torch
    mod2 = torch.nn.BatchNorm2d(C)
    mod2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    mod2.eval()
    with torch.no_grad():
        assert torch.equal(mod2(torch.from_numpy(x.copy())), mod(torch.from_numpy(x.copy())))


def _bad_states(good):
    def drop(k):
        return {key: v for key, v in good.items() if key != k}

    def with_(k, v):
        d = dict(good)
        d[k] = v
        return d

    return {
        "weight-shape": with_("weight", np.ones(C + 1, np.float32)),
        "bias-shape": with_("bias", np.ones((1, C), np.float32)),
        "running_mean-shape": with_("running_mean", np.zeros(C - 1, np.float32)),
        "running_var-shape": with_("running_var", np.ones((C, 1), np.float32)),
        "running_var-scalar": with_("running_var", np.float32(1.0)),
        "missing-weight": drop("weight"),
        "missing-bias": drop("bias"),
        "missing-running_mean": drop("running_mean"),
        "missing-running_var": drop("running_var"),
        "extra-key": with_("running_std", np.ones(C, np.float32)),
        "extra-prefixed": with_("bn.weight", np.ones(C, np.float32)),
        "num_batches_tracked-negative": with_("num_batches_tracked", np.int64(-1)),
        "num_batches_tracked-vector": with_("num_batches_tracked", np.zeros(2, np.int64)),
    }


@pytest.mark.parametrize("case", list(_bad_states({k: None for k in KEYS}).keys()))
def test_bad_state_dict_raises_and_changes_nothing(case):
    src = trained_layer("bad-src", steps=2)
    good = src.state_dict()
    # values different from the target's, so a partial load would show
    good["weight"] = good["weight"] + 1
    good["bias"] = good["bias"] - 1
    good["running_mean"] = good["running_mean"] + 5
    good["running_var"] = good["running_var"] * 3
    good["num_batches_tracked"] = np.int64(99)
    bad = _bad_states(good)[case]
    dst = trained_layer("bad-dst", steps=4)
    before = snapshot(dst)
    with pytest.raises(ValueError):
        dst.load_state_dict(bad)
    assert snapshot(dst) == before
    # the good dict loads (so the failure was the defect, not the setup)
    dst.load_state_dict(good)
    assert dst.stats.num_batches_tracked == 99


def test_non_strict_load_ignores_extra_keys():
    src = trained_layer("nonstrict")
    sd = dict(src.state_dict(), extra=np.ones(3))
    dst = fastbn.BatchNorm(C)
    with pytest.raises(ValueError):
        dst.load_state_dict(sd)
    dst.load_state_dict(sd, strict=False)
    assert snapshot(dst) == snapshot(src)


def test_bad_torch_state_dict_changes_nothing():
    torch = pytest.importorskip("torch")
    dst = trained_layer("torch-bad", steps=2)
    before = snapshot(dst)
    wrong = torch.nn.BatchNorm2d(C + 1).state_dict()
    with pytest.raises(ValueError):
        dst.load_state_dict(wrong)
    assert snapshot(dst) == before
