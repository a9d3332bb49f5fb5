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
        else:
            raise TypeError(
                "fastbn: the GPU backend is not available in this build; "
                "pass CPU arrays (numpy, or torch/JAX tensors on the CPU)"
            )
        _BACKENDS[device] = mod
    return mod


class NumpyAdapter:
    name = "numpy"

    def native(self, a, argname):
        return a

    def device(self, a):
        return "cpu"

    def wrap(self, a):
        return a

    def writable(self, a):
        return a.flags.writeable


class TorchAdapter:
    name = "torch"

    def native(self, t, argname):
        if t.requires_grad:
            raise TypeError(
                f"{argname}: expected a tensor that does not require grad "
                "(fastbn computes gradients itself); pass .detach()"
            )
        if t.device.type != "cpu":
            raise TypeError(
                f"{argname}: torch tensors on {t.device} need the GPU backend, "
                "which this build does not have; expected a CPU tensor"
            )
        if str(t.dtype) == "torch.bfloat16":
            raise TypeError(
                f"{argname}: bfloat16 is not supported on the CPU; expected "
                "float16, float32 or float64"
            )
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return np.from_dlpack(t)

    def device(self, t):
        return "cpu"

    def wrap(self, a):
        # torch.from_dlpack of a negative-stride array aborts the process.
        if any(s < 0 for s in a.strides):
            a = a.copy()
        return sys.modules["torch"].from_dlpack(a)

    def writable(self, t):
        return True


class JaxAdapter:
    name = "jax"

    def native(self, a, argname):
        devices = getattr(a, "devices", None)
        if devices is not None and any(d.platform != "cpu" for d in devices()):
            raise TypeError(
                f"{argname}: JAX arrays on an accelerator need the GPU backend, "
                "which this build does not have; expected a CPU array"
            )
        if str(a.dtype) == "bfloat16":
            raise TypeError(
                f"{argname}: bfloat16 is not supported on the CPU; expected "
                "float16, float32 or float64"
            )
        return np.from_dlpack(a)

    def device(self, a):
        return "cpu"

    def wrap(self, a):
        return sys.modules["jax"].numpy.from_dlpack(a)

    def writable(self, a):
        return False          # JAX arrays are immutable: no out= into them


class CupyAdapter:
    name = "cupy"

    def native(self, a, argname):
        return a

    def device(self, a):
        return "gpu"

    def wrap(self, a):
        return a

    def writable(self, a):
        return True


_NUMPY = NumpyAdapter()
_BY_MODULE = {"torch": TorchAdapter(), "jax": JaxAdapter(), "jaxlib": JaxAdapter(),
              "cupy": CupyAdapter()}
_CACHE = {np.ndarray: _NUMPY}


def adapter(a, argname="x"):
    """The adapter for ``a``'s library (cached per type)."""
    t = type(a)
    ad = _CACHE.get(t)
    if ad is not None:
        return ad
    if isinstance(a, np.ndarray):
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
