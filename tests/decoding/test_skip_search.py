"""Choosing a layer-skip self-draft's skip set by measurement: the traced layer gate equals static skipping, and
the greedy search picks what a brute-force search over static skip sets picks."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import skip_search
from jaxspec.decoding.sampling import warp_logits

SEQUENCES = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]
STARTS = [6, 4]


@pytest.fixture(scope="module")
def model_and_params(make_model):
    return make_model("AALA", seed=3, max_len=32)  # attention, linear attention: every mixer kind gates alike


def _static_acceptance(model, params, skip, temperature):
    """The scorer's quantity from static `skip_layers` forwards, sequence by sequence, in numpy."""
    hits, count = 0.0, 0
    for seq, start in zip(SEQUENCES, STARTS):
        tokens = jnp.asarray([seq])
        target = np.asarray(model.apply({"params": params}, tokens))[0, start - 1:-1]
        draft = np.asarray(model.apply({"params": params}, tokens, skip_layers=skip))[0, start - 1:-1]
        if temperature == 0:
            hits += np.sum(target.argmax(-1) == draft.argmax(-1))
        else:
            p, q = np.asarray(warp_logits(target, temperature)), np.asarray(warp_logits(draft, temperature))
            hits += np.minimum(p, q).sum()
        count += len(target)
    return hits / count


def test_layer_gate_is_static_skipping(model_and_params):
    model, params = model_and_params
    tokens = jnp.asarray([SEQUENCES[0]])
    for skip in [(), (1,), (0, 2), (1, 2, 3)]:
        gate = np.ones(4, bool)
        gate[list(skip)] = False
        np.testing.assert_allclose(model.apply({"params": params}, tokens, layer_gate=jnp.asarray(gate)),
                                   model.apply({"params": params}, tokens, skip_layers=skip), atol=1e-5)
    with pytest.raises(ValueError, match=r"layer_gate needs shape \(4,\)"):
        model.apply({"params": params}, tokens, layer_gate=jnp.ones(3, bool))
    # Tree forwards take the gate too: tests/decoding/test_gated_draft.py checks them against gated full forwards.


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scorer_and_greedy_path_match_static_brute_force(model_and_params, temperature):
    model, params = model_and_params
    score = skip_search.acceptance_scorer(model, params, SEQUENCES, STARTS, temperature)
    assert score(np.ones(4, bool)) == pytest.approx(1.0)  # the whole model drafts for itself
    for skip in [(1,), (0, 2)]:
        gate = np.ones(4, bool)
        gate[list(skip)] = False
        assert score(gate) == pytest.approx(_static_acceptance(model, params, skip, temperature), abs=1e-5)

    path = skip_search.search_skip_layers(model, params, SEQUENCES, STARTS, 2, temperature=temperature,
                                          candidates=range(4), depth=2, verify_cost=1.5)
    assert [len(s.skip_layers) for s in path] == [1, 2]
    singles = {(i,): _static_acceptance(model, params, (i,), temperature) for i in range(4)}
    assert path[0].acceptance == pytest.approx(max(singles.values()), abs=1e-5)
    assert path[0].skip_layers in [s for s, a in singles.items() if a >= max(singles.values()) - 1e-6]
    first = path[0].skip_layers[0]
    pairs = {tuple(sorted((first, j))): _static_acceptance(model, params, tuple(sorted((first, j))), temperature)
             for j in range(4) if j != first}
    assert path[1].acceptance == pytest.approx(max(pairs.values()), abs=1e-5)
    assert set(path[0].skip_layers) < set(path[1].skip_layers)
    assert path[1].predicted_speedup == pytest.approx(
        skip_search.predicted_speedup(path[1].acceptance, 2, 4, 2, 1.5))


def test_predicted_speedup_and_bad_inputs(model_and_params):
    # a = 0: one token per round of depth draft steps and a verification; a = 1: depth + 1 tokens.
    assert skip_search.predicted_speedup(0.0, 2, 4, depth=3, verify_cost=1.0) == pytest.approx(1 / 2.5)
    assert skip_search.predicted_speedup(1.0, 2, 4, depth=3, verify_cost=1.0) == pytest.approx(4 / 2.5)
    a = 0.6
    assert skip_search.predicted_speedup(a, 1, 10, 2, 1.2) == pytest.approx((1 + a + a * a) / (2 * 0.9 + 1.2))
    model, params = model_and_params
    with pytest.raises(ValueError, match="reply start 14 must lie in"):
        skip_search.acceptance_scorer(model, params, SEQUENCES[:1], [14])
    with pytest.raises(ValueError, match="num_skip=4 must be in"):
        skip_search.search_skip_layers(model, params, SEQUENCES, STARTS, 4)  # the last layer is not a candidate
    with pytest.raises(ValueError, match="candidates"):
        skip_search.search_skip_layers(model, params, SEQUENCES, STARTS, 1, candidates=[5])

