"""Calls from many Python threads at once.

The kernels run without the GIL; the functional API keeps no state between
calls, so concurrent calls on distinct data give exactly the single-threaded
bits.  Shared state is guarded: training forwards that update one
RunningStats are serialised (no update is lost), and a BatchNorm layer pairs
each thread's backward() with that thread's own forward().
"""

import sys
import threading
import time

import numpy as np

import fastbn

N_THREADS = 8
ROUNDS = 6


def _run_in_threads(fn, n=N_THREADS):
    """fn(i) in n threads released together; re-raises the first failure."""
    barrier = threading.Barrier(n)
    errors = [None] * n
    results = [None] * n

    def body(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results


# Distinct work per thread: both layouts, all dtypes, tensors large enough
# for the multithreaded paths (32 Ki elements and more) and small ones, each
# shape with OpenMP teams of 1 and 2.
def _case(i):
    dtype = [np.float32, np.float64, np.float16][i % 3]
    shape, axis = [((8, 6, 30, 30), 1), ((16, 20, 20, 6), -1), ((3, 6, 7), 1),
                   ((200, 6), 1)][i % 4]
    nt = 1 + (i // 4) % 2
    rng = np.random.default_rng(1000 + i)
    x = (rng.standard_normal(shape) * (1 + i) + i).astype(dtype)
    if i % 8 == 4:               # (8, 6, 30, 30) with channels-last strides, axis=1
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = np.empty_like(x)
    dy[...] = rng.standard_normal(shape)
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = rng.uniform(0.5, 2, 6).astype(pdt)
    b = rng.standard_normal(6).astype(pdt)
    return dict(x=x, dy=dy, w=w, b=b, axis=axis, pdt=pdt, nt=nt)


def _compute(c):
    """Everything a forward + backward pair produces, as bytes."""
    stats = fastbn.RunningStats(6, dtype=c["pdt"], momentum=0.3)
    y, ctx = fastbn.forward(c["x"], c["w"], c["b"], stats, axis=c["axis"], num_threads=c["nt"])
    dx, dw, db = fastbn.backward(c["dy"], ctx, num_threads=c["nt"])
    yi, ctxi = fastbn.forward(c["x"], c["w"], c["b"], stats, training=False, axis=c["axis"],
                              num_threads=c["nt"])
    dxi, _, _ = fastbn.backward(c["dy"], ctxi, num_threads=c["nt"])
    return [a.tobytes() for a in (y, ctx.mean, ctx.invstd, stats.mean, stats.var, dx, dw, db,
                                  yi, dxi)]


def test_threads_give_the_single_threaded_bits():
    cases = [_case(i) for i in range(N_THREADS)]
    # what the cases are meant to cover: multithreaded teams on large tensors
    # of both layouts, and x with channels-last strides read in place
    big = [c for c in cases if c["x"].size >= 32768 and c["nt"] == 2]
    assert {c["axis"] for c in big} == {1, -1}
    strided = [c for c in cases if c["axis"] == 1 and c["x"].ndim == 4
               and not c["x"].flags.c_contiguous]
    assert strided and all(fastbn.forward(c["x"])[1].layout == "nhwc" for c in strided)
    expected = [_compute(c) for c in cases]          # one thread, one after the other

    def work(i):
        return [_compute(cases[i]) == expected[i] for _ in range(ROUNDS)]

    assert all(all(r) for r in _run_in_threads(work))


def test_kernels_release_the_gil():
    """While one thread is inside a long kernel, another keeps running Python.

    The main thread spins and timestamps every turn; a kernel holding the GIL
    would stop it for the kernel's whole duration (C code is never preempted
    by the interpreter), so the longest pause must stay well below that."""
    x = np.random.default_rng(0).standard_normal((32, 16, 256, 256)).astype(np.float32)
    out = np.empty_like(x)
    fastbn.forward(x, out=out, num_threads=1)        # page in out
    windows = []
    started, done = threading.Event(), threading.Event()

    def long_calls():
        started.set()
        for _ in range(2):
            t0 = time.perf_counter()
            fastbn.forward(x, out=out, num_threads=1)
            windows.append((t0, time.perf_counter()))
        done.set()

    stamps = []
    # A short switch interval: a GIL-holding call could then let the main
    # thread in for at most ~0.1 ms at its start, not for 5 ms.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        t = threading.Thread(target=long_calls)
        t.start()
        started.wait()
        while not done.is_set():
            stamps.append(time.perf_counter())
        t.join()
    finally:
        sys.setswitchinterval(interval)
    stamps = np.array(stamps)
    for t0, t1 in windows:
        inside = stamps[(stamps > t0) & (stamps < t1)]
        assert inside.size > 1, "the main thread never ran during the kernel"
        longest = max(np.diff(inside).max(), inside[0] - t0, t1 - inside[-1])
        assert longest < 0.5 * (t1 - t0), (longest, t1 - t0)


def test_shared_layer_pairs_each_backward_with_its_threads_forward():
    C = 6
    layer = fastbn.BatchNorm(C, momentum=None)
    layer.weight[...] = np.linspace(0.5, 2, C)
    layer.bias[...] = np.linspace(-1, 1, C)
    rng = np.random.default_rng(7)
    xs = [(rng.standard_normal((4, C, 9, 9)) * (1 + i) + 3 * i).astype(np.float32)
          for i in range(N_THREADS)]
    dys = [rng.standard_normal((4, C, 9, 9)).astype(np.float32) for _ in range(N_THREADS)]
    # the same layer, one thread: what each (x, dy) pair must give
    solo = fastbn.BatchNorm(C)
    solo.weight[...] = layer.weight
    solo.bias[...] = layer.bias
    expected = []
    for x, dy in zip(xs, dys):
        y = solo.forward(x)
        dx = solo.backward(dy)
        expected.append((y.tobytes(), dx.tobytes()))

    def work(i):
        ok = True
        for _ in range(ROUNDS):
            y = layer.forward(xs[i])
            time.sleep(0)                            # let other threads interleave
            dx = layer.backward(dys[i])
            ok &= (y.tobytes(), dx.tobytes()) == expected[i]
        return ok

    assert all(_run_in_threads(work))
    # every update counted; momentum=None: the running mean is the mean of
    # all batch means, whatever order the threads took the lock in
    st = layer.stats
    assert st.num_batches_tracked == N_THREADS * ROUNDS
    batch_means = np.array([x.astype(np.float64).mean(axis=(0, 2, 3)) for x in xs])
    batch_vars = np.array([x.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for x in xs])
    np.testing.assert_allclose(st.mean, batch_means.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.var, batch_vars.mean(0), rtol=1e-5)
    # grad_weight / grad_bias: one consistent pair from one of the threads
    pairs = []
    for x, dy in zip(xs, dys):
        solo.forward(x)
        solo.backward(dy)
        pairs.append((solo.grad_weight.tobytes(), solo.grad_bias.tobytes()))
    assert (layer.grad_weight.tobytes(), layer.grad_bias.tobytes()) in pairs


def test_backward_in_another_thread_uses_the_last_forward():
    """An engine may run forward and backward in different threads."""
    layer = fastbn.BatchNorm(3)
    x = np.random.default_rng(3).standard_normal((4, 3, 5)).astype(np.float32)
    dy = np.ones_like(x)
    layer.forward(x)
    dx = _run_in_threads(lambda i: layer.backward(dy), n=1)[0]
    ref = fastbn.BatchNorm(3)
    ref.forward(x)
    assert np.array_equal(dx, ref.backward(dy))


def test_shared_stats_lose_no_update():
    """Distinct batches, cumulative average: the result is the mean of the
    batch means whatever the order the threads took the lock in."""
    C = 4
    stats = fastbn.RunningStats(C, momentum=None, dtype=np.float64)
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((8, C, 40, 40)) + i for i in range(N_THREADS)]

    def work(i):
        for _ in range(ROUNDS):
            fastbn.forward(xs[i], stats=stats, num_threads=1 + i % 2)

    _run_in_threads(work)
    assert stats.num_batches_tracked == N_THREADS * ROUNDS
    means = np.array([x.mean(axis=(0, 2, 3)) for x in xs])
    np.testing.assert_allclose(stats.mean, means.mean(0), rtol=1e-12, atol=1e-12)


def test_shared_stats_updates_are_serial_bit_for_bit():
    """The same batch from every thread: any serial order gives the same bits,
    so the concurrent result must equal a plain loop exactly (a torn or lost
    read-modify-write of the buffers would not)."""
    C = 4
    x = np.random.default_rng(12).standard_normal((8, C, 40, 40)).astype(np.float32) + 2
    serial = fastbn.RunningStats(C, momentum=0.1)
    for _ in range(N_THREADS * ROUNDS):
        fastbn.forward(x, stats=serial)
    shared = fastbn.RunningStats(C, momentum=0.1)

    def work(i):
        for _ in range(ROUNDS):
            fastbn.forward(x, stats=shared, num_threads=1 + i % 2)

    _run_in_threads(work)
    assert shared.num_batches_tracked == serial.num_batches_tracked
    assert shared.mean.tobytes() == serial.mean.tobytes()
    assert shared.var.tobytes() == serial.var.tobytes()
