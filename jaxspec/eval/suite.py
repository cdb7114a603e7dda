"""The offline prompt suite: chat prompts in Spec-Bench's six kinds of task, stored as package data.

Each category is one JSON-lines file in `suite_data/`, one conversation per line:
{"id": "translation-03", "category": "translation", "messages": [{"role": "user", "content": "..."}, ...]}.
Every text was written for jaxspec, so the suite is the same on every machine and needs no download.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from importlib import resources

from jaxspec.errors import InputError

# Spec-Bench's order; "qa" is question answering over a given passage (Spec-Bench's RAG-style task).
CATEGORIES = ("multi_turn", "translation", "summarization", "qa", "math_reasoning", "code")
ROLES = ("user", "assistant")
DATA_DIR = "suite_data"


@dataclasses.dataclass(frozen=True)
class SuitePrompt:
    """One conversation: alternating user/assistant turns, starting and ending with the user."""

    id: str
    category: str
    messages: tuple[dict[str, str], ...]

    @property
    def text(self) -> str:
        """The last user message: the request the model answers."""
        return self.messages[-1]["content"]

    def as_plain_prompt(self) -> str:
        """The conversation for a tokenizer without a chat template, ending where the model's answer starts."""
        lines = [f"{message['role'].capitalize()}: {message['content']}" for message in self.messages]
        return "\n".join(lines + ["Assistant:"])


def _check_messages(messages, where: str) -> tuple[dict[str, str], ...]:
    """The messages as a tuple of {"role", "content"} dicts, or an InputError saying what is wrong and where."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list, got {messages!r}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise InputError(f"{where}: message {index} must have exactly the keys 'role' and 'content', "
                             f"got {message!r}")
        expected = ROLES[index % 2]
        if message["role"] != expected:
            raise InputError(f"{where}: message {index} has role {message['role']!r}; turns alternate "
                             f"{ROLES[0]!r}, {ROLES[1]!r}, ... so it must be {expected!r}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise InputError(f"{where}: message {index} has empty or non-text content {message['content']!r}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be from the user, got {checked[-1]['role']!r}")
    return tuple(checked)


def parse_row(line: str, category: str, where: str) -> SuitePrompt:
    """One JSON line of `category`'s file as a SuitePrompt; `where` (file:line) names it in errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(row, dict) or set(row) != {"id", "category", "messages"}:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise InputError(f"{where}: a row must have exactly the keys 'id', 'category', 'messages', got {keys}")
    if row["category"] != category:
        raise InputError(f"{where}: row category {row['category']!r} does not match the file's {category!r}")
    if not isinstance(row["id"], str) or not row["id"].startswith(f"{category}-"):
        raise InputError(f"{where}: id {row['id']!r} must start with {category + '-'!r}")
    return SuitePrompt(row["id"], category, _check_messages(row["messages"], where))


def category_prompts(category: str) -> list[SuitePrompt]:
    """Every prompt of one category, in file order (read from the installed package's data)."""
    name = f"{category}.jsonl"
    text = (resources.files("jaxspec.eval") / DATA_DIR / name).read_text(encoding="utf-8")
    prompts = [parse_row(line, category, f"{DATA_DIR}/{name}:{number}")
               for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    ids = [prompt.id for prompt in prompts]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"{DATA_DIR}/{name}: repeated ids {repeated}")
    return prompts


def _check_categories(categories: Iterable[str] | str | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    wanted = (categories,) if isinstance(categories, str) else tuple(categories)
    unknown = [name for name in wanted if name not in CATEGORIES]
    if unknown:
        raise InputError(f"unknown suite categories {unknown}; the categories are {list(CATEGORIES)}")
    if not wanted:
        raise InputError(f"categories is empty; pick some of {list(CATEGORIES)} or pass None for all")
    # Spec-Bench order whatever order they were asked in, so a run's prompt order never depends on the caller.
    return tuple(name for name in CATEGORIES if name in wanted)


def load_suite(categories: Iterable[str] | str | None = None, per_category: int | None = None) -> list[SuitePrompt]:
    """The suite's prompts: the chosen categories (all by default) in CATEGORIES order, each in file order.

    per_category keeps the first N prompts of each category (all of them when a category has fewer).
    """
    chosen = _check_categories(categories)
    if per_category is not None and (isinstance(per_category, bool) or not isinstance(per_category, int)
                                     or per_category <= 0):
        raise InputError(f"per_category must be a positive integer or None, got {per_category!r}")
    prompts = []
    for category in chosen:
        prompts.extend(category_prompts(category)[:per_category])
    return prompts


def long_prompts(tokenizer, texts, count: int, max_tokens: int) -> list[list[int]]:
    """`count` chat prompts, each asking to summarise consecutive `texts` (prompt i starts at text i) joined, with
    as many of them as fit in `max_tokens` tokens."""
    prompts = []
    for start in range(count):
        ids = None
        for n in range(1, len(texts) + 1):
            notes = "\n\n".join(texts[(start + j) % len(texts)] for j in range(n))
            longer = tokenizer.encode_chat([{"role": "user", "content": "Summarize the following notes in five "
                                             f"sentences.\n\n{notes}"}])
            if len(longer) > max_tokens:
                break
            ids = longer
        if ids is None:
            raise InputError(f"max_tokens={max_tokens} holds no prompt with even one text")
        prompts.append(ids)
    return prompts
