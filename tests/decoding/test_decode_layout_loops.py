"""The decode loops and the decode layout: the loops convert standard parameters once (outside the while_loop)
and pass converted ones through; an int8 target decodes speculatively exactly as it decodes one token at a time;
and a decode step neither copies a KV cache nor a weight matrix."""

import re

import jax
import numpy as np
import pytest

from configs import lm
from jaxspec.decoding import api, engine
from jaxspec.decoding.method import Target
from jaxspec.models import layer_scan
from jaxspec.models.decode_layout import for_decoding
from jaxspec.models.lm import build_model, init_params, reconfigured
from jaxspec.ops import cached_attention

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4], [7, 8, 9], [4, 4, 4, 4, 4, 4]]


def tiny_cfg(weight_dtype="float32", d_model=48, n_layers=3, pattern="A"):
    cfg = lm.get_config("tiny").model
    cfg.update(dict(layer_pattern=pattern, n_layers=n_layers, d_model=d_model, d_ff=2 * d_model, n_heads=4,
                    n_kv_heads=2, vocab_size=48, max_len=96, weight_dtype=weight_dtype))
    return cfg


def target(weight_dtype="float32", pattern="A"):
    model = build_model(tiny_cfg(weight_dtype, pattern=pattern))
    return model, init_params(model, jax.random.key(0))


def test_loops_give_the_same_tokens_for_standard_and_converted_params():
    model, params = target()
    decode_model, decode_params = for_decoding(model, params)
    for method in ("ar", "lookup"):
        plain = api.generate(model, params, PROMPTS, method=method, max_new_tokens=10)
        converted = api.generate(decode_model, decode_params, PROMPTS, method=method, max_new_tokens=10)
        assert plain.tokens == converted.tokens, method


def test_generate_converts_standard_params_once_while_they_live(monkeypatch):
    model, params = target()
    conversions = []
    real = api._layout_converter

    def counting(m):
        convert, made = real(m)
        return (lambda p: conversions.append(m) or convert(p)), made

    monkeypatch.setattr(api, "_layout_converter", counting)
    monkeypatch.setattr(api, "_DECODE_FORMS", [])
    first = api.generate(model, params, PROMPTS, method="ar", max_new_tokens=6)
    again = api.generate(model, params, PROMPTS, method="lookup", max_new_tokens=6)
    assert len(conversions) == 1 and first.tokens == again.tokens
    kept_model, kept_params = api.decode_form(model, params)
    assert kept_model.layout == "decode" and len(conversions) == 1
    same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))  # noqa: E731
    assert same(kept_params, for_decoding(model, params)[1])
    # other params of the same shapes are converted for themselves, not served the kept ones
    other = init_params(model, jax.random.key(5))
    assert same(api.decode_form(model, other)[1], for_decoding(model, other)[1])
    assert len(conversions) == 2 and len(api._DECODE_FORMS) == 2
    del params, first, again  # a conversion whose source params are gone is dropped at the next call
    api.decode_form(model, other)
    assert len(api._DECODE_FORMS) == 1 and len(conversions) == 2


def test_a_scanned_models_decode_params_get_their_layer_stacks_once(monkeypatch):
    # Decode-layout params without the scanned layers' stacks would be stacked inside every call's program.
    model, params = target()
    decode_model, decode_params = for_decoding(model, params)
    scanned = reconfigured(decode_model, scan_layers=True)
    monkeypatch.setattr(api, "_DECODE_FORMS", [])
    kept_model, kept_params = api.decode_form(scanned, decode_params)
    assert layer_scan.STACKS in kept_params and kept_model == scanned
    assert api.decode_form(scanned, decode_params)[1] is kept_params
    assert api.decode_form(scanned, kept_params)[1] is kept_params  # already complete: passed through
    assert api.decode_form(decode_model, decode_params)[1] is decode_params  # an unrolled model needs no stacks


@pytest.mark.parametrize("pattern", ["AL"])  # attention and linear-attention layers in one stack
def test_int8_target_speculative_equals_its_autoregressive(pattern):
    model, params = target("int8", pattern)
    int8_model, int8_params = for_decoding(model, params)
    draft = build_model(tiny_cfg("int8", d_model=24, n_layers=1))
    draft_model, draft_params = for_decoding(draft, init_params(draft, jax.random.key(1)))
    ar = api.generate(int8_model, int8_params, PROMPTS, method="ar", max_new_tokens=14)
    runs = dict(layerskip=dict(method="layerskip", skip_layers=(1,), tree="chain:3"),
                lookup=dict(method="lookup", tree="chain:4"),
                draft=dict(method="draft", draft_model=draft_model, draft_params=draft_params, tree="branching:2,2"))
    for name, kwargs in runs.items():
        out = api.generate(int8_model, int8_params, PROMPTS, max_new_tokens=14, **kwargs)
        assert out.tokens == ar.tokens, name


def _while_bodies(hlo: str) -> list[list[str]]:
    """The instruction lines of every while loop body in an HLO module's text."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    bodies = re.findall(r"body=%([\w.\-]+)", hlo)
    return [computations[b] for b in bodies]


def _output_shape(line: str) -> str:
    """'f32[2,3]' of an HLO instruction line '%x = f32[2,3]{1,0} op(...)'."""
    return line.split("=", 1)[1].split()[0].split("{")[0]


def _elements(shape: str) -> int:
    """Elements of an array shape 'f32[2,3]'; 0 for anything else (tuples, tokens)."""
    match = re.fullmatch(r"\w+\[([\d,]*)\]", shape)
    if not match:
        return 0
    return int(np.prod([int(d) for d in match.group(1).split(",") if d]))


def _loop_bodies(model, params, loop: str, max_len: int, batch: int) -> list[list[str]]:
    """The while bodies of the compiled AR loop ("ar"), or of a speculative loop: a layer-skip self-draft
    ("speculative") or prompt lookup, which reads no weights ("lookup")."""
    prompts, lens = engine.pad_prompts(PROMPTS[:batch], width=16)
    statics = dict(model=model, max_new=8, max_len=max_len, sampling=engine.Sampling(), eos_ids=(), stream=False)
    dynamic = dict(params=params, prompts=prompts, prompt_lens=lens, key=jax.random.key(0))
    if loop == "ar":
        lowered = engine.autoregressive_loop.lower(**dynamic, **statics)
    else:
        kwargs = dict(tree="chain:3") if loop == "lookup" else dict(skip_layers=(1,), tree="chain:3")
        spec, objects = api.method_spec("lookup" if loop == "lookup" else "layerskip", kwargs)
        drafter, draft_params = spec.build(Target(model, params, None), **objects)
        lowered = engine.speculative_loop.lower(**dynamic, **statics, drafter=drafter, draft_params=draft_params,
                                                adaptive=engine.Adaptive())
    bodies = _while_bodies(lowered.compile().as_text())
    assert bodies
    return bodies


FREE_OPS = (" get-tuple-element(", " parameter(", " tuple(", " bitcast(", " constant(")


@pytest.mark.parametrize("loop", ["ar", "speculative"])
def test_a_decode_step_copies_no_cache_and_no_weights(loop):
    """In the compiled loop's while bodies no top-level instruction makes anything weight-shaped (a copied,
    transposed, converted or sliced weight matrix), no copy makes anything of a cache's size (the caches are
    updated in place), the only cache-sized transposes are an extend's keys, at most one per layer, and nothing
    calls out to the host."""
    model, params = target()
    # A cache length no other array has, and a head dim (12) no query-row count here equals; one batch row
    # (XLA then drops the batch dim from layouts, which is where cache copies used to appear).
    max_len, batch = 80, 1
    bodies = _loop_bodies(model, params, loop, max_len, batch)
    _, decode_params = for_decoding(model, params)
    matrices = [x.shape for x in jax.tree.leaves(decode_params) if x.ndim == 2]
    weights = {f"f32[{a},{b}]" for shape in matrices for a, b in (shape, shape[::-1])}
    cfg = model.model_cfg
    cache = f"f32[{batch},{cfg.n_kv_heads},{max_len},{cfg.d_model // cfg.n_heads}]"
    for body in bodies:
        made = [line for line in body if "=" in line and not any(op in line for op in FREE_OPS)]
        weight_sized = [line for line in made if _output_shape(line) in weights]
        assert not weight_sized, weight_sized[:3]
        cache_sized = [line for line in made if _elements(_output_shape(line)) == _elements(cache)]
        cache_copies = [line for line in cache_sized if "copy" in line.split("=")[0]
                        and "transpose" not in line.split("=")[0]]
        assert not cache_copies, cache_copies[:3]
        # The one allowed transpose: an extend's keys, once per attention layer, for its scores in XLA's ops
        # (pallas_kernels/tree_attention.py, cached_chain_attention); none where the CPU kernel attends.
        transposes = [line for line in cache_sized if "transpose" in line.split("=")[0]]
        assert all("_attend_extend" in line for line in transposes), transposes[:3]
        assert len(transposes) <= (0 if cached_attention.available() else cfg.n_layers), transposes[:3]
        assert not [line for line in made if "callback" in line or " outfeed(" in line]


@pytest.mark.parametrize("loop", ["ar", "lookup"])
def test_int8_weights_stay_int8_inside_the_loop(loop):
    """Dequantising loop-invariant int8 weights is itself loop-invariant, and XLA would hoist it out of the
    while_loop and stream float32 copies every step: no while body may hold a float32 array of an int8 matrix's
    shape (carried or made), and the bodies read the int8 matrices themselves. (Prompt lookup reads no weights
    of its own; a self-draft's drafter reads the standard-layout float params it was built with.)"""
    model, params = target("int8")
    _, decode_params = for_decoding(model, params)
    int8 = [x.shape for x in jax.tree.leaves(decode_params) if x.dtype == np.int8 and x.ndim == 2]
    assert int8
    dequantised = {f"f32[{a},{b}]" for shape in int8 for a, b in (shape, shape[::-1])}
    bodies = _loop_bodies(model, params, loop, 80, 1)
    lines = [line for body in bodies for line in body if " = " in line]
    assert not [line for line in lines if _output_shape(line) in dequantised], "float32 copies of int8 weights"
    assert {f"s8[{a},{b}]" for a, b in int8} <= {_output_shape(line) for line in lines}
