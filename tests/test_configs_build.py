"""Every config file builds a valid model that initialises and runs a jitted forward (and a decode step)."""

import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import config as config_lib
from jaxspec.models.lm import build_model, count_params, init_params
from jaxspec.state import init_decode_state


def load_config(name: str, arg: str | None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def config_modules() -> list[str]:
    import configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.ispkg)


def test_every_config_file_has_a_valid_model_section():
    """Every configs/*.py (found, not listed, so new files are covered) validates at its default arg: a model
    section that builds, or (a job over an existing model) its job's valid config: a self-distillation set, a
    Kangaroo adapter run, else a suite evaluation."""
    from jaxspec.eval import suite_eval
    from jaxspec.training import kangaroo, selfdistill

    jobs = {"selfdistill": selfdistill.validate_config, "kangaroo": kangaroo.validate_config}
    names = config_modules()
    assert {"lm", "matformer", "hybrid", "quickstart", "selfdistill"} <= set(names)
    for name in names:
        config = load_config(name, None)
        if "model" not in config:
            jobs.get(name, suite_eval.validate)(config)
            continue
        model = build_model(config.model)
        shapes = jax.eval_shape(lambda key, model=model: init_params(model, key), jax.random.key(0))
        assert count_params(shapes) > 0, name


@pytest.mark.parametrize("name, arg", [("lm", "tiny"), ("matformer", "tiny"), ("hybrid", "tiny")])
def test_config_builds_initialises_and_runs(name, arg):
    cfg = load_config(name, arg)
    cfg.model.max_len = 16  # the decode state below only needs a short cache
    model = build_model(cfg.model)
    # The smallest and the full granularity (one and the same for a plain config).
    granularities = tuple(sorted({0, len(cfg.model.matformer_fractions) - 1}))

    @jax.jit
    def run(key, tokens):
        params = init_params(model, key)
        logits = [model.apply({"params": params}, tokens, granularity=g) for g in granularities]
        state = init_decode_state(cfg.model, tokens.shape[0])
        step_logits, state = model.apply({"params": params}, tokens[:, :4], state=state)
        return params, logits, step_logits, state.lengths

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 8)))
    params, logits, step_logits, lengths = run(jax.random.key(cfg.seed), tokens)
    vocab = cfg.model.vocab_size
    assert all(x.shape == (2, 8, vocab) and np.isfinite(np.asarray(x)).all() for x in logits)
    # The full-granularity forward and the 4-token prefill agree on the shared prefix.
    np.testing.assert_allclose(step_logits, logits[-1][:, :4], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(lengths, [4, 4])
    assert count_params(params) > 0
    if len(logits) > 1:  # MatFormer granularities are different models
        assert np.abs(np.asarray(logits[0]) - np.asarray(logits[-1])).max() > 1e-3


@pytest.mark.parametrize("name, arg", [("lm", "small"), ("lm", "base"), ("matformer", "small"),
                                       ("hybrid", "size=small,pattern=ALM")])
def test_larger_configs_validate_and_have_parameter_shapes(name, arg):
    """The bigger sizes are checked without compute: validation plus traced parameter shapes."""
    cfg = load_config(name, arg)
    model = build_model(cfg.model)
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
    assert count_params(shapes) > 1_000_000
    assert config_lib.layer_kinds(cfg.model)[:3] == tuple((cfg.model.layer_pattern * 3)[:3])


def test_config_args_are_checked():
    with pytest.raises(ValueError, match=r"size='huge' is not one of \['base', 'small', 'tiny'\]"):
        load_config("lm", "huge")
    with pytest.raises(ValueError, match="config arg key 'layers' is unknown"):
        load_config("hybrid", "tiny,layers=3")
    with pytest.raises(ValueError, match=r"model\.layer_pattern='AQ'"):
        build_model(load_config("hybrid", "tiny,pattern=AQ").model)
    assert load_config("hybrid", "tiny,pattern=ML").model.layer_pattern == "ML"
