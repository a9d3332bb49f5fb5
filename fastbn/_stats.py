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
import os
import threading
import zipfile
import zlib

import numpy as np

from . import _dispatch

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _check_momentum(momentum):
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError("momentum: expected a float in [0, 1] or None, "
                        f"got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:          # also rejects NaN
        raise ValueError(f"momentum: expected a float in [0, 1] or None, got {momentum}")
    return momentum


def _check_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features: expected a positive integer, "
                        f"got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features: expected a positive integer, got {num_features}")
    return int(num_features)


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

    Threads: training forwards that update the same RunningStats from several
    threads are serialised by a lock (no update is lost; their order is the
    order in which the threads get the lock).  A forward that only reads the
    statistics (training=False) does not take the lock, so it may see a
    half-done concurrent update.

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` (PyTorch's
    keys), or :meth:`save` / :meth:`load` for a numpy .npz file.
    """

    def __init__(self, num_features, *, momentum=0.1, dtype=np.float32, like=None):
        num_features = _check_features(num_features)
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self._momentum = _check_momentum(momentum)
        self.num_features = num_features
        self.dtype = dtype
        if like is None:
            self._adapter = _dispatch.adapter(np.empty(0))
        else:
            self._adapter = _dispatch.adapter(like, "like")
            if self._adapter.name == "jax":
                raise TypeError("like: JAX arrays are immutable and cannot hold running "
                                "statistics updated in place; use numpy buffers (like=None)")
        self.device = "cpu" if like is None else self._adapter.device(like)
        if self.device == "gpu":
            # cupy buffers on like's device (a cupy array or a torch CUDA tensor)
            xp = _dispatch._cupy("like")
            dev = like.device
            if self._adapter.name != "cupy":
                dev = xp.cuda.Device(dev.index)     # torch: index None = current device
            with dev:
                self._mean = xp.zeros(self.num_features, dtype)
                self._var = xp.ones(self.num_features, dtype)
        else:
            self._mean = np.zeros(self.num_features, dtype)
            self._var = np.ones(self.num_features, dtype)
        self._wrap_buffers()
        self._count = 0
        self._lock = threading.Lock()

    def _wrap_buffers(self):
        # What users see: the same memory, as the library they asked for.
        self._mean_view = self._adapter.wrap(self._mean)
        self._var_view = self._adapter.wrap(self._var)

    @property
    def mean(self):
        """The running mean: the buffer the kernels update (shares its memory)."""
        return self._mean_view

    @mean.setter
    def mean(self, value):
        # The kernels hold on to the buffer, so assigning copies the values
        # into it (checked as load_state_dict checks running_mean).
        self._assign(self._parse_stat(value, "mean"), None, None)

    @property
    def var(self):
        """The running (unbiased) variance: the buffer the kernels update."""
        return self._var_view

    @var.setter
    def var(self, value):
        self._assign(None, self._parse_stat(value, "var"), None)

    @property
    def num_batches_tracked(self):
        return self._count

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        self._count = _check_count(value, "num_batches_tracked")

    @property
    def momentum(self):
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = _check_momentum(value)

    def __repr__(self):
        return (f"RunningStats({self.num_features}, momentum={self._momentum}, "
                f"dtype={self.dtype.name}, num_batches_tracked={self._count})")

    # copy / pickle: a fresh lock, and mean / var re-wrapped so that they keep
    # sharing memory with the buffers the kernels update.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"], state["_mean_view"], state["_var_view"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        # the library's one adapter (pickles of older versions hold a copy of it)
        self._adapter = _dispatch._named(self._adapter.name)
        self._lock = threading.Lock()
        self._wrap_buffers()

    # -- used by _api --------------------------------------------------------
    def _next_factor(self):
        """Factor f of the next update (num_batches_tracked not yet bumped)."""
        if self._momentum is None:
            return 1.0 / (self._count + 1)
        return self._momentum

    # -- public --------------------------------------------------------------
    def reset(self):
        """Back to mean 0, variance 1, no batches tracked."""
        with self._lock:
            self._mean[...] = 0
            self._var[...] = 1
            self._count = 0

    def state_dict(self):
        """Copies of the state under PyTorch's BatchNorm keys."""
        wrap = self._adapter.wrap
        with self._lock:         # the three values of one moment
            mean, var, count = self._mean.copy(), self._var.copy(), self._count
        return {
            "running_mean": wrap(mean),
            "running_var": wrap(var),
            "num_batches_tracked": wrap(np.array(count, dtype=np.int64)),
        }

    def save(self, path):
        """Write the state_dict to a numpy .npz file (np.savez; ".npz" is
        appended to a path without it, as numpy does).

        The file is written beside the target and renamed over it, so a crash
        mid-save leaves the previous checkpoint, not a truncated one.  ``path``
        may also be a writable binary file object."""
        arrays = {k: _dispatch.to_host_numpy(v, k) for k, v in self.state_dict().items()}
        if hasattr(path, "write"):
            np.savez(path, **arrays)
            return
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path, *, strict=True):
        """Load a checkpoint written by :meth:`save` (or ``np.savez(path,
        **state_dict)``).  The whole file is read and checked (zip CRCs,
        keys, shapes, dtypes) before anything changes: a truncated, corrupt or
        mismatched file raises ValueError (TypeError for wrong dtypes) and
        leaves the statistics as they were.  A missing file raises
        FileNotFoundError.  As :meth:`save` appends ".npz" to a path without
        it, so does load when the path as given does not exist."""
        if not hasattr(path, "read"):
            path = os.fspath(path)
            if not os.path.exists(path) and not str(path).endswith(".npz"):
                alt = path + (".npz" if isinstance(path, str) else b".npz")
                if os.path.exists(alt):
                    path = alt
        try:
            f = np.load(path, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            with f:
                state = {k: f[k] for k in f.files}       # reads (and CRC-checks) all now
        except FileNotFoundError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile,
                zlib.error) as exc:
            raise ValueError(f"path: expected a RunningStats .npz checkpoint, got a file "
                             f"that cannot be read as one ({path!s}: {exc})") from exc
        self.load_state_dict(state, strict=strict)

    def load_state_dict(self, state, *, strict=True):
        """Load running_mean / running_var / num_batches_tracked (numpy arrays,
        torch tensors, ...).  Everything is checked before anything changes.
        A missing num_batches_tracked keeps the current count (as PyTorch);
        strict=False also ignores unexpected keys, and a missing running_mean
        or running_var keeps the current one (as PyTorch's strict=False)."""
        parsed = self._parse_state(state, strict=strict)
        if parsed is not None:
            self._assign(*parsed)

    def _parse_state(self, state, *, strict=True, prefix=""):
        if not hasattr(state, "keys"):
            raise TypeError(f"state: expected a mapping with keys {KEYS}, "
                            f"got {type(state).__name__}")
        missing = [prefix + k for k in KEYS[:2] if prefix + k not in state]
        if missing and strict:
            raise ValueError(f"state: expected keys {list(KEYS)}, got {sorted(state.keys())} "
                             f"(missing {missing})")
        if strict and not prefix:
            extra = sorted(set(state.keys()) - set(KEYS))
            if extra:
                raise ValueError(f"state: unexpected keys {extra}; expected {list(KEYS)}")
        # absent (strict=False): keep the current values, as torch does
        arrays = [None if prefix + key not in state
                  else self._parse_stat(state[prefix + key], prefix + key)
                  for key in KEYS[:2]]
        count = None
        if prefix + KEYS[2] in state:
            c = _dispatch.to_host_numpy(state[prefix + KEYS[2]], prefix + KEYS[2])
            if c.dtype.kind not in "iu":
                raise TypeError(f"{prefix}num_batches_tracked: expected an integer scalar, "
                                f"got dtype {c.dtype}")
            if c.size != 1 or int(c.reshape(-1)[0]) < 0:
                raise ValueError(f"{prefix}num_batches_tracked: expected a non-negative "
                                 f"integer scalar, got {c!r}")
            count = int(c.reshape(-1)[0])
        if arrays[0] is None and arrays[1] is None and count is None:
            return None
        return arrays[0], arrays[1], count

    def _parse_stat(self, value, name):
        """A running statistic given by the caller, as a host numpy array of
        shape (C,), or TypeError / ValueError naming it."""
        a = _dispatch.to_host_numpy(value, name)
        if a.shape != (self.num_features,):
            raise ValueError(f"{name}: expected shape ({self.num_features},), got {a.shape}")
        if a.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got {a.dtype}")
        return a

    def _assign(self, mean, var, count):
        """Copy the given values (None: keep) into the buffers, under the lock."""
        if self.device == "gpu":
            xp = _dispatch._cupy("state")
            with self._mean.device:
                mean = None if mean is None else xp.asarray(mean)
                var = None if var is None else xp.asarray(var)
        with self._lock:
            if mean is not None:
                self._mean[...] = mean
            if var is not None:
                self._var[...] = var
            if count is not None:
                self._count = count


def _check_count(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a non-negative integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return int(value)
