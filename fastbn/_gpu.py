"""GPU backend: the CUDA kernels of fastbn/cuda/*.cu, compiled by CuPy.

Same entry points and signatures as the CPU backend (fastbn/_cpu.pyx), taking
cupy arrays: x, y, dy, dx C-contiguous (N, C, S) for ``*_nchw`` and (M, C) for
``*_nhwc``; weight, bias, running statistics, dweight, dbias (C,) arrays of
the parameter dtype or None; mean and invstd float64 (C,).  ``n_threads`` is
accepted and ignored.

Every .cu file goes into one ``cupy.RawModule`` whose ``name_expressions``
name the template instances (one per kernel and dtype).  It is compiled on the
first call that needs a kernel, once per device (CuPy also caches the binary
on disk, keyed by the source text), or up front by :func:`precompile`.
Importing this module imports neither cupy nor anything that compiles; the
array module ``xp`` (cupy) is resolved on first access.

Launches go on the current CuPy stream of the current device and nothing on
the hot path synchronises with the host.  A training forward is two launches
(statistics with its last-block finalise, then normalisation), an inference
forward one, a backward two (sums, then dx) or one (eval mode without
dweight / dbias).  When the geometry has one split (every block owns whole
channels), the reduction kernel also does the element-wise pass and the
training forward and backward are one launch each.
"""

import os
import re
import threading
from collections import namedtuple

NCHW, NHWC = "nchw", "nhwc"

_CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# Storage dtype -> (C++ storage type, accumulation / math type of the
# statistics and element-wise kernels).  The backward sums (fbn_gsum_*)
# accumulate in double for every dtype: see "Numerics" in cuda/fastbn.cuh.
_CTYPES = {
    "float32": ("float", "float"),
    "float64": ("double", "double"),
    "float16": ("__half", "float"),
    "bfloat16": ("__nv_bfloat16", "float"),
}
_KERNELS = ("fbn_stats_nchw", "fbn_stats_nhwc", "fbn_ew_nchw", "fbn_ew_nhwc",
            "fbn_gsum_nchw", "fbn_gsum_nhwc")
_DOUBLE_ACC = ("fbn_gsum_nchw", "fbn_gsum_nhwc")

# Must match fastbn.cuh.
OP_FWD, OP_BWD_TRAIN, OP_BWD_EVAL = 0, 1, 2
MODE_TABLE, MODE_INFER, MODE_EVAL = 0, 1, 2

# NVRTC options: C++17; no fast math (the statistics need IEEE division and
# square root).  CuPy adds -ftz=true to every compilation: float32 subnormals
# flush to zero, far below the absolute tolerance of every result.
_OPTIONS = ("-std=c++17",)


def _options():
    """_OPTIONS, plus the CUDA toolkit's include directory where CuPy knows
    one (cuda_fp16.h, cuda_bf16.h), in case NVRTC does not find them itself."""
    opts = _OPTIONS
    try:
        root = _cupy().cuda.get_cuda_path()
    except Exception:  # noqa: BLE001 - no toolkit found: rely on NVRTC's own headers
        root = None
    if root and os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
        opts = opts + ("-I" + os.path.join(root, "include"),)
    return opts


def kernel_name(kernel, dtype_name):
    """The name expression of a kernel's instance for a storage dtype."""
    t, a = _CTYPES[dtype_name]
    return f"{kernel}<{t}, {'double' if kernel in _DOUBLE_ACC else a}>"


def name_expressions():
    """Every template instance the module provides."""
    return tuple(kernel_name(k, d) for d in _CTYPES for k in _KERNELS)


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def source():
    """The module's CUDA source: every cuda/*.cu, in name order, with local
    headers inlined (once).  Inlining keeps NVRTC off the file system and makes
    CuPy's cache key (a hash of this text) change whenever any file does."""
    seen = set()

    def inline(m):
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(_CUDA_DIR, name), encoding="utf-8") as f:
            return _INCLUDE.sub(inline, f.read())

    parts = []
    for name in sorted(os.listdir(_CUDA_DIR)):
        if name.endswith(".cu"):
            with open(os.path.join(_CUDA_DIR, name), encoding="utf-8") as f:
                parts.append(f"// ---- {name}\n" + _INCLUDE.sub(inline, f.read()))
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# launch geometry (pure Python: tested without a GPU)

Geometry = namedtuple("Geometry", "grid block vec splits")
Geometry.__doc__ = """Launch configuration shared by a reduction and the
element-wise pass that follows it.  grid and block are (x, y, z) triples; vec
is 1 for 16-byte accesses, else 0; splits = grid[1], the number of blocks
that share each channel (channels-first) or channel tile (channels-last)."""

MAX_THREADS = 256          # threads per block (kMaxThreads in fastbn.cuh)
MIN_VECTORS = 4            # channels-first: least vectors per thread per split
MIN_ROWS = 4               # channels-last: least rows per thread per split
MAX_SPLITS = 1024          # bounds the last block's merge
MAX_LANES = 32             # channels-last: vector lanes (threads) across a tile
TILE_BYTES = 512           # channels-last: bytes of each row a tile covers at most
# The same for the reductions (see launch_geometry), by item size: measured on
# an H200, 128 bytes beat 256 for float16 (256x256x14x14 NHWC training
# forward 42.8 against 52.1 us) and lost for float32 (64x256x56x56 NHWC
# backward 302 against 264 us).
REDUCE_TILE_BYTES = {2: 128, 4: 256, 8: 256}
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCKS_PER_SM = 32
PER_THREAD_STREAM = 2      # cudaStreamPerThread's handle: one stream per host thread
# Channels-first: one split per channel (one fused launch, the second read
# from L2) when there are channels for every multiprocessor and the bytes a
# fused launch re-reads are at most this fraction of the L2 cache.
FUSE_L2_FRACTION = 1.0


def _cdiv(a, b):
    return -(-a // b)


def _pow2ceil(n):
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def launch_geometry(layout, shape, itemsize, sm_count, *, aligned=True, blocks_per_sm=4,
                    fuse_bytes=0, l2_bytes=0, tile_bytes=TILE_BYTES):
    """Grid and block for the kernels of one call.

    Parameters
    ----------
    layout : "nchw" or "nhwc"
    shape : (N, C, S) for "nchw", (M, C) for "nhwc"
    itemsize : bytes per element of x (2, 4 or 8)
    sm_count : multiprocessors of the device
    aligned : every data pointer of the call is 16-byte aligned
    blocks_per_sm : resident blocks of MAX_THREADS threads per multiprocessor
        the grid should fill (one wave: the kernels loop over their ranges)
    fuse_bytes, l2_bytes : bytes a fused reduction + element-wise launch
        reads twice (x, or x and dy), and the device's L2 size
    tile_bytes : channels-last: the most bytes of a row one tile covers

    Channels-first: a (C, splits) grid of 1-D blocks; a channel is split over
    several blocks when C alone would not fill the device, but never so finely
    that a thread gets fewer than MIN_VECTORS vectors.  Blocks shrink (to a
    warp at least) for short channels.  One split when C >= sm_count and
    fuse_bytes fit in FUSE_L2_FRACTION of the L2: the launch is then fused.

    Channels-last: a (tiles, splits) grid of (TX, TY) blocks; a tile is TX
    lanes of `vec` channels, at most MAX_LANES lanes and tile_bytes of a
    row, spread evenly over the channels; TY rows of threads, splits row
    ranges of at least MIN_ROWS rows a thread.  The reductions ask for
    narrower tiles (REDUCE_TILE_BYTES) than the element-wise pass: the last
    block of a tile merges splits x (channels of the tile) partials, splits /
    TY of them in a row per thread, and with one wide tile that tail costs
    more than the whole pass (seen on an H200: 1.6 MB of partials for 256
    float16 channels).
    """
    if itemsize not in (2, 4, 8):
        raise ValueError(f"itemsize must be 2, 4 or 8, got {itemsize}")
    width = 16 // itemsize
    target = max(1, sm_count * blocks_per_sm)
    if layout == NCHW:
        N, C, S = shape
        vec = aligned and S % width == 0
        nv = N * (S // width if vec else S)         # vectors per channel
        threads = min(MAX_THREADS, max(32, _pow2ceil(_cdiv(nv, MIN_VECTORS))))
        target = min(target * (MAX_THREADS // threads), sm_count * MAX_BLOCKS_PER_SM)
        splits = min(_cdiv(target, C), nv // (threads * MIN_VECTORS), MAX_SPLITS)
        splits = max(1, splits)
        if C >= sm_count and 0 < fuse_bytes <= FUSE_L2_FRACTION * l2_bytes:
            splits = 1
        if C > MAX_GRID[0]:
            raise ValueError(f"too many channels for one grid: {C}")
        return Geometry((C, splits, 1), (threads, 1, 1), int(vec), splits)
    if layout == NHWC:
        M, C = shape
        vec = aligned and C % width == 0
        lanes = C // width if vec else C
        tiles = _cdiv(lanes, max(1, min(MAX_LANES, tile_bytes // (16 if vec else itemsize))))
        tx = _cdiv(lanes, tiles)
        ty = max(1, min(MAX_THREADS // tx, M))
        splits = min(_cdiv(target, tiles), M // (ty * MIN_ROWS), MAX_SPLITS)
        splits = max(1, splits)
        if tiles > MAX_GRID[0]:
            raise ValueError(f"too many channels for one grid: {C}")
        return Geometry((tiles, splits, 1), (tx, ty, 1), int(vec), splits)
    raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")


# Looked up per call only on a plan miss (_setup keeps the result); a name of
# its own so that tests can substitute another geometry.
_geometry = launch_geometry


# ----------------------------------------------------------------------------
# per-device state: the compiled module, occupancy, workspaces

_cp = None
_DEVICES = {}
_LOCK = threading.Lock()


def _cupy():
    global _cp
    if _cp is None:
        import cupy
        _cp = cupy
    return _cp


def __getattr__(name):
    # `xp` (the array module of this backend's arrays) resolves lazily, so
    # that importing fastbn._gpu does not import cupy.
    if name == "xp":
        globals()["xp"] = cp = _cupy()
        return cp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Device:
    """Kernels and workspaces of one GPU.

    Workspaces: the per-(channel, split) partials and the (4, C) coefficient
    table live per host thread and stream (a reduction writes them, the
    element-wise launch after it on the same stream reads them); the
    last-block counters per stream (each launch leaves them at zero, so launches
    in stream order can share them).  They only grow."""

    def __init__(self, device_id, sm_count, regs_per_sm, l2_bytes=0):
        self.id = device_id
        self.sm_count = sm_count
        self.regs_per_sm = regs_per_sm
        self.l2_bytes = l2_bytes
        self.module = None
        self.kernels = {}
        self.occupancy = {}
        self.plans = {}
        self.counters = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    # -- kernels -------------------------------------------------------------
    def compile(self):
        return _cupy().RawModule(code=source(), options=_options(),
                                 name_expressions=name_expressions())

    def kernel(self, name):
        k = self.kernels.get(name)
        if k is None:
            with self.lock:
                if self.module is None:
                    self.module = self.compile()
                k = self.kernels[name] = self.module.get_function(name)
        return k

    def blocks_per_sm(self, names):
        """Resident MAX_THREADS-thread blocks per SM that every named kernel can
        reach (registers bound these kernels; shared memory never does)."""
        key = names
        hit = self.occupancy.get(key)
        if hit is None:
            hit = 2048 // MAX_THREADS
            for name in names:
                try:
                    regs = max(1, int(self.kernel(name).num_regs))
                except Exception:  # noqa: BLE001 - attribute missing on some builds
                    regs = 64
                regs = _cdiv(regs, 8) * 8               # allocation granularity
                hit = min(hit, max(1, self.regs_per_sm // (regs * MAX_THREADS)))
            self.occupancy[key] = hit
        return hit

    # -- workspaces ----------------------------------------------------------
    def alloc(self, n, dtype, zero=False):
        cp = _cupy()
        return cp.zeros(n, dtype) if zero else cp.empty(n, dtype)

    def stream_key(self):
        return _cupy().cuda.get_current_stream().ptr

    def workspace(self, n_part, n_coef, n_counter):
        """(part float64[>= n_part], coef float64[>= n_coef], counter uint32[>= n_counter]).

        The last-block counters are shared by the threads that launch on one
        stream (its kernels run in turn), but cudaStreamPerThread, CuPy's
        current stream under per-thread default streams, is a stream of each
        thread's own with one pointer: there each thread keeps its own, or
        two threads' kernels would run at once on one counter array and a
        reset would leave the other's count behind for good."""
        key = self.stream_key()
        spaces = getattr(self.local, "spaces", None)
        if spaces is None:
            spaces = self.local.spaces = {}
        ws = spaces.get(key)
        if ws is None:
            ws = spaces[key] = [None, None]
        part, coef = ws
        if part is None or part.size < n_part:
            part = ws[0] = self.alloc(max(n_part, 2 * (0 if part is None else part.size), 64),
                                      "float64")
        if coef is None or coef.size < n_coef:
            coef = ws[1] = self.alloc(max(n_coef, 2 * (0 if coef is None else coef.size), 64),
                                      "float64")
        if key == PER_THREAD_STREAM:
            counters = getattr(self.local, "counters", None)
            if counters is None:
                counters = self.local.counters = {}
        else:
            counters = self.counters
        counter = counters.get(key)
        if counter is None or counter.size < n_counter:
            with self.lock:
                counter = counters.get(key)
                if counter is None or counter.size < n_counter:
                    size = max(n_counter, 2 * (0 if counter is None else counter.size), 64)
                    counter = counters[key] = self.alloc(size, "uint32", zero=True)
        return part, coef, counter


def _device_state(device_id):
    dev = _DEVICES.get(device_id)
    if dev is None:
        with _LOCK:
            dev = _DEVICES.get(device_id)
            if dev is None:
                props = _cupy().cuda.runtime.getDeviceProperties(device_id)
                dev = _DEVICES[device_id] = _Device(
                    device_id, int(props["multiProcessorCount"]),
                    int(props.get("regsPerMultiprocessor", 65536)),
                    int(props.get("l2CacheSize", 0)))
    return dev


def _state(x):
    """The _Device of x, which must be the current device (outputs are
    allocated there)."""
    cp = _cupy()
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"fastbn GPU backend: expected cupy arrays, got {type(x).__name__}")
    did = x.device.id
    cur = cp.cuda.runtime.getDevice()
    if did != cur:
        raise ValueError(f"x is on GPU {did} but the current device is GPU {cur}; "
                         f"call fastbn under `with cupy.cuda.Device({did}):`")
    return _device_state(did)


def _ptr(a):
    return a.data.ptr


def _aligned(*arrays):
    bits = 0
    for a in arrays:
        if a is not None:
            bits |= _ptr(a)
    return not bits & 15


def _or0(a):
    # A NULL pointer argument (CuPy passes a Python int as a 64-bit value).
    return 0 if a is None else a


def _check_buffers(x, **arrays):
    """Every array of a call a cupy array on x's GPU: a kernel handed a pointer
    into another GPU's memory faults (and takes the process's CUDA context
    with it) or, with peer access, crawls."""
    cp = _cupy()
    did = x.device.id
    for name, a in arrays.items():
        if a is None:
            continue
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"{name}: expected a cupy array on the GPU, got {type(a).__name__} "
                            "(RunningStats buffers and parameters must live on x's device)")
        if a.device.id != did:
            raise TypeError(f"{name}: expected an array on x's GPU ({did}), got one on "
                            f"GPU {a.device.id}")


def precompile(device=None):
    """Compile every kernel for a GPU now (default: the current device).

    The first call of each process otherwise compiles on first use (or loads
    CuPy's on-disk cache).  Returns the number of kernel instances loaded."""
    cp = _cupy()
    with cp.cuda.Device(device):
        dev = _device_state(cp.cuda.runtime.getDevice())
        names = name_expressions()
        for name in names:
            dev.kernel(name)
    return len(names)


# ----------------------------------------------------------------------------
# the passes

def _setup(layout, x, aligned_arrays, reduction, ew, reread=0):
    """Device state, geometry and kernels of one call; `reread`: how many
    arrays of x's size a fused launch would read twice (0: no reduction).
    Kept per device by (layout, kernels, dtype, shape, alignment): a repeated
    call costs one dictionary lookup."""
    dev = _state(x)
    aligned = _aligned(*aligned_arrays)
    key = (layout, reduction, ew, x.dtype, x.shape, aligned)
    plan = dev.plans.get(key)
    if plan is None:
        dname = x.dtype.name
        if dname not in _CTYPES:
            raise TypeError(f"fastbn GPU backend: unsupported dtype {x.dtype}")
        red = kernel_name(reduction, dname) if reduction else None
        ewn = kernel_name(ew, dname)
        names = (red, ewn) if red else (ewn,)
        geo = _geometry(layout, tuple(x.shape), x.dtype.itemsize, dev.sm_count,
                        aligned=aligned, blocks_per_sm=dev.blocks_per_sm(names),
                        fuse_bytes=reread * x.nbytes, l2_bytes=dev.l2_bytes,
                        tile_bytes=REDUCE_TILE_BYTES[x.dtype.itemsize] if red else TILE_BYTES)
        # The element-wise launch after a channels-last reduction of several
        # splits takes the wide tiles; channels-first keeps the reduction's
        # grid (its backward walk re-reads what the reduction read last).
        geo_ew = geo
        if red and layout == NHWC and geo.splits > 1:
            geo_ew = _geometry(layout, tuple(x.shape), x.dtype.itemsize, dev.sm_count,
                               aligned=aligned, blocks_per_sm=dev.blocks_per_sm(names))
        plan = (dev, geo, (dev.kernel(red) if red else None), dev.kernel(ewn), geo_ew)
        if len(dev.plans) >= 4096:
            dev.plans.clear()
        dev.plans[key] = plan
    return plan


def _forward_train(layout, x, y, weight, bias, mean, invstd, running_mean, running_var,
                   factor, eps):
    _check_buffers(x, y=y, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    dev, geo, stats, ew, geo_ew = _setup(layout, x, (x, y), "fbn_stats_" + layout,
                                         "fbn_ew_" + layout, reread=1)
    C = x.shape[1]
    part, coef, counter = dev.workspace(3 * C * geo.splits, 4 * C, geo.grid[0])
    dims = tuple(x.shape)
    fused = geo.splits == 1
    stats(geo.grid, geo.block,
          (x, _or0(weight), _or0(bias), mean, invstd, _or0(running_mean), _or0(running_var),
           coef, part, counter, *dims, float(factor), float(eps), geo.vec, y if fused else 0))
    if fused:
        return
    ew(geo_ew.grid, geo_ew.block,
       (x, 0, y, coef, 0, 0, 0, 0, 0, 0, 0, 0, *dims, float(eps), OP_FWD, MODE_TABLE,
        geo_ew.vec, 1))


def _forward_infer(layout, x, y, weight, bias, mean, invstd, running_mean, running_var, eps):
    _check_buffers(x, y=y, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    dev, geo, _, ew, _ = _setup(layout, x, (x, y), None, "fbn_ew_" + layout)
    ew(geo.grid, geo.block,
       (x, 0, y, 0, 0, 0, running_mean, running_var, _or0(weight), _or0(bias), mean, invstd,
        *tuple(x.shape), float(eps), OP_FWD, MODE_INFER, geo.vec, 0))


def _backward(layout, x, dy, dx, mean, invstd, weight, dweight, dbias, training):
    _check_buffers(x, dy=dy, dx=dx, weight=weight, dweight=dweight, dbias=dbias)
    training = bool(training)
    reduce = training or dweight is not None or dbias is not None
    dims = tuple(x.shape)
    if not reduce:
        # Eval mode, no parameter gradients: dx = dy * weight * invstd.
        dev, geo, _, ew, _ = _setup(layout, x, (dy, dx), None, "fbn_ew_" + layout)
        ew(geo.grid, geo.block,
           (x, dy, dx, 0, mean, invstd, 0, 0, _or0(weight), 0, 0, 0, *dims, 0.0, OP_BWD_EVAL,
            MODE_EVAL, geo.vec, 0))
        return
    dev, geo, gsum, ew, geo_ew = _setup(layout, x, (x, dy, dx), "fbn_gsum_" + layout,
                                        "fbn_ew_" + layout, reread=2)
    C = x.shape[1]
    part, coef, counter = dev.workspace(2 * C * geo.splits, 4 * C, geo.grid[0])
    fused = geo.splits == 1
    gsum(geo.grid, geo.block,
         (x, dy, mean, invstd, _or0(weight), _or0(dweight), _or0(dbias), coef, part, counter,
          *dims, int(training), geo.vec, dx if fused else 0))
    if fused:
        return
    ew(geo_ew.grid, geo_ew.block,
       (x, dy, dx, coef, 0, 0, 0, 0, 0, 0, 0, 0, *dims, 0.0,
        OP_BWD_TRAIN if training else OP_BWD_EVAL, MODE_TABLE, geo_ew.vec, 1))


# ----------------------------------------------------------------------------
# entry points (same names and signatures as fastbn/_cpu.pyx)

def forward_train_nchw(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       factor, eps, n_threads):
    """Training forward.  IN x, weight, bias; OUT y, mean, invstd (batch
    statistics); INOUT running_mean, running_var, updated with
    r <- (1 - factor) r + factor * stat (unbiased variance)."""
    _forward_train(NCHW, x, y, weight, bias, mean, invstd, running_mean, running_var,
                   factor, eps)


def forward_train_nhwc(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       factor, eps, n_threads):
    """Channels-last twin of forward_train_nchw."""
    _forward_train(NHWC, x, y, weight, bias, mean, invstd, running_mean, running_var,
                   factor, eps)


def forward_infer_nchw(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       eps, n_threads):
    """Inference forward with the running statistics.  IN x, weight, bias,
    running_mean, running_var; OUT y, mean, invstd (the statistics used)."""
    _forward_infer(NCHW, x, y, weight, bias, mean, invstd, running_mean, running_var, eps)


def forward_infer_nhwc(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       eps, n_threads):
    """Channels-last twin of forward_infer_nchw."""
    _forward_infer(NHWC, x, y, weight, bias, mean, invstd, running_mean, running_var, eps)


def backward_nchw(x, dy, dx, mean, invstd, weight, dweight, dbias, training, n_threads):
    """Backward.  IN x, dy, mean, invstd (from the forward), weight; OUT dx,
    dweight, dbias (either may be None).  training: through the batch
    statistics; otherwise the statistics were constants (eval mode)."""
    _backward(NCHW, x, dy, dx, mean, invstd, weight, dweight, dbias, training)


def backward_nhwc(x, dy, dx, mean, invstd, weight, dweight, dbias, training, n_threads):
    """Channels-last twin of backward_nchw."""
    _backward(NHWC, x, dy, dx, mean, invstd, weight, dweight, dbias, training)
