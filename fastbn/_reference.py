"""Float64 NumPy reference: the test oracle.

Written for clarity, not speed, straight from the formulas of DESIGN.md
section 1, and independent of the kernels and of RunningStats (it takes and
returns the running statistics as plain arrays).  Its gradients are checked
by finite differences in tests/test_reference.py.
"""

from types import SimpleNamespace

import numpy as np


def _channels_last(a, axis):
    """float64 copy of ``a`` with the channel axis moved last."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


def _sum(a):
    """Per-channel sums of a channels-last array, pairwise: numpy sums pairwise
    only along a contiguous axis (across rows it adds one row after another,
    which left a channels-last mean of 12,600 values near -1e4 23 ulps off).
    So each channel's values are laid out contiguously first."""
    C = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, C).T).sum(axis=1)


def _centred(a):
    """(a less its per-channel mean, the mean rounded to float64).

    The mean is a pairwise mean m plus the pairwise mean r of the residuals
    a - m (small next to a mean far from zero, and so is their rounding), and
    a is centred about m + r unrounded: (a - m) - r.  Rounding m + r to
    float64 costs up to half an ulp of the mean, which for data far from zero
    with a small spread is many ulps of a - mean (float64 data at 1e4 with a
    spread of 1e-3: 2e-9 of y, where the float64 tolerance is 1e-12)."""
    n = a.size // a.shape[-1]
    m = _sum(a) / n
    d = a - m
    r = _sum(d) / n
    return d - r, m + r


def _mean(a):
    """Per-channel means, to within about an ulp (see _centred)."""
    return _centred(a)[1]


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training=True, momentum=0.1, num_batches_tracked=0, eps=1e-5, axis=1):
    """Batch-norm forward in float64.

    Returns a namespace with y (float64, x's shape), mean and invstd (the
    statistics used), and the updated running_mean, running_var and
    num_batches_tracked (unchanged where not training or not tracked).
    """
    xc = _channels_last(x, axis)
    C = xc.shape[-1]
    n = xc.size // C
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    rm = None if running_mean is None else np.asarray(running_mean, np.float64).copy()
    rv = None if running_var is None else np.asarray(running_var, np.float64).copy()
    if training:
        if n <= 1:
            raise ValueError("expected more than 1 value per channel when training")
        centred, mean = _centred(xc)
        var = _sum(centred ** 2) / n                      # biased: normalises
        if rm is not None:
            num_batches_tracked += 1
            f = 1.0 / num_batches_tracked if momentum is None else momentum
            rm = (1 - f) * rm + f * mean
            rv = (1 - f) * rv + f * var * n / (n - 1)     # unbiased: running
    else:
        mean, var = rm, rv
        centred = xc - mean
    invstd = 1.0 / np.sqrt(var + eps)
    y = centred * invstd * w + b
    return SimpleNamespace(y=np.moveaxis(y, -1, axis), mean=mean, invstd=invstd,
                           running_mean=rm, running_var=rv,
                           num_batches_tracked=num_batches_tracked)


def backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1):
    """Batch-norm backward in float64: (dx, dweight, dbias).

    training=True differentiates through the batch statistics (mean and
    invstd are functions of x); otherwise they are constants.
    """
    xc = _channels_last(x, axis)
    g = _channels_last(dy, axis)
    C = xc.shape[-1]
    n = xc.size // C
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    mean = np.asarray(mean, np.float64)
    invstd = np.asarray(invstd, np.float64)
    centred = xc - mean
    if training and n:
        # mean is the batch mean rounded: where it is (per channel), take x
        # about the unrounded one, as the forward does
        exact, m = _centred(xc)
        same = (m == mean) | (np.isnan(m) & np.isnan(mean))
        centred = np.where(same, exact, centred)
    xhat = centred * invstd
    dbias = _sum(g)
    dweight = _sum(g * xhat)
    if training:
        dx = w * invstd * (g - dbias / n - xhat * dweight / n)
    else:
        dx = g * w * invstd
    return np.moveaxis(dx, -1, axis), dweight, dbias


# How close a kernel must come to this reference: (rtol, atol) per data dtype,
# checked as |got - ref| <= atol + rtol * |ref|.  The CPU kernels accumulate and
# compute in float64 and round once on store, so these are about one unit in
# the last place of each dtype (float16 ulp(1) = 9.8e-4, float32 = 1.2e-7), with
# room for the rounding of inputs such as float32 weights.
TOLERANCE = {
    np.dtype(np.float16): (1e-3, 1e-3),
    np.dtype(np.float32): (1e-6, 1e-6),
    np.dtype(np.float64): (1e-12, 1e-12),
}


def max_violation(got, ref, dtype):
    """max(|got - ref| / (atol + rtol * |ref|)): <= 1 means within tolerance."""
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.size == 0:
        return 0.0
    bad_nan = np.isnan(got) != np.isnan(ref)
    if bad_nan.any():
        return np.inf
    with np.errstate(invalid="ignore"):
        err = np.where(np.isnan(ref), 0.0, np.abs(got - ref))
    return float(np.max(err / (atol + rtol * np.abs(np.nan_to_num(ref)))))
