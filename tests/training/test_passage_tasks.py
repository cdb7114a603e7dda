"""The suite's prose requests over a "self" set's replies (prompt_set="self_tasks"): each passage serves each
kind in turn, chats stay clear of the suite, the replies are read back from the set as stored, and the set
decodes exactly the chats of the stream."""

import json

import pytest

from jaxspec.errors import InputError
from jaxspec.eval.suite import load_suite
from jaxspec.training import instructions, passage_tasks, selfdistill

SUITE_LINE = next(line for p in load_suite() for m in p.messages for line in m["content"].splitlines()
                  if 60 < len(line) < 150)
PROSE = ("The garden club meets on the first Tuesday of every month. Members bring seeds to swap, and a guest "
         "talks about one kind of plant. New members are always welcome. {n}")
LISTY = "Here is a plan:\n1) Buy flour, 2 eggs and 300 g of sugar!\n2) Mix well (10 min) & bake at 180 C. [{n}] " * 2


def exchanges(n):
    return [(f"Question number {i}?", (PROSE if i % 2 == 0 else LISTY).format(n=i)) for i in range(n)]


def contents(chat):
    return tuple(m["content"] for m in chat)


def test_passages_are_cut_at_sentence_or_line_ends_and_short_ones_dropped():
    text = "First sentence here. " * 10 + "Unfinished tail without an end"
    passage = passage_tasks.passage
    cut = passage(text, 200)
    assert cut == ("First sentence here. " * 9).strip() and len(cut) <= 200
    lines = "a line of text that goes on\n" * 8
    assert passage(lines, 150) == ("a line of text that goes on\n" * 5).strip()
    long_sentences = "x" * 100 + ". " + "y" * 100 + "."
    assert passage(long_sentences, 150) is None  # the one sentence that fits is under MIN_PASSAGE_CHARS
    assert passage("Too short.", 800) is None
    assert passage(PROSE.format(n=0), 800) == PROSE.format(n=0).strip()


def test_each_passage_serves_each_kind_in_turn():
    chats = list(passage_tasks.iter_chats(exchanges(8), seed=0))
    assert chats == list(passage_tasks.iter_chats(exchanges(8), seed=0))
    assert chats != list(passage_tasks.iter_chats(exchanges(8), seed=1))  # the seed picks templates, languages
    # 8 passages x 4 kinds, less the translations of the 4 list-like (not prose) replies.
    assert len(chats) == 8 * 4 - 4 == len(set(map(contents, chats)))
    kinds = []
    for chat in chats:
        first = chat[0]["content"]
        if len(chat) == 3:
            kinds.append("multi_turn")
            request, reply = first, chat[1]["content"]
            assert chat[1]["role"] == "assistant" and reply == dict(exchanges(8))[request].strip()
            assert chat[2]["content"] in passage_tasks._FOLLOW_UPS
        elif any(first.startswith(t.split("{")[0]) for t in instructions.SUMMARIZE):
            kinds.append("summarization")
        elif any(language in first for language in instructions.LANGUAGES):
            kinds.append("translation")
            assert "Buy flour" not in first  # only prose is translated
        else:
            kinds.append("qa")
            assert any(f"Question number {i}?" in first and exchanges(8)[i][1][:40] in first for i in range(8))
    # The first pass gives passage i the kind i mod 4 (no list-like reply meets a translation in it).
    assert kinds[:8] == [passage_tasks.KINDS[i % 4] for i in range(8)]
    assert {k: kinds.count(k) for k in passage_tasks.KINDS} == dict(translation=4, summarization=8, qa=8,
                                                                    multi_turn=8)


def test_chats_that_quote_the_suite_or_repeat_are_left_out():
    planted = [("Tell me more?", PROSE.format(n=1) + "\n" + SUITE_LINE)] + exchanges(2) + exchanges(2)
    chats = list(passage_tasks.iter_chats(planted, seed=0))
    assert not any(SUITE_LINE in text for chat in chats for text in contents(chat))
    assert not any(instructions.overlaps_suite(text) for chat in chats for text in contents(chat))
    assert len(chats) == len(set(map(contents, chats))) == 2 * 4 - 1
    with pytest.raises(InputError, match="max_chars=50 must be an integer of at least 120"):
        next(passage_tasks.iter_chats(exchanges(2), max_chars=50))


SELF = dict(num_prompts=6, max_new_tokens=160, seq_len=480, batch_size=4, tokenizer_name="bytes", progress=False)


@pytest.fixture(scope="module")
def target(make_model, chat_tokenizer):
    # One stop id, so that a random model's replies run long enough to be passages; the tokenizer's vocabulary.
    tokenizer = type("OneStop", (type(chat_tokenizer),), {"eos_ids": (257,)})()
    return (*make_model("A", vocab_size=tokenizer.vocab_size, max_len=512), tokenizer)


@pytest.fixture(scope="module")
def self_set(target, tmp_path_factory):
    model, params, tokenizer = target
    out = tmp_path_factory.mktemp("passages") / "self"
    selfdistill.generate(model, params, tokenizer, str(out), prompt_set="self", **SELF)
    return str(out)


def test_exchanges_are_the_sets_requests_and_stored_replies(target, self_set):
    _, _, tokenizer = target
    pairs = passage_tasks.read_exchanges(self_set, tokenizer)
    with open(f"{self_set}/{selfdistill.REQUESTS}") as fh:
        requests = json.load(fh)["requests"]
    assert [request for request, _ in pairs] == requests
    _, arrays = selfdistill.read(self_set)
    by_request = {}
    for row, start, length in zip(arrays["tokens"], arrays["reply_start"], arrays["lengths"]):
        reply = row[start:length].tolist()
        reply = reply[:-1] if reply[-1] in tokenizer.eos_ids else reply
        request = next(r for r in requests if selfdistill.encode_messages(
            tokenizer, [{"role": "user", "content": r}]) == row[:start].tolist())
        assert dict(pairs)[request] == tokenizer.decode(reply)
        by_request[request] = reply
    assert sum(len(passage_tasks.passage(reply, 800) or "") > 0 for _, reply in pairs) >= 4  # the test has passages
    # A reply holding an id the tokenizer does not decode is left out.
    narrow = type("Narrow", (type(tokenizer),), {"vocab_size": 200})()
    kept = passage_tasks.read_exchanges(self_set, narrow)
    decodable = {request for request, row in by_request.items() if max(row, default=0) < 200}
    assert kept == [pair for pair in pairs if pair[0] in decodable] and len(kept) < len(pairs)


def test_a_self_tasks_set_decodes_the_streams_chats(target, self_set, tmp_path):
    model, params, tokenizer = target
    out = tmp_path / "tasks"
    settings = dict(SELF, num_prompts=8, max_new_tokens=16)
    selfdistill.generate(model, params, tokenizer, str(out), prompt_set="self_tasks", passages_from=self_set,
                         **settings)
    manifest, arrays = selfdistill.read(str(out))
    assert manifest["prompt_set"].startswith(passage_tasks.NAME) and self_set in manifest["prompt_set"]
    chats = passage_tasks.iter_chats(passage_tasks.read_exchanges(self_set, tokenizer), seed=0)
    expected, _ = selfdistill.fitting_prompts(tokenizer, chats, 8, 480 - 16, "stream", "setting")
    stored = [row[:start].tolist() for row, start in zip(arrays["tokens"], arrays["reply_start"])]
    assert stored == sorted(expected, key=len)
    again = selfdistill.generate(model, params, tokenizer, str(out), prompt_set="self_tasks",
                                 passages_from=self_set, **settings)
    assert again.shards_written == 0 and again.shards_skipped == 2


def test_missing_or_misplaced_passage_sources_are_named(target, self_set, tmp_path):
    model, params, tokenizer = target
    settings = dict(SELF, num_prompts=2, max_new_tokens=16)
    with pytest.raises(InputError, match="prompt_set='self_tasks' needs passages_from"):
        selfdistill.generate(model, params, tokenizer, str(tmp_path / "a"), prompt_set="self_tasks", **settings)
    with pytest.raises(InputError, match="passages_from=.* is read only with prompt_set='self_tasks', not 'tasks'"):
        selfdistill.generate(model, params, tokenizer, str(tmp_path / "b"), prompt_set="tasks",
                             passages_from=self_set, **settings)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="has no requests.json: passages come from a set made with prompt_set='self'"):
        selfdistill.generate(model, params, tokenizer, str(tmp_path / "c"), prompt_set="self_tasks",
                             passages_from=str(tmp_path / "plain"), **settings)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    config = selfdistill.config_defaults()
    config.prompt_set = "self_tasks"
    with pytest.raises(ValueError, match="passages_from"):
        selfdistill.validate_config(config)
    config.prompt_set, config.passages_from = "tasks", self_set
    with pytest.raises(ValueError, match="passages_from.*empty unless prompt_set='self_tasks'"):
        selfdistill.validate_config(config)
