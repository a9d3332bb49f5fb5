"""RunningStats: the one running-statistics manager.

It owns running_mean, running_var and num_batches_tracked, and is the only
place that knows the update rule.  The kernels never see the momentum: they
receive the factor f of this step and update the buffers in place in the same
pass as the batch statistics::

    running_mean <- (1 - f) * running_mean + f * batch_mean
    running_var  <- (1 - f) * running_var  + f * batch_var * n / (n - 1)
    f = momentum, or 1 / num_batches_tracked (after the increment) when
        momentum is None (cumulative moving average), as in PyTorch.
"""

import numbers

import numpy as np

from . import _dispatch

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _check_momentum(momentum):
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:          # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    return momentum


class RunningStats:
    """Running mean and variance of a batch-norm layer.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    momentum : float in [0, 1] or None
        Weight of the newest batch; None for a cumulative average.
    dtype : float32 or float64
        Buffer dtype.  float32 serves float16 and float32 inputs, float64
        serves float64 inputs.
    like : array, optional
        Buffers are created with this array's library and device (numpy by
        default; a torch CPU tensor gives torch tensors sharing memory with
        the buffers the kernels update).

    Attributes
    ----------
    mean, var : (C,) arrays, updated in place by training forwards.
    num_batches_tracked : int
    momentum : float or None
    """

    def __init__(self, num_features, *, momentum=0.1, dtype=np.float32, like=None):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(
                f"num_features must be a positive integer, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features}")
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self._momentum = _check_momentum(momentum)
        self.num_features = int(num_features)
        self.dtype = dtype
        if like is None:
            self._adapter = _dispatch.adapter(np.empty(0))
        else:
            self._adapter = _dispatch.adapter(like, "like")
            if self._adapter.name == "jax":
                raise TypeError("like: JAX arrays are immutable and cannot hold running "
                                "statistics updated in place; use numpy buffers (like=None)")
        self.device = "cpu" if like is None else self._adapter.device(like)
        if self._adapter.name == "cupy":
            xp = __import__("cupy")
            with like.device:
                self._mean = xp.zeros(self.num_features, dtype)
                self._var = xp.ones(self.num_features, dtype)
        else:
            self._mean = np.zeros(self.num_features, dtype)
            self._var = np.ones(self.num_features, dtype)
        # What users see: the same memory, as the library they asked for.
        self.mean = self._adapter.wrap(self._mean)
        self.var = self._adapter.wrap(self._var)
        self.num_batches_tracked = 0

    @property
    def momentum(self):
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = _check_momentum(value)

    def __repr__(self):
        return (f"RunningStats({self.num_features}, momentum={self._momentum}, "
                f"dtype={self.dtype.name}, num_batches_tracked={self.num_batches_tracked})")

    # -- used by _api --------------------------------------------------------
    def _next_factor(self):
        """Factor f of the next update (num_batches_tracked not yet bumped)."""
        if self._momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return self._momentum

    # -- public --------------------------------------------------------------
    def reset(self):
        """Back to mean 0, variance 1, no batches tracked."""
        self._mean[...] = 0
        self._var[...] = 1
        self.num_batches_tracked = 0

    def state_dict(self):
        """Copies of the state under PyTorch's BatchNorm keys."""
        wrap = self._adapter.wrap
        return {
            "running_mean": wrap(self._mean.copy()),
            "running_var": wrap(self._var.copy()),
            "num_batches_tracked": wrap(np.array(self.num_batches_tracked, dtype=np.int64)),
        }

    def load_state_dict(self, state, *, strict=True):
        """Load running_mean / running_var / num_batches_tracked (numpy arrays,
        torch tensors, ...).  Everything is checked before anything changes.
        A missing num_batches_tracked keeps the current count (as PyTorch);
        strict=False also ignores unexpected keys and absent statistics."""
        parsed = self._parse_state(state, strict=strict)
        if parsed is not None:
            self._assign(*parsed)

    def _parse_state(self, state, *, strict=True, prefix=""):
        if not hasattr(state, "keys"):
            raise TypeError(f"state: expected a mapping with keys {KEYS}, "
                            f"got {type(state).__name__}")
        missing = [prefix + k for k in KEYS[:2] if prefix + k not in state]
        if missing and (strict or len(missing) < 2):
            raise ValueError(f"state: missing keys {missing}")
        if missing:                      # strict=False and no statistics at all
            return None
        if strict and not prefix:
            extra = sorted(set(state.keys()) - set(KEYS))
            if extra:
                raise ValueError(f"state: unexpected keys {extra}; expected {list(KEYS)}")
        arrays = []
        for key in KEYS[:2]:
            a = _dispatch.to_host_numpy(state[prefix + key], prefix + key)
            if a.shape != (self.num_features,):
                raise ValueError(f"{prefix}{key}: expected shape ({self.num_features},), "
                                 f"got {a.shape}")
            if a.dtype.kind != "f":
                raise TypeError(f"{prefix}{key}: expected a floating-point array, got {a.dtype}")
            arrays.append(a)
        count = None                     # absent: keep the current count, as torch does
        if prefix + KEYS[2] in state:
            c = _dispatch.to_host_numpy(state[prefix + KEYS[2]], prefix + KEYS[2])
            if c.size != 1 or c.dtype.kind not in "iu" or int(c.reshape(())) < 0:
                raise ValueError(f"{prefix}num_batches_tracked: expected a non-negative "
                                 f"integer scalar, got {c!r}")
            count = int(c.reshape(()))
        return arrays[0], arrays[1], count

    def _assign(self, mean, var, count):
        if self._adapter.name == "cupy":
            xp = __import__("cupy")
            mean, var = xp.asarray(mean), xp.asarray(var)
        self._mean[...] = mean
        self._var[...] = var
        if count is not None:
            self.num_batches_tracked = count
