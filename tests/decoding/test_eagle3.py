"""EAGLE-3's fused target streams: the unrolled training forward equals drafting step by step when the committed
pairs read fused streams and the drafted ones the drafter's guesses; the engine hands a drafter exactly the
streams it names (a one-stream net planted to equal an EAGLE net decodes round for round as it does); decoding
is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import api
from jaxspec.errors import InputError
from jaxspec.models.eagle import EagleNet, drafter_model_cfg, eagle3_layers, unrolled_parents


@pytest.fixture(scope="module")
def target(make_model):
    return make_model("A", seed=3, n_layers=2, max_len=64)


def fused_net(target_model, streams: int, seed: int = 0):
    net = EagleNet(drafter_model_cfg(target_model.model_cfg, 1), fused_streams=streams)
    d = target_model.model_cfg.d_model
    params = net.init(jax.random.key(seed), jnp.zeros((1, 1, d * max(1, streams))), jnp.zeros((1, 1, d)))["params"]
    # Away from the initialiser's zeros and ones, so every parameter matters.
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 1), x.shape), params)
    return net, params


def test_eagle3_layers_pick_low_middle_high():
    assert eagle3_layers(30) == (2, 15, 27)
    assert eagle3_layers(2) == (0, 1)
    with pytest.raises(InputError, match="n_layers >= 1"):
        eagle3_layers(0)


def test_unrolled_forward_over_fused_streams_equals_drafting_step_by_step(target):
    model, _ = target
    net, params = fused_net(model, streams=2)
    d, t, steps = model.model_cfg.d_model, 4, 2  # two depths mix fused streams and guesses (test_eagle: deeper)
    streams = 30.0 * jax.random.normal(jax.random.key(5), (1, t, 2 * d))  # residual streams: large, unnormalised
    embeds = jax.random.normal(jax.random.key(6), (1, t, d))
    full = lambda f, g, e: net.apply({"params": params}, f, e, guessed=g)  # plain causal forward (eager: shapes vary)

    guesses = None
    for depth in range(1, steps + 1):  # the objective's recomputation, stage by stage
        guessed = None if guesses is None else jnp.pad(guesses[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0))
                                                       ).reshape(1, (depth - 1) * t, d)
        out = net.apply({"params": params}, streams, jnp.tile(embeds, (1, depth, 1)), guessed=guessed,
                        parents=unrolled_parents(t, depth))
        guesses = out.reshape(1, depth, t, d)

    for s in range(steps):
        for i in range(s, t):
            # Node (s, i): the true pairs up to i - s (fused streams), then s pairs of the drafter's own guesses.
            f, g, e = streams[:, :i - s + 1], jnp.zeros((1, 0, d)), embeds[:, :i - s + 1]
            for r in range(1, s + 1):
                guess = full(f, g, e)[:, -1:]
                g, e = jnp.concatenate([g, guess], 1), jnp.concatenate([e, embeds[:, i - s + r:i - s + r + 1]], 1)
            np.testing.assert_allclose(guesses[0, s, i], full(f, g, e)[0, -1], rtol=2e-4, atol=2e-5)


def test_the_engine_hands_over_the_named_streams(target):
    """A net fusing one stream, the residual stream after the last layer, with its stream norm set to the
    target's final norm and an identity projection, reads exactly the target's final feature: it must draft as
    the EAGLE net it extends does, round for round (same steps and accepted counts). A wrong stream, or the
    final feature where a stream was named, would change the drafts."""
    model, tparams = target
    plain, params = fused_net(model, streams=0)
    cfg = model.model_cfg
    one = EagleNet(plain.model_cfg, fused_streams=1)
    fused_params = dict(params, stream_norm_0=dict(tparams["final_norm"]),
                        reduce={"kernel": jnp.eye(cfg.d_model)})
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [4, 4, 4, 4, 4, 4]]
    for options in (dict(tree="chain:3"),):
        base = api.generate(model, tparams, prompts, method="eagle", net=plain, net_params=params,
                            vocab_ids=np.arange(40), max_new_tokens=20, **options)
        fused = api.generate(model, tparams, prompts, method="eagle", net=one, net_params=fused_params,
                             vocab_ids=np.arange(40), feature_layers=(cfg.n_layers - 1,), max_new_tokens=20, **options)
        assert fused.tokens == base.tokens
        assert fused.target_steps.tolist() == base.target_steps.tolist(), options
        assert fused.accepted.tolist() == base.accepted.tolist(), options
        # The negative control: the stream after layer 0 drafts differently.
        other = api.generate(model, tparams, prompts, method="eagle", net=one, net_params=fused_params,
                             vocab_ids=np.arange(40), feature_layers=(0,), max_new_tokens=20, **options)
        assert other.tokens == base.tokens
        assert other.target_steps.tolist() != base.target_steps.tolist(), options


def test_eagle3_decoding_equals_autoregressive(target):
    model, tparams = target
    net, params = fused_net(model, streams=2)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [4, 4, 4, 4, 4, 4], [5, 6]]
    ar = api.generate(model, tparams, prompts, method="ar", max_new_tokens=20)
    for options in (dict(tree="branching:3,2"), dict(expand=3, depth=3, nodes=6)):
        out = api.generate(model, tparams, prompts, method="eagle", net=net, net_params=params,
                           vocab_ids=np.arange(40), feature_layers=(1, 0), max_new_tokens=20, **options)
        assert out.tokens == ar.tokens, options


def test_streams_and_layers_must_agree(target):
    model, tparams = target
    net, params = fused_net(model, streams=2)
    with pytest.raises(InputError, match=r"fuses 2 target streams; feature_layers \(1,\) name 1"):
        api.generate(model, tparams, [[1, 2]], method="eagle", net=net, net_params=params, feature_layers=(1,))
    with pytest.raises(InputError, match=r"features \(1, 3, 32\) must be \[B, T, 64\]"):
        net.apply({"params": params}, jnp.zeros((1, 3, 32)), jnp.zeros((1, 3, 32)))
