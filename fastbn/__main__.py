"""python -m fastbn            backends, threads and a self-check of every kernel
python -m fastbn bench      the speed table (see fastbn/bench.py)"""

import importlib.util
import platform
import sys

import numpy as np

import fastbn
from fastbn import _cpu, _reference


def _have(name):
    return importlib.util.find_spec(name) is not None


def _gpu_status():
    if not _have("cupy"):
        return "not available (CuPy not installed: pip install fastbn[gpu])"
    try:
        import cupy

        if not cupy.is_available():
            return "CuPy found, no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"{name} (CuPy {cupy.__version__}; kernels compile on first use)"
    except Exception as exc:  # noqa: BLE001 - any CUDA runtime error means "no GPU here"
        return f"CuPy found, CUDA unusable ({type(exc).__name__})"


def info():
    print(f"fastbn {fastbn.__version__}  "
          f"(numpy {np.__version__}, Python {platform.python_version()})")
    omp = "OpenMP" if _cpu.openmp_enabled() else "no OpenMP: single-threaded build"
    print(f"backends: cpu ({omp}, {fastbn.get_num_threads()} threads by default)", end="")
    print("; gpu:", _gpu_status())
    peers = [n for n in ("torch", "jax", "threadpoolctl") if _have(n)]
    print("interop / peers found:", ", ".join(peers) if peers else "none")


def _case(rng, op, layout, dtype, num_threads):
    """Run one kernel on a small adversarial input; return its max violation."""
    C = 5
    shape = (6, 7, 9, C) if layout == "nhwc" else (6, C, 7, 9)
    axis = -1 if layout == "nhwc" else 1
    x = (rng.standard_normal(shape) * 3 + 100).astype(dtype)
    pdtype = _reference.np.float64 if dtype == np.float64 else np.float32
    w = rng.standard_normal(C).astype(pdtype)
    b = rng.standard_normal(C).astype(pdtype)
    stats = fastbn.RunningStats(C, dtype=pdtype)
    stats.load_state_dict({"running_mean": np.full(C, 99.0), "running_var": np.full(C, 8.0)})
    training = op in ("forward-train", "backward-train")
    y, ctx = fastbn.forward(x, w, b, stats, training=training, axis=axis, num_threads=num_threads)
    ref = _reference.forward(x, w, b, np.full(C, 99.0), np.full(C, 8.0), training=training,
                             axis=axis)
    if op.startswith("forward"):
        worst = _reference.max_violation(y, ref.y, dtype)
        if training:
            worst = max(worst, _reference.max_violation(stats.mean, ref.running_mean, pdtype),
                        _reference.max_violation(stats.var, ref.running_var, pdtype))
        return worst
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = fastbn.backward(dy, ctx, num_threads=num_threads)
    rdx, rdw, rdb = _reference.backward(dy, x, ref.mean, ref.invstd, w, training=training,
                                        axis=axis)
    return max(_reference.max_violation(dx, rdx, dtype),
               _reference.max_violation(dw, rdw, pdtype),
               _reference.max_violation(db, rdb, pdtype))


def selfcheck():
    """Every kernel against the float64 reference; True if all pass."""
    print("\nself-check against the float64 reference "
          "(error / tolerance; <= 1 passes; tolerances in fastbn/_reference.py)")
    ok = True
    nt = fastbn.get_num_threads()
    for op in ("forward-train", "forward-infer", "backward-train", "backward-eval"):
        for layout in ("nchw", "nhwc"):
            cells = []
            for dtype in (np.float16, np.float32, np.float64):
                v = _case(np.random.default_rng(0), op, layout, dtype, nt)
                ok &= v <= 1.0
                cells.append(f"{np.dtype(dtype).name} {v:7.3f} {'ok' if v <= 1 else 'FAIL'}")
            print(f"  {op:15s} {layout}  " + "   ".join(cells))
    # Thread-count invariance: exact equality, on a tensor large enough to split.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 130, 130)).astype(np.float32)
    runs = []
    for t in range(1, max(nt, 3) + 1):
        y, ctx = fastbn.forward(x, num_threads=t)
        dx, _, _ = fastbn.backward(x, ctx, num_threads=t)
        runs.append((y, dx))
    same = all(np.array_equal(r[0], runs[0][0]) and np.array_equal(r[1], runs[0][1])
               for r in runs)
    ok &= same
    print(f"  bit-identical results for 1..{len(runs)} threads: {'ok' if same else 'FAIL'}")
    print("self-check:", "PASSED" if ok else "FAILED")
    return ok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fastbn import bench
        bench.keep_freed_memory()       # before any large allocation (see its docstring)
        return bench.main(argv[1:])
    if argv:
        print(__doc__)
        return 2
    info()
    return 0 if selfcheck() else 1


if __name__ == "__main__":
    sys.exit(main())
