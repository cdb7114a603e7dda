"""SpecDec++'s draft length: an acceptance head stops a branch once its predicted P(at least one rejection)
passes the threshold; the output stays the target's; a head is learned from a self-distillation set (better
than the base rate, and not from shuffled labels) and refused for a drafter it was not trained for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api, methods
from jaxspec.decoding.drafters import Context, ModelDrafter
from jaxspec.decoding.method import Target
from jaxspec.decoding.trees import chain
from jaxspec.errors import InputError
from jaxspec.models.acceptance import AcceptanceHead
from jaxspec.training import acceptance


def constant_head(d_model: int, p_accept: float, hidden: int = 8):
    """A head that predicts the same acceptance probability everywhere (its weights zero, its bias the logit)."""
    head = AcceptanceHead(hidden)
    params = head.init(jax.random.key(0), jnp.zeros((1, d_model + 2)))["params"]
    params = jax.tree.map(jnp.zeros_like, params)
    params["out"]["bias"] = jnp.full((1,), np.log(p_accept / (1 - p_accept)), jnp.float32)
    return head, params


def test_a_branch_stops_where_the_predicted_rejection_passes_the_threshold(make_model):
    model, params = make_model("A", seed=7, n_layers=3, max_len=64)
    drafter = ModelDrafter(model, chain(5), skip_layers=(1,), acceptance_head=AcceptanceHead(8), stop_threshold=0.5)
    ctx = Context(jnp.asarray([7]), jnp.zeros((1, 64), jnp.int32), jnp.asarray([6]), jnp.zeros((1, 32)),
                  jax.random.key(0), 0.0)
    dstate = jax.jit(ModelDrafter(model, chain(5), skip_layers=(1,)).init, static_argnums=3)(
        params, jnp.asarray([[3, 1, 4, 1, 5]]), jnp.asarray([5]), 64, jnp.asarray([7]))
    propose = jax.jit(lambda p, s: drafter.propose(p, s, ctx))  # ctx.temperature stays static
    plain = jax.jit(lambda p, s: ModelDrafter(model, chain(5), skip_layers=(1,)).propose(p, s, ctx))(params, dstate)
    # Survival after d drafts is p^d: kept while 1 - p^d <= 0.5 (0.8: d <= 3; 0.3: none; 0.95: all 5).
    for p_accept, drafted in ((0.8, 3), (0.3, 0), (0.95, 5)):
        prop = propose({"draft": params, "acceptance": constant_head(32, p_accept)[1]}, dstate)
        assert np.asarray(prop.node_valid)[0].tolist() == [True] * (1 + drafted) + [False] * (5 - drafted)
        kept = 1 + drafted  # stopping changes no kept draft (past them, depths no row drafts at are not computed)
        assert np.asarray(prop.tokens)[0, :kept].tolist() == np.asarray(plain.tokens)[0, :kept].tolist()


def test_decoding_with_a_saved_head_keeps_the_targets_output(make_model, tmp_path):
    model, params = make_model("A", seed=7, n_layers=3, max_len=64)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    spec = methods.make("layerskip", skip_layers=(1,), tree="chain:4")
    ar = api.generate(model, params, prompts, max_new_tokens=12)
    for p_accept, where in ((0.8, "some"), (0.3, "none")):
        head, head_params = constant_head(32, p_accept)
        acceptance.save_head(str(tmp_path / where), head, head_params, spec.drafted_by(), {})
        out = api.generate(model, params, prompts, method="layerskip", skip_layers=(1,), tree="chain:4",
                           acceptance_head=str(tmp_path / where), stop_threshold=0.5, max_new_tokens=12)
        assert out.tokens == ar.tokens
        if where == "none":  # no drafts: every round is one autoregressive step
            assert out.target_steps.tolist() == ar.target_steps.tolist()
    with pytest.raises(InputError, match="was trained for the drafter .*skip_layers.*1.*not"):
        api.generate(model, params, prompts, method="layerskip", skip_layers=(2,), tree="chain:4",
                     acceptance_head=str(tmp_path / "some"))
    with pytest.raises(InputError, match="not an acceptance head"):
        import ml_collections

        from jaxspec.training import checkpoint
        with checkpoint.CheckpointManager(str(tmp_path / "other")) as manager:
            manager.save(1, {"params": {"w": jnp.ones(2)}}, {}, ml_collections.ConfigDict({"train": {"steps": 1}}),
                         force=True)
        methods.make("layerskip", skip_layers=(1,), acceptance_head=str(tmp_path / "other")).build(
            Target(model, params))


def test_a_head_learns_acceptance_and_not_shuffled_labels(make_model):
    model, params = make_model("A", seed=11, n_layers=3, max_len=64)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, 6).tolist() for _ in range(48)]
    replies = api.generate(model, params, prompts, max_new_tokens=24).tokens  # the target's own greedy replies
    tokens = np.zeros((48, 32), np.int32)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        tokens[i, :len(p) + len(r)] = p + r
    arrays = dict(tokens=tokens, reply_start=np.full(48, 6, np.int32),
                  lengths=np.asarray([6 + len(r) for r in replies], np.int32))
    drafter, dparams = methods.make("layerskip", skip_layers=(1,)).build(Target(model, params))
    features, labels, index = acceptance.acceptance_examples(drafter, dparams, arrays)
    assert len(labels) == sum(len(r) for r in replies) and 0.1 < labels.mean() < 0.9
    settings = acceptance.HeadSettings(hidden=32, steps=300, batch_size=256, val_fraction=0.25)
    _, _, learned = acceptance.train_head(features, labels, index, settings)
    val = learned["validation"]
    assert val["log_loss"] < val["base_log_loss"] - 0.05
    shuffled = rng.permutation(labels)
    _, _, control = acceptance.train_head(features, shuffled, index, settings)
    assert control["validation"]["log_loss"] > control["validation"]["base_log_loss"] - 0.02
