"""Exercise every GPU kernel once on small, awkward shapes: the program that
tools/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck,
synccheck, initcheck).  It also checks each result against the float64
reference, so a run that the sanitizer passes still has to be right.

    compute-sanitizer --tool memcheck python3 tools/gpu_sanitize.py
"""

import sys

import numpy as np


def main():
    import cupy as cp

    import fastbn
    from fastbn import _reference as R

    rng = np.random.default_rng(7)
    shapes = [((3, 5, 7), 1), ((2, 3, 33, 17), 1), ((2, 33, 17, 3), -1), ((5, 9), 1),
              ((1, 1030, 3), 1), ((257, 7), 1), ((4, 2, 3, 5, 6), 1)]
    bad = 0
    for dtype in (np.float32, np.float16, np.float64):
        pdt = np.float64 if dtype == np.float64 else np.float32
        for shape, axis in shapes:
            C = shape[axis]
            x_np = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
            dy_np = rng.standard_normal(shape).astype(dtype)
            w_np = rng.uniform(0.5, 2, C).astype(pdt)
            b_np = rng.standard_normal(C).astype(pdt)
            x, dy, w, b = map(cp.asarray, (x_np, dy_np, w_np, b_np))
            st = fastbn.RunningStats(C, dtype=pdt, like=x)
            for training in (True, False):
                rm, rv = cp.asnumpy(st._mean), cp.asnumpy(st._var)
                y, ctx = fastbn.forward(x, w, b, st, training=training, axis=axis)
                dx, dw, db = fastbn.backward(dy, ctx)
                ref = R.forward(x_np, w_np, b_np, rm, rv, training=training, axis=axis)
                rdx = R.backward(dy_np, x_np, cp.asnumpy(ctx.mean), cp.asnumpy(ctx.invstd),
                                 w_np, training=training, axis=axis)[0]
                # loose on purpose (100x the table): this catches garbage from a
                # bad access; tests/test_gpu.py holds the kernels to the table
                v = max(R.max_violation(cp.asnumpy(y), ref.y, dtype),
                        R.max_violation(cp.asnumpy(dx), rdx, dtype))
                if not v <= 100:
                    print("MISMATCH", np.dtype(dtype).name, shape, axis, training, v)
                    bad += 1
    print("sanitize driver done, mismatches:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
