"""Mixed batches (chunked prefill carried with other rows' decode steps) are exact: every request's tokens are
those of autoregressive decoding of its prompt alone, under every schedule, with staggered arrivals, more
requests than slots, stop ids and prompts longer than the chunk; the schedules feed what they promise."""

from __future__ import annotations

import numpy as np
import pytest

from jaxspec.decoding import api
from jaxspec.decoding.mixed_batch import MixedForward, Request, Schedule, plan_iteration, serve
from jaxspec.errors import InputError
from jaxspec.models.lm import reconfigured

MAX_LEN = 64
MAX_NEW = 10
PROMPTS = [[5, 9, 3, 7, 1], [4, 4, 8, 2, 6, 1, 6, 1, 6, 1, 6, 1, 9, 5, 2, 7, 3, 3, 8], [6, 1, 2],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
ARRIVALS = [0, 2, 2, 9, 30]  # two arrive together, and the last after every slot has gone idle
STOPS = (11, 23, 38, 40, 50)  # some replies of the seed-3 model stop early, others run to MAX_NEW


def requests(prompts=PROMPTS, arrivals=ARRIVALS):
    return [Request(tuple(p), arrival=a) for p, a in zip(prompts, arrivals, strict=True)]


def alone(model, params, prompts):
    """Each prompt decoded autoregressively on its own (one compiled shape for all)."""
    return [api.generate(model, params, [p], method="ar", max_new_tokens=MAX_NEW, eos_ids=STOPS,
                         prompt_width=32).tokens[0] for p in prompts]


@pytest.fixture(scope="module")
def attention_case(make_model):
    model, params = make_model("A", seed=3, max_len=MAX_LEN)
    return MixedForward(model, params, slots=2, max_len=MAX_LEN), alone(model, params, PROMPTS)


@pytest.mark.parametrize("schedule", [Schedule(1), Schedule(3), Schedule(8), Schedule.prefill_first(32)],
                         ids=lambda s: s.name)
def test_every_request_decodes_as_it_would_alone(attention_case, schedule):
    forward, expected = attention_case
    assert any(len(t) < MAX_NEW for t in expected) and any(len(t) == MAX_NEW for t in expected)
    out = serve(forward, requests(), schedule, max_new=MAX_NEW, eos_ids=STOPS)
    assert [r.tokens for r in out.requests] == expected
    assert {r.slot for r in out.requests} == {0, 1}  # five requests through two slots: slots reused
    for r in out.requests:
        assert len(r.token_s) == len(r.tokens) and np.all(np.diff(r.token_s) >= 0) and r.ttft_s >= 0
        assert r.token_iteration[0] >= r.arrival
    assert len(out.iteration_s) == len(out.iteration_width) == len(out.decode_tokens)
    assert sum(out.prefill_tokens) == sum(map(len, PROMPTS))
    assert max(out.iteration_width) <= schedule.chunk


def test_slot_reuse_empties_recurrent_states(make_model):
    """Linear attention and Mamba rows carry state besides their length: a request served in a reused slot
    decodes as one served on its own in a fresh batch (chunked prefill of every mixer against the one-shot one
    and against decoding: tests/decoding/test_chunked_prefill.py)."""
    model, params = make_model("ALM", seed=3, max_len=MAX_LEN)
    forward = MixedForward(model, params, slots=2, max_len=MAX_LEN)
    prompts = PROMPTS[:4]
    shared = serve(forward, requests(prompts, [0, 0, 1, 1]), Schedule(3), max_new=MAX_NEW)
    assert [r.slot for r in shared.requests] == [0, 1, 0, 1]
    fresh = [serve(forward, requests([p], [0]), Schedule(3), max_new=MAX_NEW).requests[0].tokens for p in prompts]
    assert [r.tokens for r in shared.requests] == fresh


def test_a_scanned_stack_serves_the_unrolled_tokens(make_model):
    """A scanned model's decode state holds its scanned layers stacked (jaxspec.state); a reused slot's recurrent
    states are renewed in the stacks as well."""
    model, params = make_model("ALM", seed=3, max_len=MAX_LEN, n_layers=6)
    served = requests(PROMPTS[:4], [0, 0, 1, 1])
    want = serve(MixedForward(model, params, slots=2, max_len=MAX_LEN), served, Schedule(3), max_new=MAX_NEW)
    scanned = MixedForward(reconfigured(model, scan_layers=True), params, slots=2, max_len=MAX_LEN)
    assert scanned.empty_state().stack_plan == (3, 2)
    got = serve(scanned, served, Schedule(3), max_new=MAX_NEW)
    assert [r.slot for r in got.requests] == [0, 1, 0, 1]
    assert [r.tokens for r in got.requests] == [r.tokens for r in want.requests]


def test_schedules_feed_what_they_promise(attention_case):
    """A 10-token prompt arrives at iteration 3 while a row decodes: in chunks of 3 it takes iterations 3-6 and
    the decoding row gets a token in each; prefilled first, it takes iteration 3 alone and the row waits."""
    forward, _ = attention_case
    reqs = [Request((5, 9, 3), arrival=0), Request(tuple(PROMPTS[3][:10]), arrival=3)]
    chunked = serve(forward, reqs, Schedule(3), max_new=8)
    assert chunked.requests[0].token_iteration == list(range(8))  # never stalled
    assert chunked.requests[1].token_iteration == list(range(6, 14))
    assert chunked.prefill_tokens[:7] == [3, 0, 0, 3, 3, 3, 1] and chunked.decode_tokens[:7] == [0] + [1] * 6
    first = serve(forward, reqs, Schedule.prefill_first(16), max_new=8)
    assert first.requests[0].token_iteration == [0, 1, 2, 4, 5, 6, 7, 8]  # waited at iteration 3
    assert first.requests[1].token_iteration == list(range(3, 11))
    assert first.prefill_tokens[3] == 10 and first.decode_tokens[3] == 0 and first.iteration_width[3] == 16
    assert [r.tokens for r in first.requests] == [r.tokens for r in chunked.requests]


def test_iteration_plan():
    wants = [(1, 2, 3, 4, 5, 6), (7,), (), (8, 9)]
    tokens, num_new = plan_iteration(wants, [True, False, False, True], Schedule(4))
    assert num_new.tolist() == [4, 1, 0, 2]
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [7, 0, 0, 0], [0, 0, 0, 0], [8, 9, 0, 0]])
    tokens, num_new = plan_iteration(wants, [True, False, False, True], Schedule.prefill_first(64))
    assert num_new.tolist() == [6, 0, 0, 2] and tokens.shape == (4, 16)  # width: a power of two >= 16
    tokens, num_new = plan_iteration([(), (7,), (3,)], [False, False, False], Schedule.prefill_first(64))
    assert num_new.tolist() == [0, 1, 1] and tokens.shape == (3, 1)  # decode only: one token wide


@pytest.mark.parametrize("call, message", [
    (lambda f: serve(f, requests(), Schedule(0), max_new=4), r"chunk=0 must be a positive"),
    (lambda f: serve(f, requests(), Schedule(-2), max_new=4), r"chunk=-2 must be a positive"),
    (lambda f: serve(f, requests(), Schedule(128), max_new=4), r"chunk=128 is wider than the decode state"),
    (lambda f: serve(f, [Request((1,) * 60)], Schedule(8), max_new=8),
     r"requests\[0\]: a prompt of 60 tokens \+ max_new=8 does not fit the decode state \(max_len=64\)"),
    (lambda f: serve(f, [Request((1, 2), arrival=-1)], Schedule(8), max_new=4), r"requests\[0\].arrival=-1"),
    (lambda f: serve(f, [Request((1, 99))], Schedule(8), max_new=4), r"prompts\[0\]\[1\] = 99 lies outside"),
    (lambda f: serve(f, [], Schedule(8), max_new=4), r"requests is empty"),
    (lambda f: serve(f, requests(), Schedule(8), max_new=0), r"max_new=0 must be a positive integer"),
    (lambda f: MixedForward(f.model, f.params, slots=0, max_len=64), r"slots=0 must be a positive integer"),
])
def test_bad_input_is_named(attention_case, call, message):
    with pytest.raises(InputError, match=message):
        call(attention_case[0])
