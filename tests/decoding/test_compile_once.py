"""Prompts of many lengths share one compiled loop per method (bucketed widths and lengths); compile time is
reported apart from decode time; streaming hands over exactly the tokens the loop emits."""

import contextlib

import jax
import pytest

from jaxspec.decoding import api, engine

LENGTHS = (3, 7, 11, 14, 16)  # five prompt lengths inside one width bucket


@contextlib.contextmanager
def count_backend_compiles():
    """Counts XLA backend compilations (jax's monitoring events) while the block runs."""
    events = []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("method, kwargs", [("ar", {}), ("lookup", dict(tree="chain:3")),
                                            ("layerskip", dict(skip_layers=(1,), tree="chain:2"))])
def test_five_prompt_lengths_compile_each_method_once(make_model, method, kwargs):
    model, params = make_model("A", seed=3, max_len=64)
    prompts = [[(5 * i + j) % 60 + 1 for j in range(n)] for i, n in enumerate(LENGTHS)]
    first = api.generate(model, params, prompts[:1], method=method, max_new_tokens=6, **kwargs)
    assert first.compilations == 1 and first.compile_s > 0
    with count_backend_compiles() as compiles:
        rest = [api.generate(model, params, [p], method=method, max_new_tokens=6, **kwargs) for p in prompts[1:]]
    assert compiles == [], f"{len(compiles)} compilations after the first prompt"
    assert [r.compilations for r in rest] == [0] * 4 and all(r.compile_s == 0 for r in rest)
    assert {r.prompt_width for r in [first, *rest]} == {16}
    # Padding to a bucket changes nothing: the same prompt at its exact width gives the same tokens.
    exact = api.generate(model, params, prompts[1:2], method=method, max_new_tokens=6, prompt_width=LENGTHS[1],
                         **kwargs)
    assert exact.tokens == rest[0].tokens


def test_buckets():
    assert [engine.bucket_width(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert [engine.bucket_len(n) for n in (1, 64, 65)] == [64, 64, 128]


def test_plan_falls_back_to_exact_sizes_near_the_context_limit(make_model):
    model, _ = make_model("A", seed=3, max_len=64)
    # 20 prompt tokens bucket to 32; 32 + 31 + 1 + 1 > 64, but the exact 20 + 31 + 2 fits.
    assert engine.plan_shapes(model.model_cfg, [20], 31, 1) == (20, 64)
    assert engine.plan_shapes(model.model_cfg, [20], 30, 1) == (32, 64)
    with pytest.raises(ValueError, match="max_len=64"):
        engine.plan_shapes(model.model_cfg, [40], 30, 1)
    with pytest.raises(ValueError, match="prompt_width=8 is shorter"):
        engine.plan_shapes(model.model_cfg, [10], 4, 1, prompt_width=8)


@pytest.mark.parametrize("method, kwargs", [("ar", {}), ("lookup", dict(tree="chain:3"))])
def test_streaming_delivers_the_emitted_tokens_in_order(make_model, method, kwargs):
    model, params = make_model("A", seed=3, max_len=64)
    prompts = [[1, 2, 3, 1, 2, 3, 1], [4, 5, 6]]
    plain = api.generate(model, params, prompts, method=method, max_new_tokens=9, eos_ids=None, **kwargs)
    rounds = []
    streamed = api.generate(model, params, prompts, method=method, max_new_tokens=9, on_tokens=rounds.append,
                            **kwargs)
    assert streamed.tokens == plain.tokens
    assert [sum((r[i] for r in rounds), []) for i in range(2)] == plain.tokens
    assert len(rounds) >= 2  # the first token, then one call per round


def test_several_stop_ids(make_model):
    model, params = make_model("A", seed=3, max_len=64)
    free = api.generate(model, params, [[1, 2, 3]], max_new_tokens=10).tokens[0]
    stop_a, stop_b = free[4], free[2]
    out = api.generate(model, params, [[1, 2, 3]], max_new_tokens=10, eos_ids=[stop_a, stop_b]).tokens[0]
    first_stop = min(free.index(stop_a), free.index(stop_b))
    assert out == free[:first_stop + 1]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        api.generate(model, params, [[1, 2, 3]], max_new_tokens=4, eos_ids=[10_000])
