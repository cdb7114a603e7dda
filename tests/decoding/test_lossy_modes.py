"""Lossy decoding modes: a method with lossless = False decodes with a changed model (`Method.decoder`), gives
exactly that model's output, and is refused when lossless decoding is required."""

import numpy as np
import pytest

from jaxspec.decoding import api, methods
from jaxspec.decoding.methods.skiplayers import evenly_skipped_layers
from jaxspec.errors import InputError
from jaxspec.models.lm import WithOptions


def greedy_reference(full_logits, model, params, prompt, max_new, **options):
    """Greedy decoding by repeated full forwards (no cache) with the apply options of the decoding model."""
    seq = list(prompt)
    for _ in range(max_new):
        seq.append(int(np.argmax(full_logits(model, params, [seq], **options)[0][-1])))
    return seq[len(prompt):]


def test_evenly_skipped_layers_keep_the_first_and_last_and_the_asked_share():
    assert evenly_skipped_layers(6, 2.0) == (1, 3, 4)  # ceil(6/2) = 3 run: 0, 2 (2.5 rounds to even), 5
    skip = evenly_skipped_layers(30, 1.5)
    assert len(skip) == 10 and 0 not in skip and 29 not in skip
    assert np.all(np.diff(sorted(set(range(30)) - set(skip))) <= 2)  # spread: no two skipped layers adjacent
    assert evenly_skipped_layers(4, 1.0) == () and evenly_skipped_layers(4, 100.0) == (1, 2)


def test_skiplayers_decodes_exactly_the_skipping_model(make_model, full_logits):
    model, params = make_model("A", seed=3, max_len=64, n_layers=4)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    out = api.generate(model, params, prompts, method="skiplayers", skip_layers=(1, 2), max_new_tokens=8)
    ar = api.generate(model, params, prompts, max_new_tokens=8)
    for prompt, got in zip(prompts, out.tokens, strict=True):
        assert got == greedy_reference(full_logits, model, params, prompt, 8, skip_layers=(1, 2))
    assert out.tokens != ar.tokens  # the negative control: skipping half the layers changes this model's output
    by_speedup = api.generate(model, params, prompts, method="skiplayers", target_speedup=2.0, max_new_tokens=8)
    assert by_speedup.tokens == out.tokens  # ceil(4 / 2) = 2 layers run: 0 and 3


def test_lossless_decoding_can_be_required(make_model):
    model, params = make_model("A", seed=3, max_len=64, n_layers=4)
    with pytest.raises(InputError, match="method 'skiplayers' is lossy"):
        api.generate(model, params, [[1, 2]], method="skiplayers", require_lossless=True)
    with pytest.raises(InputError, match="rule='typical' is lossy"):
        api.generate(model, params, [[1, 2]], method="lookup", rule="typical", temperature=1.0,
                     require_lossless=True)
    kept = api.generate(model, params, [[1, 2]], method="lookup", max_new_tokens=4, require_lossless=True)
    assert kept.tokens == api.generate(model, params, [[1, 2]], max_new_tokens=4).tokens
    lossy = [name for name in methods.names() if not methods.make(name).lossless]
    assert "skiplayers" in lossy and "ar" not in lossy


def test_options_fixed_by_the_decoding_model_cannot_be_passed_again(make_model):
    model, params = make_model("A", seed=3, max_len=64, n_layers=4)
    skipping = WithOptions.of(model, skip_layers=(1,))
    assert skipping == WithOptions.of(model, skip_layers=(1,)) and hash(skipping) == hash(WithOptions.of(
        model, skip_layers=(1,)))  # a static argument of the compiled loops
    with pytest.raises(InputError, match="skip_layers.*fixed by this model's options"):
        skipping.apply({"params": params}, np.zeros((1, 4), np.int32), skip_layers=(2,))


def test_a_comparison_reports_how_much_of_ar_a_lossy_mode_keeps(make_model):
    from jaxspec.eval.compare import compare_methods, markdown_table
    from jaxspec.eval.quality import agreement_with

    model, params = make_model("A", seed=3, max_len=64, n_layers=4)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    results = compare_methods(model, params, prompts, {"skip": methods.make("skiplayers", skip_layers=(1, 2))},
                              max_new_tokens=8)
    ar = api.generate(model, params, prompts, max_new_tokens=8).tokens
    lossy = api.generate(model, params, prompts, method="skiplayers", skip_layers=(1, 2), max_new_tokens=8).tokens
    by_name = {r.name: r for r in results}
    assert by_name["ar"].agreement == 1.0 and by_name["ar"].identical
    assert not by_name["skip"].lossless and not by_name["skip"].identical
    assert by_name["skip"].agreement == pytest.approx(np.mean([agreement_with(t, r) for t, r in zip(lossy, ar)]))
    assert markdown_table(results).splitlines()[0].endswith("| lossless | agreement |")
