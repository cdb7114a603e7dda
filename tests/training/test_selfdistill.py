"""Self-distillation sets: stored replies are what the decoder gives, stored features are the target's hidden
states, runs resume, `read` refuses what is broken, and bad settings are named."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import selfdistill as selfdistill_config
from jaxspec.config import ConfigError
from jaxspec.decoding import api
from jaxspec.training import instructions, selfdistill

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Six prompts in batches of four: a full batch and a partial one.
# The "docs" prompts all fit this tiny set's 208 prompt bytes, so its rows are the stream's first six.
SETTINGS = dict(num_prompts=6, max_new_tokens=16, seq_len=224, batch_size=4, feature_layers=(1, 0),
                max_prompt_chars=100, tokenizer_name="bytes", progress=False, prompt_set="docs")


@pytest.fixture(scope="module")
def target(make_model, chat_tokenizer):
    """(model, params, tokenizer). max_len leaves room for the bucketed prompt width (256), so every batch and
    single prompt shares one shape."""
    return (*make_model("A", vocab_size=264, max_len=512), chat_tokenizer)


def make_set(target, out_dir, **changes):
    model, params, tokenizer = target
    return selfdistill.generate(model, params, tokenizer, str(out_dir), **{**SETTINGS, **changes})


@pytest.fixture(scope="module")
def dataset(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("selfdistill") / "set"
    summary = make_set(target, out)
    manifest, arrays = selfdistill.read(str(out))
    return out, summary, manifest, arrays


def copy_set(dataset, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(dataset[0], out)
    return out


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_manifest_describes_the_set(dataset):
    out, summary, manifest, arrays = dataset
    assert sorted(manifest) == sorted(selfdistill.MANIFEST_KEYS)
    assert manifest["format"] == selfdistill.FORMAT and manifest["complete"] is True
    assert (manifest["seq_len"], manifest["d_model"], manifest["vocab_size"]) == (224, 32, 264)
    assert manifest["feature_layers"] == [1, 0] and manifest["num_examples"] == 6
    assert manifest["shards"] == ["shard_00000.npz", "shard_00001.npz"]
    assert sorted(os.listdir(out)) == ["manifest.json", "shard_00000.npz", "shard_00001.npz"]
    assert (summary.shards_written, summary.shards_skipped) == (2, 0)
    assert summary.reply_tokens == summary.generated_tokens == int(np.sum(arrays["lengths"] - arrays["reply_start"]))
    assert summary.bytes_on_disk == sum(os.path.getsize(out / name) for name in os.listdir(out))


def test_replies_are_what_generate_gives_one_prompt_at_a_time(target, dataset):
    model, params, tok = target
    _, _, _, arrays = dataset
    prompts = [selfdistill.encode_messages(tok, m)
               for m in instructions.instruction_prompts(6, seed=0, max_chars=SETTINGS["max_prompt_chars"],
                                                       prompt_set="docs")]
    assert len({len(p) for p in prompts}) > 1 and [len(p) for p in prompts] != sorted(map(len, prompts))
    prompts = sorted(prompts, key=len)  # the set's order: by prompt length, ties in stream order
    stopped = []
    for i, prompt in enumerate(prompts):
        # Alone: decoding rows together in a batch (padded with a copy of a prompt) changes no reply.
        reply = api.generate(model, params, [prompt], max_new_tokens=16, eos_ids=tok.eos_ids).tokens[0]
        length = len(prompt) + len(reply)
        assert arrays["reply_start"][i] == len(prompt) and arrays["lengths"][i] == length
        assert arrays["tokens"][i, :length].tolist() == prompt + reply
        assert not arrays["tokens"][i, length:].any()
        stopped.append(reply[-1] in tok.eos_ids)
    assert any(stopped) and not all(stopped)  # rows that stop at a stop id and rows that run to max_new_tokens


def test_features_are_the_targets_hidden_states(target, dataset, apply):
    model, params, _ = target
    _, _, manifest, arrays = dataset
    out = apply(model, params, arrays["tokens"], return_hidden=True)
    hidden, layers = np.asarray(out.hidden), [np.asarray(out.layer_hidden[i]) for i in manifest["feature_layers"]]
    assert arrays["features"].dtype == arrays["layer_features"].dtype == np.float16
    assert arrays["layer_features"].shape == (6, 224, 2, 32)
    for i, length in enumerate(arrays["lengths"]):
        np.testing.assert_allclose(arrays["features"][i, :length], hidden[i, :length], rtol=2e-3, atol=2e-3)
        for k, layer in enumerate(layers):
            np.testing.assert_allclose(arrays["layer_features"][i, :length, k], layer[i, :length], rtol=2e-3,
                                       atol=2e-3)
        assert not arrays["features"][i, length:].any() and not arrays["layer_features"][i, length:].any()
    assert not np.allclose(layers[0], layers[1])  # the layers are stored in the order the manifest names them


def test_a_deleted_shard_is_made_again_and_the_rest_is_kept(target, dataset, tmp_path):
    out = copy_set(dataset, tmp_path)
    again = make_set(target, out)
    assert (again.shards_written, again.shards_skipped, again.generated_tokens) == (0, 2, 0)
    os.remove(out / "shard_00000.npz")
    resumed = make_set(target, out)
    assert (resumed.shards_written, resumed.shards_skipped) == (1, 1)
    assert resumed.reply_tokens == dataset[1].reply_tokens
    assert_same_arrays(selfdistill.read(str(out))[1], dataset[3])


def test_an_interrupted_run_leaves_no_partial_file_and_a_rerun_completes(target, dataset, tmp_path, monkeypatch):
    real_savez, calls = np.savez, []

    def savez_then_fail(fh, **arrays):
        calls.append(1)
        if len(calls) == 1:
            return real_savez(fh, **arrays)
        fh.write(b"half a shard")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    out = tmp_path / "set"
    with pytest.raises(RuntimeError, match="interrupted"):
        make_set(target, out)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["manifest.json", "shard_00000.npz"]
    with pytest.raises(ValueError, match=r"incomplete \(manifest.json says complete=False\)"):
        selfdistill.read(str(out))
    resumed = make_set(target, out)
    assert (resumed.shards_written, resumed.shards_skipped) == (1, 1)
    assert_same_arrays(selfdistill.read(str(out))[1], dataset[3])


def test_restream_adds_the_streams_generate_would_have_stored(target, make_model, dataset, tmp_path):
    """A set made without streams, restreamed with layers (1, 0), is the set made with them: the same manifest,
    shard fingerprints and arrays (bitwise, but for the added streams: generate records them in the decode
    steps, restream in one full forward, equal up to float32 rounding); a rerun skips every shard; another model
    is refused by file."""
    model, params, _ = target
    plain = tmp_path / "plain"
    make_set(target, plain, feature_layers=())
    out = tmp_path / "restreamed"
    summary = selfdistill.restream(model, params, str(plain), str(out), (1, 0), progress=False)
    assert (summary.shards_written, summary.reply_tokens) == (2, dataset[1].reply_tokens)
    manifest, arrays = selfdistill.read(str(out))
    assert manifest == dataset[2]
    streams, want = arrays.pop("layer_features"), dict(dataset[3])
    np.testing.assert_allclose(streams, want.pop("layer_features"), rtol=2e-3, atol=2e-3)
    assert_same_arrays(arrays, want)
    for name in manifest["shards"]:
        with np.load(out / name) as got, np.load(dataset[0] / name) as want:
            assert str(got["fingerprint"]) == str(want["fingerprint"])
    again = selfdistill.restream(model, params, str(plain), str(out), (1, 0), progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 2)
    other, other_params = make_model("A", seed=9, vocab_size=264, max_len=512, n_layers=3)
    with pytest.raises(ValueError, match=r"shard_00000.npz was made by another model"):
        selfdistill.restream(other, other_params, str(plain), str(tmp_path / "other"), (1,), progress=False)
    assert not (tmp_path / "other").exists()


def test_a_shard_made_with_other_arguments_is_refused(target, dataset, tmp_path):
    out = copy_set(dataset, tmp_path)
    manifest_before = (out / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"shard_00000.npz was made with other arguments \(max_new_tokens: 16 "
                                         r"there, 12 now\)"):
        make_set(target, out, max_new_tokens=12)
    assert (out / "manifest.json").read_text() == manifest_before  # a refused run changes nothing
    with pytest.raises(ValueError, match="feature_layers: \\[1, 0\\] there, \\[0\\] now"):
        make_set(target, out, feature_layers=(0,))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        make_set(target, foreign)
    with pytest.raises(ValueError, match=r"feature_layers=\(2,\) must be distinct layer indices in 0..1"):
        make_set(target, tmp_path / "bad", feature_layers=(2,))
    assert not os.path.exists(tmp_path / "bad")


def test_combined_sets_hold_every_example_of_each_in_order(target, dataset, tmp_path, monkeypatch):
    out, _, manifest, arrays = dataset
    other = tmp_path / "other"
    make_set(target, other, seed=1, num_prompts=5)  # another stream of instructions: other examples
    other_manifest, other_arrays = selfdistill.read(str(other))
    with monkeypatch.context() as patch:  # killed before its manifest: no set at out_dir, and a rerun completes
        patch.setattr(selfdistill, "_write_manifest", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            selfdistill.combine([str(out), str(other)], str(tmp_path / "both"))
    assert not (tmp_path / "both").exists()
    combined = selfdistill.combine([str(out), str(other)], str(tmp_path / "both"))
    read_manifest, both = selfdistill.read(str(tmp_path / "both"))
    assert read_manifest == combined and combined["num_examples"] == 11
    assert combined["shards"] == [selfdistill.shard_name(i) for i in range(4)]
    assert combined["prompt_set"] == f"{manifest['prompt_set']} + {other_manifest['prompt_set']}"
    assert [(s["seed"], s["num_examples"]) for s in combined["sources"]] == [(0, 6), (1, 5)]
    assert_same_arrays(both, {k: np.concatenate([arrays[k], other_arrays[k]]) for k in arrays})

    fewer_layers = tmp_path / "fewer_layers"
    make_set(target, fewer_layers, feature_layers=(0,), num_prompts=2)
    with pytest.raises(ValueError, match=r"fewer_layers has feature_layers=\[0\] but .* has \[1, 0\]"):
        selfdistill.combine([str(out), str(fewer_layers)], str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        selfdistill.combine([str(out), str(other)], str(tmp_path / "both"))
    with pytest.raises(ValueError, match="the same set twice"):
        selfdistill.combine([str(out), str(out)], str(tmp_path / "twice"))
    _edit_manifest(other, complete=False)
    with pytest.raises(ValueError, match="other: the set is incomplete"):
        selfdistill.combine([str(out), str(other)], str(tmp_path / "incomplete"))
    assert not any((tmp_path / name).exists() for name in ("mixed", "twice", "incomplete"))


def _edit_manifest(out, **changes):
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("break_it, message", [
    (lambda out: _edit_manifest(out, complete=False), r"the set is incomplete \(manifest.json says complete=False"),
    (lambda out: (out / "manifest.json").write_text('{"format": "jaxspec-selfdistill-1", "comp'),
     "manifest.json is not readable JSON"),
    (lambda out: _edit_manifest(out, format="other-1"), "manifest.json has format 'other-1', not "
                                                        "'jaxspec-selfdistill-1'"),
    (lambda out: os.remove(out / "shard_00001.npz"), "shard shard_00001.npz listed in manifest.json is missing"),
    (lambda out: _edit_manifest(out, d_model=16), r"shard_00000.npz has features float16\[4, 224, 32\]; the "
                                                  r"manifest says float16\[4, 224, 16\]"),
    (lambda out: _edit_manifest(out, feature_layers=[0]), r"has layer_features float16\[4, 224, 2, 32\]; the "
                                                         r"manifest says float16\[4, 224, 1, 32\]"),
    (lambda out: _edit_manifest(out, num_examples=7), "the shards hold 6 examples; manifest.json says "
                                                      "num_examples=7"),
    (lambda out: (out / "shard_00001.npz").write_bytes(b"not a zip"), "shard shard_00001.npz is not a readable"),
])
def test_read_refuses_a_broken_set_naming_the_problem(dataset, tmp_path, break_it, message):
    out = copy_set(dataset, tmp_path)
    break_it(out)
    with pytest.raises(ValueError, match=message) as err:
        selfdistill.read(str(out))
    assert str(out) in str(err.value)


def test_loss_mask_marks_the_positions_that_predict_reply_tokens(dataset):
    arrays = dict(tokens=np.zeros((2, 7), np.int32), reply_start=np.array([2, 3], np.int32),
                  lengths=np.array([4, 7], np.int32))
    expected = [[0, 1, 1, 0, 0, 0, 0],  # reply tokens at 2, 3: predicted from positions 1, 2
                [0, 0, 1, 1, 1, 1, 0]]  # reply tokens at 3..6: predicted from positions 2..5
    np.testing.assert_array_equal(selfdistill.loss_mask(arrays), np.asarray(expected, bool))
    _, _, _, arrays = dataset
    mask = selfdistill.loss_mask(arrays)
    for i in range(len(mask)):
        positions = np.flatnonzero(mask[i])
        assert positions.tolist() == list(range(arrays["reply_start"][i] - 1, arrays["lengths"][i] - 1))


def test_token_frequencies_count_reply_tokens(dataset):
    _, _, _, arrays = dataset
    counts = collections.Counter()
    for tokens, start, length in zip(arrays["tokens"], arrays["reply_start"], arrays["lengths"]):
        counts.update(tokens[start:length].tolist())
    frequencies = selfdistill.token_frequencies(arrays, 264)
    assert frequencies.dtype == np.int64 and frequencies.shape == (264,)
    assert {t: int(c) for t, c in enumerate(frequencies) if c} == dict(counts)
    with pytest.raises(ValueError, match="outside vocab_size=100"):
        selfdistill.token_frequencies(arrays, 100)


def test_config_presets_validate_and_bad_values_are_named():
    small = selfdistill_config.get_config("small")
    assert (small.num_prompts, small.max_new_tokens, small.batch_size) == (64, 96, 8)
    assert selfdistill_config.get_config("small,num_prompts=32,max_new_tokens=64").num_prompts == 32
    selfdistill.validate_config(selfdistill_config.get_config(None))
    with pytest.raises(ConfigError, match="preset='huge' is not one of"):
        selfdistill_config.get_config("huge")
    for key, value, match in [
        ("num_prompts", 0, "config.num_prompts=0 is not allowed: a positive integer"),
        ("max_new_tokens", 384, "config.max_new_tokens=384 is not allowed: fewer than seq_len=384"),
        ("feature_layers", (3, 3), r"config.feature_layers=\(3, 3\) is not allowed: a tuple of distinct"),
        ("seed", -1, "config.seed=-1 is not allowed"),
        ("prompt_set", "chat",
         r"config.prompt_set='chat' is not allowed: one of \['docs', 'self', 'self_tasks', 'tasks'\]"),
    ]:
        config = selfdistill_config.get_config("small")
        config[key] = value
        with pytest.raises(ConfigError, match=match):
            selfdistill.validate_config(config)
    config = selfdistill_config.get_config("small")
    config.num_prompt = 3
    with pytest.raises(ConfigError, match="unknown config key config.num_prompt; did you mean num_prompts"):
        selfdistill.validate_config(config)


def test_launch_rejects_a_bad_value_before_compute(tmp_path, subprocess_env):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "launch.selfdistill", "--config=configs/selfdistill.py:small",
                           f"--out={tmp_path / 'set'}", "--config.batch_size=0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config.batch_size=0 is not allowed: a positive integer" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "set")
    proc = subprocess.run([sys.executable, "-m", "launch.selfdistill", f"--combine={tmp_path / 'a'},{tmp_path / 'b'}",
                           f"--out={tmp_path / 'both'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'a'}: no manifest.json; not a self-distillation set" in proc.stderr
    assert not os.path.exists(tmp_path / "both")
