"""`python -m fastbn bench`: how fast fastbn is, on this machine, against its floor and peers.

One table: operation x layout x shape x dtype x threads, with

    fastbn   median seconds per call (inputs and the out= buffer reused between calls)
    GB/s     floor bytes / time; the floor is 2*E*s bytes for a forward (read x, write y)
             and 3*E*s for a backward (read x and dy, write dx), E elements of s bytes;
             backward-eval is the backward after an inference forward (frozen
             statistics, dweight and dbias still computed: fine-tuning)
    eff      GB/s over the copy bandwidth of a buffer of x's size on as many threads
             (fastbn._cpu.parallel_copy, the faster of memcpy and a streaming-store
             copy, timed in the same round-robin): 1.0 is the floor
    xref     speed-up over the float64 NumPy reference (fastbn._reference)
    xtorch   speed-up over PyTorch on the CPU, same threads and memory layout:
             forward = aten.native_batch_norm.out (the kernel behind F.batch_norm,
             writing into a reused output: F.batch_norm itself allocates y on every call,
             and page faults on a fresh large tensor cost more than the kernel);
             backward = aten.native_batch_norm_backward (its .out variant only copies),
             which returns a fresh dx every call: `python -m fastbn bench` first has
             glibc keep freed memory for reuse (keep_freed_memory), so that torch's
             time is its kernel's and not the kernel's page faults
    torch    PyTorch's time; on a CUDA machine also torch-cuda (native kernels) and
             cudnn, timed with CUDA events.

Contenders are interleaved round-robin (fastbn, torch, reference, copy, repeat; the
order rotates every pass) and the median of each is reported, so a noisy neighbour hurts
all of them alike.  A busy minute can still move one row's medians: --rounds R measures
the whole table R times over, one round after another, and reports per row the median of
the R medians.  The copy bandwidth of a large buffer (>= 64 MiB, beyond the last-level
cache) per thread count is printed in the header.  Minor page faults in the timed calls
are counted for fastbn and torch, and the table lists every row where either took one or
more per call in its median sample (its time then includes the allocator's).
Nothing here asserts speed; --json writes every number.
"""

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

try:
    import resource                     # minor page faults of the timed calls (POSIX)
except ImportError:
    resource = None

import fastbn
from fastbn import _cpu, _reference

OPS = ("forward-train", "forward-infer", "backward", "backward-eval")
LAYOUTS = ("nchw", "nhwc")
DEFAULT_SHAPES = ((16, 16, 8, 8), (32, 64, 56, 56), (256, 256, 14, 14), (64, 2048, 7, 7),
                  (128, 64, 28, 28), (32, 256, 14, 14), (4096, 1024), (64, 2048))
QUICK_SHAPES = ((16, 16, 8, 8), (8, 32, 12, 12))
EPS = 1e-5
MOMENTUM = 0.1
REFERENCE_MAX_ELEMENTS = 30_000_000     # the float64 reference takes seconds beyond this
BIG_COPY_BYTES = 64 << 20               # > L3: the DRAM copy bandwidth in the header


@dataclass
class Row:
    """One line of the table; times in seconds per call (medians), None where absent."""
    op: str
    layout: str
    shape: tuple
    dtype: str
    threads: int
    elements: int
    itemsize: int
    floor_bytes: int
    fastbn_s: float
    copy_s: float
    samples: int
    reference_s: Optional[float] = None
    torch_s: Optional[float] = None
    torch_cuda_s: Optional[float] = None
    cudnn_s: Optional[float] = None
    fastbn_faults: Optional[float] = None     # minor page faults per call, median sample
    torch_faults: Optional[float] = None
    rounds: int = 1                           # medians over this many rounds (--rounds)
    round_times: Optional[list] = None        # each round's times, when rounds > 1
    gbps: float = field(init=False)
    copy_gbps: float = field(init=False)
    efficiency: float = field(init=False)
    speedup_reference: Optional[float] = field(init=False)
    speedup_torch: Optional[float] = field(init=False)

    def __post_init__(self):
        self.gbps = self.floor_bytes / self.fastbn_s / 1e9
        self.copy_gbps = 2 * self.elements * self.itemsize / self.copy_s / 1e9
        self.efficiency = self.gbps / self.copy_gbps
        self.speedup_reference = _ratio(self.reference_s, self.fastbn_s)
        self.speedup_torch = _ratio(self.torch_s, self.fastbn_s)


def _ratio(other_s, fastbn_s):
    return None if other_s is None else other_s / fastbn_s


@dataclass
class Inputs:
    """Random normal data for one (shape, dtype, layout), shared by every op and thread count.

    x and dy are stored in the layout's memory order: (N, C, spatial...) for nchw,
    (N, spatial..., C) for nhwc; ``shape`` is always the logical (N, C, spatial...)."""
    shape: tuple
    dtype: np.dtype
    layout: str
    axis: int
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @property
    def channels(self):
        return self.shape[1]


def make_inputs(shape, dtype, layout, rng):
    dtype = np.dtype(dtype)
    mem = shape if layout == "nchw" else (shape[0], *shape[2:], shape[1])
    pdtype = np.float64 if dtype == np.float64 else np.float32
    C = shape[1]
    return Inputs(
        shape=tuple(shape), dtype=dtype, layout=layout, axis=1 if layout == "nchw" else -1,
        x=(rng.standard_normal(mem, dtype=np.float32) * 2 + 0.5).astype(dtype),
        dy=rng.standard_normal(mem, dtype=np.float32).astype(dtype),
        weight=(rng.standard_normal(C) * 0.2 + 1).astype(pdtype),
        bias=(rng.standard_normal(C) * 0.2).astype(pdtype),
    )


def _running(inp):
    """Running statistics as fastbn, reference and torch see them (close to the data's)."""
    stats = fastbn.RunningStats(inp.channels, momentum=MOMENTUM, dtype=inp.weight.dtype)
    stats.load_state_dict({"running_mean": np.full(inp.channels, 0.5),
                           "running_var": np.full(inp.channels, 4.0)})
    return stats


# ----------------------------------------------------------------------------
# contenders: each returns a zero-argument callable doing one call (or None if absent)

def fastbn_call(op, inp, threads):
    x, w, b, axis = inp.x, inp.weight, inp.bias, inp.axis
    stats = _running(inp)
    out = np.empty_like(x)
    if op == "forward-train":
        return lambda: fastbn.forward(x, w, b, stats, training=True, eps=EPS, axis=axis,
                                      out=out, num_threads=threads)
    if op == "forward-infer":
        return lambda: fastbn.forward(x, w, b, stats, training=False, eps=EPS, axis=axis,
                                      out=out, num_threads=threads)
    _, ctx = fastbn.forward(x, w, b, stats, training=op == "backward", eps=EPS, axis=axis,
                            out=out, num_threads=threads)
    dy, dx = inp.dy, np.empty_like(x)
    return lambda: fastbn.backward(dy, ctx, out=dx, num_threads=threads)


def reference_call(op, inp):
    x, w, b, axis = inp.x, inp.weight, inp.bias, inp.axis
    rm, rv = np.full(inp.channels, 0.5), np.full(inp.channels, 4.0)
    if op == "forward-train":
        return lambda: _reference.forward(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                          eps=EPS, axis=axis)
    if op == "forward-infer":
        return lambda: _reference.forward(x, w, b, rm, rv, training=False, eps=EPS, axis=axis)
    training = op == "backward"          # backward-eval: the running statistics
    fwd = _reference.forward(x, w, b, None if training else rm, None if training else rv,
                             training=training, eps=EPS, axis=axis)
    return lambda: _reference.backward(inp.dy, x, fwd.mean, fwd.invstd, w, training=training,
                                       axis=axis)


def copy_call(inp, threads, stream):
    src, dst = inp.x, np.empty_like(inp.x)
    return lambda: _cpu.parallel_copy(src, dst, threads, stream)


_TORCH = []


def _torch():
    """torch, imported on first use; None if it is not installed."""
    if not _TORCH:
        _TORCH.append(importlib.import_module("torch")
                      if importlib.util.find_spec("torch") is not None else None)
    return _TORCH[0]


def _logical(t, layout):
    """A torch tensor holding memory in `layout` order, viewed with the logical (N, C, ...)
    shape: for 4-D/5-D nhwc this is exactly torch's channels_last(_3d) format."""
    if layout == "nchw":
        return t
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def _torch_tensors(inp, device="cpu"):
    torch = _torch()
    x = _logical(torch.from_numpy(inp.x.copy()), inp.layout).to(device)
    dy = _logical(torch.from_numpy(inp.dy.copy()), inp.layout).to(device)
    if inp.layout == "nhwc" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    elif inp.layout == "nchw":
        x, dy = x.contiguous(), dy.contiguous()
    w = torch.from_numpy(inp.weight.copy()).to(device)
    b = torch.from_numpy(inp.bias.copy()).to(device)
    rm = torch.full((inp.channels,), 0.5, dtype=w.dtype, device=device)
    rv = torch.full((inp.channels,), 4.0, dtype=w.dtype, device=device)
    return torch, x, dy, w, b, rm, rv


def torch_call(op, inp, threads):
    """PyTorch CPU, the cheapest honest route (see the module docstring)."""
    if _torch() is None:
        return None
    torch, x, dy, w, b, rm, rv = _torch_tensors(inp)
    torch.set_num_threads(threads)
    aten = torch.ops.aten
    out, sm, si = torch.empty_like(x), torch.empty_like(rm), torch.empty_like(rm)
    if op in ("forward-train", "forward-infer"):
        training = op == "forward-train"
        return lambda: aten.native_batch_norm.out(x, w, b, rm, rv, training, MOMENTUM, EPS,
                                                  out=out, save_mean=sm, save_invstd=si)
    mask = [True, True, True]
    if op == "backward-eval":          # the running statistics are the constants
        return lambda: aten.native_batch_norm_backward(dy, x, w, rm, rv, None, None, False,
                                                       EPS, mask)
    _, mean, invstd = aten.native_batch_norm(x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS)
    return lambda: aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, EPS,
                                                   mask)


def torch_cuda_sampler(op, inp, cudnn, min_sample_s):
    """A sampler (seconds per call, timed with CUDA events) for torch on the GPU with the
    native kernels (cudnn=False) or cuDNN; None without CUDA.  Not exercised on CPU-only
    machines: kept deliberately plain."""
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return None
    F = torch.nn.functional
    _, x, dy, w, b, rm, rv = _torch_tensors(inp, "cuda")
    with torch.backends.cudnn.flags(enabled=cudnn):
        if op.startswith("backward"):
            x.requires_grad_(True)
            w.requires_grad_(True)
            b.requires_grad_(True)
            y = F.batch_norm(x, rm, rv, w, b, op == "backward", MOMENTUM, EPS)   # the graph

            def call():
                torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        else:
            training = op == "forward-train"

            def call():
                F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        k = 1
        while True:
            start.record()
            for _ in range(k):
                call()
            end.record()
            end.synchronize()
            if start.elapsed_time(end) / 1e3 >= min_sample_s or k >= 1 << 16:
                break
            k *= 2

    def sample():
        with torch.backends.cudnn.flags(enabled=cudnn):
            start.record()
            for _ in range(k):
                call()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3 / k
    return sample


# ----------------------------------------------------------------------------
# timing

def sampler(call, min_sample_s):
    """A function returning the seconds per call of one sample: a loop of k calls, k
    doubled until a sample lasts at least min_sample_s (tiny tensors); k is its
    ``calls`` attribute."""
    call()                              # warm-up: page faults, lazy initialisation
    k = 1
    while True:
        t0 = time.perf_counter_ns()
        for _ in range(k):
            call()
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        if elapsed >= min_sample_s or k >= 1 << 16:
            break
        k *= 2

    def sample():
        t0 = time.perf_counter_ns()
        for _ in range(k):
            call()
        return (time.perf_counter_ns() - t0) / 1e9 / k
    sample.calls = k
    return sample


def _minor_faults():
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_robin(samplers, faults=None):
    """{name: (sample, n)} -> {name: median seconds}: sample each contender in turn,
    n times each, so that slow drifts of the machine hit every contender alike.  The
    order rotates from round to round: contenders share their inputs, and whoever runs
    right after another finds part of its data still in the last-level cache (in A/B
    runs of two builds on one input, 12-51 MB, the second in a fixed order gained
    5-20 % on the dev VM).

    If ``faults`` is a dict, it receives {name: median over the samples of the minor
    page faults per call} (of every thread of the process, as the times are medians;
    None where not POSIX)."""
    times = {name: [] for name in samplers}
    counts = {name: [] for name in samplers}
    names = list(samplers)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(max(n for _, n in samplers.values())):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                sample, n = samplers[name]
                if i < n:
                    before = _minor_faults()
                    times[name].append(sample())
                    if before is not None:
                        counts[name].append((_minor_faults() - before)
                                            / getattr(sample, "calls", 1))
    finally:
        if gc_was_enabled:
            gc.enable()
    if faults is not None:
        for name, per_call in counts.items():
            faults[name] = statistics.median(per_call) if per_call else None
    return {name: statistics.median(v) for name, v in times.items()}


_MALLOC = []        # what keep_freed_memory changed, for the table's header


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks for reuse (this process only).

    torch's backward has no kernel that writes into a given dx: every call allocates
    a fresh one.  By default glibc maps each block over its mmap threshold (which it
    raises to at most 32 MiB) anew and unmaps it on free, and gives the free top of the
    heap back past its trim threshold, so the next call pays a page fault per 4 KiB it
    writes: 12,500 faults for a 256x256x14x14 float32 dx, 20-25 ms on the dev VM
    against a torch kernel of 7-13 ms.  That is the allocator, not batch norm, and a
    PyTorch user with a caching allocator (jemalloc, tcmalloc) does not pay it, so the
    bench removes it: blocks up to 1 GiB come from the heap and stay there (the default
    run's peak memory: 1.3 -> 1.6 GB; its time: 31 -> 20 s, as the reference's
    temporaries no longer fault either).  Returns a description of what changed, or
    None where the C library is not glibc."""
    if _MALLOC:
        return _MALLOC[0]
    done = None
    if platform.libc_ver()[0] == "glibc":
        import ctypes

        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            if mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30):
                done = "glibc malloc keeps freed memory (mmap and trim thresholds 1 GiB)"
        except (OSError, AttributeError):
            pass
    _MALLOC.append(done)
    return done


def copy_bandwidths(threads, repeat, nbytes=BIG_COPY_BYTES):
    """{threads: GB/s} of the faster parallel_copy (memcpy or streaming stores)
    on a buffer beyond the last-level cache."""
    src = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    medians = round_robin({
        (t, stream): (sampler(lambda t=t, stream=stream: _cpu.parallel_copy(src, dst, t, stream),
                              0.0), repeat)
        for t in threads for stream in (False, True)})
    return {t: 2 * nbytes / min(medians[t, False], medians[t, True]) / 1e9 for t in threads}


# ----------------------------------------------------------------------------
# the run

def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = _TORCH[0] if _TORCH else None
    info = {
        "cpu": cpu,
        "cores": _cores(),
        "fastbn": fastbn.__version__,
        "fastbn_threads": fastbn.get_num_threads(),
        "openmp": bool(_cpu.openmp_enabled()),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch": None if torch is None else torch.__version__,
        "cuda_device": None,
        "malloc": _MALLOC[0] if _MALLOC else None,
        "load_average_start": _load(),
    }
    if torch is not None and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _load():
    """1-minute load average (other work on the cores skews the multi-thread rows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cases(opts):
    """(shape, dtype, layout) in table order; a rank-2 (N, C) tensor has one memory
    layout, so it runs under the first requested layout only."""
    for shape in opts.shapes:
        for dtype in opts.dtypes:
            for i, layout in enumerate(opts.layouts):
                if len(shape) == 2 and i > 0:
                    continue
                yield shape, dtype, layout


def run(opts, progress=sys.stderr):
    """Measure every row; returns (rows, copy bandwidths {threads: GB/s}, machine info).

    With ``opts.rounds`` > 1 the whole set of rows is measured that many times over, one
    round after another, and each row reports the median over the rounds of each
    contender's median: a busy minute on a shared machine then moves one round of a
    row, not the row (the reference is timed in the first round only)."""
    use_torch = not opts.no_torch and _torch() is not None
    info = machine_info()           # before torch.set_num_threads changes the OpenMP default
    torch_threads = _torch().get_num_threads() if use_torch else None
    _progress(progress, f"copy bandwidth, {BIG_COPY_BYTES >> 20} MiB buffer ...")
    bandwidths = copy_bandwidths(opts.threads, max(3, opts.repeat // 2))
    rounds = [_round(opts, use_torch, r, progress) for r in range(opts.rounds)]
    rows = [_merge(same) for same in zip(*rounds)]
    if use_torch:
        _torch().set_num_threads(torch_threads)
    info["load_average_end"] = _load()
    _progress(progress, "", end=True)
    return rows, bandwidths, info


def _round(opts, use_torch, rnd, progress):
    """One measurement of every row (round rnd, from 0), in table order."""
    total = sum(1 for _ in cases(opts)) * len(opts.ops) * len(opts.threads)
    where = f"round {rnd + 1}/{opts.rounds} " if opts.rounds > 1 else ""
    rows, done = [], 0
    rng = np.random.default_rng(0)              # the same inputs in every round
    for shape, dtype, layout in cases(opts):
        inp = make_inputs(shape, dtype, layout, rng)
        E = inp.x.size
        with_reference = (not opts.no_reference and E <= REFERENCE_MAX_ELEMENTS
                          and rnd == 0)
        for op in opts.ops:
            reference_s = cuda_s = cudnn_s = None
            for j, threads in enumerate(opts.threads):
                done += 1
                _progress(progress, f"{where}[{done}/{total}] {op} {layout} "
                                    f"{_fmt_shape(shape)} {np.dtype(dtype).name} "
                                    f"threads={threads}")
                contenders = {
                    "fastbn": (sampler(fastbn_call(op, inp, threads), opts.min_sample_s),
                               opts.repeat)}
                if use_torch:
                    contenders["torch"] = (sampler(torch_call(op, inp, threads),
                                                   opts.min_sample_s), opts.repeat)
                # The reference is single-threaded NumPy: time it with the first thread count.
                if with_reference and j == 0:
                    contenders["reference"] = (sampler(reference_call(op, inp), 0.0),
                                               opts.reference_repeat)
                # The floor: the faster of memcpy and a streaming-store copy (which
                # writes without reading first; memcpy streams only past a size it
                # derives from the cache size the OS reports).
                for name, stream in (("copy", False), ("copy_nt", True)):
                    contenders[name] = (sampler(copy_call(inp, threads, stream),
                                                opts.min_sample_s), opts.repeat)
                if use_torch and j == 0:
                    for name, cudnn in (("torch_cuda", False), ("cudnn", True)):
                        s = torch_cuda_sampler(op, inp, cudnn, opts.min_sample_s)
                        if s is not None:
                            contenders[name] = (s, opts.repeat)
                faults = {}
                med = round_robin(contenders, faults)
                reference_s = med.get("reference", reference_s)
                cuda_s = med.get("torch_cuda", cuda_s)
                cudnn_s = med.get("cudnn", cudnn_s)
                floor = (3 if op.startswith("backward") else 2) * E * inp.dtype.itemsize
                rows.append(Row(op=op, layout=layout, shape=tuple(shape),
                                dtype=inp.dtype.name, threads=threads, elements=E,
                                itemsize=inp.dtype.itemsize, floor_bytes=floor,
                                fastbn_s=med["fastbn"],
                                copy_s=min(med["copy"], med["copy_nt"]),
                                samples=opts.repeat, reference_s=reference_s,
                                torch_s=med.get("torch"), torch_cuda_s=cuda_s,
                                cudnn_s=cudnn_s, fastbn_faults=faults.get("fastbn"),
                                torch_faults=faults.get("torch")))
        del inp
    return rows


_ROUND_TIMES = ("fastbn_s", "copy_s", "torch_s", "torch_cuda_s", "cudnn_s")


def _merge(same):
    """One row from its measurements in every round: the median of each time (None
    where a contender is absent from any round); the reference is the first round's;
    round_times keeps each round's times when there is more than one."""
    if len(same) == 1:
        return same[0]

    def median(name):
        values = [getattr(r, name) for r in same]
        return None if any(v is None for v in values) else statistics.median(values)
    return replace(same[0], fastbn_faults=median("fastbn_faults"),
                   torch_faults=median("torch_faults"), rounds=len(same),
                   round_times=[{name: getattr(r, name) for name in _ROUND_TIMES}
                                for r in same],
                   **{name: median(name) for name in _ROUND_TIMES})


def _progress(stream, text, end=False):
    if stream is None:
        return
    if stream.isatty():
        stream.write("\r\x1b[K" + text + ("\n" if end and text else ""))
    elif text:
        stream.write(text + "\n")
    stream.flush()


# ----------------------------------------------------------------------------
# output

def _fmt_shape(shape):
    return "x".join(map(str, shape))


def _fmt_time(s):
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_gbps(g):
    return f"{g:.1f}" if g >= 10 else f"{g:.2f}"


def _fmt_ratio(r):
    return "—" if r is None else (f"{r:.0f}" if r >= 100 else f"{r:.2f}")


def table(rows, bandwidths, info):
    rounds = max((r.rounds for r in rows), default=1)
    cuda = any(r.torch_cuda_s is not None or r.cudnn_s is not None for r in rows)
    lines = [
        f"fastbn {info['fastbn']} bench: {info['cpu']}, {info['cores']} cores, "
        f"fastbn {info['fastbn_threads']} threads by default"
        f"{'' if info['openmp'] else ' (no OpenMP)'}, numpy {info['numpy']}, "
        f"torch {info['torch'] or '—'}"
        + (f", GPU {info['cuda_device']}" if info["cuda_device"] else ""),
        "copy bandwidth (parallel_copy, the faster of memcpy and streaming stores, "
        + f"{BIG_COPY_BYTES >> 20} MiB): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw:.1f} GB/s"
                    for t, bw in sorted(bandwidths.items()))
        + f"; load average {info['load_average_start']} at start, "
          f"{info['load_average_end']} at end",
        f"allocator: {info.get('malloc') or 'as the process found it'}",
        ("median time per call" if rounds == 1 else
         f"median over {rounds} rounds of the median time per call")
        + "; GB/s = floor bytes (forward 2·E·s, backward 3·E·s) / time; "
        "eff = GB/s / copy GB/s of x's size; ×ref, ×torch: speed-up",
        "",
    ]
    head = ["op", "layout", "shape", "dtype", "thr", "fastbn", "GB/s", "eff", "×ref",
            "×torch", "torch"]
    if cuda:
        head += ["torch-cuda", "cudnn"]
    body = []
    for r in rows:
        cells = [r.op, r.layout, _fmt_shape(r.shape), r.dtype, str(r.threads),
                 _fmt_time(r.fastbn_s), _fmt_gbps(r.gbps), f"{r.efficiency:.2f}",
                 _fmt_ratio(r.speedup_reference), _fmt_ratio(r.speedup_torch),
                 _fmt_time(r.torch_s)]
        if cuda:
            cells += [_fmt_time(r.torch_cuda_s), _fmt_time(r.cudnn_s)]
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    left = 4                                             # op, layout, shape, dtype

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines.append(fmt(head))
    lines.extend(fmt(c) for c in body)
    faulty = [(r, who, n) for r in rows
              for who, n in (("fastbn", r.fastbn_faults), ("torch", r.torch_faults))
              if n is not None and n >= 1]
    if faulty:
        lines += ["", "page faults in the timed calls (their times include the allocator's):"]
        lines += [f"  {r.op} {r.layout} {_fmt_shape(r.shape)} {r.dtype} {r.threads} thr: "
                  f"{who} {n:.0f} per call" for r, who, n in faulty]
    return "\n".join(lines)


def to_json(rows, bandwidths, info, opts):
    return {
        "machine": info,
        "copy_bandwidth_gbps": {str(t): bw for t, bw in sorted(bandwidths.items())},
        "copy_buffer_bytes": BIG_COPY_BYTES,
        "options": {"repeat": opts.repeat, "rounds": opts.rounds,
                    "reference_repeat": opts.reference_repeat,
                    "min_sample_s": opts.min_sample_s, "torch": not opts.no_torch,
                    "reference": not opts.no_reference},
        "rows": [dict(asdict(r), shape=list(r.shape)) for r in rows],
    }


# ----------------------------------------------------------------------------
# command line

def _shapes(text):
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(d) for d in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected e.g. 32x64x56x56")
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: 2 to 5 positive sizes")
        shapes.append(shape)
    return shapes


def _choices(allowed):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                             f"{','.join(allowed)}, got {text!r}")
        return items
    return parse


def _threads(text):
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2, got {text!r}")
    return sorted(set(threads))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Speed table: fastbn against the copy floor, the NumPy reference and "
                    "PyTorch.",
        epilog="Shapes are N×C×spatial in logical (channels-first) order for every layout.")
    p.add_argument("--shapes", type=_shapes,
                   help="comma-separated, e.g. 256x256x14x14,16x16x8x8 (rank 2 to 5)")
    p.add_argument("--dtypes", type=_choices(("float32", "float16", "float64")),
                   help="default float32")
    p.add_argument("--threads", type=_threads, help="default: 1 and all cores")
    p.add_argument("--ops", type=_choices(OPS), default=list(OPS),
                   help="default " + ",".join(OPS))
    p.add_argument("--layouts", type=_choices(LAYOUTS), default=list(LAYOUTS),
                   help="default nchw,nhwc (nhwc: channels-last memory, axis=-1)")
    p.add_argument("--repeat", type=int, help="samples per contender (default 15, quick 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every row this many times over, one whole round after "
                        "another, and report the median of the rounds (default 1; odd "
                        "counts take a true median)")
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--json", metavar="PATH", help="also write rows and machine info as JSON")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    opts = p.parse_args(argv)
    if opts.shapes is None:
        opts.shapes = list(QUICK_SHAPES if opts.quick else DEFAULT_SHAPES)
    opts.dtypes = opts.dtypes or ["float32"]
    opts.threads = opts.threads or sorted({1, _cores()})
    if opts.repeat is None:
        opts.repeat = 3 if opts.quick else 15
    if opts.repeat < 1:
        p.error("--repeat must be at least 1")
    if opts.rounds < 1:
        p.error("--rounds must be at least 1")
    opts.reference_repeat = min(opts.repeat, 1 if opts.quick else 3)
    opts.min_sample_s = 50e-6 if opts.quick else 200e-6
    return opts


def main(argv=None):
    """Entry point of `python -m fastbn bench`; returns the exit status."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    rows, bandwidths, info = run(opts)
    print(table(rows, bandwidths, info))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(to_json(rows, bandwidths, info, opts), f, indent=1)
    return 0


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
