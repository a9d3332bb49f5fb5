"""RunningStats: the update rule, state_dict and checkpoints."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as R

from .conftest import make_x


def test_defaults_and_reset(rng):
    s = fastbn.RunningStats(4)
    assert s.mean.dtype == np.float32 and np.array_equal(s.mean, np.zeros(4))
    assert np.array_equal(s.var, np.ones(4)) and s.num_batches_tracked == 0
    assert s.momentum == 0.1
    mean_buffer = s.mean
    fastbn.forward(make_x(rng, (5, 4, 3), np.float32), stats=s)
    assert s.num_batches_tracked == 1 and not np.array_equal(s.mean, np.zeros(4))
    assert s.mean is mean_buffer                       # updated in place
    s.reset()
    assert np.array_equal(s.mean, np.zeros(4)) and np.array_equal(s.var, np.ones(4))
    assert s.num_batches_tracked == 0


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
def test_several_steps_match_reference(rng, momentum):
    s = fastbn.RunningStats(3, momentum=momentum, dtype=np.float64)
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    for step in range(5):
        x = make_x(rng, (6, 3, 7), np.float64, offset=step)
        fastbn.forward(x, stats=s)
        ref = R.forward(x, None, None, rm, rv, momentum=momentum, num_batches_tracked=nbt)
        rm, rv, nbt = ref.running_mean, ref.running_var, ref.num_batches_tracked
    np.testing.assert_allclose(s.mean, rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.var, rv, rtol=1e-12)
    assert s.num_batches_tracked == nbt == 5


def test_invalid_construction():
    with pytest.raises(ValueError, match="momentum"):
        fastbn.RunningStats(3, momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.RunningStats(3, momentum=float("nan"))
    with pytest.raises(TypeError, match="momentum"):
        fastbn.RunningStats(3, momentum="0.1")
    with pytest.raises(ValueError, match="num_features"):
        fastbn.RunningStats(0)
    with pytest.raises(TypeError, match="dtype"):
        fastbn.RunningStats(3, dtype=np.float16)
    s = fastbn.RunningStats(3)
    with pytest.raises(ValueError, match="momentum"):
        s.momentum = -0.1
    s.momentum = None
    assert s.momentum is None


def test_state_dict_npz_round_trip(rng, tmp_path):
    s = fastbn.RunningStats(5, momentum=None)
    for _ in range(3):
        fastbn.forward(make_x(rng, (4, 5, 6), np.float32), stats=s)
    sd = s.state_dict()
    assert list(sd) == ["running_mean", "running_var", "num_batches_tracked"]
    assert sd["num_batches_tracked"].dtype == np.int64 and int(sd["num_batches_tracked"]) == 3
    sd["running_mean"][0] = 123.0              # a copy: the stats are not affected
    assert s.mean[0] != 123.0
    path = tmp_path / "stats.npz"
    np.savez(path, **s.state_dict())
    t = fastbn.RunningStats(5, momentum=None)
    t.load_state_dict(dict(np.load(path)))
    assert t.mean.tobytes() == s.mean.tobytes() and t.var.tobytes() == s.var.tobytes()
    assert t.num_batches_tracked == 3


@pytest.mark.parametrize("bad,exc", [
    ({"running_mean": np.zeros(4)}, ValueError),                                  # missing key
    ({"running_mean": np.zeros(4), "running_var": np.ones(5)}, ValueError),       # wrong shape
    ({"running_mean": np.zeros(4), "running_var": np.ones(4), "extra": 1}, ValueError),
    ({"running_mean": np.zeros(4, int), "running_var": np.ones(4)}, TypeError),
    ({"running_mean": np.zeros(4), "running_var": np.ones(4),
      "num_batches_tracked": np.array(-1)}, ValueError),
    ({"running_mean": np.zeros(4), "running_var": np.ones(4),
      "num_batches_tracked": np.array(2.0)}, TypeError),                         # wrong kind
    ([1, 2], TypeError),
])
def test_bad_state_is_refused_and_changes_nothing(rng, bad, exc):
    s = fastbn.RunningStats(4)
    fastbn.forward(make_x(rng, (3, 4, 5), np.float32), stats=s)
    before = {k: v.copy() for k, v in s.state_dict().items()}
    with pytest.raises(exc):
        s.load_state_dict(bad)
    after = s.state_dict()
    for k in before:
        assert before[k].tobytes() == after[k].tobytes()


def test_missing_count_keeps_current_and_non_strict_loading(rng):
    s = fastbn.RunningStats(3)
    s.num_batches_tracked = 7
    s.load_state_dict({"running_mean": np.ones(3), "running_var": np.full(3, 2.0)})
    assert s.num_batches_tracked == 7                  # as torch: the count is kept
    with pytest.raises(ValueError, match="unexpected"):
        s.load_state_dict({"running_mean": np.ones(3), "running_var": np.ones(3), "w": 1})
    s.load_state_dict({"running_mean": np.zeros(3), "running_var": np.ones(3), "w": 1},
                      strict=False)
    assert np.array_equal(s.mean, np.zeros(3))
    s.load_state_dict({}, strict=False)                # nothing to load: nothing changes
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"running_mean": np.zeros(3)})
    # strict=False loads what is there and keeps the rest, as torch does
    s.load_state_dict({"running_var": np.full(3, 5.0)}, strict=False)
    assert np.array_equal(s.mean, np.zeros(3)) and np.array_equal(s.var, np.full(3, 5.0))
    s.load_state_dict({"running_mean": np.full(3, 2.0)}, strict=False)
    assert np.array_equal(s.mean, np.full(3, 2.0)) and np.array_equal(s.var, np.full(3, 5.0))
    assert s.num_batches_tracked == 7


def test_layer_momentum_is_settable_and_validated():
    bn = fastbn.BatchNorm(3)
    bn.momentum = 0.5
    assert bn.stats.momentum == 0.5 and bn.momentum == 0.5
    with pytest.raises(ValueError, match="momentum"):
        bn.momentum = 2.0
    free = fastbn.BatchNorm(3, track_running_stats=False)
    free.momentum = None
    assert free.momentum is None
    with pytest.raises(TypeError, match="num_features"):
        fastbn.BatchNorm(4.7, track_running_stats=False)


def test_layer_non_strict_load_ignores_missing_keys():
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict({"weight": np.full(3, 2.0)}, strict=False)
    assert np.array_equal(bn.weight, np.full(3, 2.0)) and np.array_equal(bn.bias, np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        bn.load_state_dict({"weight": np.full(3, 2.0)})


# ----------------------------------------------------------------------------
# checkpoint files: save / load

def _trained(rng, dtype=np.float32, momentum=None, steps=3, C=5):
    s = fastbn.RunningStats(C, momentum=momentum, dtype=dtype)
    for k in range(steps):
        fastbn.forward(make_x(rng, (4, C, 6), dtype, offset=k, scale=1 + k), stats=s)
    return s


def _state_bytes(s):
    return s.mean.tobytes(), s.var.tobytes(), s.num_batches_tracked


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_save_load_round_trip_is_exact(rng, tmp_path, dtype):
    s = _trained(rng, dtype)
    s.mean[2] = np.nan                                 # any bits survive, NaN included
    path = tmp_path / "stats.npz"
    s.save(path)
    t = fastbn.RunningStats(5, momentum=None, dtype=dtype)
    t.load(path)
    assert _state_bytes(t) == _state_bytes(s)
    # "ckpt" gets ".npz" appended, as np.savez does; a str path works too
    s.save(str(tmp_path / "ckpt"))
    u = fastbn.RunningStats(5, dtype=dtype)
    u.load(str(tmp_path / "ckpt.npz"))
    assert _state_bytes(u) == _state_bytes(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz", "stats.npz"]  # no temp left
    # the np.savez route of the README is the same file format
    np.savez(tmp_path / "manual.npz", **s.state_dict())
    v = fastbn.RunningStats(5, dtype=dtype)
    v.load(tmp_path / "manual.npz")
    assert _state_bytes(v) == _state_bytes(s)


def test_save_to_a_file_object(rng, tmp_path):
    import io
    s = _trained(rng)
    buf = io.BytesIO()
    s.save(buf)
    buf.seek(0)
    t = fastbn.RunningStats(5)
    t.load(buf)
    assert _state_bytes(t) == _state_bytes(s)


def test_save_torch_backed_stats(rng, tmp_path):
    torch = pytest.importorskip("torch")
    s = fastbn.RunningStats(5, like=torch.zeros(1))
    fastbn.forward(torch.from_numpy(make_x(rng, (4, 5, 6), np.float32)), stats=s)
    s.save(tmp_path / "t.npz")
    t = fastbn.RunningStats(5)
    t.load(tmp_path / "t.npz")
    assert t.mean.tobytes() == s.mean.numpy().tobytes() and t.num_batches_tracked == 1


def _corrupt_files(tmp_path, good):
    raw = good.read_bytes()
    files = {}
    for name, data in [("truncated-half", raw[: len(raw) // 2]),
                       ("truncated-end", raw[:-10]),
                       ("truncated-header", raw[:20]),
                       ("empty", b""),
                       ("garbage", b"not a checkpoint at all" * 10)]:
        p = tmp_path / f"{name}.npz"
        p.write_bytes(data)
        files[name] = p
    # a flipped byte inside the first member's data: the zip CRC catches it
    flipped = bytearray(raw)
    flipped[100] ^= 0xFF
    p = tmp_path / "flipped.npz"
    p.write_bytes(bytes(flipped))
    files["flipped"] = p
    p = tmp_path / "single.npy"
    np.save(p, np.zeros(5))
    files["single-npy"] = p
    return files


def test_truncated_or_corrupt_checkpoint_is_refused_and_changes_nothing(rng, tmp_path):
    good = tmp_path / "good.npz"
    _trained(rng).save(good)
    s = _trained(rng, steps=2)
    before = _state_bytes(s)
    for name, path in _corrupt_files(tmp_path, good).items():
        with pytest.raises(ValueError, match="^path: expected a RunningStats .npz checkpoint"):
            s.load(path)
        assert _state_bytes(s) == before, name
    with pytest.raises(FileNotFoundError):
        s.load(tmp_path / "missing.npz")
    assert _state_bytes(s) == before


@pytest.mark.parametrize("what", ["features", "extra-key", "missing-key", "int-dtype",
                                  "negative-count", "float-count", "layer-checkpoint"])
def test_mismatched_checkpoint_is_refused_and_changes_nothing(rng, tmp_path, what):
    src = _trained(rng)
    sd = {k: np.asarray(v) for k, v in src.state_dict().items()}
    if what == "features":
        sd = {k: v[:4] if v.ndim else v for k, v in sd.items()}
    elif what == "extra-key":
        sd["weight"] = np.ones(5, np.float32)
    elif what == "missing-key":
        del sd["running_var"]
    elif what == "int-dtype":
        sd["running_mean"] = sd["running_mean"].astype(np.int32)
    elif what == "negative-count":
        sd["num_batches_tracked"] = np.array(-3)
    elif what == "float-count":
        sd["num_batches_tracked"] = np.array(3.0)
    elif what == "layer-checkpoint":
        sd = fastbn.BatchNorm(5).state_dict()
    path = tmp_path / "bad.npz"
    np.savez(path, **sd)
    s = _trained(rng, steps=2)
    before = _state_bytes(s)
    with pytest.raises((ValueError, TypeError)) as info:
        s.load(path)
    assert "expected" in str(info.value)
    assert _state_bytes(s) == before


def test_copy_and_pickle_keep_buffers_consistent(rng):
    import copy
    import pickle
    s = _trained(rng)
    for t in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert _state_bytes(t) == _state_bytes(s) and t.momentum is None
        assert np.shares_memory(t.mean, t._mean)       # the visible buffer is the kernel's
        fastbn.forward(make_x(rng, (4, 5, 6), np.float32), stats=t)
        assert t.num_batches_tracked == s.num_batches_tracked + 1
        assert _state_bytes(s) != _state_bytes(t)        # independent of the original
    bn = fastbn.BatchNorm(5)
    bn.forward(make_x(rng, (4, 5, 6), np.float32))
    bn2 = copy.deepcopy(bn)
    assert bn2._ctx is None                           # a copy needs its own forward
    bn2.forward(make_x(rng, (4, 5, 6), np.float32))
    bn2.backward(make_x(rng, (4, 5, 6), np.float32))
    assert pickle.loads(pickle.dumps(bn)).stats.num_batches_tracked == 1


def test_copies_of_torch_backed_stats_serve_torch_tensors(rng):
    import copy
    import pickle
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(make_x(rng, (4, 5, 6), np.float32))
    s = fastbn.RunningStats(5, like=x)
    fastbn.forward(x, stats=s)
    for t in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert isinstance(t.mean, torch.Tensor) and t.num_batches_tracked == 1
        fastbn.forward(x, stats=t)                     # was: "stats: expected ... torch"
        fastbn.forward(x, stats=t, training=False)
        assert t.num_batches_tracked == 2
        assert np.shares_memory(t.mean.numpy(), t._mean)


def test_copies_of_numpy_stats_keep_the_plain_lane(rng):
    import copy
    s = _trained(rng)
    t = copy.deepcopy(s)
    _, ctx = fastbn.forward(make_x(rng, (4, 5, 6), np.float32), stats=t)
    assert ctx.plain                                   # the adapter is numpy's own, not a copy
    state = s.__getstate__()                           # as older versions pickled it:
    state["_adapter"] = type(s._adapter)()             # a copy of the adapter
    u = fastbn.RunningStats.__new__(fastbn.RunningStats)
    u.__setstate__(state)
    assert u._adapter is s._adapter


def test_assigning_mean_or_var_sets_the_buffers(rng):
    s = _trained(rng, momentum=0.1)
    mean_obj, var_obj = s.mean, s.var
    s.mean = np.full(5, 5.0, np.float64)               # any float dtype: converted
    s.var = [4.0] * 5                                   # array-likes too
    assert s.mean is mean_obj and s.var is var_obj      # the same buffers, new values
    assert np.array_equal(s.mean, np.full(5, 5.0)) and np.array_equal(s.var, np.full(5, 4.0))
    assert np.array_equal(s.state_dict()["running_mean"], np.full(5, 5.0))
    x = np.full((2, 5, 3), 5.0, np.float32)
    y, _ = fastbn.forward(x, stats=s, training=False)   # normalised with them
    assert np.array_equal(y, np.zeros_like(x))
    count = s.num_batches_tracked
    with pytest.raises(ValueError, match="^mean: expected shape"):
        s.mean = np.zeros(4)
    with pytest.raises(TypeError, match="^var: expected a floating-point"):
        s.var = np.ones(5, np.int64)
    assert np.array_equal(s.mean, np.full(5, 5.0)) and s.num_batches_tracked == count


def test_load_finds_the_file_save_wrote(rng, tmp_path):
    s = _trained(rng)
    s.save(tmp_path / "ckpt")                          # writes ckpt.npz, as np.savez
    assert (tmp_path / "ckpt.npz").exists()
    for path in (tmp_path / "ckpt", str(tmp_path / "ckpt"), tmp_path / "ckpt.npz"):
        t = fastbn.RunningStats(5)
        t.load(path)
        assert _state_bytes(t) == _state_bytes(s)
    with pytest.raises(FileNotFoundError):
        fastbn.RunningStats(5).load(tmp_path / "nothing")


def test_layer_flags_are_booleans():
    for flag in ("affine", "track_running_stats"):
        with pytest.raises(TypeError, match=f"^{flag}: expected True or False"):
            fastbn.BatchNorm(3, **{flag: "False"})
    bn = fastbn.BatchNorm(3)
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(np.bool_(True)).training is True
