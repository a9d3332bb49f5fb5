"""GPU speed table: fastbn's CUDA kernels against the copy floor and peers.

    python3 tools/bench_gpu.py [--quick] [--out FILE.md] [--json FILE.json]

For each operation (training forward, inference forward, training backward),
layout (NCHW, NHWC), dtype (float32, float16) and shape, one row with

    fastbn      median microseconds per call (cupy arrays in, cupy out)
    eff         bytes at the floor / time / copy bandwidth: 2*E*s bytes for a
                forward (read x, write y), 3*E*s for a backward (read x and dy,
                write dx); the copy bandwidth is a device-to-device copy of a
                buffer of the same size, measured in this run (1.0 = floor)
    torch       torch.nn.functional.batch_norm on CUDA with cuDNN disabled
                (PyTorch's native kernels); backward through autograd
    cudnn       the same with cuDNN enabled
    cupy-cudnn  cupy.cudnn batch normalization, where CuPy has cuDNN
    vs best     fastbn's speed-up over the fastest of the peers

Timing: CUDA events around `reps` back-to-back calls after a warm-up, the
median of several such samples, every sample followed by a synchronisation
that raises any launch error.  Inputs are random normal data (never zeros).
Per-call times include each library's Python overhead, which dominates tiny
tensors.  Prints the GPU model and the command line with the table.

This file is standalone (it is not part of the package): it can be folded into
`python -m fastbn bench` later.
"""

import argparse
import json
import platform
import statistics
import sys

import numpy as np

SHAPES = [(16, 16, 8, 8), (32, 3, 224, 224), (64, 16, 56, 56), (32, 64, 56, 56),
          (256, 256, 14, 14), (64, 2048, 7, 7), (64, 256, 56, 56)]
QUICK_SHAPES = [(16, 16, 8, 8), (32, 64, 56, 56)]
OPS = ("forward-train", "forward-infer", "backward")
EPS, MOMENTUM = 1e-5, 0.1


def _events_time(cp, fn, reps, samples):
    """Median seconds per call of fn over `samples` samples of `reps` calls."""
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


def copy_bandwidth(cp, nbytes, samples):
    src = cp.random.standard_normal(max(1, nbytes // 4), dtype=cp.float32)
    dst = cp.empty_like(src)

    def copy():
        cp.copyto(dst, src)
    reps = _reps(cp, copy)
    return 2 * src.nbytes / _events_time(cp, copy, reps, samples)


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
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    n = fastbn.precompile()
    header = [f"GPU: {name}, {props['multiProcessorCount']} SMs, "
              f"{props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cp.__version__}, "
              f"torch {torch.__version__ if torch else 'n/a'}, Python {platform.python_version()}; "
              f"fastbn kernels precompiled: {n}",
              f"command: python3 {' '.join(sys.argv)}", ""]
    cols = ["op", "layout", "shape", "dtype", "fastbn us", "eff", "torch us", "cudnn us",
            "cupy-cudnn us", "vs best"]
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
                bw_cache[nbytes] = copy_bandwidth(cp, nbytes, samples)
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
                    t = _events_time(cp, fb[op], _reps(cp, fb[op]), samples)
                    floor = (3 if op == "backward" else 2) * nbytes
                    res = {"op": op, "layout": layout, "shape": list(shape), "dtype": dtype,
                           "fastbn_s": t, "eff": floor / t / bw, "copy_GBps": bw / 1e9}
                    for pname, calls in peers.items():
                        fn = calls.get(op)
                        res[pname + "_s"] = None if fn is None else _events_time(
                            cp, fn, _reps(cp, fn), samples)
                    best = min((v for k, v in res.items() if k.endswith("_s") and
                                k != "fastbn_s" and v), default=None)
                    res["vs_best"] = None if best is None else best / t
                    rows.append(res)

                    def us(v):
                        return "n/a" if v is None else f"{v * 1e6:.1f}"
                    lines.append("| " + " | ".join([
                        op, layout, "x".join(map(str, shape)), dtype, us(t), f"{res['eff']:.2f}",
                        us(res.get("torch_s")), us(res.get("cudnn_s")),
                        us(res.get("cupy-cudnn_s")),
                        "n/a" if res["vs_best"] is None else f"{res['vs_best']:.2f}x"]) + " |")
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
