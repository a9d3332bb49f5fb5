"""Public entry points: validate, resolve the layout, allocate, dispatch.

Everything a call can reject is rejected here, before any kernel runs, so a
failed call leaves running statistics and out= buffers untouched.  Each kernel
call then does a whole pass (statistics, running update, normalisation).

Mixing libraries: weight, bias, out= and dy must come from x's library.
RunningStats buffers must be on x's device; stats with the backend's own
buffers (numpy, the default, or cupy) serve any array on that device, while
stats created with ``like=<torch tensor>`` serve torch tensors only.

Threads: the kernels release the GIL, and nothing here keeps state between
calls, so concurrent calls on distinct arrays are safe and give the same bits
as sequential ones.  Training forwards that update the same RunningStats are
serialised by that RunningStats' lock (the update is a read-modify-write).
"""

import math
import numbers

import numpy as np

from . import _dispatch, _threads
from ._cpu import backward_plain as _cpu_backward_plain
from ._stats import RunningStats

_NUMPY = _dispatch.adapter(np.empty(0))

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
# Parameter / statistics dtype for each data dtype (float16 computes in float32).
PARAM_DTYPE = {_F32: _F32, _F64: _F64, _F16: _F32}
SUPPORTED = "float16, float32 or float64"

NCHW, NHWC = "nchw", "nhwc"


class Context:
    """What :func:`backward` needs from a :func:`forward` call.

    Attributes
    ----------
    mean, invstd : (C,) float64 numpy arrays
        The statistics the forward normalised with: batch statistics in
        training, running statistics in inference.
    mean_lo : (C,) float64 numpy array or None
        In training on the CPU: what the final rounding of the batch mean
        to float64 lost (exactly), which y (through its constant) and the
        backward add back for data far from zero with a small spread.
    layout : "nchw" or "nhwc"
        The kernel layout the forward used (channels-first (N, C, S) or
        channels-last (M, C) memory).
    training : bool
        Whether the forward used batch statistics (backward then flows
        through them) or frozen statistics.
    """

    __slots__ = ("mean", "invstd", "mean_lo", "layout", "training", "x", "weight", "weight_dtype",
                 "bias_dtype", "spatial", "shape", "dtype", "perm", "adapter", "device",
                 "num_features", "plain")

    def __repr__(self):
        if not hasattr(self, "plain"):
            return "Context(<empty: not made by a forward>)"
        return (f"Context(layout={self.layout!r}, training={self.training}, "
                f"shape={self.shape}, dtype={self.dtype})")


# ----------------------------------------------------------------------------
# layouts

_PERMS = {}
_IDENT = {n: tuple(range(n)) for n in range(2, 6)}


def _perms(ndim, axis):
    """(preferred layout, {layout: (perm, identity)}) for a logical shape.

    perm orders the logical axes as they lie in memory: channels-first memory
    is (N, C, spatial...), channels-last memory is (N, spatial..., C)."""
    key = (ndim, axis)
    hit = _PERMS.get(key)
    if hit is None:
        if axis == 1 and ndim > 2:
            first = tuple(range(ndim))
            last = (0, *range(2, ndim), 1)
            preferred = NCHW
        else:
            last = tuple(range(ndim))
            first = (0, ndim - 1, *range(1, ndim - 1))
            preferred = NHWC
        ident = tuple(range(ndim))
        hit = _PERMS[key] = (preferred, {NCHW: (first, first == ident),
                                         NHWC: (last, last == ident)})
    return hit


def _kernel_view(a, layout, perm, identity, C, S):
    """``a`` as the kernel's (N, C, S) or (M, C) array without a copy, or None."""
    v = a if identity else a.transpose(perm)
    if not v.flags.c_contiguous:
        return None
    if layout == NCHW:
        return v.reshape(v.shape[0], C, S)
    return v.reshape(-1, C)


def _allocate(xp, shape, dtype, layout, perm, identity, C, S):
    """(logical array, kernel view) of a new array in the given layout."""
    if identity:
        buf = xp.empty(shape, dtype)
        logical = buf
    else:
        buf = xp.empty(tuple(shape[p] for p in perm), dtype)
        logical = buf.transpose(np.argsort(perm))
    view = buf.reshape(shape[0], C, S) if layout == NCHW else buf.reshape(-1, C)
    return logical, view


def _resolve(a, axis, C, S, xp=np):
    """Choose the layout for x: the preferred one if the strides allow it,
    else the other one if they allow that (no copy), else a copy in the
    preferred layout.  Returns (layout, perm, identity, view)."""
    if a.flags.c_contiguous:       # the common case: no strides to read
        if axis == 1 and S != 1 and a.ndim > 2:
            return NCHW, _IDENT[a.ndim], True, a.reshape(a.shape[0], C, S)
        if axis == -1 or a.ndim == 2 or S == 1:
            return NHWC, _IDENT[a.ndim], True, a.reshape(-1, C)
    preferred, perms = _perms(a.ndim, axis)
    order = (preferred, NHWC if preferred == NCHW else NCHW)
    if S == 1:                     # (N, C, 1, ...) is (M, C) memory either way
        order = (NHWC,)
    for layout in order:
        perm, identity = perms[layout]
        view = _kernel_view(a, layout, perm, identity, C, S)
        if view is not None:
            return layout, perm, identity, view
    layout = order[0]
    perm, identity = perms[layout]
    copy = xp.ascontiguousarray(a if identity else a.transpose(perm))
    return layout, perm, identity, _kernel_view(copy, layout, tuple(range(a.ndim)), True, C, S)


# ----------------------------------------------------------------------------
# argument checks

def _same_memory(a, b):
    """Whether two arrays are the same elements (same start, shape and strides)."""
    ptr = (lambda v: v.ctypes.data) if isinstance(a, np.ndarray) else (lambda v: v.data.ptr)
    return ptr(a) == ptr(b) and a.shape == b.shape and a.strides == b.strides


def _dtype_error(argname, dtype):
    """The TypeError for data of an unsupported dtype."""
    if dtype.kind == "f" and dtype.newbyteorder("=") in PARAM_DTYPE:
        why = "in native byte order; convert with .astype(np.dtype(...).newbyteorder('='))"
    elif dtype.kind in "biuc":
        why = "integer, complex and bool data are not normalised; convert with .astype()"
    else:
        why = "convert with .astype()"
    return TypeError(f"{argname}: expected dtype {SUPPORTED} ({why}), got {dtype}")


def _check_x(x, axis, argname="x"):
    ad = _dispatch.adapter(x, argname)
    xn = ad.native(x, argname)
    ndim = xn.ndim
    if not 2 <= ndim <= 5:
        raise ValueError(f"{argname}: expected 2 to 5 dimensions (N, C, ...), "
                         f"got shape {tuple(xn.shape)}")
    dtype = xn.dtype
    if dtype not in PARAM_DTYPE:
        raise _dtype_error(argname, dtype)
    if type(axis) is not int:
        axis = _check_axis_type(axis)
    if axis == 1 or axis == -1 or axis == ndim - 1:
        axis = 1 if axis == 1 else -1
    else:
        raise ValueError(f"axis: expected 1 (channels-first) or -1 (channels-last, or "
                         f"x.ndim - 1 = {ndim - 1}), got {axis!r}")
    return ad, xn, axis


def _check_axis_type(axis):
    """axis as a Python int, or the TypeError for a non-integer (bool included)."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected the int 1 (channels-first) or -1 "
                        f"(channels-last), got {type(axis).__name__} {axis!r}")
    return int(axis)


def _check_flag(value, name):
    """True or False (numpy bools too); anything else is a TypeError: a string
    such as "False" must not silently mean True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def _check_eps(eps):
    if type(eps) is not float:
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
            raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
        eps = float(eps)
    if not (eps > 0.0 and eps != math.inf):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return eps


def _check_param(p, name, ad, C, xdtype, pdtype):
    """(array in the parameter dtype, the caller's dtype) or (None, None)."""
    if p is None:
        return None, None
    if (type(p) is np.ndarray and ad is _NUMPY and p.dtype is pdtype and p.ndim == 1
            and p.shape[0] == C and p.flags.c_contiguous):
        return p, pdtype
    pad = _dispatch.adapter(p, name)
    if pad is not ad:
        raise TypeError(f"{name}: expected a {ad.name} array like x, got a {pad.name} array")
    pn = pad.native(p, name)
    given = pn.dtype
    if tuple(pn.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},) to match the {C} channels of x, "
                         f"got {tuple(pn.shape)}")
    if pn.dtype != pdtype:
        if pn.dtype != xdtype:
            raise TypeError(f"{name}: expected dtype {pdtype} to match x ({xdtype}), "
                            f"got {pn.dtype}")
        pn = pn.astype(pdtype)
    elif not pn.flags.c_contiguous:
        pn = pn.copy()                     # C order (numpy and cupy alike)
    return pn, given


# Libraries whose arrays are a backend's own buffers: stats kept in them serve
# any array on their device.
_NATIVE_LIBS = ("numpy", "cupy")


def _check_stats(stats, ad, device, C, pdtype, xdtype):
    if not isinstance(stats, RunningStats):
        raise TypeError(f"stats: expected fastbn.RunningStats or None, got {type(stats).__name__}")
    if stats.num_features != C:
        raise ValueError(f"stats: expected {C} features to match the {C} channels of x, "
                         f"got RunningStats({stats.num_features})")
    if stats.dtype != pdtype:
        raise TypeError(f"stats: expected RunningStats(..., dtype={pdtype.name}) to serve x of "
                        f"dtype {xdtype}, got dtype {stats.dtype}")
    if stats.device != device:
        raise TypeError(f"stats: expected buffers on x's device ({device}), "
                        f"got buffers on {stats.device}")
    sad = stats._adapter
    if sad is not ad and sad.name not in _NATIVE_LIBS:
        raise TypeError(f"stats: expected buffers of x's library ({ad.name}) or the default "
                        f"numpy buffers, got {sad.name} buffers (RunningStats(like=...))")


def _check_out(out, ad, shape, dtype, layout, perm, identity, C, S, argname="out"):
    if (type(out) is np.ndarray and ad is _NUMPY and out.shape == shape
            and out.dtype is dtype and out.flags.writeable):
        view = _kernel_view(out, layout, perm, identity, C, S)
        if view is not None:
            return view
    oad = _dispatch.adapter(out, argname)
    if oad is not ad:
        raise TypeError(f"{argname}: expected a {ad.name} array like the input, "
                        f"got a {oad.name} array")
    why = oad.why_not_writable(out)
    if why is not None:
        raise ValueError(f"{argname}: expected a writable array, got {why}")
    on = oad.native(out, argname)
    if tuple(on.shape) != tuple(shape):
        raise ValueError(f"{argname}: expected shape {tuple(shape)}, got {tuple(on.shape)}")
    if on.dtype != dtype:
        raise TypeError(f"{argname}: expected dtype {dtype}, got {on.dtype}")
    if isinstance(on, np.ndarray) and not on.flags.writeable:   # cupy: always writable
        raise ValueError(f"{argname}: expected a writable array, got a read-only one")
    view = _kernel_view(on, layout, perm, identity, C, S)
    if view is None:
        mem = "channels-first" if layout == NCHW else "channels-last"
        raise ValueError(f"{argname}: expected a contiguous array in the input's "
                         f"{mem} memory layout, got strides {_elem_strides(on)}")
    return view


def _elem_strides(a):
    """An array's strides for a message, in elements (torch's .stride(), numpy's
    strides over the itemsize), named as such."""
    return f"{tuple(s // a.itemsize for s in a.strides)} (in elements)"


def _check_finite(xp, a, argname):
    """ValueError unless every element of ``a`` is finite (check_finite=True).

    One read of ``a`` and no temporary in the common case: a sum is finite
    only if every term is (NaN and Inf never cancel out), so a finite sum
    settles it; only a non-finite sum (NaN/Inf, or finite float64 values
    overflowing the sum) takes the exact, allocating look.  numpy sums float16
    slowly, so there the exponent bits are tested instead: uint16 << 1 drops
    the sign, and all-ones exponents (Inf, NaN) are then the values >= 0xF800
    (one temporary of x's size, about 14 GB/s here)."""
    if a.size == 0:
        return
    if a.dtype == _F16:
        if int((a.view(np.uint16) << 1).max()) < 0xF800:
            return
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(a.sum())):
                return
    bad = a.size - int(xp.isfinite(a).sum())
    if bad:
        raise ValueError(f"{argname}: expected finite values (check_finite=True), got {bad} "
                         f"NaN or Inf element(s) of {a.size}")


# ----------------------------------------------------------------------------
# forward / backward

def forward(x, weight=None, bias=None, stats=None, *, training=True, eps=1e-5, axis=1,
            out=None, num_threads=None, check_finite=False):
    """Batch normalization forward.

    Parameters
    ----------
    x : array of rank 2 to 5, float16 / float32 / float64
        numpy, torch (CPU) or JAX (CPU) array; the result is the same kind.
        N = 0 or a zero-size spatial dimension gives an empty y, as PyTorch.
    weight, bias : (C,) arrays or None
        Affine parameters (None: weight 1, bias 0).  Same library as x, same
        dtype as x, or float32 for float16 x.
    stats : RunningStats or None
        Running statistics.  training=True updates them (if given);
        training=False normalises with them (required).  Buffers on x's
        device; numpy-backed stats (the default) serve any CPU array, stats
        made with ``like=<tensor>`` only arrays of that library.
    training : bool
        Batch statistics (True) or running statistics (False).
    eps : float > 0
    axis : 1 or -1
        The channel axis: 1 for channels-first (NC, NCL, NCHW, NCDHW), -1 for
        channels-last (NLC, NHWC, NDHWC).  With axis=1 an array whose strides
        are channels-last (e.g. a torch channels_last tensor) is read in place
        by the channels-last kernel.
    out : array like x, optional
        Where to write y; must have x's shape, dtype and memory layout, be
        writable, and not overlap x, except that out=x itself is allowed with
        training=False (in-place inference).
    num_threads : int, optional
        CPU threads for this call (see :func:`fastbn.set_num_threads`).
    check_finite : bool
        Refuse (ValueError) NaN or Inf in x, weight, bias and, with
        training=False, the running statistics, before anything is written.
        Costs one extra read of x (about a third of a forward's memory
        traffic); off by default, when NaN/Inf propagate per channel (a NaN
        in channel c makes y, the statistics and the running statistics of
        channel c NaN, and no other channel).

    Returns
    -------
    y : array like x (same shape, dtype and memory layout)
    ctx : Context for :func:`backward`; ``ctx.mean`` and ``ctx.invstd`` are
        the float64 statistics used (NaN for an empty training batch).

    Raises
    ------
    TypeError, ValueError
        For any invalid argument, naming it; nothing (y, out=, stats) has
        been written when they are raised.
    """
    if (type(x) is np.ndarray and type(eps) is float and type(axis) is int
            and -8 < axis < 8 and check_finite is False
            and (training is True or training is False)):
        hit = _forward_plain(x, weight, bias, stats, training, eps, axis, out, num_threads)
        if hit is not None:
            return hit
    ad, xn, axis = _check_x(x, axis)
    shape = xn.shape
    ndim = len(shape)
    C = shape[1] if axis == 1 else shape[ndim - 1]
    if C == 0:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(shape)}")
    E = xn.size
    S = math.prod(shape[2:]) if axis == 1 else math.prod(shape[1:-1])
    dtype = xn.dtype
    pdtype = PARAM_DTYPE[dtype]
    device = ad.device(xn)
    w, wdtype = _check_param(weight, "weight", ad, C, dtype, pdtype)
    b, bdtype = _check_param(bias, "bias", ad, C, dtype, pdtype)
    if ad is not _NUMPY:
        _check_param_device(w, "weight", ad, device)
        _check_param_device(b, "bias", ad, device)
    eps = _check_eps(eps)
    if training is not True and training is not False:
        training = _check_flag(training, "training")
    if check_finite is not True and check_finite is not False:
        check_finite = _check_flag(check_finite, "check_finite")
    if stats is not None:
        _check_stats(stats, ad, device, C, pdtype, dtype)
    if training:
        if E // C <= 1 and E:
            raise ValueError("x: expected more than 1 value per channel when training, "
                             f"got shape {tuple(shape)}")
    elif stats is None:
        raise ValueError("stats: inference (training=False) normalises with running "
                         "statistics; expected a RunningStats, got None")
    nt = _threads.resolve(num_threads)

    kernels = _dispatch.backend(device)
    xp = kernels.xp
    layout, perm, identity, xv = _resolve(xn, axis, C, S, xp)
    in_place = False
    if out is None:
        y, yv = _allocate(xp, shape, dtype, layout, perm, identity, C, S)
    else:
        yv = _check_out(out, ad, shape, dtype, layout, perm, identity, C, S)
        if xp.may_share_memory(yv, xv):
            if training:
                raise ValueError("out: expected an array that does not overlap x when "
                                 "training (backward needs x), got one that does; in-place "
                                 "forward (out=x) is supported with training=False")
            if not _same_memory(yv, xv):
                raise ValueError("out: expected x itself (in-place inference) or an array "
                                 "that does not overlap x, got one that partly overlaps x")
            in_place = True
    if check_finite:
        _check_finite(xp, xv, "x")
        if w is not None:
            _check_finite(xp, w, "weight")
        if b is not None:
            _check_finite(xp, b, "bias")
        if not training:
            _check_finite(xp, stats._mean, "stats.mean")
            _check_finite(xp, stats._var, "stats.var")
    mean = xp.empty(C, _F64)
    invstd = xp.empty(C, _F64)
    # the batch mean's float64 rounding error, where the backend keeps it (_cpu.MEAN_LO)
    lo = xp.empty(C, _F64) if training and E and getattr(kernels, "MEAN_LO", False) else None
    extra = {} if lo is None else {"mean_lo": lo}
    if E == 0:
        # As PyTorch's BatchNorm layers: an empty batch gives an empty y and
        # leaves the running mean and variance alone, but is counted.
        if training:
            mean.fill(math.nan)
            invstd.fill(math.nan)
            if stats is not None:
                with stats._lock:
                    stats._count += 1
        else:
            mean[...] = stats._mean
            invstd[...] = 1.0 / xp.sqrt(stats._var.astype(_F64) + eps)
    elif training:
        if stats is not None:
            # The running update is a read-modify-write of shared buffers
            # (acquire/release: half the cost of a with-block).
            lock = stats._lock
            lock.acquire()
            try:
                getattr(kernels, "forward_train_" + layout)(
                    xv, yv, w, b, mean, invstd, stats._mean, stats._var,
                    stats._next_factor(), eps, nt, **extra)
                stats._count += 1
            finally:
                lock.release()
        else:
            getattr(kernels, "forward_train_" + layout)(
                xv, yv, w, b, mean, invstd, None, None, 0.0, eps, nt, **extra)
    else:
        getattr(kernels, "forward_infer_" + layout)(
            xv, yv, w, b, mean, invstd, stats._mean, stats._var, eps, nt)

    ctx = Context()
    ctx.mean = mean
    ctx.invstd = invstd
    ctx.mean_lo = lo
    ctx.layout = layout
    ctx.training = training
    # An in-place inference overwrote x: backward can still give dx, not dweight.
    ctx.x = None if in_place else xv
    ctx.plain = False
    ctx.weight = w
    ctx.weight_dtype = wdtype
    ctx.bias_dtype = bdtype
    ctx.spatial = S
    ctx.shape = tuple(shape)
    ctx.dtype = dtype
    ctx.perm = (perm, identity)
    ctx.adapter = ad
    ctx.device = device
    ctx.num_features = C
    if out is not None:
        return out, ctx
    return ad.wrap(y), ctx


def _plain_threads(num_threads):
    """num_threads for a plain lane, or 0 when only the general path (with its
    error messages) may look at it."""
    if num_threads is None:
        return _threads.resolve(None)
    if type(num_threads) is int and 0 < num_threads <= _threads.MAX_THREADS:
        return num_threads
    return 0


def _forward_plain(x, weight, bias, stats, training, eps, axis, out, num_threads):
    """forward for plain numpy arguments in one kernel-module call
    (_cpu.forward_plain), or None when the call needs the general path.
    Nothing is written before the lane accepts the call."""
    nt = _plain_threads(num_threads)
    if not nt or not 0.0 < eps < math.inf:
        return None
    # The backend serving numpy arrays offers the lane (the CPU backend does;
    # the test suite's CUDA emulator puts the GPU backend there, which does not).
    lane = getattr(_dispatch.backend("cpu"), "forward_plain", None)
    if lane is None:
        return None
    if stats is None:
        if not training:
            return None
        hit = lane(x, out, weight, bias, None, None, 0.0, eps, True, axis, nt)
    elif type(stats) is RunningStats and stats._adapter is _NUMPY:
        if training:
            lock = stats._lock
            lock.acquire()
            try:
                hit = lane(x, out, weight, bias, stats._mean, stats._var,
                           stats._next_factor(), eps, True, axis, nt)
                if hit is not None:
                    stats._count += 1
            finally:
                lock.release()
        else:
            hit = lane(x, out, weight, bias, stats._mean, stats._var, 0.0, eps, False, axis, nt)
    else:
        return None
    if hit is None:
        return None
    y, mean, invstd, lo, nhwc, C, S, in_place = hit
    ctx = Context()
    ctx.mean = mean
    ctx.invstd = invstd
    ctx.mean_lo = lo
    ctx.layout = NHWC if nhwc else NCHW
    ctx.training = training
    ctx.x = None if in_place else x          # x itself, not a kernel view: see plain
    ctx.plain = True
    ctx.weight = weight
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.spatial = S
    shape = x.shape
    ctx.shape = shape
    ctx.dtype = x.dtype
    ctx.perm = (_IDENT[len(shape)], True)
    ctx.adapter = _NUMPY
    ctx.device = "cpu"
    ctx.num_features = C
    return (y if out is None else out), ctx


def _backward_plain(dy, ctx, out, num_threads):
    """backward for a plain numpy call after a plain forward, or None.  Only the
    CPU backend's forward lane makes plain contexts, so its backward lane pairs
    with them (imported once, not looked up per call)."""
    nt = _plain_threads(num_threads)
    if not nt:
        return None
    hit = _cpu_backward_plain(
        ctx.x, dy, out, ctx.mean, ctx.invstd, ctx.weight, ctx.layout == NHWC,
        ctx.num_features, ctx.spatial, ctx.training, ctx.weight_dtype is not None,
        ctx.bias_dtype is not None, nt, ctx.mean_lo)
    if hit is None:
        return None
    if out is not None:
        return out, hit[1], hit[2]
    return hit


def _check_param_device(p, name, ad, device):
    if p is not None and ad.device(p) != device:
        raise TypeError(f"{name}: expected an array on x's device ({device}), "
                        f"got one on {ad.device(p)}")


_MEMORY = {NCHW: "channels-first", NHWC: "channels-last"}


def backward(dy, ctx, *, out=None, num_threads=None, check_finite=False):
    """Batch normalization backward.

    Parameters
    ----------
    dy : array like the forward's x (same kind, device, shape and dtype)
        Gradient of the loss with respect to y.  In x's memory layout, or
        non-contiguous (then copied once); dy contiguous in the other
        layout (channels-last vs channels-first) is a ValueError.
    ctx : Context from :func:`forward`
        A training forward gives the gradient through the batch statistics;
        an inference forward treats the statistics as constants.  x must not
        have been modified since the forward (ctx reads it).
    out : array like x, optional
        Where to write dx (x's shape, dtype and memory layout).  May be dy
        itself (in-place); may not overlap x or partly overlap dy.
    num_threads : int, optional
    check_finite : bool
        Refuse (ValueError) NaN or Inf in dy or in the forward's x before
        anything is written (one extra read of each).

    Returns
    -------
    dx : array like dy
    dweight, dbias : (C,) arrays, or None where the forward had no weight /
        no bias (zeros for an empty batch).
    """
    if type(ctx) is Context:
        try:
            plain = ctx.plain
        except AttributeError:           # Context(): made by hand, not by forward
            plain = None
        if (plain and type(dy) is np.ndarray and check_finite is False
                and ctx.x is not None):
            hit = _backward_plain(dy, ctx, out, num_threads)
            if hit is not None:
                return hit
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx: expected the Context returned by fastbn.forward, "
                        f"got {type(ctx).__name__}")
    if not hasattr(ctx, "plain"):
        raise TypeError("ctx: expected the Context returned by fastbn.forward, got an "
                        "empty Context (made by Context(), not by a forward)")
    if check_finite is not True and check_finite is not False:
        check_finite = _check_flag(check_finite, "check_finite")
    ad = _dispatch.adapter(dy, "dy")
    if ad is not ctx.adapter:
        raise TypeError(f"dy: expected a {ctx.adapter.name} array like x, got a {ad.name} array")
    dyn = ad.native(dy, "dy")
    if tuple(dyn.shape) != ctx.shape:
        raise ValueError(f"dy: expected shape {ctx.shape} (the shape of x), got {tuple(dyn.shape)}")
    if dyn.dtype != ctx.dtype:
        raise TypeError(f"dy: expected dtype {ctx.dtype} (the dtype of x), got {dyn.dtype}")
    if ad is not _NUMPY and ad.device(dyn) != ctx.device:
        raise TypeError(f"dy: expected an array on x's device ({ctx.device}), "
                        f"got one on {ad.device(dyn)}")
    nt = _threads.resolve(num_threads)
    C = ctx.num_features
    layout = ctx.layout
    perm, identity = ctx.perm
    S = ctx.spatial
    dyv = _kernel_view(dyn, layout, perm, identity, C, S)
    if dyv is None:
        _check_dy_layout(dyn, ctx)
        # any other strides: one copy into x's layout
        dyv = _kernel_view(_dispatch.backend(ctx.device).xp.ascontiguousarray(
                               dyn if identity else dyn.transpose(perm)),
                           layout, tuple(range(dyn.ndim)), True, C, S)
    xv = ctx.x
    if ctx.plain and xv is not None:         # the plain lane kept x itself
        xv = _kernel_view(xv, layout, perm, identity, C, S)
    needs_x = ctx.training or ctx.weight_dtype is not None or ctx.bias_dtype is not None
    if xv is None and needs_x:
        raise ValueError("ctx: expected the context of a forward that kept x (needed for "
                         "the batch statistics or dweight/dbias), got one whose forward wrote "
                         "y over x (in-place); in-place forwards only support backward in eval "
                         "mode without affine parameters")
    kernels = _dispatch.backend(ctx.device)
    xp = kernels.xp
    if out is None:
        dx, dxv = _allocate(xp, ctx.shape, ctx.dtype, layout, perm, identity, C, S)
    else:
        dxv = _check_out(out, ad, ctx.shape, ctx.dtype, layout, perm, identity, C, S)
        if xv is not None and xp.may_share_memory(dxv, xv):
            raise ValueError("out: expected an array that does not overlap x (the "
                             "forward's input), got one that does")
        if xp.may_share_memory(dxv, dyv) and not _same_memory(dxv, dyv):
            raise ValueError("out: expected dy itself (in-place) or an array that does not "
                             "overlap dy, got one that partly overlaps dy")
    if check_finite:
        _check_finite(xp, dyv, "dy")
        if xv is not None:
            _check_finite(xp, xv, "x (the forward's input)")
    pdtype = PARAM_DTYPE[ctx.dtype]
    dweight = None if ctx.weight_dtype is None else xp.empty(C, pdtype)
    dbias = None if ctx.bias_dtype is None else xp.empty(C, pdtype)
    if dyv.size:
        extra = {} if ctx.mean_lo is None else {"mean_lo": ctx.mean_lo}
        getattr(kernels, "backward_" + layout)(xv if xv is not None else dyv, dyv, dxv,
                                               ctx.mean, ctx.invstd, ctx.weight, dweight,
                                               dbias, ctx.training, nt, **extra)
    else:                    # empty batch: sums over nothing, as PyTorch
        for g in (dweight, dbias):
            if g is not None:
                g.fill(0)
    if dweight is not None:
        if dweight.dtype != ctx.weight_dtype:
            dweight = dweight.astype(ctx.weight_dtype)
        dweight = ad.wrap(dweight)
    if dbias is not None:
        if dbias.dtype != ctx.bias_dtype:
            dbias = dbias.astype(ctx.bias_dtype)
        dbias = ad.wrap(dbias)
    return (out if out is not None else ad.wrap(dx)), dweight, dbias


def _check_dy_layout(dyn, ctx):
    """ValueError if dy is contiguous in the other canonical layout than the
    one the forward ran in: reading it would need a transposing copy, which
    is a silent slowdown the caller can avoid (and almost always means dy was
    produced without regard to x's memory format)."""
    layout = ctx.layout
    other = NHWC if layout == NCHW else NCHW
    if ctx.spatial == 1 or dyn.ndim == 2 or dyn.size == 0:
        return               # both layouts are the same memory
    # The channel axis is where the forward's memory order put it: second
    # (channels-first) or last (channels-last); the rest keep their order.
    perm = ctx.perm[0]
    c = perm[1] if layout == NCHW else perm[-1]
    rest = tuple(a for a in perm[1:] if a != c)
    perm = (0, *rest, c) if other == NHWC else (0, c, *rest)
    identity = perm == tuple(range(dyn.ndim))
    if _kernel_view(dyn, other, perm, identity, ctx.num_features, ctx.spatial) is not None:
        raise ValueError(f"dy: expected x's memory layout ({_MEMORY[layout]}, the layout the "
                         f"forward ran in), got a {_MEMORY[other]} contiguous array with "
                         f"strides {_elem_strides(dyn)}; give dy x's layout (numpy: "
                         f"np.empty_like(x) then copy; torch: .contiguous(memory_format=...))")
