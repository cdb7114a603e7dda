"""Hidden states recorded by the autoregressive loop (`record_features`): the same tokens as without recording,
and at every prompt and output position, the last output token's included, the states a full forward gives."""

import numpy as np
import pytest

from jaxspec.decoding import api
from jaxspec.errors import InputError

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 9, 9, 5]]


def full_forward_states(apply, model, params, sequences, layers):
    """(final hidden, residual streams after `layers`) of each sequence from one full forward."""
    width = max(map(len, sequences))
    batch = np.zeros((len(sequences), width), np.int32)
    for i, seq in enumerate(sequences):
        batch[i, :len(seq)] = seq
    out = apply(model, params, batch, return_hidden=True)
    return np.asarray(out.hidden), np.stack([np.asarray(out.layer_hidden[i]) for i in layers], axis=2)


# Stop ids that these random models emit in some rows and not others.
@pytest.mark.parametrize("pattern, overrides, options, eos", [
    ("A", {}, {}, (13,)),
    ("A", {}, {"prefill_chunk": 4}, (13,)),
    ("LM", {}, {}, (57,)),  # linear attention and Mamba: recurrent states
    ("AA", {"scan_layers": True}, {}, (13,)),
], ids=["attention", "chunked-prefill", "linear-mamba", "scanned"])
def test_recorded_states_are_the_full_forward_states(make_model, apply, pattern, overrides, options, eos):
    model, params = make_model(pattern, **overrides)
    plain = api.generate(model, params, PROMPTS, max_new_tokens=9, eos_ids=eos, **options)
    layers = (1, 0)
    recorded = api.generate(model, params, PROMPTS, max_new_tokens=9, eos_ids=eos, record_features=layers,
                            **options)
    assert recorded.tokens == plain.tokens
    assert plain.features is None
    lengths = {len(t) for t in plain.tokens}
    assert len(lengths) > 1 and 9 in lengths  # rows stop at a stop id and at max_new_tokens, at different steps
    sequences = [p + t for p, t in zip(PROMPTS, recorded.tokens)]
    final, layered = full_forward_states(apply, model, params, sequences, layers)
    assert recorded.features.final.dtype == recorded.features.layers.dtype == np.float16
    for i, seq in enumerate(sequences):
        n = len(seq)  # through the last output token, which only the loop's one extra forward computes
        np.testing.assert_allclose(recorded.features.final[i, :n], final[i, :n], rtol=3e-3, atol=3e-3)
        np.testing.assert_allclose(recorded.features.layers[i, :n], layered[i, :n], rtol=3e-3, atol=3e-3)


def test_recording_no_layers_gives_the_final_states_only(make_model):
    model, params = make_model("A")
    result = api.generate(model, params, PROMPTS[:1], max_new_tokens=1, record_features=())
    assert result.features.layers is None
    assert result.features.final.shape[0] == 1 and result.features.final.shape[2] == model.model_cfg.d_model


@pytest.mark.parametrize("arguments, message", [
    (dict(method="lookup", record_features=()), r"record_features is for autoregressive decoding \(method='ar'\), "
                                                r"not method='lookup'"),
    (dict(record_features=(0, 2)), r"record_features=\(0, 2\) must be distinct layer indices in 0..1"),
    (dict(record_features=(0, 0)), r"must be distinct layer indices"),
    (dict(record_features="0"), r"record_features='0' must be a sequence of layer indices"),
])
def test_bad_record_features_are_named(make_model, arguments, message):
    model, params = make_model("A")
    with pytest.raises(InputError, match=message):
        api.generate(model, params, PROMPTS[:1], max_new_tokens=2, **arguments)
