"""The method registry: one typed spec per method, validated fields, one default tree, clear errors, and a new
method is one registered class."""

import dataclasses

import jax.numpy as jnp
import pytest

from jaxspec.config import ConfigError
from jaxspec.decoding import api, methods
from jaxspec.decoding.drafters import Proposal
from jaxspec.decoding.method import GENERATE_ARGUMENTS, Speculative, Target


def test_every_method_is_registered_with_a_default_tree():
    assert set(methods.names()) >= {"ar", "draft", "medusa", "matformer", "layerskip", "lookup"}
    for name in methods.names():
        spec = methods.make(name)
        assert spec.name == name and isinstance(spec.lossless, bool)
        if isinstance(spec, Speculative):
            assert spec.tree_spec == spec.default_tree and spec.num_nodes >= 2


@pytest.mark.parametrize("name, fields, message", [
    ("lookup", dict(granularity=0), "method 'lookup' takes no argument 'granularity'; it takes: tree"),
    ("ar", dict(tree="chain:2"), "method 'ar' takes no argument 'tree'; it takes: no arguments"),
    ("lookup", dict(tree="branching:2,2"), "tree='branching:2,2' is not allowed: a chain"),
    ("lookup", dict(min_ngram=3, max_ngram=2), "max_ngram=2 is not allowed: an integer >= min_ngram=3"),
    ("layerskip", dict(skip_layers=(-1,)), "skip_layers=(-1,) is not allowed"),
    ("matformer", dict(granularity="big"), "granularity='big' is not allowed"),
    ("draft", dict(tree="chain:x"), "method 'draft': "),
    ("draft", dict(adaptive=-1), "adaptive=-1 is not allowed"),
    ("draft", dict(draft_model=object()), "are Python objects"),
    ("beam", {}, "unknown decoding method 'beam'"),
])
def test_bad_fields_name_the_method_and_the_field(name, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        methods.make(name, **fields)


def test_a_spec_and_its_name_give_the_same_output(make_model):
    model, params = make_model("A", seed=5, max_len=64)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [5, 6, 7]]
    by_name = api.generate(model, params, prompts, method="lookup", tree="chain:3", max_new_tokens=8)
    by_spec = api.generate(model, params, prompts, method=methods.make("lookup", tree="chain:3"), max_new_tokens=8)
    assert by_name.tokens == by_spec.tokens and by_name.method == by_spec.method == "lookup"
    with pytest.raises(ValueError, match="set \\['tree'\\] on the spec"):
        api.generate(model, params, prompts, method=methods.make("lookup"), tree="chain:3")
    with pytest.raises(ValueError, match="takes no argument 'heads'"):
        api.generate(model, params, prompts, method="lookup", heads=None)


def test_layerskip_without_a_skip_set_uses_the_documented_default(make_model):
    from jaxspec.decoding.methods.layerskip import default_skip_layers

    assert default_skip_layers(30) == tuple(range(10, 29, 2))
    model, params = make_model("A", seed=5, max_len=64, n_layers=6)
    drafter, _ = methods.make("layerskip").build(Target(model, params))
    assert drafter.skip_layers == default_skip_layers(6) == (2, 4)


@dataclasses.dataclass(frozen=True)
class RepeatRootDrafter:
    """Drafts the root token again at every depth (a new method in a few lines)."""

    tree: object

    def init(self, params, prompts, prompt_lens, max_len, first_token):
        return ()

    def propose(self, params, dstate, ctx):
        tokens = jnp.repeat(ctx.root[:, None], self.tree.num_nodes, axis=1).astype(jnp.int32)
        return Proposal(tokens, None, None, dstate)

    def update(self, dstate, emitted, num_emitted):
        return dstate


def test_a_new_method_is_one_registered_class(make_model):
    @methods.register
    @dataclasses.dataclass(frozen=True)
    class RepeatRoot(Speculative):
        name = "repeat_root_test"
        default_tree = "chain:3"

        def build(self, target, **objects):
            return RepeatRootDrafter(self.token_tree()), ()

    model, params = make_model("A", seed=5, max_len=64)
    prompts = [[4, 4, 4, 4], [1, 2, 3]]
    ar = api.generate(model, params, prompts, max_new_tokens=10)
    out = api.generate(model, params, prompts, method="repeat_root_test", max_new_tokens=10)
    assert out.tokens == ar.tokens and "repeat_root_test" in methods.names()


def test_a_method_field_may_not_shadow_an_argument_of_generate():
    """generate takes its own keyword arguments first: a method field of the same name would never reach the
    method (its default would silently apply), so registering one is refused."""
    import inspect

    params = inspect.signature(api.generate).parameters
    own = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY or n == "method"}
    assert own == GENERATE_ARGUMENTS

    with pytest.raises(ValueError, match="'top_k' is an argument of api.generate itself"):
        @methods.register
        @dataclasses.dataclass(frozen=True)
        class Shadowing(Speculative):
            name = "shadowing_test"
            top_k: int = 0
    assert "shadowing_test" not in methods.names()
