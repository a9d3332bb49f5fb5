"""Which array library an array comes from, and how to hand it to a backend.

An *adapter* per library turns the caller's array into the backend's native
array (a numpy array for the CPU backend) and turns results back into the
caller's kind.  Libraries are recognised by the type's module name, so no
framework is ever imported here; the answer is cached per type.  Torch and JAX
arrays cross through DLPack without a copy.
"""

import sys

import numpy as np

_BACKENDS = {}


def backend(device):
    """The kernel module for a device ("cpu" or "gpu")."""
    mod = _BACKENDS.get(device)
    if mod is None:
        if device == "cpu":
            from . import _cpu as mod
        elif device == "gpu":
            _cupy("x")
            from . import _gpu as mod
        else:
            raise TypeError(f"fastbn: no backend for device {device!r}")
        _BACKENDS[device] = mod
    return mod


def _cupy(argname):
    """The cupy module (GPU arrays cannot be handled without it)."""
    cp = sys.modules.get("cupy")
    if cp is None:
        try:
            import cupy as cp
        except ImportError:
            raise TypeError(
                f"{argname}: GPU arrays need CuPy, which is not installed; install "
                "fastbn[gpu] (or the cupy-cudaXXx wheel matching your CUDA)"
            ) from None
    return cp


def precompile(device=None):
    """Compile the GPU kernels now rather than on first use.

    The kernels are compiled once per process and device the first time a GPU
    array needs them (CuPy also keeps the binaries in its on-disk cache);
    training engines that want that cost up front call this at start-up.

    Parameters
    ----------
    device : int or None
        CUDA device id; None for the current device.

    Returns
    -------
    int : the number of kernel instances compiled or loaded.
    """
    return backend("gpu").precompile(device)


class _Adapter:
    """Base of the adapters: one instance per library, compared by identity,
    so a copy or an unpickled object gets the same instance back."""

    name = None

    def __reduce__(self):
        return (_named, (self.name,))

    def why_not_writable(self, a):
        """None if results may be written into ``a`` (out=), else why not."""
        return None


def _named(name):
    """The adapter instance of a library (for unpickling)."""
    return _NUMPY if name == "numpy" else _BY_MODULE[name]


def _from_dlpack(a, argname, what):
    """np.from_dlpack(a), its failures re-raised as a TypeError naming the argument."""
    try:
        return np.from_dlpack(a)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{argname}: expected a strided {what} that numpy can read "
                        f"through DLPack, got one it cannot ({type(exc).__name__}: {exc})"
                        ) from None


class NumpyAdapter(_Adapter):
    name = "numpy"

    def native(self, a, argname):
        return a

    def device(self, a):
        return "cpu"

    def wrap(self, a):
        return a

    def why_not_writable(self, a):
        return None if a.flags.writeable else "a read-only one"


class TorchAdapter(_Adapter):
    name = "torch"

    def native(self, t, argname):
        if t.requires_grad:
            raise TypeError(
                f"{argname}: expected a tensor that does not require grad "
                "(fastbn computes gradients itself); pass .detach()"
            )
        kind = t.device.type
        if kind == "cuda":
            # CUDA tensors (bfloat16 included) go to the GPU backend as cupy
            # arrays sharing their memory.
            cp = _cupy(argname)
            if t.is_conj() or t.is_neg():
                t = t.resolve_conj().resolve_neg()
            try:
                return cp.from_dlpack(t)
            except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
                raise TypeError(f"{argname}: cannot hand this {t.dtype} CUDA tensor to CuPy "
                                f"through DLPack ({exc})") from None
        if kind != "cpu":
            raise TypeError(
                f"{argname}: torch tensors on {t.device} are not supported; expected a CPU "
                "or CUDA tensor"
            )
        if str(t.dtype) == "torch.bfloat16":
            raise TypeError(
                f"{argname}: bfloat16 is not supported on the CPU; expected "
                "float16, float32 or float64 (or a CUDA tensor)"
            )
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return _from_dlpack(t, argname, f"{t.dtype} tensor")

    def device(self, a):
        # Called with a native array (numpy or cupy) or with a torch tensor
        # (RunningStats(like=...)).
        if type(a) is np.ndarray:
            return "cpu"
        dev = getattr(a, "device", None)
        if getattr(dev, "type", None) == "cuda":
            return "gpu"
        if (getattr(type(a), "__module__", "") or "").split(".")[0] == "cupy":
            return "gpu"
        return "cpu"

    def wrap(self, a):
        if isinstance(a, np.ndarray):
            # torch.from_dlpack of a negative-stride array aborts the process.
            if any(s < 0 for s in a.strides):
                a = a.copy()
        return sys.modules["torch"].from_dlpack(a)

    def why_not_writable(self, t):
        # A negative view's memory holds -t: what it reads back is resolved
        # into a copy, which results would be written into and then lost.
        if t.is_neg() or t.is_conj():
            return ("a negative or conjugate view (is_neg() or is_conj()), which cannot "
                    "be written through")
        return None


class JaxAdapter(_Adapter):
    name = "jax"

    def native(self, a, argname):
        devices = getattr(a, "devices", None)
        if devices is not None and any(d.platform != "cpu" for d in devices()):
            raise TypeError(
                f"{argname}: JAX arrays on an accelerator are not supported yet; "
                "expected a CPU array (GPU arrays: cupy or torch CUDA tensors)"
            )
        if str(a.dtype) == "bfloat16":
            raise TypeError(
                f"{argname}: bfloat16 is not supported on the CPU; expected "
                "float16, float32 or float64"
            )
        return _from_dlpack(a, argname, f"{a.dtype} array")

    def device(self, a):
        return "cpu"

    def wrap(self, a):
        return sys.modules["jax"].numpy.from_dlpack(a)

    def why_not_writable(self, a):
        return "a JAX array (JAX arrays are immutable)"


class CupyAdapter(_Adapter):
    name = "cupy"

    def native(self, a, argname):
        return a

    def device(self, a):
        return "gpu"

    def wrap(self, a):
        return a


_NUMPY = NumpyAdapter()
_JAX = JaxAdapter()
_BY_MODULE = {"torch": TorchAdapter(), "jax": _JAX, "jaxlib": _JAX, "cupy": CupyAdapter()}
_CACHE = {np.ndarray: _NUMPY}


def adapter(a, argname="x"):
    """The adapter for ``a``'s library (cached per type)."""
    t = type(a)
    ad = _CACHE.get(t)
    if ad is not None:
        return ad
    if isinstance(a, np.ndarray):
        if (getattr(t, "__module__", "") or "").startswith("numpy.ma"):
            raise TypeError(f"{argname}: expected a plain array, got a numpy masked array "
                            "(its mask would be ignored); pass a.filled(...) or a.data")
        ad = _NUMPY
    else:
        root = (getattr(t, "__module__", "") or "").split(".")[0]
        ad = _BY_MODULE.get(root)
        if ad is None or root not in sys.modules:
            raise TypeError(
                f"{argname}: expected an array (numpy, cupy, torch or JAX), "
                f"got {t.__module__}.{t.__qualname__}"
            )
    _CACHE[t] = ad
    return ad


def to_host_numpy(a, argname):
    """Any supported array (or array-like) as a numpy array on the host, for
    small things such as state_dict values."""
    if isinstance(a, np.ndarray):
        return a
    root = (getattr(type(a), "__module__", "") or "").split(".")[0]
    if root == "torch":
        return np.from_dlpack(a.detach().cpu())
    if root == "cupy":
        return a.get()
    try:
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{argname}: cannot be read as an array ({exc})") from None
