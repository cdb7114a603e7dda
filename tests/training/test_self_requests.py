"""Requests the target writes itself (prompt_set="self"): the prefix is the chat template's user opening, kept
requests are finished samples that pass the filters, the set decodes them and a rerun reads them back."""

import json

import pytest

from jaxspec.decoding import api
from jaxspec.training import self_requests, selfdistill

SETTINGS = dict(num_prompts=6, max_new_tokens=16, seq_len=224, batch_size=4, tokenizer_name="bytes",
                progress=False, prompt_set="self")


@pytest.fixture(scope="module")
def target(make_model, chat_tokenizer):
    return (*make_model("A", vocab_size=264, max_len=512), chat_tokenizer)


@pytest.fixture(scope="module")
def self_set(target, tmp_path_factory):
    model, params, tokenizer = target
    out = tmp_path_factory.mktemp("self_set") / "set"
    selfdistill.generate(model, params, tokenizer, str(out), **SETTINGS)
    return out, json.loads((out / selfdistill.REQUESTS).read_text())


def test_the_prefix_is_the_templates_opening_of_a_user_turn(chat_tokenizer):
    # The test template renders "<user>{content}\n"; what comes before the content is "<user>".
    assert self_requests.request_prefix(chat_tokenizer) == chat_tokenizer.encode_prompt("<user>")


def test_kept_requests_are_finished_distinct_samples_of_the_target(target):
    model, params, tokenizer = target
    texts, counts = self_requests.sample_requests(model, params, tokenizer, 6, seed=0, max_prompt_tokens=80,
                                                  batch_size=4, min_chars=4)
    assert len(texts) == len(set(texts)) == counts["kept"] == 6
    assert counts["sampled"] == counts["kept"] + sum(counts[r] for r in self_requests.REJECTIONS)
    assert all(len(t) >= 4 for t in texts)
    assert all(len(selfdistill.encode_messages(tokenizer, [{"role": "user", "content": t}])) <= 80 for t in texts)
    # The first batch's samples are api.generate's, from the prefix, at temperature 1 with the batch's key: every
    # kept request of that batch is one of them, ended by a stop id.
    prefix = self_requests.request_prefix(tokenizer)
    first = api.generate(model, params, [prefix] * 4, max_new_tokens=self_requests.MAX_REQUEST_TOKENS,
                         temperature=1.0, eos_ids=tokenizer.eos_ids, seed=self_requests._batch_seed(0, 0))
    finished = [tokenizer.decode(ids[:-1]).strip() for ids in first.tokens
                if ids[-1] in tokenizer.eos_ids and max(ids) < tokenizer.vocab_size]
    assert texts[0] in finished
    again, _ = self_requests.sample_requests(model, params, tokenizer, 6, seed=0, max_prompt_tokens=80, batch_size=4,
                                             min_chars=4)
    other, _ = self_requests.sample_requests(model, params, tokenizer, 6, seed=1, max_prompt_tokens=80, batch_size=4,
                                             min_chars=4)
    assert again == texts and other != texts


def test_the_set_decodes_the_requests_it_stores(target, self_set):
    model, params, tokenizer = target
    out, stored = self_set
    assert stored["counts"]["kept"] == 6 and len(stored["requests"]) == 6
    manifest, arrays = selfdistill.read(str(out))
    assert manifest["prompt_set"] == selfdistill.self_written_description(0)
    prompts = sorted((selfdistill.encode_messages(tokenizer, [{"role": "user", "content": t}])
                      for t in stored["requests"]), key=len)
    stored_prompts = [row[:start].tolist() for row, start in zip(arrays["tokens"], arrays["reply_start"])]
    assert stored_prompts == prompts
    replies = api.generate(model, params, prompts, max_new_tokens=16, eos_ids=tokenizer.eos_ids).tokens
    assert [row[s:n].tolist() for row, s, n in zip(arrays["tokens"], arrays["reply_start"], arrays["lengths"])] \
        == [list(r) for r in replies]


def test_a_rerun_reads_the_stored_requests_and_other_settings_are_refused(target, self_set, tmp_path,
                                                                          monkeypatch):
    model, params, tokenizer = target
    out, stored = self_set

    def no_sampling(*args, **kwargs):
        raise AssertionError("a rerun sampled again")

    monkeypatch.setattr(self_requests, "sample_requests", no_sampling)
    summary = selfdistill.generate(model, params, tokenizer, str(out), **SETTINGS)
    assert (summary.shards_written, summary.shards_skipped) == (0, 2)
    before = (out / selfdistill.REQUESTS).read_text()
    with pytest.raises(ValueError, match=r"requests.json holds requests sampled with other settings \(seed\)"):
        selfdistill.generate(model, params, tokenizer, str(out), **{**SETTINGS, "seed": 3})
    assert (out / selfdistill.REQUESTS).read_text() == before


def test_bad_tokenizers_and_rare_requests_are_named(target, chat_tokenizer, monkeypatch):
    model, params, _ = target
    plain = type(chat_tokenizer).__mro__[1]()  # the byte tokenizer without a chat template
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        self_requests.request_prefix(plain)
    no_stops = type("NoStops", (type(chat_tokenizer),), {"eos_ids": ()})()
    with pytest.raises(ValueError, match=r"needs the tokenizer's stop ids \(eos_ids\)"):
        self_requests.sample_requests(model, params, no_stops, 2, seed=0, max_prompt_tokens=40, batch_size=2)
    rare = type("RareStop", (type(chat_tokenizer),), {"eos_ids": (263,)})()
    monkeypatch.setattr(self_requests, "MAX_SAMPLES_PER_REQUEST", 1)
    with pytest.raises(ValueError, match=r"sampled requests kept only \d+ of 16"):
        self_requests.sample_requests(model, params, rare, 16, seed=0, max_prompt_tokens=40, batch_size=4)
    with pytest.raises(ValueError, match=r"prompt_set='chat' is not one of \['docs', 'self', 'self_tasks', 'tasks'\]"):
        selfdistill.generate(model, params, chat_tokenizer, "/nonexistent/never", **{**SETTINGS, "prompt_set": "chat"})
