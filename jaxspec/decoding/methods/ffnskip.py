"""FFN-skip self-drafting (after FFN-SkipLLM): the target with the FFN sub-blocks of some layers left out drafts for
itself. Every mixer still runs, so the drafter's cache is complete; no extra weights. Lossless: the full target
verifies every draft.

Which FFNs: those that change the residual stream least. `ffn_similarity` is, per layer, the mean cosine
similarity of the FFN's input and output residual streams (x and x + ffn(norm(x))) over a calibration forward;
`most_similar_ffns` picks the `num_skip_ffn` most similar layers. `build` has the target but no tokenizer, so
its default calibration text is a fixed, seeded batch of token ids (`calibration_tokens`); the benchmark
(benchmarks/early_exit.py) also calibrates on real text and passes the set as `skip_ffn`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import config as config_lib
from jaxspec.decoding import methods
from jaxspec.decoding.method import ModelDrafting, Target, is_int
from jaxspec.errors import InputError
from jaxspec.models.lm import WithOptions


def calibration_tokens(model_cfg, rows: int = 4, length: int = 64, seed: int = 0) -> np.ndarray:
    """[rows, min(length, max_len)] token ids drawn uniformly from the model's vocabulary with a fixed seed: the
    default calibration text, the same for every call on one model config."""
    shape = (rows, min(length, model_cfg.max_len))
    return np.random.default_rng(seed).integers(0, model_cfg.vocab_size, shape, dtype=np.int32)


def ffn_similarity(inputs: Sequence[np.ndarray | None], outputs: Sequence[np.ndarray | None],
                   mask: np.ndarray | None = None) -> np.ndarray:
    """Per layer, the mean over the positions where `mask` [N, T] is True (default: all) of the cosine similarity
    of the FFN's input and output residual streams, each [N, T, d]; NaN for a layer without an FFN (None)."""
    out = np.full(len(inputs), np.nan)
    for i, (x, y) in enumerate(zip(inputs, outputs, strict=True)):
        if x is None:
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        cosine = np.sum(x * y, -1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-12)
        keep = np.ones(cosine.shape, bool) if mask is None else np.asarray(mask, bool)
        if keep.shape != cosine.shape:
            raise InputError(f"mask has shape {keep.shape}; the residual streams have positions {cosine.shape}")
        out[i] = cosine[keep].mean()
    return out


def most_similar_ffns(similarity: np.ndarray, count: int) -> tuple[int, ...]:
    """The `count` layers whose FFN changes the residual stream least (highest similarity), sorted."""
    has_ffn = np.flatnonzero(~np.isnan(similarity))
    if not 0 <= count <= len(has_ffn):
        raise InputError(f"num_skip_ffn={count} must lie in [0, {len(has_ffn)}] (the layers with an FFN)")
    ranked = has_ffn[np.argsort(-similarity[has_ffn], kind="stable")]
    return tuple(sorted(int(i) for i in ranked[:count]))


@functools.partial(jax.jit, static_argnums=0)
def _sown_forward(model, params, tokens):
    out, sown = model.apply({"params": params}, tokens, return_hidden=True, mutable=["intermediates"])
    return out.layer_hidden, sown["intermediates"]


def ffn_residual_streams(model, params, tokens) -> tuple[list, list]:
    """(inputs, outputs): per layer, the residual stream entering its FFN and leaving it, [N, T, d] each, from
    one full forward over `tokens` [N, T] (None for layers without an FFN)."""
    layer_hidden, sown = _sown_forward(model, params, jnp.asarray(tokens, jnp.int32))
    inputs = [sown.get(f"layer_{i}", {}).get("ffn_input", (None,))[0] for i in range(len(layer_hidden))]
    outputs = [None if x is None else y for x, y in zip(inputs, layer_hidden, strict=True)]
    return inputs, outputs


def calibrated_skip_ffn(model, params, count: int, tokens=None, mask=None) -> tuple[int, ...]:
    """The `count` most similar FFNs of `model` on `tokens` (default: `calibration_tokens`)."""
    tokens = calibration_tokens(model.model_cfg) if tokens is None else tokens
    return most_similar_ffns(ffn_similarity(*ffn_residual_streams(model, params, tokens), mask), count)


@methods.register
@dataclasses.dataclass(frozen=True)
class FFNSkip(ModelDrafting):
    """`skip_ffn`: the layers whose FFN the draft leaves out; () takes the `num_skip_ffn` (0: a fifth of the
    layers, at least one) most similar ones by `calibrated_skip_ffn` (one calibration forward per build)."""

    name = "ffnskip"
    default_tree = "chain:3"
    skip_ffn: tuple = ()
    num_skip_ffn: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "skip_ffn", tuple(self.skip_ffn))
        self.check(all(is_int(i) and i >= 0 for i in self.skip_ffn), "skip_ffn",
                   "layer indices (empty: the most similar num_skip_ffn layers)")
        self.check(is_int(self.num_skip_ffn) and self.num_skip_ffn >= 0, "num_skip_ffn",
                   "a non-negative integer (0: a fifth of the layers)")

    def build(self, target: Target, **objects):
        cfg = target.model.model_cfg
        skip = self.skip_ffn or calibrated_skip_ffn(target.model, target.params,
                                                    self.num_skip_ffn or max(1, cfg.n_layers // 5))
        skip = config_lib.validate_skip_ffn(cfg, skip)
        return self.model_drafter(WithOptions.of(target.model, skip_ffn=skip), target.params)
