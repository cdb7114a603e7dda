"""Shared helpers for the model tests: tiny configs, cached models, a jitted apply and full-forward references.

Helpers are handed to tests as fixtures (test files do not import this module: several directories hold a
`conftest.py`, so the module name is not unique). Everything that runs a model goes through one jitted
`apply`, so each (model, shape, mode) compiles once per session; eager Flax apply is far too slow here.

jax is imported inside the helpers, not here: this conftest also loads for tests/parallel/multidevice, whose
own conftest must set the device count before anything imports jax.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

# The suite compiles hundreds of tiny programs, whose compilation costs more than their runs. LLVM's optimisation of
# the generated code is about a fifth of a decoding test's time; XLA:CPU's fusion emitters and its concurrency-
# optimised scheduler take another third of a decode loop's backend compile (1.8 -> 0.8 s for a tree loop of a
# 2-layer model). Set before any backend starts; appended, so flags the caller set (a device count) stay.
# Subprocesses inherit them.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                 "--xla_cpu_use_fusion_emitters=false",
                                                 "--xla_cpu_enable_concurrency_optimized_scheduler=false"]))

import ml_collections
import numpy as np
import pytest

from jaxspec import config as config_lib

# Many test modules compile the same programs (the same tiny models, loops and shapes), and each module drops its
# compiled programs when it ends (release_compiled_programs). One persistent compilation cache for the whole run,
# shared by the xdist workers and the subprocesses they start, turns those repeats into loads from disk (a small
# gain: 4% on five decoding test files, as most programs differ between modules). The first process to load this
# file (the controller) creates it and removes it at exit. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _run_cache = tempfile.mkdtemp(prefix="jaxspec-test-xla-")
    atexit.register(shutil.rmtree, _run_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_run_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# One entry per mixer kind and one hybrid: name -> (layer_pattern, overrides).
MIXER_CASES = {
    "attention": ("A", {}),
    "linear_decay": ("L", {}),
    "linear_nodecay": ("L", {"linear_attention": {"decay": "none"}}),
    "mamba": ("M", {}),
    # Mamba with its own FFN here, so the hybrid also covers that branch.
    "hybrid": ("ALM", {"mamba": {"ffn": True}}),
    # Gemma 3 style: sliding windows shorter than the test sequences around a global layer, local RoPE base.
    "gemma": ("A", {"n_layers": 3, "layer_windows": (4, 0, 3), "rope_local_theta": 100.0, "qk_norm": True,
                    "sandwich_norms": True, "embed_scale": True, "ffn_activation": "gelu_tanh", "query_scale": 0.3}),
}


def tiny_model_config(pattern: str = "A", **overrides) -> ml_collections.ConfigDict:
    """A model config small enough to compile in seconds: d_model 32, 2 layers (one per letter for
    longer patterns), vocab 64. `overrides` set top-level keys; a dict value updates a sub-section."""
    cfg = config_lib.model_defaults()
    cfg.update(dict(vocab_size=64, d_model=32, n_layers=max(2, len(pattern)), n_heads=4, n_kv_heads=2, d_ff=64,
                    layer_pattern=pattern, max_len=32))
    cfg.linear_attention.chunk_size = 5  # shorter than the test sequences, and divides none of their lengths
    cfg.mamba.update(dict(d_state=4, d_conv=4, expand=2))
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def random_params(model, seed: int = 0):
    """Random weights in the shapes `init_params` gives (traced, never compiled): kernels ~ N(0, 1/fan_in),
    vectors (norm scales, biases, D) ~ 1 + N(0, 0.1^2).

    Exactness holds for any weights, and weights away from the initialiser's ones and zeros exercise more
    (norm scales, biases, skip terms); it also spares compiling an initialiser for every test model.
    """
    import jax
    import jax.numpy as jnp

    from jaxspec.models.lm import init_params

    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]), leaf.dtype)

    return jax.tree.map(draw, shapes)


@functools.cache
def _model_and_params(frozen_cfg: ml_collections.FrozenConfigDict, seed: int):
    from jaxspec.models.lm import build_model

    model = build_model(ml_collections.ConfigDict(frozen_cfg))
    return model, random_params(model, seed)


def tiny_model(pattern: str = "A", seed: int = 0, **overrides):
    """(model, params) for `tiny_model_config(pattern, **overrides)`, built once per session."""
    cfg = tiny_model_config(pattern, **overrides)
    return _model_and_params(ml_collections.FrozenConfigDict(cfg), seed)


def _apply(model, params, *args, method=None, **kwargs):
    return model.apply({"params": params}, *args, method=method, **kwargs)


@functools.cache
def _jitted_apply():
    import jax

    return jax.jit(_apply, static_argnums=0, static_argnames=("granularity", "skip_layers", "skip_ffn",
                                                              "return_hidden", "method"))


def jit_apply(model, params, *args, **kwargs):
    """`model.apply({"params": params}, *args, **kwargs)` under jit (static model and static options)."""
    return _jitted_apply()(model, params, *args, **kwargs)


# Every full-forward reference runs at this one shape (rows, length), so it compiles once per model.
REFERENCE_SHAPE = (32, 24)


def full_forward_logits(model, params, sequences, **kwargs) -> list[np.ndarray]:
    """Full causal forward of each 1-D token sequence: its logits [len, V] at every position.

    The sequences go in one batch, right-padded to REFERENCE_SHAPE: padding cannot reach an earlier
    position of a causal model (test_lm checks that property).
    """
    rows, length = REFERENCE_SHAPE
    if len(sequences) > rows or max(len(s) for s in sequences) > length:
        raise ValueError(f"references hold at most {rows} sequences of {length} tokens")
    batch = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(sequences):
        batch[i, :len(seq)] = seq
    logits = np.asarray(jit_apply(model, params, batch, **kwargs))
    return [logits[i, :len(seq)] for i, seq in enumerate(sequences)]


def last_logits(model, params, sequences, **kwargs) -> np.ndarray:
    """[N, V]: the full-forward logits of each sequence at its last position."""
    return np.stack([x[-1] for x in full_forward_logits(model, params, sequences, **kwargs)])


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module, drop every compiled program: each keeps memory mappings alive, and a whole suite's
    worth in one process passes the kernel's limit (vm.max_map_count, 65530), where XLA:CPU crashes."""
    yield
    import jax

    from jaxspec.decoding import engine

    engine.clear_compiled()
    jax.clear_caches()


def chat_byte_tokenizer():
    """The byte tokenizer with a chat template, and a stop set wide enough that some replies of a random model
    stop early (instruction data for tiny models: self-distillation sets, suite prompts)."""
    from jaxspec.training import chat
    from jaxspec.training.tokenizer import ByteTokenizer

    class ChatBytes(ByteTokenizer):
        chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
        eos_ids = (*range(97, 110), 257)

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return chat.render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt)

        def encode_chat(self, messages, add_generation_prompt=True):
            return self.encode_prompt(self.apply_chat_template(messages, add_generation_prompt))

    return ChatBytes()


def autoregressive_and(model, params, prompts, max_new: int, method: str, **fields):
    """(autoregressive result, `method`'s result) of the same greedy request."""
    from jaxspec.decoding import api

    ar = api.generate(model, params, prompts, max_new_tokens=max_new)
    return ar, api.generate(model, params, prompts, max_new_tokens=max_new, method=method, **fields)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_environment(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a test's Python subprocess: this one's, on the CPU backend, with the repository first on
    PYTHONPATH and `devices` simulated CPU devices (None: one). Every other XLA flag stays (the cheap-compile ones
    above), so both sides of a comparison compile alike. `extra` goes on top."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])), **extra)
    return env


@pytest.fixture(scope="session")
def subprocess_env():
    return subprocess_environment


@pytest.fixture(scope="session")
def ar_and_method():
    return autoregressive_and


@pytest.fixture(scope="session")
def chat_tokenizer():
    return chat_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_model_config


@pytest.fixture(scope="session")
def make_model():
    return tiny_model


@pytest.fixture(scope="session")
def apply():
    return jit_apply


@pytest.fixture(scope="session")
def full_logits():
    return full_forward_logits


@pytest.fixture(scope="session")
def final_logits():
    return last_logits


def draft_paths(tokens, parents) -> list[tuple[int, ...]]:
    """Each draft node's token path below the root (node 0), in node order, from one row's tokens and parents."""
    paths = []
    for i in range(1, len(tokens)):
        path, node = [], i
        while node > 0:
            path.append(int(tokens[node]))
            node = int(parents[node])
        paths.append(tuple(path[::-1]))
    return paths


@pytest.fixture(scope="session")
def tree_paths():
    return draft_paths


@pytest.fixture(scope="session", params=list(MIXER_CASES))
def mixer_model(request):
    """(model, params) of each mixer kind and the hybrid; tests taking it run once per case."""
    pattern, overrides = MIXER_CASES[request.param]
    return tiny_model(pattern, **overrides)
