"""Self-distillation instructions: deterministic streams that never repeat, stay clear of the evaluation suite,
and (the "tasks" set) ask for each of the suite's kinds of request."""

import re

import pytest

from jaxspec.errors import InputError
from jaxspec.eval.suite import load_suite
from jaxspec.training import instructions, selfdistill
from jaxspec.training.tokenizer import ByteTokenizer

SUITE = {m["content"] for p in load_suite() for m in p.messages}


def contents(chat):
    return tuple(m["content"] for m in chat)


@pytest.mark.parametrize("prompt_set", ["tasks", "docs"])
def test_streams_are_deterministic_varied_and_clear_of_the_suite(prompt_set):
    prompts = instructions.instruction_prompts(48, seed=0, prompt_set=prompt_set)
    assert prompts == instructions.instruction_prompts(48, seed=0, prompt_set=prompt_set)
    assert instructions.instruction_prompts(12, seed=0, prompt_set=prompt_set) == prompts[:12]
    assert instructions.instruction_prompts(12, seed=1, prompt_set=prompt_set) != prompts[:12]
    for chat in prompts:
        assert all(sorted(m) == ["content", "role"] for m in chat)
        assert [m["role"] for m in chat] == ["user", "assistant", "user"][:len(chat)] and len(chat) in (1, 3)
    assert len(set(map(contents, prompts))) == len(prompts)
    assert len({chat[0]["content"].split("\n", 1)[0] for chat in prompts}) >= 6  # several templates
    texts = [text for chat in prompts for text in contents(chat)]
    assert not SUITE & set(texts)
    assert not any(instructions.overlaps_suite(text) for text in texts)
    assert all(instructions.overlaps_suite(text) for text in list(SUITE)[:5])  # the check itself finds overlaps
    short = instructions.instruction_prompts(24, seed=0, max_chars=100, prompt_set=prompt_set)
    assert max(len(c[0]["content"]) for c in short) < 400  # max_chars bounds the quoted text


def test_the_tasks_set_asks_for_each_kind_of_suite_request_in_turn():
    prompts = instructions.instruction_prompts(60, seed=3)
    kinds = instructions._TASK_KINDS
    assert len(kinds) == 6 == len({p.category for p in load_suite()})
    for i, chat in enumerate(prompts):
        first = chat[0]["content"]
        kind = kinds[i % 6]
        assert (len(chat) == 3) == (kind == "multi_turn"), (i, chat)
        if kind == "translation":
            assert any(language in first for language in instructions.LANGUAGES), first
        if kind == "math":
            assert re.search(r"\d", first) and "?" in first, first
        if kind == "code":
            assert "python" in first.lower(), first
        if kind == "qa":
            assert "`" in first, first  # asks about a named piece of the library


def test_word_problems_have_positive_whole_answers_over_varied_patterns():
    import random

    rng = random.Random(0)
    problems = [instructions._word_problem(rng) for _ in range(300)]
    assert all(isinstance(answer, int) and answer >= 1 for _, answer in problems)
    texts = [text for text, _ in problems]
    assert len(set(texts)) >= 295
    assert len({re.sub(r"\d+", "N", t.split("\n")[0])[:25] for t in texts}) >= 6  # several patterns
    assert all(not re.search(r"\d\.\d", t) for t in texts)  # whole quantities only


def test_bad_sets_and_sizes_are_named():
    with pytest.raises(InputError, match=r"prompt_set='chat' is not one of \['docs', 'tasks'\]"):
        instructions.instruction_prompts(3, prompt_set="chat")
    with pytest.raises(InputError, match="max_chars=10 must be an integer of at least 60"):
        instructions.instruction_prompts(3, max_chars=10)
    with pytest.raises(InputError, match="gives only"):
        instructions.instruction_prompts(10 ** 6, max_chars=60)


def test_plan_prompts_names_a_used_up_stream_apart_from_prompts_too_long():
    tok = ByteTokenizer()
    with pytest.raises(InputError, match="only 0 of 4 instructions fit seq_len - max_new_tokens = 8 prompt tokens"):
        selfdistill.plan_prompts(tok, 4, seed=0, max_chars=100, max_prompt_tokens=8)
    ids, skipped = selfdistill.plan_prompts(tok, 4, seed=0, max_chars=100, max_prompt_tokens=400)
    assert len(ids) == 4 and all(0 < len(x) <= 400 for x in ids)
    assert selfdistill.encode_messages(tok, instructions.instruction_prompts(1, max_chars=100)[0]) in ids
    with pytest.raises(InputError, match=r"prompt_set='tasks' with max_chars=60 gives only \d+ instructions"):
        selfdistill.plan_prompts(tok, 10 ** 5, seed=0, max_chars=60, max_prompt_tokens=10 ** 6)
