"""GPU speed table: fastbn's CUDA kernels against the copy floor and peers.

    python3 tools/bench_gpu.py [--quick] [--out FILE.md] [--json FILE.json]

For each operation (training forward, inference forward, training backward),
layout (NCHW, NHWC), dtype (float32, float16) and shape, one row with

    gpu us      device time per call: the calls are queued behind a spinning
                kernel, so the host has issued all of them before the device
                starts the first; the time between two events around them then
                holds no host gaps (what a CUDA graph or an engine that keeps
                the device fed would see)
    eff         bytes at the floor / gpu time / copy bandwidth: 2*E*s bytes for
                a forward (read x, write y), 3*E*s for a backward (read x and
                dy, write dx); the copy bandwidth is a device-to-device copy of
                a buffer of the same size, measured in this run (1.0 = floor)
    call us     time per call when Python issues calls back to back and waits
                for none: the larger of the host's cost per call (argument
                checks, allocation, launches) and the device time
    torch, cudnn  the same two times for torch.nn.functional.batch_norm on
                CUDA with cuDNN disabled (PyTorch's native kernels) and
                enabled; backward through autograd
    cupy-cudnn  cupy.cudnn batch normalization, where CuPy has cuDNN (CuPy 14
                has none)
    vs best     fastbn's speed-up over the fastest peer, in device time and
                in call time

Timing: CUDA events after a warm-up, the median of several samples, every
sample followed by a synchronisation that raises any launch error.  A queued
sample counts only if the spinning kernel was still running when the last
call had been issued (else the spin doubles and the sample is taken again).
Inputs are random normal data (never zeros).  Prints the GPU model and the
command line with the table.

This file is standalone (it is not part of the package): it can be folded into
`python -m fastbn bench` later.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

SHAPES = [(16, 16, 8, 8), (32, 3, 224, 224), (64, 16, 56, 56), (32, 64, 56, 56),
          (256, 256, 14, 14), (64, 2048, 7, 7), (64, 256, 56, 56)]
QUICK_SHAPES = [(16, 16, 8, 8), (32, 64, 56, 56)]
OPS = ("forward-train", "forward-infer", "backward")
EPS, MOMENTUM = 1e-5, 0.1


def _events_time(cp, fn, reps, samples):
    """Median seconds per call of fn over `samples` samples of `reps` calls
    issued back to back from Python."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / reps)
    cp.cuda.Device().synchronize()           # raises any pending launch error
    return statistics.median(out)


def _reps(cp, fn, target_s=0.02):
    """Calls per sample so that a sample takes about target_s."""
    fn()
    cp.cuda.Device().synchronize()
    t = _events_time(cp, fn, 3, 1)
    return max(3, min(2000, int(target_s / max(t, 1e-7))))


_SPIN_SRC = r"""
extern "C" __global__ void fbn_bench_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


class Queued:
    """Device time per call: `reps` calls queued behind a spinning kernel."""

    def __init__(self, cp):
        self.cp = cp
        self.spin = cp.RawKernel(_SPIN_SRC, "fbn_bench_spin")
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.hz = props["clockRate"] * 1e3          # the highest SM clock: spins at least this long

    def time(self, fn, reps, samples, host_s):
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        spin_s = 1.5 * reps * host_s + 2e-4
        out = []
        while len(out) < samples:
            self.spin((1,), (1,), (np.int64(spin_s * self.hz),))
            start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            end.record()
            issued = time.perf_counter() - t0
            ok = not start.done                # the device has not reached start yet
            end.synchronize()
            if ok:
                out.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / reps)
            else:
                spin_s = 2 * max(spin_s, issued)
                if spin_s > 5.0:
                    raise RuntimeError("calls could not be queued ahead of the device")
        cp.cuda.Device().synchronize()
        return statistics.median(out)


def measure(cp, queued, fn, samples, strict=True):
    """(device seconds per call, call seconds per call) of fn.  The device
    time is None for a peer whose calls wait for the device (strict=False)."""
    call = _events_time(cp, fn, _reps(cp, fn), samples)
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    host = (time.perf_counter() - t0) / 5
    cp.cuda.Device().synchronize()
    # enough calls that the device works for about a millisecond, at most 200
    reps = max(5, min(200, int(1e-3 / max(call, 1e-7)) * 4))
    try:
        return queued.time(fn, reps, samples, host), call
    except RuntimeError:
        if strict:
            raise
        return None, call


def copy_bandwidth(cp, queued, nbytes, samples):
    """Bytes read + written per second by a device-to-device copy of nbytes
    (device time, queued)."""
    src = cp.random.standard_normal(max(1, nbytes // 4), dtype=cp.float32)
    dst = cp.empty_like(src)

    def copy():
        cp.copyto(dst, src)
    return 2 * src.nbytes / measure(cp, queued, copy, samples)[0]


def fastbn_calls(cp, fastbn, x, dy, w, b, stats, axis):
    _, ctx = fastbn.forward(x, w, b, stats, axis=axis)
    return {
        "forward-train": lambda: fastbn.forward(x, w, b, stats, axis=axis),
        "forward-infer": lambda: fastbn.forward(x, w, b, stats, training=False, axis=axis),
        "backward": lambda: fastbn.backward(dy, ctx),
    }


def torch_calls(torch, x, dy, w, b, cudnn):
    F = torch.nn.functional
    rm = torch.zeros(w.shape[0], device=x.device, dtype=w.dtype)
    rv = torch.ones(w.shape[0], device=x.device, dtype=w.dtype)
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)
    with torch.backends.cudnn.flags(enabled=cudnn):
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)

    def fwd_train():
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=cudnn):
            F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

    def fwd_infer():
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=cudnn):
            F.batch_norm(x, rm, rv, w, b, training=False, momentum=MOMENTUM, eps=EPS)

    def bwd():
        with torch.backends.cudnn.flags(enabled=cudnn):
            torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
    return {"forward-train": fwd_train, "forward-infer": fwd_infer, "backward": bwd}


def cupy_cudnn_calls(cp, x, dy, w, b, layout):
    """cupy.cudnn batch norm (NCHW / NHWC via the tensor layout), or None."""
    try:
        from cupy import cudnn
        from cupy.cuda import cudnn as lib
    except Exception:  # noqa: BLE001 - no cuDNN in this CuPy
        return None
    fmt = lib.CUDNN_TENSOR_NHWC if layout == "nhwc" else lib.CUDNN_TENSOR_NCHW
    mode = lib.CUDNN_BATCHNORM_SPATIAL
    C = w.shape[0]
    pdt = w.dtype
    rm, rv = cp.zeros(C, pdt), cp.ones(C, pdt)
    mean, inv = cp.empty(C, pdt), cp.empty(C, pdt)
    xx = x if layout == "nchw" else x      # cupy arrays are already in the layout's memory
    try:
        cudnn.batch_normalization_forward_training(xx, w, b, rm, rv, mean, inv, EPS, MOMENTUM,
                                                   mode, tensor_layout=fmt)
    except Exception:  # noqa: BLE001 - signature / support differs across CuPy versions
        return None

    def fwd_train():
        cudnn.batch_normalization_forward_training(xx, w, b, rm, rv, mean, inv, EPS, MOMENTUM,
                                                   mode, tensor_layout=fmt)

    def fwd_infer():
        cudnn.batch_normalization_forward_inference(xx, w, b, rm, rv, EPS, mode,
                                                    tensor_layout=fmt)

    def bwd():
        cudnn.batch_normalization_backward(xx, w, dy, mean, inv, EPS, mode, tensor_layout=fmt)
    calls = {"forward-train": fwd_train, "forward-infer": fwd_infer, "backward": bwd}
    for name, fn in list(calls.items()):
        try:
            fn()
        except Exception:  # noqa: BLE001
            calls[name] = None
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer samples")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--shapes", help="comma-separated NxCxHxW list (default: the full set)")
    opts = ap.parse_args(argv)

    import cupy as cp
    import fastbn
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None

    samples = 3 if opts.quick else opts.samples
    shapes = QUICK_SHAPES if opts.quick else SHAPES
    if opts.shapes:
        shapes = [tuple(int(v) for v in t.split("x")) for t in opts.shapes.split(",")]
    queued = Queued(cp)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    n = fastbn.precompile()
    header = [f"GPU: {name}, {props['multiProcessorCount']} SMs, "
              f"{props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cp.__version__}, "
              f"torch {torch.__version__ if torch else 'n/a'}, Python {platform.python_version()}; "
              f"fastbn kernels precompiled: {n}",
              f"command: python3 {' '.join(sys.argv)}", ""]
    cols = ["op", "layout", "shape", "dtype", "gpu us", "eff", "call us", "torch gpu / call",
            "cudnn gpu / call", "cupy-cudnn gpu / call", "vs best gpu / call"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = []
    rng = np.random.default_rng(0)
    bw_cache = {}
    for dtype in opts.dtypes.split(","):
        np_dt = np.dtype(dtype)
        pdt = np.float32 if np_dt != np.float64 else np.float64
        for shape in shapes:
            E = int(np.prod(shape))
            nbytes = E * np_dt.itemsize
            if nbytes not in bw_cache:
                bw_cache[nbytes] = copy_bandwidth(cp, queued, nbytes, samples)
            bw = bw_cache[nbytes]
            C = shape[1]
            for layout in ("nchw", "nhwc"):
                x_np = (rng.standard_normal(shape) * 2 + 1).astype(np_dt)
                dy_np = rng.standard_normal(shape).astype(np_dt)
                if layout == "nhwc":
                    x_np = np.ascontiguousarray(np.moveaxis(x_np, 1, -1))
                    dy_np = np.ascontiguousarray(np.moveaxis(dy_np, 1, -1))
                axis = 1 if layout == "nchw" else -1
                x, dy = cp.asarray(x_np), cp.asarray(dy_np)
                w = cp.asarray(rng.uniform(0.5, 2, C).astype(pdt))
                b = cp.asarray(rng.standard_normal(C).astype(pdt))
                stats = fastbn.RunningStats(C, dtype=pdt, like=x)
                fb = fastbn_calls(cp, fastbn, x, dy, w, b, stats, axis)
                peers = {}
                if torch is not None:
                    tx = torch.from_dlpack(x)
                    tdy = torch.from_dlpack(dy)
                    if layout == "nhwc":          # logical NCHW with channels_last strides
                        tx = tx.permute(0, tx.ndim - 1, *range(1, tx.ndim - 1))
                        tdy = tdy.permute(0, tdy.ndim - 1, *range(1, tdy.ndim - 1))
                    tw, tb = torch.from_dlpack(w), torch.from_dlpack(b)
                    peers["torch"] = torch_calls(torch, tx, tdy, tw, tb, cudnn=False)
                    peers["cudnn"] = torch_calls(torch, tx, tdy, tw, tb, cudnn=True)
                cc = cupy_cudnn_calls(cp, x, dy, w, b, layout)
                if cc:
                    peers["cupy-cudnn"] = cc
                for op in OPS:
                    t, tc = measure(cp, queued, fb[op], samples)
                    floor = (3 if op == "backward" else 2) * nbytes
                    res = {"op": op, "layout": layout, "shape": list(shape), "dtype": dtype,
                           "fastbn_s": t, "fastbn_call_s": tc, "eff": floor / t / bw,
                           "copy_GBps": bw / 1e9}
                    for pname, calls in peers.items():
                        fn = calls.get(op)
                        pt, pc = (None, None) if fn is None else measure(cp, queued, fn, samples,
                                                                           strict=False)
                        res[pname + "_s"], res[pname + "_call_s"] = pt, pc
                    for kind, suffix in (("gpu", "_s"), ("call", "_call_s")):
                        best = min((res[p + suffix] for p in peers if res.get(p + suffix)),
                                   default=None)
                        res["vs_best_" + kind] = None if best is None else best / res[
                            "fastbn" + suffix]
                    rows.append(res)

                    def us(v):
                        return "n/a" if v is None else f"{v * 1e6:.1f}"

                    def pair(name):
                        if res.get(name + "_call_s") is None:
                            return "n/a"
                        return f"{us(res[name + '_s'])} / {us(res[name + '_call_s'])}"

                    def ratio(v):
                        return "n/a" if v is None else f"{v:.2f}x"
                    lines.append("| " + " | ".join([
                        op, layout, "x".join(map(str, shape)), dtype, us(t), f"{res['eff']:.2f}",
                        us(tc), pair("torch"), pair("cudnn"), pair("cupy-cudnn"),
                        f"{ratio(res['vs_best_gpu'])} / {ratio(res['vs_best_call'])}"]) + " |")
                    print(lines[-1], flush=True)
    text = "\n".join(header + ["copy bandwidth (device to device, bytes read + written): "
                               + ", ".join(f"{k / 2**20:.1f} MiB: {v / 1e9:.0f} GB/s"
                                           for k, v in sorted(bw_cache.items())), ""] + lines)
    print("\n" + text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
