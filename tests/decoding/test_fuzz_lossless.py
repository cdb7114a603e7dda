"""Property-based fuzzing of greedy losslessness: for random token trees, batch sizes, prompt lengths, EOS
tokens, max_new_tokens and mixers, every training-free method's greedy output equals autoregressive decoding's.

Settings: hypothesis draws `FUZZ_EXAMPLES` cases (default 8; set JAXSPEC_FUZZ_EXAMPLES for a longer run),
derandomized so that CI runs the same cases every time, with no deadline (a new shape compiles). Each case
draws: a method (prompt lookup, adaptive n-grams, token recycling, layer-skip self-drafting), a tree (a chain
of 1-4 nodes, or a branching tree of depth 1-3 and widths 1-3; lookup takes chains only), a mixer (attention or
the attention / linear attention / Mamba hybrid), a batch of 1-3 prompts of 1-9 tokens from a 6-token
alphabet (so n-gram drafts find matches and get accepted), max_new_tokens 4 or 9, and no EOS or an EOS token
drawn from that alphabet (a row stops after its first EOS, and so must the method's). The shapes are drawn
from small sets so that compilations are shared between cases.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxspec.decoding import api

FUZZ_EXAMPLES = int(os.environ.get("JAXSPEC_FUZZ_EXAMPLES", "8"))
ALPHABET = (3, 7, 11, 19, 23, 42)
MIXERS = {"attention": ("A", {}), "hybrid": ("ALM", {"mamba": {"ffn": True}})}


@st.composite
def trees(draw, chain_only: bool) -> str:
    if chain_only or draw(st.booleans()):
        return f"chain:{draw(st.integers(1, 4))}"
    widths = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return "branching:" + ",".join(map(str, widths))


@st.composite
def cases(draw) -> dict:
    method = draw(st.sampled_from(["lookup", "ngram", "recycling", "layerskip"]))
    args = dict(tree=draw(trees(chain_only=method == "lookup")))
    if method == "layerskip":
        args["skip_layers"] = (1,)
    batch = draw(st.sampled_from([1, 3]))
    prompts = [draw(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=9)) for _ in range(batch)]
    return dict(method=method, args=args, mixer=draw(st.sampled_from(sorted(MIXERS))), prompts=prompts,
                max_new_tokens=draw(st.sampled_from([4, 9])),
                eos_ids=draw(st.sampled_from([None, *ALPHABET[:3]])))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_every_method_equals_autoregressive_greedy(make_model, case):
    pattern, overrides = MIXERS[case["mixer"]]
    model, params = make_model(pattern, seed=3, max_len=64, **overrides)
    common = dict(max_new_tokens=case["max_new_tokens"], eos_ids=case["eos_ids"])
    ar = api.generate(model, params, case["prompts"], **common)
    out = api.generate(model, params, case["prompts"], method=case["method"], **common, **case["args"])
    assert out.tokens == ar.tokens, case
    assert np.all(out.target_steps <= ar.target_steps), case
    for row, eos in ((r, case["eos_ids"]) for r in ar.tokens):
        assert len(row) <= case["max_new_tokens"]
        if eos is not None and eos in row:
            assert row.index(eos) == len(row) - 1  # stopped right after its first EOS
