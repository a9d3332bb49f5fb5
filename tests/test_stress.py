"""Long runs and large tensors.

- No leak: resident memory is flat over 100,000 forward + backward calls.
- 64-bit indexing: a float16 tensor of more than 2**31 elements (4 GiB) gives
  the right statistics, outputs and gradients in its last channels, whose
  offsets do not fit in 32 bits (slow; skipped where memory is short).
"""

import gc
import os

import numpy as np
import pytest

import fastbn


def _rss_bytes():
    """Resident set size from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="reads /proc/self/statm (Linux)")


def _growth(step, calls, warmup):
    for _ in range(warmup):           # allocator pools, caches, first-call imports
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(calls):
        step()
    gc.collect()
    return _rss_bytes() - before


@needs_proc
def test_no_leak_over_100k_forward_backward_calls():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    x_cl = rng.standard_normal((4, 5, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.ones(3, np.float32)
    b = np.zeros(3, np.float32)
    stats = fastbn.RunningStats(3)
    out, dxo = np.empty_like(x), np.empty_like(x)
    bad = x.astype(np.int32)
    calls = [0]

    def step():
        # every path once in a while, the common one every time
        y, ctx = fastbn.forward(x, w, b, stats)
        fastbn.backward(dy, ctx)
        k = calls[0] = calls[0] + 1
        if k % 10 == 0:
            _, ctx = fastbn.forward(x, w, b, stats, training=False, out=out)
            fastbn.backward(dy, ctx, out=dxo)
            _, ctx = fastbn.forward(x_cl, axis=-1)
            fastbn.backward(x_cl, ctx)
        if k % 100 == 0:
            try:                                       # error paths must not leak either
                fastbn.forward(bad, stats=stats)
            except TypeError:
                pass

    grown = _growth(step, 100_000, 5_000)
    # A leak of one small object per call would be >= 3 MB here.
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 100,000 calls"


@needs_proc
def test_no_leak_layer_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    bn = fastbn.BatchNorm(3)
    xt = torch.from_numpy(rng.standard_normal((4, 3, 5)).astype(np.float32))
    xn = rng.standard_normal((4, 3, 5)).astype(np.float32)

    def step():
        bn.backward(bn.forward(xt))                    # DLPack in and out
        bn.backward(bn.forward(xn))

    grown = _growth(step, 20_000, 2_000)
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 20,000 calls"


# ----------------------------------------------------------------------------
# 64-bit indexing

BIG_SHAPE = (4, 1025, 524288)          # 2,149,580,800 elements > 2**31; 4.0 GiB as float16
BIG_BYTES = int(np.prod(BIG_SHAPE, dtype=np.int64)) * 2
# channels whose elements in the last sample lie beyond 2**31 (and the first ones)
CHECK = [0, 1, 513, 1023, 1024]


def _fill(x):
    """Random float16 data with a period (999,983, prime) that no power of two
    divides: reading at an offset wrapped by 2**31 or 2**32 reads other values."""
    period = 999_983
    block = (np.random.default_rng(5).standard_normal(period) * 2 + 0.5).astype(np.float16)
    flat = x.reshape(-1)
    full = flat.size // period
    flat[: full * period].reshape(full, period)[...] = block
    flat[full * period:] = block[: flat.size - full * period]


def _check_channel(xc, yc, dxc, mean, invstd, eps, what):
    """One channel's statistics, y (forward, if given) and dx (backward with
    dy = x, if given), all float16 of any shape, against float64."""
    xd = xc.astype(np.float64).ravel()
    n = xd.size
    m = xd.mean()
    v = xd.var()
    assert abs(mean - m) <= 1e-9 * (1 + abs(m)), what
    assert abs(1.0 / invstd**2 - eps - v) <= 1e-9 * v, what
    inv = 1.0 / np.sqrt(v + eps)
    xhat = (xd - m) * inv
    if yc is not None:                                # y = xhat (no affine)
        assert np.max(np.abs(yc.astype(np.float64).ravel() - xhat)
                      / (1e-3 + 1e-3 * np.abs(xhat))) <= 1.0, what
    if dxc is not None:                               # backward with dy = x
        g = xd
        dbias, dweight = g.sum(), (g * xhat).sum()
        dx_ref = inv * (g - dbias / n - xhat * dweight / n)
        assert np.max(np.abs(dxc.astype(np.float64).ravel() - dx_ref)
                      / (1e-3 + 1e-3 * np.abs(dx_ref))) <= 1.0, what
    return m, v


@pytest.mark.slow
def test_more_than_2_31_elements_float16():
    if _mem_available_bytes() < 3 * BIG_BYTES:
        pytest.skip(f"needs {3 * BIG_BYTES / 2**30:.0f} GiB of available memory")
    x = np.empty(BIG_SHAPE, np.float16)
    _fill(x)
    y = np.empty_like(x)
    eps = 1e-5
    C = BIG_SHAPE[1]
    # channels-first kernel: (N, C, S), the last channel starts past 2**31
    stats = fastbn.RunningStats(C, momentum=1.0)
    _, ctx = fastbn.forward(x, stats=stats, out=y)
    n = BIG_SHAPE[0] * BIG_SHAPE[2]
    for c in CHECK:
        m, v = _check_channel(x[:, c], y[:, c], None, ctx.mean[c], ctx.invstd[c], eps,
                              f"nchw forward, channel {c}")
        assert abs(stats.mean[c] - m) <= 1e-6 * (1 + abs(m))
        assert abs(stats.var[c] - v * n / (n - 1)) <= 1e-6 * v
    # backward over the same memory (dy = x), dx written over y
    fastbn.backward(x, ctx, out=y)
    for c in CHECK:
        _check_channel(x[:, c], None, y[:, c], ctx.mean[c], ctx.invstd[c], eps,
                       f"nchw backward, channel {c}")
    # channels-last kernel: the same memory as (M, C'), rows past 2**31
    x2 = x.reshape(-1, C)
    y2 = y.reshape(-1, C)
    _, ctx = fastbn.forward(x2, axis=-1, out=y2)
    for c in CHECK:
        _check_channel(x2[:, c], y2[:, c], None, ctx.mean[c], ctx.invstd[c], eps,
                       f"nhwc forward, channel {c}")
    fastbn.backward(x2, ctx, out=y2)
    for c in CHECK[-2:]:
        _check_channel(x2[:, c], None, y2[:, c], ctx.mean[c], ctx.invstd[c], eps,
                       f"nhwc backward, channel {c}")
