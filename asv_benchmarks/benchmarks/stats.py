"""Fixed costs: RunningStats bookkeeping, and the per-call overhead of a tiny tensor
(validation, layout resolution, allocation, dispatch), which dominates small layers."""

import numpy as np

import fastbn

from ._common import BACKENDS, Case, array_module


class RunningStatsOverhead:
    params = [[64, 2048], BACKENDS]
    param_names = ["num_features", "backend"]

    def setup(self, num_features, backend):
        xp = array_module(backend)
        self.like = None if backend == "cpu" else xp.empty(1, np.float32)
        self.stats = fastbn.RunningStats(num_features, like=self.like)
        rng = np.random.default_rng(0)
        # A PyTorch-style checkpoint: numpy arrays under BatchNorm's keys.
        self.state = {"running_mean": rng.standard_normal(num_features).astype(np.float32),
                      "running_var": rng.random(num_features).astype(np.float32) + 0.5,
                      "num_batches_tracked": np.array(7, dtype=np.int64)}
        self.num_features = num_features

    def time_create(self, num_features, backend):
        fastbn.RunningStats(num_features, like=self.like)

    def time_state_dict(self, num_features, backend):
        self.stats.state_dict()

    def time_load_state_dict(self, num_features, backend):
        self.stats.load_state_dict(self.state)


class TinyTensorCall:
    """One call on an 8x4x2x2 float32 tensor with the default thread count: the fixed
    cost per call, with the out= buffer reused or a new output allocated."""
    params = [["forward-train", "forward-infer", "backward"], ["reused", "allocated"], BACKENDS]
    param_names = ["op", "out", "backend"]

    def setup(self, op, out, backend):
        c = self.case = Case("nchw", "8x4x2x2", "float32", 1, backend)
        c.threads = None                      # the default path resolves the thread count
        c.ctx = c.forward(True)
        args = (c.x, c.weight, c.bias, c.stats)
        kw = {"axis": c.axis, "out": c.y if out == "reused" else None}
        if op == "forward-train":
            self.call = lambda: fastbn.forward(*args, training=True, **kw)
        elif op == "forward-infer":
            self.call = lambda: fastbn.forward(*args, training=False, **kw)
        else:
            dx = c.dx if out == "reused" else None
            self.call = lambda: fastbn.backward(c.dy, c.ctx, out=dx)
        self.call()

    def time_call(self, op, out, backend):
        self.call()
        self.case.sync()
