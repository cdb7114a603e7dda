"""Heads trained on a self-distillation set without running the target: Hydra heads (teacher-forced on the
stored replies) and Medusa heads on the stored features (on the whole or a draft vocabulary). The objective scores
the right tokens (a hand-computed case), the runs lower their loss on a tiny target's set and leave heads the
decoding methods load, and bad configs are refused by key."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import hydra as hydra_config
from configs import lm
from configs import medusa as medusa_config
from jaxspec.config import ConfigError
from jaxspec.decoding import methods
from jaxspec.decoding.method import Target
from jaxspec.errors import InputError
from jaxspec.models.eagle import target_side
from jaxspec.models.hydra import HydraHeads
from jaxspec.training import checkpoint, losses, selfdistill
from jaxspec.training.data import make_datasets, split_documents
from jaxspec.training.train_config import hydra_defaults
from jaxspec.training.trainer import prepare_config, read_metrics, train


@pytest.fixture(scope="module")
def target_run(make_model, tiny_config, chat_tokenizer, tmp_path_factory):
    """A tiny random target saved as a workdir (byte tokenizer) and its self-distillation set."""
    model, params = make_model("A", seed=2, vocab_size=260, max_len=192)
    root = tmp_path_factory.mktemp("hydra_training")
    target_dir, sd = str(root / "target"), str(root / "sd")
    config = lm.get_config("tiny")
    config.model = tiny_config("A", vocab_size=260, max_len=192)
    with checkpoint.CheckpointManager(target_dir) as manager:
        manager.save(1, {"params": params}, {}, config, force=True)
    tokenizer = copy.copy(chat_tokenizer)
    tokenizer.eos_ids = (chat_tokenizer.eos_id,)  # replies run to max_new_tokens: every example has its replies
    selfdistill.generate(model, params, tokenizer, sd, num_prompts=8, max_new_tokens=24, seq_len=160, batch_size=8,
                         max_prompt_chars=60, target_workdir=target_dir, tokenizer_name="bytes", progress=False,
                         prompt_set="docs")  # short instructions: these fit the tiny target's 112 prompt bytes
    return model, params, target_dir, sd


def on_the_set(config, target_dir, sd, steps=30):
    config.target_workdir, config.data.source = target_dir, sd
    config.data.seq_len, config.data.batch_size, config.data.val_fraction = 127, 2, 0.25
    t = config.train
    t.steps, t.warmup_steps, t.learning_rate, t.log_every, t.eval_every, t.eval_batches = steps, 2, 1e-2, 5, 0, 1
    t.save_every, t.progress_bar = steps, False
    return config


def trained(config, workdir):
    """The metrics records of a run of `config` into `workdir`."""
    train(config, workdir)
    return read_metrics(workdir)


def test_hydra_objective_scores_head_k_on_the_token_k_plus_2_ahead():
    """Hand-computed: head k at position t reads f_t, E(x_{t+1}) .. E(x_{t+k+1}) and is scored on x_{t+k+2} where
    it is a reply token and in the draft vocabulary."""
    d, vocab, k_heads = 4, 6, 2
    rng = np.random.default_rng(0)
    heads = HydraHeads(k_heads, d)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), jax.eval_shape(
        lambda: heads.init(jax.random.key(0), jnp.zeros((1, 1, d)), jnp.zeros((1, 1, k_heads, d)))["params"]))
    embedding = jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32)
    side = target_side({"embed": {"embedding": embedding}}, ml_collections.ConfigDict(
        dict(vocab_size=vocab, tie_embeddings=True)), [5, 1, 2, 3])  # ids 0 and 4 are outside it
    tokens = np.asarray([[1, 2, 3, 4, 5, 1, 2]])
    features = rng.standard_normal((1, 7, d)).astype(np.float32)
    mask = np.asarray([[False, True, True, True, True, True, False]])  # mask[t]: x_{t+1} is a reply token
    objective = losses.hydra_objective(heads, hydra_defaults())
    stats = jax.jit(objective.stats)(params, side, {"tokens": tokens, "features": features, "mask": mask})
    rows = {int(v): i for i, v in enumerate(side["vocab_ids"])}
    head_logp = jax.jit(lambda f, path: jax.nn.log_softmax(
        side["head_t"] @ heads.apply({"params": params}, f, path, method=HydraHeads.head)))
    for k in range(k_heads):
        nll, count = 0.0, 0
        for t in range(6):
            label = t + k + 2
            if label > 6 or not mask[0, label - 1] or int(tokens[0, label]) not in rows:
                continue
            logp = head_logp(features[0, t], embedding[tokens[0, t + 1:t + k + 2]])
            nll -= float(logp[rows[int(tokens[0, label])]])
            count += 1
        assert float(stats[f"head{k}"]["tokens"]) == count > 0
        assert float(stats[f"head{k}"]["sum"]) == pytest.approx(nll, rel=1e-5)
    assert not any(name.startswith("teacher") for name in stats)
    # With hydra.teacher, head k at t is also scored by KL(target || head) over the draft vocabulary, the target's
    # distribution of x_{t+k+2} being its LM head on f_{t+k+1}, wherever x_{t+k+2} is a reply token (in the draft
    # vocabulary or not).
    cfg = hydra_defaults()
    cfg.teacher = 0.25
    objective = losses.hydra_objective(heads, cfg)
    stats = jax.jit(objective.stats)(params, side, {"tokens": tokens, "features": features, "mask": mask})
    for k in range(k_heads):
        kl, count = 0.0, 0
        for t in range(6):
            if t + k + 2 > 6 or not mask[0, t + k + 1]:
                continue
            draft = head_logp(features[0, t], embedding[tokens[0, t + 1:t + k + 2]])
            target = jax.nn.log_softmax(side["head_t"] @ features[0, t + k + 1])
            kl += float(jnp.sum(jnp.exp(target) * (target - draft)))
            count += 1
        assert float(stats[f"teacher{k}"]["tokens"]) == count > 0
        assert float(stats[f"teacher{k}"]["sum"]) == pytest.approx(kl, rel=1e-4)
        assert objective.weights[f"teacher{k}"] == pytest.approx(0.25 * cfg.decay ** k)
        assert objective.weights[f"head{k}"] == pytest.approx(0.75 * cfg.decay ** k)


def test_hydra_heads_learn_from_the_set_and_load_for_decoding(target_run, tmp_path):
    model, params, target_dir, sd = target_run
    config = on_the_set(hydra_config.get_config("heads=2,vocab=48"), target_dir, sd)
    workdir = str(tmp_path / "hydra")
    final, records = train(config, workdir), read_metrics(workdir)
    assert records[-1]["head0_loss"] < records[0]["head0_loss"] - 0.5, (records[0], records[-1])
    assert records[-1]["head1_loss"] < records[0]["head1_loss"], (records[0], records[-1])
    assert {"val_head0_acc", "val_head1_acc"} <= set(final)
    assert np.load(os.path.join(workdir, "draft_vocab.npy")).shape == (48,)
    drafter, dparams = methods.make("hydra", draft_workdir=workdir, tree="chain:2").build(
        Target(model, params, target_dir))
    assert drafter.heads.num_heads == 2 and dparams["head_t"].shape == (48, model.model_cfg.d_model)
    with pytest.raises(InputError, match="trained for the target"):
        methods.make("hydra", draft_workdir=workdir).build(Target(model, params, str(tmp_path)))
    with pytest.raises(InputError, match="not a Hydra heads run"):
        methods.make("hydra", draft_workdir=target_dir).build(Target(model, params, target_dir))


def test_hydra_heads_learn_the_targets_distribution(target_run, tmp_path):
    _, _, target_dir, sd = target_run
    # On the distribution alone: the random tiny target's is nearly flat, so heads fitting its greedy tokens
    # would move away from it.
    config = on_the_set(hydra_config.get_config("heads=2,vocab=48,teacher=1"), target_dir, sd)
    workdir = str(tmp_path / "hydra_teacher")
    records = trained(config, workdir)
    for stream in ("teacher0", "teacher1"):
        assert records[-1][f"{stream}_loss"] < records[0][f"{stream}_loss"], (stream, records[0], records[-1])


def test_medusa_heads_learn_from_stored_features(target_run, tmp_path):
    model, params, target_dir, sd = target_run
    config = on_the_set(medusa_config.get_config("heads=2,share=True"), target_dir, sd)
    workdir = str(tmp_path / "medusa")
    records = trained(config, workdir)
    assert records[-1]["head0_loss"] < records[0]["head0_loss"] - 0.5, (records[0], records[-1])
    assert records[-1]["head1_loss"] < records[0]["head1_loss"], (records[0], records[-1])
    heads, saved = checkpoint.restore_params(workdir)
    assert sorted(heads) == ["head_0_block_0", "head_1_block_0"]  # the LM head is the target's, not saved
    assert saved.data.tokenizer == "bytes" and saved.target_workdir == target_dir
    drafter, dparams = methods.make("medusa", draft_workdir=workdir, tree="chain:2").build(
        Target(model, params, target_dir))
    assert drafter.heads.share_lm_head and drafter.heads.vocab_size == 260 and "vocab_ids" not in dparams
    # A run saved before medusa.draft_vocab existed loads the same way: its heads score the whole vocabulary.
    config_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    with open(config_path) as fh:
        old = json.load(fh)
    del old["medusa"]["draft_vocab"]
    with open(config_path, "w") as fh:
        json.dump(old, fh)
    drafter, dparams = methods.make("medusa", draft_workdir=workdir, tree="chain:2").build(
        Target(model, params, target_dir))
    assert drafter.heads.vocab_size == 260 and dparams["lm_head"].shape == (model.model_cfg.d_model, 260)


def test_medusa_heads_on_a_draft_vocabulary_learn_and_save_the_most_frequent_reply_tokens(target_run, tmp_path):
    model, params, target_dir, sd = target_run
    config = on_the_set(medusa_config.get_config("heads=2,vocab=48"), target_dir, sd)
    workdir = str(tmp_path / "medusa_vocab")
    records = trained(config, workdir)
    assert records[-1]["head0_loss"] < records[0]["head0_loss"] - 0.5, (records[0], records[-1])
    assert records[-1]["head1_loss"] < records[0]["head1_loss"], (records[0], records[-1])
    saved = np.load(os.path.join(workdir, "draft_vocab.npy"))
    # The N most frequent reply tokens of the training split (mask[t]: token t+1 is a reply token), most frequent
    # first: no id left out is more frequent than one kept.
    windows = make_datasets(prepare_config(config).data)[0].windows
    counts = np.bincount(windows["tokens"][:, 1:][windows["mask"][:, :-1]], minlength=260)
    left_out = np.setdiff1d(np.arange(260), saved)
    assert saved.shape == (48,) and len(np.unique(saved)) == 48
    assert np.all(np.diff(counts[saved]) <= 0) and counts[saved].min() >= counts[left_out].max()
    heads, _ = checkpoint.restore_params(workdir)
    assert heads["head_0_out"]["kernel"].shape == (model.model_cfg.d_model, 48)  # own heads: N outputs
    drafter, dparams = methods.make("medusa", draft_workdir=workdir, tree="chain:2").build(
        Target(model, params, target_dir))
    assert drafter.heads.vocab_size == 48 and drafter.vocab_size == 260
    np.testing.assert_array_equal(dparams["vocab_ids"], saved)


@pytest.mark.parametrize("key, value, message", [
    ("hydra.num_heads", 0, "hydra.num_heads"),
    ("hydra.decay", 1.5, "hydra.decay"),
    ("hydra.draft_vocab", -1, "hydra.draft_vocab"),
    ("hydra.teacher", 1.5, r"hydra.teacher=1.5 is not allowed: a number in \[0, 1\]"),
    ("hydra.heads", 2, "unknown config key hydra.heads"),
    ("data.source", "stdlib", "data.source"),
])
def test_bad_hydra_configs_are_refused_by_key(target_run, key, value, message):
    _, _, target_dir, sd = target_run
    config = on_the_set(hydra_config.get_config(), target_dir, sd)
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        prepare_config(config)


def test_windows_from_the_reply_score_every_position_drafted_from(target_run):
    """A window that starts at the reply's root (the last prompt position, the first a drafter drafts from) and
    holds the whole reply scores head k at exactly the positions t >= reply_start - 1 whose token t + k + 2 is a
    reply token, with their losses; the whole example also scores the k + 1 prompt positions before the root,
    which decoding never drafts from."""
    model, params, target_dir, sd = target_run
    config = on_the_set(hydra_config.get_config("heads=3,vocab=0"), target_dir, sd)
    config.data.window, config.data.seq_len = "reply", 31  # replies of 24 tokens, no prompt positions
    d = model.model_cfg.d_model
    heads = HydraHeads(3, d)
    side = target_side(params, model.model_cfg, np.arange(260))
    head_params = heads.init(jax.random.key(1), jnp.zeros((1, 1, d)), jnp.zeros((1, 1, 3, d)))["params"]
    windows = make_datasets(prepare_config(config).data)[0].windows
    assert windows["tokens"].shape[1] == 32 and windows["mask"][:, 0].all()  # each starts at the root
    stats = jax.jit(losses.hydra_objective(heads, hydra_defaults()).stats)(head_params, side, windows)
    # The reference: every train example of the set, every position from the root on, one head call each.
    _, arrays = selfdistill.read(sd)
    train_rows = split_documents([str(i) for i in range(len(arrays["tokens"]))], 0.25)[0]
    head_logp = jax.jit(lambda f, path: jax.nn.log_softmax(
        side["head_t"] @ heads.apply({"params": head_params}, f, path, method=HydraHeads.head)))
    embedding = params["embed"]["embedding"]
    for k in range(3):
        nll, count = 0.0, 0
        for row in train_rows:
            tokens, start, length = arrays["tokens"][row], arrays["reply_start"][row], arrays["lengths"][row]
            for t in range(start - 1, length - k - 2):
                logp = head_logp(arrays["features"][row, t].astype(np.float32), embedding[tokens[t + 1:t + k + 2]])
                nll -= float(logp[tokens[t + k + 2]])
                count += 1
        assert float(stats[f"head{k}"]["tokens"]) == count > 0
        assert float(stats[f"head{k}"]["sum"]) == pytest.approx(nll, rel=1e-4)


def test_windows_from_the_reply_are_refused_where_the_context_counts(target_run):
    _, _, target_dir, sd = target_run
    from configs import eagle as eagle_config

    config = on_the_set(eagle_config.get_config(), target_dir, sd)
    config.data.window = "reply"
    with pytest.raises(ConfigError, match=r"data.window.*'start' for train.loss='eagle'"):
        prepare_config(config)
    config = on_the_set(hydra_config.get_config(), target_dir, sd)
    config.data.window = "middle"
    with pytest.raises(InputError, match=r"data.window='middle' is invalid; expected one of \['start', 'reply'\]"):
        prepare_config(config)
    corpus = lm.get_config("tiny")
    corpus.data.window = "reply"
    with pytest.raises(InputError, match="data.window='reply' needs a self-distillation set"):
        make_datasets(corpus.data)
