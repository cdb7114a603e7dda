"""Training a Kangaroo adapter: the loss falls, a stopped run resumes to the losses of an uninterrupted one, the
config is validated, and an adapter is refused for another target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import methods
from jaxspec.decoding.method import Target
from jaxspec.errors import InputError
from jaxspec.models import kangaroo
from jaxspec.training import kangaroo as training
from jaxspec.training import selfdistill


def greedy_set(apply, model, params, rows: int = 12, prompt_len: int = 4, reply_len: int = 8) -> dict:
    """A self-distillation set's arrays: random prompts and the target's greedy replies (one full forward per
    reply token, at one shape), the last rows shorter so that padding is masked."""
    rng = np.random.default_rng(0)
    width = prompt_len + reply_len
    tokens = np.zeros((rows, width), np.int32)
    tokens[:, :prompt_len] = rng.integers(0, model.model_cfg.vocab_size, (rows, prompt_len))
    for t in range(prompt_len - 1, width - 1):
        tokens[:, t + 1] = np.asarray(apply(model, params, jnp.asarray(tokens)))[:, t].argmax(-1)
    lengths = np.full(rows, width, np.int32)
    lengths[-3:] = width - 3
    tokens[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return dict(tokens=tokens, lengths=lengths, reply_start=np.full(rows, prompt_len, np.int32))


def config(**changes):
    cfg = training.config_defaults()
    cfg.update(dict(data="in-memory", exit_layer=1, steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=1,
                    eval_every=0, save_every=4, val_fraction=0.25))
    cfg.update(changes)
    return cfg


def quiet(_):
    pass


@pytest.fixture(scope="module")
def target(make_model, apply):
    model, params = make_model("A", seed=6, n_layers=3, max_len=64)
    return model, params, greedy_set(apply, model, params)


@pytest.fixture(scope="module")
def whole_run(target, tmp_path_factory):
    """(workdir, result) of an uninterrupted run."""
    model, params, arrays = target
    workdir = str(tmp_path_factory.mktemp("kangaroo") / "whole")
    return workdir, training.train(config(), model.model_cfg, params, arrays, workdir, log=quiet)


def test_reply_scores_are_those_of_the_full_forward_at_the_reply_positions(target, apply):
    """The loss reads the LM head at the reply positions only; it equals cross-entropy and agreement of the full
    forward's logits under `selfdistill.loss_mask`."""
    model, params, arrays = target
    draft = kangaroo.draft_model(model.model_cfg, 1)
    adapter = kangaroo.init_adapter(params, model.model_cfg, 1, seed=5)
    replies = training.training_replies(arrays)
    scores = training.programs(draft, training.optimizer_settings(config()), replies.width)[2]  # the runs' own
    got = scores(adapter, kangaroo.shared_params(params, 1), *replies.rows(slice(None)))
    logits = np.asarray(apply(draft, kangaroo.draft_params(params, adapter), jnp.asarray(replies.tokens)))[:, :-1]
    mask = selfdistill.loss_mask(arrays)[:, :replies.tokens.shape[1] - 1]
    labels = replies.tokens[:, 1:]
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(got[0]), ce[mask].sum(), rtol=1e-5)
    assert float(got[1]) == np.sum((logits.argmax(-1) == labels)[mask]) and float(got[2]) == mask.sum()


def test_training_lowers_the_loss(whole_run):
    losses = [loss for _, loss in whole_run[1]["losses"]]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    # Held-out scores are reported (on a random tiny target's few replies they need not improve).
    assert whole_run[1]["adapted"]["positions"] == whole_run[1]["unadapted"]["positions"] > 0


def test_a_stopped_run_resumes_to_the_losses_of_an_uninterrupted_one(target, whole_run, tmp_path):
    model, params, arrays = target
    parts = str(tmp_path / "parts")
    first = training.train(config(), model.model_cfg, params, arrays, parts, stop_at=5, log=quiet)
    rest = training.train(config(), model.model_cfg, params, arrays, parts, log=quiet)
    assert [s for s, _ in first["losses"]] == [1, 2, 3, 4, 5] and [s for s, _ in rest["losses"]] == list(range(6, 13))
    np.testing.assert_array_equal([x for _, x in first["losses"] + rest["losses"]],
                                  [x for _, x in whole_run[1]["losses"]])
    a = training.load_adapter(whole_run[0], params, model.model_cfg)
    b = training.load_adapter(parts, params, model.model_cfg)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(InputError, match="has learning_rate=0.01, this config learning_rate=0.02"):
        training.train(config(learning_rate=2e-2), model.model_cfg, params, arrays, parts, log=quiet)


def test_an_adapter_decodes_over_its_own_target_and_is_refused_by_file_over_another(target, whole_run):
    model, params, _ = target
    spec = methods.make("kangaroo", draft_workdir=whole_run[0])
    drafter, _ = spec.build(Target(model, params))
    assert drafter.model.model_cfg.n_layers == 2 and drafter.confidence_threshold == 0.6
    other = jax.tree.map(lambda x: x + 1e-3, params)
    with pytest.raises(InputError, match=r"whole/config.json: the Kangaroo adapter .* trained for another target"):
        spec.build(Target(model, other))


@pytest.mark.parametrize("changes, message", [
    (dict(exit_layer=0), "config.exit_layer=0 is not allowed: a positive integer"),
    (dict(exit_layer=3), r"config.exit_layer=3 is not allowed: a layer index in \[1, 2\]"),
    (dict(batch_size=0), "config.batch_size=0 is not allowed: a positive integer"),
    (dict(warmup_steps=12), "config.warmup_steps=12 is not allowed: fewer than steps=12"),
    (dict(val_fraction=1.0), "config.val_fraction=1.0 is not allowed"),
])
def test_bad_config_values_are_named(target, tmp_path, changes, message):
    model, params, arrays = target
    with pytest.raises(ConfigError, match=message):
        training.train(config(**changes), model.model_cfg, params, arrays, str(tmp_path / "run"), log=quiet)


def test_a_run_needs_a_self_distillation_set(target):
    with pytest.raises(ConfigError, match="config.data='' is not allowed: a self-distillation set of the target"):
        training.read_set(config(data=""), target[0].model_cfg, "")
