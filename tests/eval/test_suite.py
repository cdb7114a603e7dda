"""The offline prompt suite: the shipped data files are well formed (read raw, apart from the loader), load_suite
filters and limits, bad arguments and bad rows raise, and the files travel with the package when it is built."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxspec.eval import suite

DATA_DIR = pathlib.Path(suite.__file__).parent / suite.DATA_DIR
REPO_ROOT = pathlib.Path(suite.__file__).parents[2]
MIN_ROWS = 12


def raw_rows(category):
    """The rows of one category's file as plain JSON, without going through the loader."""
    with open(DATA_DIR / f"{category}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_categories_are_the_six_spec_bench_kinds_with_one_file_each():
    assert suite.CATEGORIES == ("multi_turn", "translation", "summarization", "qa", "math_reasoning", "code")
    assert sorted(path.stem for path in DATA_DIR.glob("*.jsonl")) == sorted(suite.CATEGORIES)


@pytest.mark.parametrize("category", suite.CATEGORIES)
def test_every_category_has_enough_rows_with_unique_ids_that_match_the_file(category):
    rows = raw_rows(category)
    assert len(rows) >= MIN_ROWS
    assert [row["id"] for row in rows] == [f"{category}-{n:02d}" for n in range(1, len(rows) + 1)]
    assert {row["category"] for row in rows} == {category}
    assert all(set(row) == {"id", "category", "messages"} for row in rows)


@pytest.mark.parametrize("category", suite.CATEGORIES)
def test_turns_alternate_from_user_to_user_and_none_is_empty(category):
    for row in raw_rows(category):
        roles = [message["role"] for message in row["messages"]]
        assert len(roles) % 2 == 1, row["id"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], row["id"]
        assert all(message["content"].strip() == message["content"] != "" for message in row["messages"]), row["id"]


@pytest.mark.parametrize("category", suite.CATEGORIES)
def test_prompts_are_sized_for_a_small_instruct_model(category):
    # 30-400 tokens, checked by characters (English text and short code run about 3-4 characters per token).
    for row in raw_rows(category):
        characters = sum(len(message["content"]) for message in row["messages"])
        assert 150 <= characters <= 1200, (row["id"], characters)


def test_multi_turn_rows_hold_earlier_assistant_turns_and_the_rest_are_single_requests():
    assert all(len(row["messages"]) >= 3 for row in raw_rows("multi_turn"))
    for category in suite.CATEGORIES[1:]:
        assert all(len(row["messages"]) == 1 for row in raw_rows(category)), category


def test_code_rows_carry_code_to_repeat_and_math_rows_ask_for_steps():
    code_rows = [row["messages"][-1]["content"] for row in raw_rows("code")]
    assert sum("```python\n" in text for text in code_rows) >= MIN_ROWS // 2
    assert all("step by step" in row["messages"][-1]["content"] for row in raw_rows("math_reasoning"))


def test_load_suite_returns_every_row_in_category_order_then_file_order():
    prompts = suite.load_suite()
    expected = [(category, row["id"]) for category in suite.CATEGORIES for row in raw_rows(category)]
    assert [(prompt.category, prompt.id) for prompt in prompts] == expected
    assert len({prompt.id for prompt in prompts}) == len(prompts)
    assert all(isinstance(prompt.messages, tuple) for prompt in prompts)


def test_load_suite_filters_categories_and_keeps_the_first_n_of_each():
    prompts = suite.load_suite(categories=["code", "translation"], per_category=3)
    # Spec-Bench order, not the order asked in.
    assert [prompt.id for prompt in prompts] == ["translation-01", "translation-02", "translation-03",
                                                "code-01", "code-02", "code-03"]
    assert [prompt.id for prompt in suite.load_suite("qa", per_category=1)] == ["qa-01"]
    assert len(suite.load_suite("math_reasoning", per_category=1000)) == len(raw_rows("math_reasoning"))


def test_text_is_the_last_user_message_and_the_plain_prompt_ends_with_the_assistant_cue():
    prompt = suite.SuitePrompt("multi_turn-99", "multi_turn", (
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count to two."},
    ))
    assert prompt.text == "Count to two."
    assert prompt.as_plain_prompt() == "User: Hi.\nAssistant: Hello!\nUser: Count to two.\nAssistant:"
    first = suite.load_suite("multi_turn", per_category=1)[0]
    assert first.text == raw_rows("multi_turn")[0]["messages"][-1]["content"]
    assert first.as_plain_prompt().startswith("User: ") and first.as_plain_prompt().endswith("\nAssistant:")


def test_prompts_are_frozen():
    prompt = suite.load_suite("qa", per_category=1)[0]
    with pytest.raises(AttributeError):
        prompt.id = "qa-00"


@pytest.mark.parametrize("categories", [["poetry"], ["code", "Code"], "summarisation"])
def test_an_unknown_category_is_named_along_with_the_allowed_ones(categories):
    with pytest.raises(ValueError, match=r"unknown suite categories.*'multi_turn', 'translation'"):
        suite.load_suite(categories=categories)


def test_an_empty_category_list_raises():
    with pytest.raises(ValueError, match="categories is empty"):
        suite.load_suite(categories=[])


@pytest.mark.parametrize("per_category", [0, -2, 1.5, True, "3"])
def test_per_category_must_be_a_positive_integer(per_category):
    with pytest.raises(ValueError, match="per_category must be a positive integer"):
        suite.load_suite(per_category=per_category)


def good_row(**changes):
    row = {"id": "qa-01", "category": "qa", "messages": [{"role": "user", "content": "Why?"}]}
    row.update(changes)
    return json.dumps(row)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "qa-01", "category": "qa"}), "exactly the keys 'id', 'category', 'messages'"),
    (good_row(category="code"), "does not match the file's 'qa'"),
    (good_row(id="code-01"), "must start with 'qa-'"),
    (good_row(messages=[]), "non-empty list"),
    (good_row(messages=[{"role": "assistant", "content": "Hi."}]), "message 0 has role 'assistant'"),
    (good_row(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     "message 1 has role 'user'"),
    (good_row(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "last message must be from the user"),
    (good_row(messages=[{"role": "user", "content": "  "}]), "empty or non-text content"),
    (good_row(messages=[{"role": "user", "text": "a"}]), "exactly the keys 'role' and 'content'"),
])
def test_a_bad_row_names_its_place_and_the_problem(line, message):
    with pytest.raises(ValueError, match=message) as error:
        suite.parse_row(line, "qa", "suite_data/qa.jsonl:7")
    assert str(error.value).startswith("suite_data/qa.jsonl:7: ")


def test_a_good_row_parses():
    prompt = suite.parse_row(good_row(), "qa", "suite_data/qa.jsonl:1")
    assert prompt == suite.SuitePrompt("qa-01", "qa", ({"role": "user", "content": "Why?"},))


def test_the_data_files_are_package_data_of_a_built_package(tmp_path):
    # build_py lays out exactly what an install copies; the suite must load from there, away from the source tree.
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    built = sorted(path.name for path in (build / "jaxspec" / "eval" / suite.DATA_DIR).glob("*.jsonl"))
    assert built == sorted(f"{category}.jsonl" for category in suite.CATEGORIES), (
        "setup.py must list the suite files: package_data={'jaxspec.eval': ['suite_data/*.jsonl']}")
    check = (f"import jaxspec.eval.suite as s; assert s.__file__.startswith({str(build)!r}), s.__file__; "
             "print(len(s.load_suite()))")
    env = dict(os.environ, PYTHONPATH=str(build))
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(suite.load_suite())
