"""The oracle itself: its gradients against central finite differences."""

import numpy as np
import pytest

from fastbn import _reference as R


def _loss(x, w, b, g, training, stats, axis):
    rm, rv = stats
    out = R.forward(x, w, b, rm, rv, training=training, axis=axis)
    return float(np.sum(out.y * g))


def _numeric_grad(f, a, h=1e-6):
    grad = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((3, 2, 2, 3), -1), ((6, 4), 1)])
def test_reference_gradients_match_finite_differences(shape, axis, training):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape) * 2 + 0.5
    C = shape[axis]
    w = rng.standard_normal(C)
    b = rng.standard_normal(C)
    g = rng.standard_normal(shape)
    stats = (rng.standard_normal(C), rng.uniform(0.5, 2.0, C))
    f = lambda: _loss(x, w, b, g, training, stats, axis)  # noqa: E731
    out = R.forward(x, w, b, *stats, training=training, axis=axis)
    dx, dw, db = R.backward(g, x, out.mean, out.invstd, w, training=training, axis=axis)
    np.testing.assert_allclose(dx, _numeric_grad(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, _numeric_grad(f, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _numeric_grad(f, b), rtol=1e-6, atol=1e-7)


def test_reference_running_update_is_pytorch_rule():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4) ** 1.5
    out = R.forward(x, None, None, np.zeros(3), np.ones(3), momentum=0.25)
    xc = np.moveaxis(x, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(out.running_mean, 0.25 * xc.mean(0))
    np.testing.assert_allclose(out.running_var, 0.75 + 0.25 * xc.var(0, ddof=1))
    assert out.num_batches_tracked == 1
    cma = R.forward(x, None, None, out.running_mean, out.running_var, momentum=None,
                    num_batches_tracked=1)
    np.testing.assert_allclose(cma.running_mean, 0.5 * out.running_mean + 0.5 * xc.mean(0))


@pytest.mark.parametrize("axis", [1, -1])
def test_reference_sums_are_accurate_far_from_zero(axis):
    """The oracle's own rounding stays under the kernels' tolerance: its
    per-channel mean, dbias and dweight within about an ulp of math.fsum's
    correctly rounded sums, channels-first and channels-last, on 12,600 values
    per channel near -1e4 (numpy's row-after-row sum across rows put a
    channels-last mean 23 ulps off, which the kernels' exact mean then failed
    against)."""
    import math

    rng = np.random.default_rng(2)
    shape = (75, 15, 168) if axis == 1 else (75, 168, 15)
    x = rng.standard_normal(shape) * 1e3 - 1e4
    dy = rng.standard_normal(shape)
    ref = R.forward(x, axis=axis)
    _, dw, db = R.backward(dy, x, ref.mean, ref.invstd, axis=axis)
    xc = np.moveaxis(x, axis, -1).reshape(-1, 15)
    gc = np.moveaxis(dy, axis, -1).reshape(-1, 15)
    n = xc.shape[0]
    for c in range(15):
        mean = math.fsum(xc[:, c]) / n
        assert abs(ref.mean[c] - mean) <= np.spacing(abs(mean)), c
        assert abs(db[c] - math.fsum(gc[:, c])) <= 4 * np.spacing(np.abs(gc[:, c]).sum()), c
        xhat = (xc[:, c] - ref.mean[c]) * ref.invstd[c]
        terms = gc[:, c] * xhat
        assert abs(dw[c] - math.fsum(terms)) <= 4 * np.spacing(np.abs(terms).sum()), c


def _decimal_training(x, w, b, g, axis, eps):
    """y, dx, dweight, dbias of a training forward and backward in 60-digit
    decimal arithmetic, from the float64 values of the inputs (exact there)."""
    import decimal

    D = decimal.Decimal
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        xc = np.moveaxis(x, axis, -1)
        gc = np.moveaxis(g, axis, -1)
        C = xc.shape[-1]
        xs = xc.reshape(-1, C)
        gs = gc.reshape(-1, C)
        n = xs.shape[0]
        y = np.empty(xs.shape)
        dx = np.empty(xs.shape)
        dw = np.empty(C)
        db = np.empty(C)
        for c in range(C):
            v = [D(float(t)) for t in xs[:, c]]
            gg = [D(float(t)) for t in gs[:, c]]
            mean = sum(v) / n
            d = [t - mean for t in v]
            var = sum(t * t for t in d) / n
            invstd = 1 / (var + D(eps)).sqrt()
            xhat = [t * invstd for t in d]
            sdy = sum(gg)
            sdyx = sum(a * h for a, h in zip(gg, xhat))
            wc, bc = D(float(w[c])), D(float(b[c]))
            y[:, c] = [float(h * wc + bc) for h in xhat]
            dx[:, c] = [float(wc * invstd * (a - sdy / n - h * sdyx / n))
                        for a, h in zip(gg, xhat)]
            dw[c], db[c] = float(sdyx), float(sdy)
    back = lambda a: np.moveaxis(a.reshape(xc.shape), -1, axis)  # noqa: E731
    return back(y), back(dx), dw, db


@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((6, 5, 2), -1), ((40, 2), 1)])
def test_reference_is_about_the_unrounded_mean(shape, axis):
    """float64 data at 1e4 with a spread of 1e-3: rounding the batch mean to
    float64 costs up to half an ulp of 1e4 (9e-13) in every x - mean, 2e-9 of
    y once scaled by invstd 1e3, where the float64 tolerance is 1e-12.  The
    reference centres x about the unrounded mean, as the CPU kernels do, so
    it stays within a small part of the tolerance of exact arithmetic (before
    it did: y 25-370x, dx and dweight up to 2000x the tolerance off)."""
    rng = np.random.default_rng(11)
    x = 1e4 + 1e-3 * rng.standard_normal(shape)
    C = shape[axis]
    w = rng.uniform(0.5, 2.0, C)
    b = rng.standard_normal(C)
    g = rng.standard_normal(shape)
    eps = 1e-12
    ref = R.forward(x, w, b, eps=eps, axis=axis)
    dx, dw, db = R.backward(g, x, ref.mean, ref.invstd, w, axis=axis)
    ey, edx, edw, edb = _decimal_training(x, w, b, g, axis, eps)
    for what, got, want in (("y", ref.y, ey), ("dx", dx, edx), ("dweight", dw, edw),
                            ("dbias", db, edb)):
        v = R.max_violation(got, want, np.float64)
        assert v <= 0.1, f"{what}: {v:.3g} x the float64 tolerance off exact arithmetic"
