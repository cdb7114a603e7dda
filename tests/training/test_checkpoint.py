import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxspec.training.checkpoint import CheckpointManager, load_config, restore_params


def make_state(seed=0, hidden=4):
    """A train state like the trainer's: params, optimizer state, RNG key data and a step counter."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k1, (7, hidden)),
        "block_0": {"kernel": jax.random.normal(k2, (hidden, 3)), "bias": jnp.arange(3.0)},
    }
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 2, opt_state)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(k3), "step": jnp.int32(11)}


def config():
    return ml_collections.ConfigDict(
        {"model": {"hidden": 4, "layers": (1, 2)}, "data": {"seed": 3}, "lr": 1e-3})


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


DATA_STATE = {"epoch": 2, "step": 5, "seed": 3, "num_windows": 40}


def saved_workdir(tmp_path, step=10):
    workdir = str(tmp_path / "run")
    with CheckpointManager(workdir, save_every=5) as manager:
        assert manager.save(step, make_state(), DATA_STATE, config())
    return workdir


def test_round_trip_restores_state_data_position_and_step(tmp_path):
    workdir = saved_workdir(tmp_path)
    state = make_state()
    manager = CheckpointManager(workdir)
    restored, data_state, step = manager.restore_train_state(jax.eval_shape(make_state))
    assert_trees_equal(restored, state)
    assert restored["rng"].dtype == jnp.uint32
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # optax namedtuples come back
    assert data_state == DATA_STATE and step == 10
    # Concrete arrays work as the target too.
    assert_trees_equal(manager.restore_train_state(make_state(seed=1))[0], state)


def test_interval_and_keep_last_k(tmp_path):
    workdir = str(tmp_path / "run")
    state = make_state()
    with CheckpointManager(workdir, save_every=2, keep=2) as manager:
        written = [manager.save(s, state, {"step": s}, config()) for s in range(1, 10)]
        assert written == [False, True, False, True, False, True, False, True, False]
        assert manager.save(9, state, {"step": 9}, config(), force=True)
        assert manager.all_steps() == [8, 9] and manager.latest_step() == 9
        assert not manager.save(9, state, {"step": 9}, config(), force=True)  # already saved: no-op
        assert manager.restore_train_state(state)[1] == {"step": 9}
        assert manager.restore_train_state(state, step=8)[1:] == ({"step": 8}, 8)
        with pytest.raises(ValueError, match="newer than step 4"):
            manager.save(4, state, {"step": 4}, config(), force=True)
        with pytest.raises(ValueError, match="available steps: \\[8, 9\\]"):
            manager.restore_train_state(state, step=2)


def test_async_save_is_complete_after_close(tmp_path):
    workdir = str(tmp_path / "run")
    with CheckpointManager(workdir, save_every=1, async_save=True) as manager:
        manager.save(3, make_state(), DATA_STATE, config())
    assert_trees_equal(restore_params(workdir)[0], make_state()["params"])


def test_restore_params_returns_params_and_config(tmp_path):
    workdir = saved_workdir(tmp_path)
    params, cfg = restore_params(workdir)
    assert_trees_equal(params, make_state()["params"])
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.model.hidden == 4 and list(cfg.model.layers) == [1, 2] and cfg.lr == 1e-3
    # The saved config, with only the model keys it lacks (added since it was saved) at their defaults.
    saved, got = load_config(workdir).to_dict(), cfg.to_dict()
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in saved.items() if k != "model"}
    assert {k: got["model"][k] for k in saved["model"]} == saved["model"]
    assert got["model"]["attention"]["prefill"] == "dense"


def test_missing_checkpoints_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        restore_params(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="config.json"):
        restore_params(str(tmp_path))
    empty = CheckpointManager(str(tmp_path / "fresh"))
    assert empty.latest_step() is None
    with pytest.raises(ValueError, match="no checkpoint found"):
        empty.restore_train_state(make_state())
    (tmp_path / "fresh" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no checkpoint found"):
        restore_params(str(tmp_path / "fresh"))


# Orbax's reader leaves an asyncio callback behind when a data file is gone; it is harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("victim", ["commit_success.txt", "train_state/_METADATA",
                                    "data_state/commit_success.txt", "train_state chunk files"])
def test_partial_checkpoint_raises_instead_of_restarting(tmp_path, victim):
    workdir = saved_workdir(tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "10")
    if victim == "train_state chunk files":
        # The array data; every index and metadata file is left in place.
        chunks = glob.glob(os.path.join(step_dir, "train_state", "**", "d", "*"), recursive=True)
        assert chunks
        for f in chunks:
            os.remove(f)
    else:
        os.remove(os.path.join(step_dir, victim))
    manager = CheckpointManager(workdir)
    # Still reported, so a trainer resumes (and fails loudly) instead of restarting over it.
    assert manager.latest_step() == 10
    with pytest.raises(ValueError, match="checkpoints/10"):
        manager.restore_train_state(make_state())
    if victim != "data_state/commit_success.txt":  # restore_params does not need the data state
        with pytest.raises(ValueError, match="checkpoints/10"):
            restore_params(workdir)
    with pytest.raises(ValueError, match="newer than step 5"):
        manager.save(5, make_state(), DATA_STATE, config())


def test_other_model_shape_names_the_first_mismatch(tmp_path):
    workdir = saved_workdir(tmp_path)
    manager = CheckpointManager(workdir)
    with pytest.raises(ValueError, match=r"'params\.block_0\.kernel' has shape \(4, 3\) in the checkpoint "
                                         r"but \(8, 3\) in the target"):
        manager.restore_train_state(jax.eval_shape(lambda: make_state(hidden=8)))
    missing = make_state()
    missing["params"]["block_1"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"no entry 'params\.block_1\.kernel'"):
        manager.restore_train_state(missing)
    extra = make_state()
    del extra["rng"]
    with pytest.raises(ValueError, match="entries the target lacks, first 'rng'"):
        manager.restore_train_state(extra)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(str(tmp_path), save_every=0)
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(str(tmp_path), keep=0)
    manager = CheckpointManager(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        manager.save(1, make_state(), {"epoch": np.arange(2)}, config())
    state = make_state()
    state.pop("params")
    assert not manager.save(1, state, DATA_STATE, config())  # off the interval of 1000
    assert manager.save(1, state, DATA_STATE, config(), force=True)
    with pytest.raises(ValueError, match="no top-level 'params'"):
        restore_params(str(tmp_path / "run"))
