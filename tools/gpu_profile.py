"""Where the GPU backend's time goes, for tools/gpu_check.sh.

    python3 tools/gpu_profile.py ops SHAPE[,SHAPE...] DTYPE[,DTYPE...]
        one warm-up, then each operation once per layout: the program to run
        under `ncu --clock-control none -k regex:fbn_` (kernel durations,
        DRAM throughput, occupancy, registers)
    python3 tools/gpu_profile.py launch
        host microseconds per CuPy launch by argument count and kind, per
        cupy.empty, and per fastbn call of each operation on a tiny tensor
    python3 tools/gpu_profile.py fuse SHAPE[,SHAPE...] DTYPE[,DTYPE...]
        device time (queued, as tools/bench_gpu.py) of the channels-first
        training forward and backward with and without the L2 fusion rule
        (_gpu.FUSE_L2_FRACTION), interleaved
    python3 tools/gpu_profile.py host [CALLS]
        cProfile of CALLS training forwards and backwards of a (16,16,8,8)
        float32 tensor, both layouts: the host's cost per call, by function
"""

import cProfile
import pstats
import sys

import numpy as np


def _data(cp, shape, dtype, layout, rng):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "nhwc":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    C = shape[1]
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = rng.uniform(0.5, 2, C).astype(pdt)
    b = rng.standard_normal(C).astype(pdt)
    return [cp.asarray(a) for a in (x, dy, w, b)] + [1 if layout == "nchw" else -1]


def ops(shapes, dtypes):
    import cupy as cp

    import fastbn
    rng = np.random.default_rng(0)
    for dt in dtypes:
        for shape in shapes:
            for layout in ("nchw", "nhwc"):
                x, dy, w, b, axis = _data(cp, shape, np.dtype(dt), layout, rng)
                st = fastbn.RunningStats(shape[1], dtype=w.dtype, like=x)
                for _ in range(2):             # the second round is the one to read
                    y, ctx = fastbn.forward(x, w, b, st, axis=axis)
                    fastbn.backward(dy, ctx)
                    fastbn.forward(x, w, b, st, training=False, axis=axis)
                cp.cuda.Device().synchronize()
                print("done", dt, shape, layout, flush=True)


def host(calls):
    import cupy as cp

    import fastbn
    rng = np.random.default_rng(0)
    for layout in ("nchw", "nhwc"):
        x, dy, w, b, axis = _data(cp, (16, 16, 8, 8), np.float32, layout, rng)
        st = fastbn.RunningStats(16, like=x)

        def loop():
            for _ in range(calls):
                y, ctx = fastbn.forward(x, w, b, st, axis=axis)
                fastbn.backward(dy, ctx)
        loop()
        cp.cuda.Device().synchronize()
        prof = cProfile.Profile()
        prof.enable()
        loop()
        prof.disable()
        cp.cuda.Device().synchronize()
        print(f"== {layout}: {calls} training forwards + backwards")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def launch(calls=20000):
    import time

    import cupy as cp

    import fastbn
    n = 22
    params = ", ".join(f"long long a{i}" for i in range(n))
    src = (f'extern "C" __global__ void k1(long long a) {{ }}\n'
           f'extern "C" __global__ void kn({params}) {{ }}\n'
           f'struct P {{ long long a[{n}]; }};\n'
           f'extern "C" __global__ void ks(P p) {{ }}\n')
    mod = cp.RawModule(code=src)
    k1, kn, ks = (mod.get_function(k) for k in ("k1", "kn", "ks"))
    arr = cp.empty(4)
    rec = np.zeros((), dtype=[(f"a{i}", np.int64) for i in range(n)])
    cases = [("launch, 1 int", lambda: k1((1,), (1,), (1,))),
             (f"launch, {n} ints", lambda: kn((1,), (1,), (1,) * n)),
             (f"launch, {n} np.int64", lambda: kn((1,), (1,), (np.int64(1),) * n)),
             (f"launch, {n} arrays", lambda: kn((1,), (1,), (arr,) * n)),
             (f"launch, 1 struct of {n}", lambda: ks((1,), (1,), (rec[()],))),
             ("cupy.empty(16)", lambda: cp.empty(16)),
             ("runtime.getDevice()", cp.cuda.runtime.getDevice),
             ("get_current_stream()", cp.cuda.get_current_stream)]
    rng = np.random.default_rng(0)
    for layout in ("nchw", "nhwc"):
        x, dy, w, b, axis = _data(cp, (16, 16, 8, 8), np.float32, layout, rng)
        st = fastbn.RunningStats(16, like=x)
        _, ctx = fastbn.forward(x, w, b, st, axis=axis)
        cases += [(f"fastbn training forward {layout}",
                   lambda x=x, w=w, b=b, st=st, axis=axis: fastbn.forward(x, w, b, st, axis=axis)),
                  (f"fastbn inference {layout}",
                   lambda x=x, w=w, b=b, st=st, axis=axis: fastbn.forward(
                       x, w, b, st, training=False, axis=axis)),
                  (f"fastbn backward {layout}", lambda dy=dy, ctx=ctx: fastbn.backward(dy, ctx))]
    for name, fn in cases:
        try:
            for _ in range(100):
                fn()
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(calls // 10):
                fn()
            t = (time.perf_counter() - t0) / (calls // 10)
            cp.cuda.Device().synchronize()
            print(f"{name:<36} {t * 1e6:7.2f} us")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name:<36} failed: {type(exc).__name__}: {exc}")


def fuse(shapes, dtypes, samples=7):
    import os

    import cupy as cp

    import fastbn
    from fastbn import _gpu
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_gpu
    queued = bench_gpu.Queued(cp)
    rng = np.random.default_rng(0)
    for dt in dtypes:
        for shape in shapes:
            x, dy, w, b, axis = _data(cp, shape, np.dtype(dt), "nchw", rng)
            st = fastbn.RunningStats(shape[1], dtype=w.dtype, like=x)
            _, ctx = fastbn.forward(x, w, b, st, axis=axis)
            ops = {"forward": lambda: fastbn.forward(x, w, b, st, axis=axis),
                   "backward": lambda: fastbn.backward(dy, ctx)}
            for op, fn in ops.items():
                res = {}
                for _ in range(2):
                    for frac in (1.0, 0.0):
                        _gpu.FUSE_L2_FRACTION = frac
                        for d in _gpu._DEVICES.values():
                            d.plans.clear()
                        t = bench_gpu.measure(cp, queued, fn, samples)[0]
                        res.setdefault(frac, []).append(t)
                _gpu.FUSE_L2_FRACTION = 1.0
                for d in _gpu._DEVICES.values():
                    d.plans.clear()
                print(f"{dt} {shape} {op}: fused-if-fits " +
                      ", ".join(f"{t * 1e6:.1f}" for t in res[1.0]) + " us; never fused " +
                      ", ".join(f"{t * 1e6:.1f}" for t in res[0.0]) + " us", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "fuse":
        fuse([tuple(int(v) for v in t.split("x")) for t in sys.argv[2].split(",")],
             sys.argv[3].split(","))
    elif sys.argv[1] == "launch":
        launch()
    elif sys.argv[1] == "ops":
        ops([tuple(int(v) for v in s.split("x")) for s in sys.argv[2].split(",")],
            sys.argv[3].split(","))
    else:
        host(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
