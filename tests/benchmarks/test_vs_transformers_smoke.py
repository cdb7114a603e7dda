"""Tiny runs of benchmarks/vs_transformers.py: both libraries give the same greedy tokens for every pair, and
the report holds every row. Random mode runs a tiny random Llama; real-model mode runs a tiny random Llama
written to a GGUF file (with a byte-level BPE tokenizer and a chat template), loaded by each library as it loads
a zoo model. Speed is not asserted."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from jaxspec.decoding import api
from jaxspec.decoding.engine import bucket_width
from jaxspec.eval.suite import CATEGORIES, load_suite
from jaxspec.interop import workdir as workdir_lib


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("vs_transformers")


def test_tiny_run_same_tokens_and_every_row(script, tmp_path):
    settings = script.Settings(sizes=("tiny",), max_new_tokens=12, num_prompts=2, prompt_len=48, repeats=1,
                               draft_tokens=4, lookup_tokens=5, torch_threads=(1, 2))
    result = script.benchmark(settings, workdir=str(tmp_path), log=lambda _: None)

    expected = ["autoregressive", "draft model, 4 drafts (matched)", "draft model, defaults: jaxspec chain:4",
                "prompt lookup, 5 drafts, n-gram <= 3"]
    assert [r.pair.split(" vs ")[0] for r in result.rows] == expected
    for row in result.rows:
        assert row.identical == row.num_prompts == 2, (row.pair, row.matched)
        assert row.matched == row.lengths == [12, 12], row.pair
        assert row.same_as_own_ar == (True, True), row.pair
        assert row.jaxspec.tokens_per_s > 0 and row.transformers.tokens_per_s > 0
    assert result.rows[0].jaxspec.tau == result.rows[0].transformers.tau == 1.0
    # Every transformers runner (4) on every prompt (2) kept its fastest of the two thread settings.
    assert sorted(result.thread_wins["tiny"]) == [1, 2] and sum(result.thread_wins["tiny"].values()) == 8

    text = script.report(settings, result, "pytest")
    table = [line for line in text.splitlines() if line.startswith("| tiny,")]
    assert len(table) == len(expected) + 1  # one row per pair, then the best speculative of each library
    assert table[-1].startswith("| tiny, ") and "best speculative of each" in table[-1]
    for row, line in zip(result.rows, table):
        assert row.pair in line and line.rstrip().endswith("| 2/2 |")


# ------------------------------------------------------------------------------------------ real-model mode


def test_zoo_plan_pairs_the_same_draft_in_both_libraries(script):
    settings = script.Settings(model="smollm2-135m-instruct", draft_tokens=3, lookup_tokens=6, lookup_max_ngram=2)
    plan = script.zoo_plan(settings, n_layers=30, early_exit=12)

    assert [(p.jaxspec, p.transformers, p.speculative) for p in plan.pairs] == [
        ("ar", "greedy", False), ("lookup chain:6", "lookup 6", True), ("layerskip chain:3", "early exit 12, 3", True)]
    assert plan.jaxspec["lookup chain:6"] == dict(method="lookup", tree="chain:6", min_ngram=1, max_ngram=2)
    assert plan.transformers["lookup 6"].kwargs == dict(prompt_lookup_num_tokens=6, max_matching_ngram_size=2)
    # jaxspec skips layers 12..29; transformers runs layers 0..11 of the target itself, 3 drafts, no early stop.
    assert plan.jaxspec["layerskip chain:3"] == dict(method="layerskip", tree="chain:3",
                                                     skip_layers=tuple(range(12, 30)))
    early = plan.transformers["early exit 12, 3"]
    assert early.kwargs == dict(assistant_early_exit=12) and early.assistant == "target"
    assert early.assistant_settings == dict(num_assistant_tokens=3, num_assistant_tokens_schedule="constant",
                                            assistant_confidence_threshold=0.0)
    assert plan.transformers["greedy"] == script.HFCall()


def test_bad_real_model_settings_are_named(script):
    with pytest.raises(ValueError, match="not a zoo model"):
        script.Settings(model="gpt-5")
    with pytest.raises(ValueError, match="per_category=0"):
        script.Settings(model="gemma3-270m", per_category=0)
    with pytest.raises(ValueError, match="early_exit=0"):
        script.Settings(model="gemma3-270m", early_exit=0)
    assert script.resolve_early_exit(None, 18) == 13 and script.resolve_early_exit(None, 2) == 1
    with pytest.raises(ValueError, match=r"early_exit=18 must lie in \[1, 17\]"):
        script.resolve_early_exit(18, 18)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab() -> dict:
    """GGUF tokenizer metadata of a byte-level BPE trained on the suite: three control tokens first (ids 0..2),
    like SmolLM2's, with <|im_end|> as EOS."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for p in load_suite() for m in p.messages], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return dict(tokens=tokens, types=[3 if t in SPECIALS else 1 for t in tokens],
                merges=[m if isinstance(m, str) else " ".join(m) for m in model["merges"]])


def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k projection rows in llama.cpp's order (which both libraries' loaders undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: str, chat_template: str | None) -> str:
    """A random 2-layer transformers Llama of the trained vocabulary, written as llama.cpp writes a GGUF."""
    vocab = byte_level_vocab()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   initializer_range=0.1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in ((writer.add_context_length, 2048), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 128), (writer.add_block_count, 2), (writer.add_head_count, 4),
                       (writer.add_head_count_kv, 2), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_rope_dimension_count, 16),
                       (writer.add_vocab_size, cfg.vocab_size), (writer.add_tokenizer_model, "gpt2"),
                       (writer.add_tokenizer_pre, "smollm"), (writer.add_token_list, vocab["tokens"]),
                       (writer.add_token_types, vocab["types"]), (writer.add_token_merges, vocab["merges"]),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_pad_token_id, 2),
                       (writer.add_add_bos_token, False)):
        add(value)
    if chat_template:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name, value in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name, w = names.get_name(base), value.float().numpy()
        if name.endswith(("attn_q", "attn_k")):
            w = llama_cpp_rows(w, 4 if name.endswith("attn_q") else 2)
        writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def imported(gguf_path: str, workdir: str):
    """What `api.load` gives for a zoo model: the GGUF imported into a jaxspec workdir, loaded."""
    workdir_lib.import_checkpoint(gguf_path, workdir)
    return api.load(workdir)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = write_tiny_gguf(str(root / "tiny-chat.gguf"), CHAT_TEMPLATE)
    return path, imported(path, str(root / "workdir"))


def transformers_continuation(script, gguf_path: str, prompt: list[int], num: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored."""
    model, _ = script.load_transformers_gguf(gguf_path)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num, do_sample=False,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_gguf_model_same_tokens_stops_at_eos_and_every_row(script, tiny_gguf):
    path, lm = tiny_gguf
    # A zoo name is only checked by Settings here: gguf_subject is handed the tiny file and its import.
    settings = script.Settings(model="smollm2-135m-instruct", max_new_tokens=10, per_category=1, repeats=1,
                               draft_tokens=3, lookup_tokens=4, torch_threads=(1,))
    subject = script.gguf_subject("tiny-gguf", path, lm, settings, log=lambda _: None)

    assert len(subject.prompts) == len(CATEGORIES)
    assert subject.prompts[0] == lm.tokenizer.encode_chat(list(load_suite(per_category=1)[0].messages))
    assert f"identical in jaxspec's and transformers' tokenizers: {len(CATEGORIES)}/{len(CATEGORIES)}" in \
        subject.notes[0]
    assert subject.eos_ids == (2,) and 0 <= subject.draft_agreement <= 1
    # Stop at a token greedy decoding first emits third or later on the first prompt, so the stop is exercised.
    first = transformers_continuation(script, path, subject.prompts[0], 10)
    stop = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    # Two prompts padded to the same width: one compiled loop per method.
    second = next(p for p in subject.prompts[1:] if bucket_width(len(p)) == bucket_width(len(subject.prompts[0])))
    subject = dataclasses.replace(subject, prompts=[subject.prompts[0], second], eos_ids=(stop,))
    result = script.run_subjects(settings, [subject], log=lambda _: None)

    assert [r.pair for r in result.rows] == ["autoregressive", "prompt lookup, 4 drafts, n-gram <= 3",
                                             "early exit at layer 1 of 2, 3 drafts (layer skip 1..1)"]
    stop_at = first.index(stop) + 1
    for row in result.rows:
        assert row.identical == row.num_prompts == 2, (row.pair, row.matched)
        assert row.lengths[0] == stop_at, row.pair
        assert row.same_as_own_ar == (True, True), row.pair
    assert result.rows[0].jaxspec.tau == result.rows[0].transformers.tau == 1.0
    assert sorted(result.compiled["tiny-gguf"]) == ["ar", "layerskip chain:3", "lookup chain:4"]
    assert all(n == 1 and sec > 0 for sec, n in result.compiled["tiny-gguf"].values())

    text = script.report(settings, result, "pytest")
    assert "tiny-gguf: 6 prompts of the offline suite (1 per category), rendered through the model's chat" in text
    assert f"both libraries stop at EOS ids [{stop}]" in text
    table = [line for line in text.splitlines() if line.startswith("| tiny-gguf,")]
    assert len(table) == len(result.rows) + 1 and "best speculative of each" in table[-1]


def test_scanned_stack_gives_transformers_tokens(script, tiny_gguf):
    path, lm = tiny_gguf
    settings = script.Settings(model="smollm2-135m-instruct", max_new_tokens=8, per_category=1, repeats=1,
                               draft_tokens=3, lookup_tokens=4, torch_threads=(1,), scan_layers=True)
    subject = script.gguf_subject("tiny-gguf", path, lm, settings, log=lambda _: None)
    assert subject.models.target.model_cfg.scan_layers and not lm.model.model_cfg.scan_layers
    subject = dataclasses.replace(subject, prompts=subject.prompts[:1])
    result = script.run_subjects(settings, [subject], log=lambda _: None)
    for row in result.rows:
        assert row.identical == row.num_prompts == 1, (row.pair, row.matched)
        assert row.same_as_own_ar == (True, True), row.pair
    assert "jaxspec's target layer stack: scanned" in script.report(settings, result, "pytest")


def test_plain_prompts_when_the_model_has_no_chat_template(script, tmp_path):
    path = write_tiny_gguf(str(tmp_path / "tiny-base.gguf"), chat_template=None)
    lm = imported(path, str(tmp_path / "workdir"))
    _, hf_tokenizer = script.load_transformers_gguf(path)
    assert not lm.tokenizer.chat_template
    for prompt in load_suite(per_category=1):
        ids = script.jaxspec_prompt_ids(prompt, lm.tokenizer, chat=False)
        assert ids == lm.tokenizer.encode_prompt(prompt.as_plain_prompt())
        assert ids == script.transformers_prompt_ids(prompt, hf_tokenizer, chat=False), prompt.id
