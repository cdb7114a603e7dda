"""Long runs: 2,048 new tokens per row at batch 8 on a tiny random model.

Autoregressive and prompt-lookup decoding agree token for token over the whole run; every logit the run
produced is finite (checked by one full forward over the final sequences, which also has to pick each greedy
token wherever its top two logits are apart); the run's counts are consistent; and the compiled loop's memory
does not grow with the number of steps: 2,048 new tokens need no more scratch memory than 512 beyond the
token buffers themselves (a loop that kept anything per step - logits, states - would need megabytes more).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxspec.decoding import api, engine, methods
from jaxspec.decoding.method import Target

NEW = 2048
SHORT = 512
BATCH = 8
VOCAB = 64
MAX_LEN = 2176  # the bucketed decode-state length of a 64-wide prompt + 2,048 new tokens + a 5-node tree
TREE = "chain:4"


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=5 + 5 * i).tolist() for i in range(BATCH)]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model("A", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def runs(model):
    lm, params = model
    return {method: api.generate(lm, params, prompts(), method=method, max_new_tokens=NEW,
                                 **({"tree": TREE} if method == "lookup" else {}))
            for method in ("ar", "lookup")}


@pytest.mark.slow
def test_lookup_equals_autoregressive_over_2048_tokens(runs):
    ar, lookup = runs["ar"], runs["lookup"]
    assert ar.max_len == lookup.max_len == MAX_LEN
    assert [len(t) for t in ar.tokens] == [NEW] * BATCH
    assert lookup.tokens == ar.tokens
    for result in (ar, lookup):
        tokens = np.asarray(result.tokens)
        assert tokens.min() >= 0 and tokens.max() < VOCAB
        assert np.all(result.target_steps > 0) and np.all(result.accepted >= result.target_steps)
        assert np.all(np.isfinite(result.mean_accepted)) and np.isfinite(result.tokens_per_s)
        assert np.isfinite(result.wall_time_s) and result.wall_time_s > 0
    assert np.array_equal(ar.target_steps, np.full(BATCH, NEW - 1))  # the first token comes from the prefill
    assert np.all(lookup.target_steps < ar.target_steps)  # drafts were accepted: the loops really differ


@pytest.mark.slow
def test_every_logit_of_the_run_is_finite_and_picks_the_greedy_token(model, runs, apply):
    """One full forward over the final sequences of the shortest and the longest prompt (a forward over all eight
    costs four times as much and checks the same positions 1..2,088)."""
    lm, params = model
    checked = (0, BATCH - 1)
    rows = [prompts()[i] + runs["ar"].tokens[i] for i in checked]
    batch = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for j, row in enumerate(rows):
        batch[j, :len(row)] = row
    logits = np.asarray(apply(lm, params, batch))
    for j, i in enumerate(checked):
        prompt, generated = prompts()[i], np.asarray(runs["ar"].tokens[i])
        # The logits at every position that chose a generated token: the last prompt token's, then each one's.
        at = logits[j, len(prompt) - 1:len(prompt) - 1 + NEW]
        assert np.all(np.isfinite(at))
        top2 = np.sort(at, axis=-1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > 1e-3  # a near-tie may fall either way between cached and full forward
        assert decided.mean() > 0.9
        np.testing.assert_array_equal(at.argmax(-1)[decided], generated[decided])


def compiled_temp_bytes(lm, params, method: str, max_new: int) -> int:
    """Scratch memory of the compiled decode loop for `max_new` new tokens, the decode state MAX_LEN long."""
    tokens, lens = engine.pad_prompts(prompts(), width=64)
    dynamic = dict(params=params, prompts=tokens, prompt_lens=lens, key=jax.random.key(0))
    statics = dict(model=lm, max_new=max_new, max_len=MAX_LEN, sampling=engine.Sampling())
    if method == "ar":
        loop = engine.autoregressive_loop
    else:
        drafter, draft_params = methods.make(method, tree=TREE).build(Target(lm, params))
        loop = engine.speculative_loop
        dynamic["draft_params"] = draft_params
        statics["drafter"] = drafter
    stats = loop.lower(**dynamic, **statics).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ar", "lookup"])
def test_loop_memory_does_not_grow_with_the_number_of_steps(model, method):
    lm, params = model
    short, long = (compiled_temp_bytes(lm, params, method, n) for n in (SHORT, NEW))
    token_buffer = BATCH * (NEW - SHORT) * np.dtype(np.int32).itemsize  # one [B, max_new] int32 more
    per_step_logits = BATCH * (NEW - SHORT) * VOCAB * np.dtype(np.float32).itemsize
    assert long - short <= 4 * token_buffer, (short, long)  # the emitted-token buffers, a few copies at most
    assert long - short < per_step_logits / 8
