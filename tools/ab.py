"""A/B of two or more builds of fastbn._cpu on the raw kernels (no Python API).

Build each variant, copy its extension module aside, then

    python tools/ab.py base.so new.so [more.so ...] --shapes 256x256x14x14 \
        --layouts nhwc --ops bwd,eval --threads 1 --dtype float32

Each build is loaded as its own module and timed on the same arrays.  Three ways
(BENCHMARKS.md, "How A/B runs are made"):

    --method rotated   medians of samples taken round-robin with the order rotating
                       (bench.round_robin): for calls of a millisecond and more
    --method best      the best of --repeat timed loops of back-to-back calls per
                       build, builds in turn: for calls on tensors in cache, where the
                       rotated medians swing by tens of percent from run to run
    --method cold      medians of single calls, rotated, each after a pass over 64 MiB
                       of other memory: as `python -m fastbn bench` times calls of
                       200 us and more (one call a sample, after other contenders'
                       work), for tensors of a few MB, where a call right after
                       another finds x and y in cache and may take another path's
                       speed (back-to-back timing once favoured a change that made
                       the bench's mid-size rows 1.2-1.7x slower: docs/performance-log.md)

Prints each build's time and its ratio to the first build's.
"""

import argparse
import importlib.util
import pathlib
import sys
import timeit

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from fastbn import bench  # noqa: E402

OPS = ("train", "infer", "bwd", "eval")


def load(path):
    """The build at path as a module of its own (its init function is _cpu's)."""
    spec = importlib.util.spec_from_file_location("fastbn._cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arrays(shape, layout, dtype, rng):
    N, C, S = shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))
    mem = (N, C, S) if layout == "nchw" else (N * S, C)
    p = np.float64 if dtype == np.float64 else np.float32
    x = (rng.standard_normal(mem, dtype=np.float32) * 2 + 0.5).astype(dtype)
    return dict(x=x, dy=rng.standard_normal(mem, dtype=np.float32).astype(dtype),
                y=np.empty_like(x), w=rng.uniform(0.5, 2, C).astype(p), b=np.zeros(C, p),
                rm=np.zeros(C, p), rv=np.ones(C, p), mean=np.full(C, 0.5),
                invstd=np.full(C, 0.5), dw=np.empty(C, p), db=np.empty(C, p))


def call(module, op, layout, a, nt):
    if op == "train":
        f = getattr(module, "forward_train_" + layout)
        return lambda: f(a["x"], a["y"], a["w"], a["b"], a["mean"], a["invstd"], a["rm"],
                         a["rv"], 0.1, 1e-5, nt)
    if op == "infer":
        f = getattr(module, "forward_infer_" + layout)
        return lambda: f(a["x"], a["y"], a["w"], a["b"], a["mean"], a["invstd"], a["rm"],
                         a["rv"], 1e-5, nt)
    f = getattr(module, "backward_" + layout)
    return lambda: f(a["x"], a["dy"], a["y"], a["mean"], a["invstd"], a["w"], a["dw"],
                     a["db"], op == "bwd", nt)


def best_of(calls, repeat, min_loop_s=0.02):
    """The best per-call time of `repeat` timed loops of each callable, in turn."""
    loops = []
    for f in calls:
        f()
        n = 1
        while timeit.timeit(f, number=n) < min_loop_s and n < 1 << 16:
            n *= 2
        loops.append(n)
    best = [float("inf")] * len(calls)
    for _ in range(repeat):
        for i, (f, n) in enumerate(zip(calls, loops)):
            best[i] = min(best[i], timeit.timeit(f, number=n) / n)
    return best


def cold_sampler(f, evict):
    """One call per sample, timed after evict() has pushed the arrays out of cache."""
    def sample():
        evict()
        t0 = timeit.default_timer()
        f()
        return timeit.default_timer() - t0
    return sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("builds", nargs="+", help="extension modules (.so) to compare")
    p.add_argument("--shapes", type=bench._shapes, default=[(256, 256, 14, 14)])
    p.add_argument("--layouts", default="nchw,nhwc")
    p.add_argument("--ops", default="train,infer,bwd,eval")
    p.add_argument("--threads", type=bench._threads, default=[1])
    p.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--method", choices=("rotated", "best", "cold"), default="rotated")
    p.add_argument("--loop-ms", type=float, default=20.0,
                   help="least duration of a timed loop or sample (default %(default)s)")
    opts = p.parse_args(argv)
    ops = [o for o in opts.ops.split(",") if o]
    if len(opts.builds) < 2 or set(ops) - set(OPS):
        p.error(f"need two builds or more, and ops among {','.join(OPS)}")
    modules = [load(path) for path in opts.builds]
    names = [pathlib.Path(path).name for path in opts.builds]
    rng = np.random.default_rng(0)
    dtype = np.dtype(opts.dtype)
    junk = np.ones(8 << 20) if opts.method == "cold" else None   # 64 MiB, past the cache

    def evict():
        junk[::8] += 1.0                                # a read and a write of every line
    for shape in opts.shapes:
        for layout in opts.layouts.split(","):
            a = arrays(shape, layout, dtype, rng)
            for op in ops:
                for nt in opts.threads:
                    calls = [call(m, op, layout, a, nt) for m in modules]
                    if opts.method == "best":
                        t = best_of(calls, opts.repeat, opts.loop_ms / 1e3)
                    elif opts.method == "cold":
                        for f in calls:
                            f()
                        med = bench.round_robin({i: (cold_sampler(f, evict), opts.repeat)
                                                 for i, f in enumerate(calls)})
                        t = [med[i] for i in range(len(calls))]
                    else:
                        med = bench.round_robin({i: (bench.sampler(f, opts.loop_ms / 1e3),
                                                     opts.repeat)
                                                 for i, f in enumerate(calls)})
                        t = [med[i] for i in range(len(calls))]
                    print(f"{'x'.join(map(str, shape)):15} {layout} {op:5} {nt}t  "
                          + "  ".join(f"{n} {bench._fmt_time(s)}" for n, s in zip(names, t))
                          + "   ratio " + " ".join(f"{s / t[0]:.3f}" for s in t[1:]),
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
