"""The in-jit debug checks (jaxspec.checks): off, a traced bad value passes silently (why they exist); on, it is
an error naming the precondition; on a correct run they change nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import checks
from jaxspec.decoding import api
from jaxspec.state import commit, init_decode_state


def extend(model, params, tokens, num_new, lengths=None):
    state = init_decode_state(model.model_cfg, tokens.shape[0], 16)
    if lengths is not None:
        state = state.replace(lengths=lengths)
    return model.apply({"params": params}, tokens, state=state, num_new=num_new)[0]


def test_a_traced_num_new_out_of_range_is_caught_only_when_checked(make_model):
    model, params = make_model("A", seed=1)
    tokens = jnp.ones((2, 4), jnp.int32)
    bad = jnp.asarray([4, 9])  # 9 > the 4 columns
    fn = lambda params, num_new: extend(model, params, tokens, num_new)
    jax.jit(fn)(params, bad)  # unchecked: runs on silently clamped values
    with pytest.raises(checks.InvariantError, match=r"num_new=\[4 9\] must lie in \[0, 4\]"):
        checks.run_checked(fn, params, bad)
    good = jnp.asarray([4, 2])
    np.testing.assert_array_equal(checks.run_checked(fn, params, good), jax.jit(fn)(params, good))


def test_lengths_past_the_cache_and_bad_traced_trees_are_caught(make_model):
    model, params = make_model("A", seed=1)
    tokens = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(checks.InvariantError, match="exceed the decode state's max_len=16"):
        checks.run_checked(lambda n: extend(model, params, tokens, n, lengths=jnp.asarray([15])), jnp.asarray([3]))

    def tree_forward(parents):
        state = init_decode_state(model.model_cfg, 1, 16)
        return model.apply({"params": params}, tokens, state=state, parents=parents)[0]

    with pytest.raises(checks.InvariantError, match="is not a tree"):
        checks.run_checked(tree_forward, jnp.asarray([-1, 2, 0]))  # node 1's parent comes after it
    checks.run_checked(tree_forward, jnp.asarray([-1, 0, 0]))


def test_commit_checks_num_accepted(make_model):
    model, params = make_model("A", seed=1)

    def forward_and_commit(n):
        state = init_decode_state(model.model_cfg, 1, 16)
        _, state = model.apply({"params": params}, jnp.ones((1, 3), jnp.int32), state=state, parents=(-1, 0, 1))
        return commit(state, jnp.asarray([[0, 1, 2]]), n).lengths

    with pytest.raises(checks.InvariantError, match=r"num_accepted=\[5\] must lie in \[0, 3\]"):
        checks.run_checked(forward_and_commit, jnp.asarray([5]))
    assert checks.run_checked(forward_and_commit, jnp.asarray([2])).tolist() == [2]


@pytest.mark.parametrize("method, args", [("ar", {}), ("lookup", dict(tree="chain:3")),
                                          ("recycling", dict(tree="branching:2,1"))])
def test_checked_decoding_gives_the_same_tokens(make_model, method, args):
    model, params = make_model("ALM", seed=2, max_len=64, mamba={"ffn": True})
    prompts = [[5, 6, 5, 6, 5], [7, 8]]
    plain = api.generate(model, params, prompts, method=method, max_new_tokens=8, **args)
    checked = api.generate(model, params, prompts, method=method, max_new_tokens=8, check_invariants=True, **args)
    assert checked.tokens == plain.tokens
