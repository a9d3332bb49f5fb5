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
        s.load_state_dict({"running_mean": np.zeros(3)}, strict=False)


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
