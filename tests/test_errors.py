"""Every rejected call: a TypeError / ValueError that names the argument, says
what was expected and what was given, raised before any kernel runs, so that
running statistics, out= buffers and the inputs are byte-for-byte unchanged.

Each case is a function of a fresh environment (x, weight, bias, trained
RunningStats, out= buffers, a Context) that makes one bad call.
"""

import re

import numpy as np
import pytest

import fastbn

C = 3
SHAPE = (4, C, 5, 6)


class Env:
    """Fresh inputs and state for one error case."""

    def __init__(self):
        rng = np.random.default_rng(4)
        self.x = (rng.standard_normal(SHAPE) * 2 + 1).astype(np.float32)
        self.dy = rng.standard_normal(SHAPE).astype(np.float32)
        self.w = rng.uniform(0.5, 2, C).astype(np.float32)
        self.b = rng.standard_normal(C).astype(np.float32)
        # momentum=None: the count enters the next update, so it must not move either
        self.stats = fastbn.RunningStats(C, momentum=None)
        for _ in range(2):
            fastbn.forward(rng.standard_normal(SHAPE).astype(np.float32), stats=self.stats)
        self.out = np.full(SHAPE, 7.0, np.float32)         # forward's out=
        self.dxo = np.full(SHAPE, 9.0, np.float32)         # backward's out=
        _, self.ctx = fastbn.forward(self.x, self.w, self.b)
        self.layer = fastbn.BatchNorm(C, momentum=None)
        self.layer.forward(rng.standard_normal(SHAPE).astype(np.float32))

    def arrays(self):
        """Everything a rejected call must leave alone."""
        return {"x": self.x, "dy": self.dy, "w": self.w, "b": self.b, "out": self.out,
                "dxo": self.dxo, "stats.mean": self.stats.mean, "stats.var": self.stats.var,
                "layer.mean": self.layer.stats.mean, "layer.var": self.layer.stats.var,
                "layer.weight": self.layer.weight, "layer.bias": self.layer.bias}

    def snapshot(self):
        snap = {k: (a.dtype, a.shape, a.tobytes()) for k, a in self.arrays().items()}
        snap["stats.count"] = self.stats.num_batches_tracked
        snap["layer.count"] = self.layer.stats.num_batches_tracked
        snap["layer.training"] = self.layer.training
        return snap


def _torch():
    return pytest.importorskip("torch")


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _channels_last(a):
    """``a`` (NCHW logical) with NHWC memory."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _overlap_out_with_x(e):
    """Make e.out share all but one element with e.x."""
    base = np.empty(e.x.size + 1, np.float32)
    base[:-1] = e.x.ravel()
    e.x = base[:-1].reshape(SHAPE)
    e.out = base[1:].reshape(SHAPE)


def _overlap_dxo_with_dy(e):
    """Make e.dxo share all but one element with e.dy."""
    buf = np.full(e.dy.size + 1, 9.0, np.float32)
    buf[:-1] = e.dy.ravel()
    e.dy = buf[:-1].reshape(SHAPE)
    e.dxo = buf[1:].reshape(SHAPE)


def _nan_at(a, value=np.nan):
    a = a.copy()
    a.reshape(-1)[a.size // 2] = value
    return a


def _in_place_eval_ctx(e):
    x = e.x.copy()
    _, ctx = fastbn.forward(x, e.w, e.b, e.stats, training=False, out=x)
    return ctx


def _load_nan_stats():
    s = fastbn.RunningStats(C)
    s.load_state_dict({"running_mean": np.array([0.0, np.nan, 0.0]),
                       "running_var": np.ones(C)})
    return s


F = fastbn.forward
B = fastbn.backward

# name: (call(env), exception, argument named first in the message)
CASES = {
    # --- x
    "x-rank-1": (lambda e: F(e.x[0, 0, 0], stats=e.stats), ValueError, "x"),
    "x-rank-6": (lambda e: F(e.x[..., None, None], stats=e.stats), ValueError, "x"),
    "x-int32": (lambda e: F(e.x.astype(np.int32), stats=e.stats), TypeError, "x"),
    "x-complex": (lambda e: F(e.x.astype(np.complex64), stats=e.stats), TypeError, "x"),
    "x-bool": (lambda e: F(e.x > 0, stats=e.stats), TypeError, "x"),
    "x-longdouble": (lambda e: F(e.x.astype(np.longdouble), stats=e.stats), TypeError, "x"),
    "x-big-endian": (lambda e: F(e.x.astype(">f4"), stats=e.stats), TypeError, "x"),
    "x-object": (lambda e: F(e.x.astype(object), stats=e.stats), TypeError, "x"),
    "x-list": (lambda e: F(e.x.tolist(), stats=e.stats), TypeError, "x"),
    "x-masked": (lambda e: F(np.ma.masked_array(e.x), stats=e.stats), TypeError, "x"),
    "x-no-channels": (lambda e: F(np.empty((4, 0, 5), np.float32)), ValueError, "x"),
    "x-one-value-per-channel": (lambda e: F(e.x[:1, :, :1, :1], stats=e.stats), ValueError, "x"),
    "x-nan-check-finite": (lambda e: F(_nan_at(e.x), e.w, e.b, e.stats, out=e.out,
                                       check_finite=True), ValueError, "x"),
    "x-inf-check-finite-f16": (lambda e: F(_nan_at(e.x.astype(np.float16), -np.inf),
                                           stats=e.stats, check_finite=True), ValueError, "x"),
    "x-inf-check-finite-f64": (lambda e: F(_nan_at(e.x.astype(np.float64), np.inf),
                                           stats=fastbn.RunningStats(C, dtype=np.float64),
                                           check_finite=True), ValueError, "x"),
    # --- weight / bias
    "weight-shape": (lambda e: F(e.x, np.ones(C + 1, np.float32), e.b, e.stats, out=e.out),
                     ValueError, "weight"),
    "weight-2d": (lambda e: F(e.x, np.ones((1, C), np.float32), e.b, e.stats), ValueError,
                  "weight"),
    "weight-int": (lambda e: F(e.x, np.ones(C, np.int32), e.b, e.stats), TypeError, "weight"),
    "weight-float64-for-float32-x": (lambda e: F(e.x, e.w.astype(np.float64), e.b, e.stats),
                                     TypeError, "weight"),
    "weight-list": (lambda e: F(e.x, [1.0] * C, e.b, e.stats), TypeError, "weight"),
    "bias-shape": (lambda e: F(e.x, e.w, np.zeros(C - 1, np.float32), e.stats), ValueError,
                   "bias"),
    "bias-complex": (lambda e: F(e.x, e.w, e.b.astype(np.complex64), e.stats), TypeError,
                     "bias"),
    "weight-torch-for-numpy-x": (lambda e: F(e.x, _torch().ones(C), e.b, e.stats), TypeError,
                                 "weight"),
    "weight-nan-check-finite": (lambda e: F(e.x, _nan_at(e.w), e.b, e.stats,
                                            check_finite=True), ValueError, "weight"),
    "bias-inf-check-finite": (lambda e: F(e.x, e.w, _nan_at(e.b, np.inf), e.stats,
                                          check_finite=True), ValueError, "bias"),
    # --- stats
    "stats-channels": (lambda e: F(e.x, stats=fastbn.RunningStats(C + 1)), ValueError, "stats"),
    "stats-dtype": (lambda e: F(e.x, stats=fastbn.RunningStats(C, dtype=np.float64)),
                    TypeError, "stats"),
    "stats-not-runningstats": (lambda e: F(e.x, stats={"running_mean": np.zeros(C)}),
                               TypeError, "stats"),
    "stats-torch-buffers-numpy-x": (lambda e: F(e.x, stats=fastbn.RunningStats(
        C, like=_torch().zeros(1))), TypeError, "stats"),
    "stats-missing-in-inference": (lambda e: F(e.x, training=False, out=e.out), ValueError,
                                   "stats"),
    "stats-nan-check-finite-eval": (lambda e: F(e.x, stats=_load_nan_stats(), training=False,
                                                out=e.out, check_finite=True),
                                    ValueError, "stats"),
    # --- scalars
    "eps-zero": (lambda e: F(e.x, stats=e.stats, eps=0.0), ValueError, "eps"),
    "eps-negative": (lambda e: F(e.x, stats=e.stats, eps=-1e-5), ValueError, "eps"),
    "eps-nan": (lambda e: F(e.x, stats=e.stats, eps=float("nan")), ValueError, "eps"),
    "eps-inf": (lambda e: F(e.x, stats=e.stats, eps=float("inf")), ValueError, "eps"),
    "eps-str": (lambda e: F(e.x, stats=e.stats, eps="1e-5"), TypeError, "eps"),
    "eps-bool": (lambda e: F(e.x, stats=e.stats, eps=True), TypeError, "eps"),
    "training-str": (lambda e: F(e.x, stats=e.stats, training="False"), TypeError, "training"),
    "training-none": (lambda e: F(e.x, stats=e.stats, training=None), TypeError, "training"),
    "axis-0": (lambda e: F(e.x, stats=e.stats, axis=0), ValueError, "axis"),
    "axis-2": (lambda e: F(e.x, stats=e.stats, axis=2), ValueError, "axis"),
    "num-threads-0": (lambda e: F(e.x, stats=e.stats, num_threads=0), ValueError,
                      "num_threads"),
    "num-threads-float": (lambda e: F(e.x, stats=e.stats, num_threads=1.5), TypeError,
                          "num_threads"),
    "num-threads-beyond-c-int": (lambda e: F(e.x, stats=e.stats, num_threads=2**31),
                                 ValueError, "num_threads"),
    "axis-str": (lambda e: F(e.x, stats=e.stats, axis="1"), TypeError, "axis"),
    "axis-float": (lambda e: F(e.x, stats=e.stats, axis=1.0), TypeError, "axis"),
    "axis-none": (lambda e: F(e.x, stats=e.stats, axis=None), TypeError, "axis"),
    "axis-huge": (lambda e: F(e.x, stats=e.stats, axis=2**70), ValueError, "axis"),
    "check-finite-str": (lambda e: F(e.x, e.w, e.b, e.stats, out=e.out, check_finite="no"),
                         TypeError, "check_finite"),
    "check-finite-none": (lambda e: F(e.x, e.w, e.b, e.stats, out=e.out, check_finite=None),
                          TypeError, "check_finite"),
    # --- out=
    "out-shape": (lambda e: F(e.x, stats=e.stats, out=e.out[:, :, :4]), ValueError, "out"),
    "out-dtype": (lambda e: F(e.x, stats=e.stats, out=e.out.view(np.int32)), TypeError, "out"),
    "out-layout": (lambda e: F(e.x, stats=e.stats, out=_channels_last(e.out)), ValueError,
                   "out"),
    "out-non-contiguous": (lambda e: F(e.x[:, :, ::2], stats=e.stats, out=e.out[:, :, ::2]),
                           ValueError, "out"),
    "out-read-only": (lambda e: F(e.x, stats=e.stats, out=_readonly(e.out)), ValueError, "out"),
    "out-list": (lambda e: F(e.x, stats=e.stats, out=e.out.tolist()), TypeError, "out"),
    "out-is-x-training": (lambda e: F(e.x, stats=e.stats, out=e.x), ValueError, "out"),
    "out-overlaps-x-eval": (lambda e: F(e.x, stats=e.stats, training=False, out=e.out),
                            ValueError, "out"),
    "out-torch-for-numpy-x": (lambda e: F(e.x, stats=e.stats, out=_torch().empty(SHAPE)),
                              TypeError, "out"),
    # --- other libraries
    "x-torch-requires-grad": (lambda e: F(_torch().ones(SHAPE, requires_grad=True),
                                          stats=e.stats), TypeError, "x"),
    "x-torch-bfloat16": (lambda e: F(_torch().ones(SHAPE, dtype=_torch().bfloat16),
                                     stats=e.stats), TypeError, "x"),
    "x-torch-out-numpy": (lambda e: F(_torch().from_numpy(e.x.copy()), stats=e.stats,
                                      out=e.out), TypeError, "out"),
    # tensors DLPack cannot hand over: named, not a BufferError / RuntimeError
    "x-torch-sparse": (lambda e: F(_torch().ones(4, C).to_sparse(), stats=e.stats),
                       TypeError, "x"),
    "weight-torch-sparse": (lambda e: F(_torch().ones(4, C), _torch().ones(C).to_sparse(),
                                        stats=e.stats), TypeError, "weight"),
    "x-torch-float8": (lambda e: F(_torch().ones(4, C).to(_torch().float8_e4m3fn),
                                   stats=e.stats), TypeError, "x"),
    # a negative view's memory holds -out: results written there would be lost
    "out-torch-negative-view": (lambda e: F(_torch().from_numpy(e.x.copy()), stats=e.stats,
                                            out=_torch()._neg_view(_torch().from_numpy(e.out))),
                                ValueError, "out"),
    # --- backward
    "ctx-none": (lambda e: B(e.dy, None, out=e.dxo), TypeError, "ctx"),
    "ctx-dict": (lambda e: B(e.dy, {"mean": 0}, out=e.dxo), TypeError, "ctx"),
    "ctx-empty": (lambda e: B(e.dy, fastbn.Context(), out=e.dxo), TypeError, "ctx"),
    "dx-check-finite-str": (lambda e: B(e.dy, e.ctx, out=e.dxo, check_finite="yes"), TypeError,
                            "check_finite"),
    "dy-shape": (lambda e: B(e.dy[:2], e.ctx, out=e.dxo), ValueError, "dy"),
    "dy-dtype": (lambda e: B(e.dy.astype(np.float64), e.ctx, out=e.dxo), TypeError, "dy"),
    "dy-int": (lambda e: B(e.dy.astype(np.int32), e.ctx, out=e.dxo), TypeError, "dy"),
    "dy-other-layout": (lambda e: B(_channels_last(e.dy), e.ctx, out=e.dxo), ValueError, "dy"),
    "dy-torch-for-numpy-ctx": (lambda e: B(_torch().from_numpy(e.dy.copy()), e.ctx,
                                           out=e.dxo), TypeError, "dy"),
    "dy-list": (lambda e: B(e.dy.tolist(), e.ctx, out=e.dxo), TypeError, "dy"),
    "dy-nan-check-finite": (lambda e: B(_nan_at(e.dy), e.ctx, out=e.dxo, check_finite=True),
                            ValueError, "dy"),
    "ctx-of-in-place-forward": (lambda e: B(e.dy, _in_place_eval_ctx(e), out=e.dxo),
                                ValueError, "ctx"),
    "dx-out-shape": (lambda e: B(e.dy, e.ctx, out=e.dxo[:2]), ValueError, "out"),
    "dx-out-dtype": (lambda e: B(e.dy, e.ctx, out=e.dxo.astype(np.float64)), TypeError, "out"),
    "dx-out-read-only": (lambda e: B(e.dy, e.ctx, out=_readonly(e.dxo)), ValueError, "out"),
    "dx-out-is-x": (lambda e: B(e.dy, e.ctx, out=e.x), ValueError, "out"),
    "dx-out-partly-dy": (lambda e: B(e.dy, e.ctx, out=e.dxo), ValueError, "out"),
    "dx-num-threads": (lambda e: B(e.dy, e.ctx, out=e.dxo, num_threads=-1), ValueError,
                       "num_threads"),
    # --- the layer
    "layer-channels": (lambda e: e.layer.forward(e.x[:, :2]), ValueError, "x"),
    "layer-dtype": (lambda e: e.layer.forward(e.x.astype(np.float64)), TypeError, "weight"),
    "layer-dy-shape": (lambda e: e.layer.backward(e.dy[:1]), ValueError, "dy"),
    "layer-load-bad-shape": (lambda e: e.layer.load_state_dict(
        {**e.layer.state_dict(), "running_var": np.ones(C + 1)}), ValueError, "running_var"),
    "layer-load-non-mapping": (lambda e: e.layer.load_state_dict([1, 2]), TypeError, "state"),
    "layer-train-str": (lambda e: e.layer.train("False"), TypeError, "mode"),
    "layer-train-none": (lambda e: e.layer.train(None), TypeError, "mode"),
    "stats-mean-shape": (lambda e: setattr(e.stats, "mean", np.zeros(C + 1)), ValueError,
                         "mean"),
    "stats-var-int": (lambda e: setattr(e.stats, "var", np.ones(C, int)), TypeError, "var"),
    "set-num-threads-beyond-c-int": (lambda e: fastbn.set_num_threads(2**40), ValueError, "n"),
}


# Cases whose environment needs arranging before the snapshot.
PREPARE = {"out-overlaps-x-eval": _overlap_out_with_x, "dx-out-partly-dy": _overlap_dxo_with_dy}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejected_call_changes_nothing(name):
    call, exc, arg = CASES[name]
    e = Env()
    PREPARE.get(name, lambda e: None)(e)
    before = e.snapshot()
    threads = fastbn.set_num_threads(None)      # the process-wide setting, restored below
    fastbn.set_num_threads(threads)
    try:
        with pytest.raises(exc) as info:
            call(e)
    finally:
        changed = fastbn.set_num_threads(threads)
    assert changed == threads, "a rejected call changed the process-wide thread count"
    msg = str(info.value)
    # names the argument first, says what was expected and what was given
    assert re.match(rf"{re.escape(arg)}\b", msg), msg
    assert "expected" in msg, msg
    assert "got" in msg or "bfloat16" in msg or "grad" in msg, msg
    assert e.snapshot() == before, "a rejected call changed state"


def test_every_case_is_an_error_of_a_valid_call():
    """The environment itself is valid: the same calls without the defect run."""
    e = Env()
    y, _ = F(e.x, e.w, e.b, e.stats, out=e.out, check_finite=True)
    assert y is e.out
    dx, _, _ = B(e.dy, e.ctx, out=e.dxo, check_finite=True)
    assert dx is e.dxo
    e.layer.backward(e.dy)


@pytest.mark.parametrize("kw,exc", [
    ({"eps": 0}, ValueError), ({"eps": "x"}, TypeError), ({"momentum": 1.5}, ValueError),
    ({"momentum": -0.1}, ValueError), ({"momentum": float("nan")}, ValueError),
    ({"axis": 0}, ValueError), ({"axis": True}, TypeError), ({"axis": 1.0}, TypeError),
    ({"dtype": np.float16}, TypeError),
    ({"dtype": np.int32}, TypeError), ({"num_threads": 0}, ValueError),
    ({"check_finite": "yes"}, TypeError),
])
def test_layer_construction_is_validated(kw, exc):
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        fastbn.BatchNorm(C, **kw)


def test_count_is_validated():
    s = fastbn.RunningStats(C)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        s.num_batches_tracked = -1
    with pytest.raises(TypeError, match="num_batches_tracked"):
        s.num_batches_tracked = 2.5
    assert s.num_batches_tracked == 0
    s.num_batches_tracked = np.int64(3)
    assert s.num_batches_tracked == 3 and type(s.num_batches_tracked) is int


def test_check_finite_passes_finite_edge_values():
    """Large finite values whose sum overflows are not mistaken for Inf."""
    x = np.full((4, C, 5), np.finfo(np.float64).max / 2)
    x[:, :, ::2] *= -1
    fastbn.forward(x, check_finite=True)
    x16 = np.full((4, C, 5), 65504.0, np.float16)
    x16[0, 0, 0] = -65504.0
    fastbn.forward(x16, check_finite=True)
    x32 = np.full((4, C, 5), 3e38, np.float32)
    x32[0, 0, 0] = 1.0
    y, ctx = fastbn.forward(x32, check_finite=True)
    fastbn.backward(x32, ctx, check_finite=True)


def test_layer_check_finite():
    bn = fastbn.BatchNorm(C, check_finite=True)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    bn.forward(x)
    before = (bn.stats.mean.tobytes(), bn.stats.var.tobytes(), bn.stats.num_batches_tracked)
    with pytest.raises(ValueError, match="^x: expected finite"):
        bn.forward(_nan_at(x))
    assert (bn.stats.mean.tobytes(), bn.stats.var.tobytes(),
            bn.stats.num_batches_tracked) == before
    with pytest.raises(ValueError, match="^dy: expected finite"):
        bn.backward(_nan_at(x, np.inf))


def test_strides_in_messages_are_in_elements():
    """torch users read .stride() (elements); numpy's byte strides would not match it."""
    torch = _torch()
    x = torch.ones(4, C, 5, 6)
    out = torch.ones(4, C, 5, 12)[..., ::2]
    with pytest.raises(ValueError, match=re.escape(f"strides {tuple(out.stride())} (in elements)")):
        F(x, out=out)
    _, ctx = F(x.numpy())
    dy = _channels_last(np.ones(SHAPE, np.float32))
    want = tuple(s // dy.itemsize for s in dy.strides)
    with pytest.raises(ValueError, match=re.escape(f"strides {want} (in elements)")):
        B(dy, ctx)
