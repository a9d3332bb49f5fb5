"""BatchNorm: a stateful layer for hand-written training engines."""

import threading

import numpy as np

from . import _api, _dispatch, _threads
from ._stats import KEYS as _STAT_KEYS
from ._stats import RunningStats, _check_features, _check_momentum


class BatchNorm:
    """Batch normalization over the channel axis, PyTorch-compatible.

    Parameters
    ----------
    num_features : int
        Channels C.
    eps : float
    momentum : float in [0, 1] or None (cumulative average)
    affine : bool
        Learnable weight (ones) and bias (zeros).
    track_running_stats : bool
        Keep running statistics (used in eval mode).  Without them the layer
        always normalises with batch statistics, as PyTorch does.
    axis : 1 or -1
        Channel axis (1: NCHW and friends, -1: NHWC and friends).
    dtype : float32 or float64
        Dtype of weight, bias and running statistics.  float32 serves
        float16 and float32 inputs.
    num_threads : int, optional
        CPU threads for this layer's calls.
    check_finite : bool
        Refuse NaN / Inf inputs with a ValueError before anything changes
        (see :func:`fastbn.forward`); off by default.

    Usage::

        bn = BatchNorm(64)
        y = bn.forward(x)          # training mode by default
        dx = bn.backward(dy)       # fills bn.grad_weight, bn.grad_bias
        bn.eval(); y = bn.forward(x)

    Threads: one layer may be used from several threads at once.  backward()
    pairs with the last forward() made by the same thread (or, in a thread
    that made none, with the last forward() of any thread), so concurrent
    forward/backward pairs on distinct batches give each thread exactly its
    own gradients; running-statistics updates are serialised (see
    :class:`RunningStats`).  grad_weight / grad_bias hold the gradients of the
    most recent backward() of any thread, as one consistent pair; for
    per-thread parameter gradients use :func:`fastbn.backward`, which returns
    them.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, num_threads=None,
                 check_finite=False):
        self.num_features = _check_features(num_features)
        self.eps = _api._check_eps(eps)
        self.affine = _api._check_flag(affine, "affine")
        self.track_running_stats = _api._check_flag(track_running_stats, "track_running_stats")
        axis = _api._check_axis_type(axis)
        if axis not in (1, -1):
            raise ValueError(f"axis: expected 1 (channels-first) or -1 (channels-last), "
                             f"got {axis!r}")
        self.axis = axis
        if num_threads is not None:
            num_threads = _threads._check(num_threads, "num_threads")
        self.num_threads = num_threads
        self.check_finite = _api._check_flag(check_finite, "check_finite")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.stats = (RunningStats(num_features, momentum=momentum, dtype=self.dtype)
                      if track_running_stats else None)
        self._momentum = _check_momentum(momentum)
        if self.affine:
            self.weight = np.ones(self.num_features, self.dtype)
            self.bias = np.zeros(self.num_features, self.dtype)
        else:
            self.weight = self.bias = None
        self.grad_weight = self.grad_bias = None
        self.training = True
        self._init_threading()

    def _init_threading(self):
        self._lock = threading.Lock()
        self._local = threading.local()      # .ctx: this thread's last forward
        self._last_ctx = None                # the last forward of any thread

    @property
    def _ctx(self):
        """The Context backward() will use in the calling thread."""
        ctx = getattr(self._local, "ctx", None)
        return ctx if ctx is not None else self._last_ctx

    @_ctx.setter
    def _ctx(self, ctx):
        self._local.ctx = ctx
        self._last_ctx = ctx

    # copy / pickle: no locks, no contexts (a copy needs a forward of its own)
    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_lock", "_local", "_last_ctx"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_threading()

    @property
    def momentum(self):
        return self.stats.momentum if self.stats is not None else self._momentum

    @momentum.setter
    def momentum(self, value):
        if self.stats is not None:
            self.stats.momentum = value
        else:
            self._momentum = _check_momentum(value)

    def train(self, mode=True):
        """Training mode (batch statistics) if mode, else eval mode; returns self."""
        self.training = _api._check_flag(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x, *, out=None):
        return self.forward(x, out=out)

    def forward(self, x, *, out=None):
        """y for x (any supported array); remembers what backward needs."""
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) >= 2:
            c = shape[1] if self.axis == 1 else shape[-1]
            if c != self.num_features:
                raise ValueError(f"x: expected {self.num_features} channels on axis "
                                 f"{self.axis} (this layer's num_features), got shape "
                                 f"{tuple(shape)}")
        # Without running statistics even eval mode uses batch statistics.
        batch = self.training or self.stats is None
        y, ctx = _api.forward(x, self._param(self.weight, x), self._param(self.bias, x),
                              self.stats, training=batch, eps=self.eps, axis=self.axis,
                              out=out, num_threads=self.num_threads,
                              check_finite=self.check_finite)
        self._ctx = ctx
        return y

    def backward(self, dy, *, out=None):
        """dx for dy; sets grad_weight and grad_bias (numpy arrays) when affine."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("backward() called before forward()")
        dx, dw, db = _api.backward(dy, ctx, out=out, num_threads=self.num_threads,
                                   check_finite=self.check_finite)
        if self.affine:
            gw = _dispatch.to_host_numpy(dw, "dweight")
            gb = _dispatch.to_host_numpy(db, "dbias")
            with self._lock:             # one consistent pair
                self.grad_weight, self.grad_bias = gw, gb
        return dx

    def _param(self, p, x):
        """The parameter as the caller's kind of array (shares memory)."""
        if p is None:
            return None
        ad = _dispatch.adapter(x)
        return p if ad.name == "numpy" else ad.wrap(p)

    # -- checkpoints ---------------------------------------------------------
    def state_dict(self):
        """weight, bias, running_mean, running_var, num_batches_tracked (as in
        torch.nn.BatchNorm2d.state_dict()), as numpy copies."""
        d = {}
        if self.affine:
            d["weight"] = self.weight.copy()
            d["bias"] = self.bias.copy()
        if self.stats is not None:
            d.update(self.stats.state_dict())
        return d

    def load_state_dict(self, state, *, strict=True):
        """Load a state dict from this class or from torch's BatchNorm (tensor
        values are read through DLPack).  All of it is checked first; with
        strict=False missing and unexpected keys are ignored, as in PyTorch."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state: expected a mapping (a state dict), "
                            f"got {type(state).__name__}")
        expected = (["weight", "bias"] if self.affine else []) + (
            list(_STAT_KEYS) if self.stats is not None else [])
        keys = set(state.keys())
        missing = [k for k in expected if k not in keys and k != "num_batches_tracked"]
        extra = sorted(keys - set(expected))
        if strict and (missing or extra):
            raise ValueError(f"state: expected keys {expected}; missing {missing}, "
                             f"unexpected {extra}")
        params = {}
        for k in [k for k in ("weight", "bias") if k in keys] if self.affine else ():
            a = _dispatch.to_host_numpy(state[k], k)
            if a.shape != (self.num_features,):
                raise ValueError(f"{k}: expected shape ({self.num_features},), got {a.shape}")
            if a.dtype.kind != "f":
                raise TypeError(f"{k}: expected a floating-point array, got {a.dtype}")
            params[k] = a
        stat_values = None
        if self.stats is not None:
            stat_values = self.stats._parse_state(
                {k: state[k] for k in _STAT_KEYS if k in state}, strict=strict)
        with self._lock:
            for k, a in params.items():
                getattr(self, k)[...] = a
        if stat_values is not None:
            self.stats._assign(*stat_values)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis})")
