"""The trainer end to end on a tiny model and corpus: learning, resume, MatFormer, Medusa, EAGLE, distillation,
data parallelism, checkpoint refusal, and the optimizer's schedule and decay mask."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from jaxspec.decoding import api
from jaxspec.models.lm import build_model
from jaxspec.parallel.mesh import make_mesh
from jaxspec.training import checkpoint, instructions, optim, selfdistill
from jaxspec.training.data import make_datasets
from jaxspec.training.train_config import eagle_defaults, medusa_defaults, train_defaults
from jaxspec.training.trainer import build_trainer, prepare_config, read_metrics, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "red", "big", "house", "and", "then")


def write_corpus(directory, num_docs=24, words_per_doc=300) -> str:
    """Documents of seeded word salad ending in '.' every few words: structure a tiny model picks up fast."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for d in range(num_docs):
        words = rng.choice(WORDS, size=words_per_doc)
        text = " ".join(w + ("." if i % 7 == 6 else "") for i, w in enumerate(words))
        with open(os.path.join(directory, f"doc_{d:02d}.txt"), "w") as fh:
            fh.write(text)
    return str(directory)


def tiny_config(corpus: str, steps: int = 8, **train_overrides):
    """d_model 32, 2 layers, seq_len 32: a config whose train step compiles and runs in about a second."""
    config = lm.get_config("tiny")
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.max_len = 32, 2, 2, 1, 64, 64
    d = config.data
    d.source, d.seq_len, d.batch_size, d.val_fraction, d.max_bytes = corpus, 32, 8, 0.2, 60_000
    t = config.train
    t.steps, t.warmup_steps, t.decay_steps, t.learning_rate = steps, 2, 0, 1e-2
    t.log_every, t.eval_every, t.eval_batches, t.save_every, t.progress_bar = 1, 0, 2, 1000, False
    t.update(train_overrides)
    return config


def losses_by_step(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def lm_run(corpus, tmp_path_factory):
    """An uninterrupted 60-step LM run (saving at 30 and 60): the reference and the target of later tests."""
    workdir = str(tmp_path_factory.mktemp("lm_run"))
    config = tiny_config(corpus, steps=60, save_every=30, eval_every=60)
    final = train(config, workdir)
    return config, workdir, final


def test_lm_loss_goes_down_and_logs(lm_run):
    config, workdir, final = lm_run
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 61))
    first, last = records[0], records[-1]
    assert first["loss"] > np.log(259) - 0.5  # starts near uniform over the byte vocabulary
    assert last["loss"] < first["loss"] - 2.5
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb", "val_lm_acc"):
        assert key in last, key
    assert "tokens_per_s" not in first  # the compiling first step is not timed
    assert final["val_loss"] == last["val_loss"] and final["step"] == 60
    assert final["val_loss"] < np.log(259) - 2.5
    # Bits per byte: the corpus is ASCII, so bytes = non-special targets; nats/ln2/bytes >= nats/ln2/tokens.
    assert final["val_bpb"] >= final["val_loss"] / np.log(2)
    assert checkpoint.CheckpointManager(workdir).all_steps() == [30, 60]


def test_resume_gives_the_uninterrupted_losses(lm_run, tmp_path):
    config, reference_dir, reference = lm_run
    # A run killed during step 60, before its save: checkpoint 30 is the latest, metrics were logged past it.
    workdir = str(tmp_path / "killed")
    shutil.copytree(reference_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "60"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": 61, "loss": -1.0}) + "\n")
    resumed = train(config, workdir)
    assert losses_by_step(workdir) == losses_by_step(reference_dir)  # steps 31..60 computed again, equal
    assert resumed["val_loss"] == reference["val_loss"]
    assert checkpoint.CheckpointManager(workdir).all_steps() == [30, 60]
    # The whole train state (params, optimizer moments, step, RNG) ends bit for bit as the reference's.
    prepared = prepare_config(config)
    abstract = build_trainer(prepared, make_mesh(prepared.mesh)).abstract_state()
    state_a, data_a, _ = checkpoint.CheckpointManager(workdir).restore_train_state(abstract)
    state_b, data_b, _ = checkpoint.CheckpointManager(reference_dir).restore_train_state(abstract)
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    assert data_a == data_b and int(state_a["step"]) == 60


def test_used_workdir_is_refused_not_overwritten(lm_run, corpus, tmp_path):
    config, reference_dir, _ = lm_run
    other_shape = tiny_config(corpus, steps=60)
    other_shape.model.d_model, other_shape.model.d_ff = 48, 96
    mismatched = str(tmp_path / "mismatched")
    shutil.copytree(reference_dir, mismatched)
    with pytest.raises(ValueError, match="another model shape"):
        train(other_shape, mismatched)

    partial = str(tmp_path / "partial")
    shutil.copytree(reference_dir, partial)
    os.remove(os.path.join(partial, "checkpoints", "60", checkpoint.COMMIT_MARKER))
    with pytest.raises(ValueError, match="incomplete"):
        train(config, partial)

    no_checkpoint = str(tmp_path / "no_checkpoint")
    shutil.copytree(reference_dir, no_checkpoint, ignore=shutil.ignore_patterns("checkpoints"))
    before = read_metrics(no_checkpoint)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train(config, no_checkpoint)
    assert read_metrics(no_checkpoint) == before


@pytest.mark.slow
def test_matformer_granularities_are_ordered_by_validation_loss(corpus, tmp_path):
    config = tiny_config(corpus, steps=60, loss="matformer", eval_every=60, eval_batches=16)
    config.model.matformer_fractions = (0.0625, 0.25, 1.0)
    config.model.d_ff = 128
    final = train(config, str(tmp_path / "matformer"))
    val = [final[f"val_g{g}_loss"] for g in range(3)]
    assert val[0] > val[1] > val[2], val
    assert final["val_loss"] == pytest.approx(sum(val), rel=1e-6)  # unit weights: the sum of the three
    assert final["val_bpb"] == final["val_g2_bpb"]


def test_medusa_heads_learn_on_a_frozen_backbone(lm_run, corpus, tmp_path):
    _, target_dir, target_final = lm_run
    backbone_before, _ = checkpoint.restore_params(target_dir)
    config = tiny_config(corpus, steps=60, loss="medusa", eval_every=60)
    config.target_workdir = target_dir
    config.medusa = medusa_defaults()
    config.medusa.num_heads = 2
    workdir = str(tmp_path / "medusa")
    final = train(config, workdir)

    # Chance = always guessing the most frequent validation target (a bigram-free baseline).
    _, val_batches, _ = make_datasets(config.data)
    targets = np.concatenate([b["targets"].ravel() for b in val_batches.eval_pass(2)])
    majority = np.bincount(targets).max() / targets.size
    assert final["val_head0_acc"] > majority + 0.05, (final["val_head0_acc"], majority)
    assert final["val_head1_acc"] > majority, (final["val_head1_acc"], majority)
    records = read_metrics(workdir)
    assert records[-1]["head0_loss"] < records[0]["head0_loss"] - 1.0

    # Only the heads were trained and saved; the backbone is bit for bit the target's.
    heads, saved_config = checkpoint.restore_params(workdir)
    assert sorted(heads) == ["head_0_block_0", "head_0_out", "head_1_block_0", "head_1_out"]
    assert saved_config.target_workdir == target_dir
    assert saved_config.model.to_dict() == checkpoint.load_config(target_dir).model.to_dict()
    backbone_after, _ = checkpoint.restore_params(target_dir)
    jax.tree.map(np.testing.assert_array_equal, backbone_before, backbone_after)
    # The backbone used at the end of head training scores the validation set as the target run did.
    assert final["val_lm_loss"] == pytest.approx(target_final["val_lm_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def selfdistill_set(lm_run, chat_tokenizer, tmp_path_factory):
    """(model, params, tokenizer, set directory, target workdir): the trained tiny LM's self-distillation set,
    with the residual streams of both its layers stored (EAGLE-3)."""
    _, target_dir, _ = lm_run
    params, target_config = checkpoint.restore_params(target_dir)
    target_config.model.max_len = 256  # room for the chat-rendered prompts; the parameters do not depend on it
    model = build_model(target_config.model)
    tokenizer = copy.copy(chat_tokenizer)
    tokenizer.eos_ids = (chat_tokenizer.eos_id,)  # the word-salad target says letters a-m often: no early stops
    sd = str(tmp_path_factory.mktemp("sd"))
    selfdistill.generate(model, params, tokenizer, sd, num_prompts=24, max_new_tokens=48, seq_len=160,
                         batch_size=8, max_prompt_chars=60, target_workdir=target_dir, feature_layers=(0, 1),
                         tokenizer_name=target_config.data.tokenizer, progress=False, prompt_set="docs")
    return model, params, tokenizer, sd, target_dir


def test_eagle_drafter_learns_its_targets_features_and_drafts_for_it(selfdistill_set, corpus, tmp_path):
    """A self-distillation set of the trained tiny LM, an EAGLE drafter trained on it, and decoding with it."""
    model, params, tokenizer, sd, target_dir = selfdistill_set
    config = tiny_config(corpus, steps=120, loss="eagle", eval_every=120, learning_rate=3e-3)
    config.data.source, config.data.seq_len, config.data.batch_size = sd, 159, 4
    config.target_workdir = target_dir
    config.eagle = eagle_defaults()
    config.eagle.update(draft_vocab=32, unroll=2)
    workdir = str(tmp_path / "eagle")
    final = train(config, workdir)

    records = read_metrics(workdir)
    assert records[-1]["tok0_loss"] < records[0]["tok0_loss"] - 0.5
    assert records[-1]["feat0_loss"] < records[0]["feat0_loss"]
    # Depth 1 guesses the target's next token far better than its most frequent reply token would.
    _, val_batches, _ = make_datasets(prepare_config(config).data)
    val = list(val_batches.eval_pass(4))
    labels = np.concatenate([b["tokens"][:, 2:][b["mask"][:, 2:]] for b in val])
    majority = np.bincount(labels).max() / labels.size
    assert final["val_tok0_acc"] > majority + 0.2, (final["val_tok0_acc"], majority)
    assert final["val_tok1_acc"] > majority, (final["val_tok1_acc"], majority)
    assert checkpoint.finished(workdir) and not checkpoint.finished(sd)
    too_big = prepare_config(config).data
    too_big.batch_size = 16
    with pytest.raises(ValueError, match="validation split .* make the set with more prompts"):
        make_datasets(too_big)
    too_long = prepare_config(config).data
    too_long.seq_len = 160
    with pytest.raises(ValueError, match=r"data.seq_len=160 needs 161 positions .* stores 160"):
        make_datasets(too_long)
    vocab = np.load(os.path.join(workdir, "draft_vocab.npy"))
    assert vocab.shape == (32,) and len(set(vocab.tolist())) == 32

    # Decoding with the trained drafter: identical output, and drafts accepted.
    prompts = [selfdistill.encode_messages(tokenizer, m)
               for m in instructions.instruction_prompts(3, seed=5, max_chars=60, prompt_set="docs")]
    ar = api.generate(model, params, prompts, max_new_tokens=32)
    out = api.generate(model, params, prompts, method="eagle", draft_workdir=workdir, tree="chain:3",
                       target_workdir=target_dir, max_new_tokens=32)
    assert out.tokens == ar.tokens
    assert np.sum(out.accepted) > 1.5 * np.sum(out.target_steps), (out.accepted, out.target_steps)
    with pytest.raises(ValueError, match="trained for the target"):
        api.generate(model, params, prompts, method="eagle", draft_workdir=workdir, target_workdir=str(tmp_path))
    with pytest.raises(ValueError, match="not an EAGLE drafter run"):
        api.generate(model, params, prompts, method="eagle", draft_workdir=target_dir)


def test_eagle3_drafter_fuses_the_stored_streams_and_drafts_for_it(selfdistill_set, corpus, tmp_path):
    """EAGLE-3 on the same set: the drafter reads the residual streams of layers 0 and 1, trains on tokens
    alone, and decodes exactly; a layer the set does not store is refused by name before any compute."""
    model, params, tokenizer, sd, target_dir = selfdistill_set
    config = tiny_config(corpus, steps=60, loss="eagle", eval_every=60, learning_rate=3e-3)
    config.data.source, config.data.seq_len, config.data.batch_size = sd, 159, 4
    config.target_workdir = target_dir
    config.eagle = eagle_defaults()
    config.eagle.update(draft_vocab=32, unroll=3, feature_layers=(1, 0), feature_weight=0.0)
    workdir = str(tmp_path / "eagle3")
    final = train(config, workdir)
    records = read_metrics(workdir)
    assert records[-1]["tok0_loss"] < records[0]["tok0_loss"] - 0.5
    assert final["val_tok2_acc"] > 0.0
    prompts = [selfdistill.encode_messages(tokenizer, m)
               for m in instructions.instruction_prompts(3, seed=5, max_chars=60, prompt_set="docs")]
    ar = api.generate(model, params, prompts, max_new_tokens=32)
    for options in (dict(tree="chain:3"), dict(expand=2, depth=3, nodes=4)):
        out = api.generate(model, params, prompts, method="eagle", draft_workdir=workdir, target_workdir=target_dir,
                           max_new_tokens=32, **options)
        assert out.tokens == ar.tokens, options
        assert np.sum(out.accepted) > 1.3 * np.sum(out.target_steps), (options, out.accepted, out.target_steps)
    config.eagle.feature_layers = (0, 5)
    with pytest.raises(ValueError, match=r"eagle.feature_layers=\(0, 5\).* below n_layers=2"):
        train(config, str(tmp_path / "refused"))
    plain = str(tmp_path / "sd_plain")  # a set without stored streams
    shutil.copytree(sd, plain)
    with open(os.path.join(plain, selfdistill.MANIFEST)) as fh:
        manifest = json.load(fh)
    manifest["feature_layers"] = [0]
    with open(os.path.join(plain, selfdistill.MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    config.eagle.feature_layers, config.data.source = (1,), plain
    with pytest.raises(ValueError, match=r"stores the residual streams of layers \[0\], not \[1\]"):
        prepare_config(config)
    assert not os.path.exists(str(tmp_path / "refused"))


@pytest.mark.slow
def test_distillation_with_early_exit(lm_run, corpus, tmp_path):
    _, target_dir, _ = lm_run
    config = tiny_config(corpus, steps=40, loss="distill", distill_alpha=0.5, distill_temperature=2.0,
                         early_exit_layers=(0,), early_exit_weight=0.5, eval_every=40)
    config.target_workdir = target_dir
    config.model.d_model, config.model.d_ff = 16, 32
    final = train(config, str(tmp_path / "draft"))
    records = read_metrics(str(tmp_path / "draft"))
    for key in ("kl_loss", "exit0_loss", "lm_loss"):
        assert records[-1][key] < records[0][key] - 0.3, key
    expected = 0.5 * final["val_lm_loss"] + 0.5 * 4.0 * final["val_kl_loss"] + 0.5 * final["val_exit0_loss"]
    assert final["val_loss"] == pytest.approx(expected, rel=1e-6)


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_trainer import tiny_config
    from jaxspec.parallel.mesh import make_mesh
    from jaxspec.training.data import make_datasets
    from jaxspec.training.trainer import build_trainer, prepare_config

    assert jax.device_count() == 4, jax.devices()
    config = tiny_config(sys.argv[2])
    config.model.n_layers = 1  # one layer compiles faster; the sharding question is the same
    config = prepare_config(config)
    train_batches, _, tokenizer = make_datasets(config.data)
    batches = [next(train_batches) for _ in range(3)]

    single = build_trainer(config, make_mesh(config.mesh, devices=jax.devices()[:1]), tokenizer)
    initial = jax.device_get(single.init_state(0))

    def run(trainer):
        state = jax.device_put(initial, trainer.state_shardings)
        losses = []
        for b in batches:
            batch = trainer.put_batch(b)
            state, metrics = trainer.train_step(state, batch, trainer.frozen)
            losses.append(float(metrics["loss"]))
        return batch, jax.device_get(state), losses

    batch4, state4, losses4 = run(build_trainer(config, make_mesh(config.mesh), tokenizer))
    batch1, state1, losses1 = run(single)
    assert len(batch4["inputs"].sharding.device_set) == 4
    assert batch4["inputs"].addressable_shards[0].data.shape == (2, 32)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), state4, state1)
    print("OK", losses4)
""")


@pytest.mark.slow
def test_data_parallel_step_equals_single_device(corpus, subprocess_env):
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, os.path.dirname(__file__), corpus],
                          env=subprocess_env(4), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_schedule_warms_up_then_decays_to_the_floor():
    t = train_defaults()
    t.steps, t.warmup_steps, t.learning_rate, t.min_lr_ratio = 100, 10, 1.0, 0.1
    schedule = optim.make_schedule(t)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half-way down the cosine
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(150)) == pytest.approx(0.1)
    t.decay_steps = 200
    assert float(optim.make_schedule(t)(105)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)


def test_weight_decay_mask_skips_norms_biases_and_log_rates():
    params = {
        "embed": {"embedding": jnp.ones((8, 4))},
        "final_norm": {"scale": jnp.ones(4)},
        "layer_0": {"attn": {"q_proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
                    "ffn": {"gate_proj": jnp.ones((4, 8))},
                    "mamba": {"A_log": jnp.ones((4, 2)), "D": jnp.ones(4), "conv1d_weight": jnp.ones((4, 2))},
                    "linear_attn": {"out_norm": jnp.ones(4)}},
    }
    mask = optim.decay_mask(params)
    assert mask == {
        "embed": {"embedding": True},
        "final_norm": {"scale": False},
        "layer_0": {"attn": {"q_proj": {"kernel": True, "bias": False}},
                    "ffn": {"gate_proj": True},
                    "mamba": {"A_log": False, "D": False, "conv1d_weight": True},
                    "linear_attn": {"out_norm": False}},
    }
    # With a zero gradient only the masked-in leaves shrink.
    t = train_defaults()
    t.weight_decay, t.warmup_steps, t.learning_rate = 0.5, 0, 0.1
    optimizer, _ = optim.make_optimizer(t)
    update = jax.jit(lambda p: optimizer.update(jax.tree.map(jnp.zeros_like, p), optimizer.init(p), p)[0])
    updates = update(params)
    changed = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert changed == mask
