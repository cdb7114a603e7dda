"""Instructions for self-distillation, built from text every machine has: the running interpreter's standard
library (as the default training corpus is, jaxspec/training/data.py).

    prompts = instruction_prompts(320, seed=0)                        # the "tasks" set: the suite's six kinds
    prompts = instruction_prompts(320, seed=0, prompt_set="docs")     # instructions about the library itself

Two sets, each a deterministic stream given the seed (on a given Python version) that never repeats a text:

- ``tasks`` (PROMPT_SETS["tasks"]): the kinds of request the evaluation suite makes, over library text: translate
  a docstring's prose into another language, summarise it, answer a question about it, a generated arithmetic
  word problem, write a function from its name, signature and docstring summary (or explain / review one), and
  a follow-up question after an earlier exchange (two user turns). The wording of every request is this
  module's own, none of the suite's.
- ``docs`` (PROMPT_SETS["docs"]): module, class and function docstrings and the source of documented functions,
  each under one of several instruction templates ("Explain what this function does:", "Summarize this
  documentation:", "Write a docstring for:", "Continue the text:", "Continue the code:", ...).

An instruction equal to, or sharing a line of 30 characters or more with, a conversation of the evaluation suite
(jaxspec/eval/suite.py) is left out of both.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import os
import random
import re
import sys
import textwrap
from collections.abc import Iterator

from jaxspec.errors import InputError
from jaxspec.eval.suite import load_suite
from jaxspec.training import data

DEFAULT_MAX_CHARS = 800
# The name recorded in a self-distillation manifest for each set (the "docs" name predates "tasks").
PROMPT_SETS = {"tasks": "stdlib-tasks-1", "docs": "stdlib-instructions-1"}
DEFAULT_PROMPT_SET = "tasks"

# Directories of the standard library that hold no library text worth instructing on: those the training
# corpus skips (tests, installed packages), and demos, codec tables, generated data.
_SKIP_DIRS = data.STDLIB_SKIP_DIRS | {"idlelib", "turtledemo", "lib2to3", "pydoc_data", "ensurepip", "encodings"}
MIN_CHARS = 60  # shortest docstring or function source that makes an instruction
# Pieces taken from one file before moving to the next: "docs" keeps to 2 (as it always has); "tasks" needs more
# prose, most of which sits in a few long module docstrings.
_UNITS_PER_FILE = {"docs": 2, "tasks": 6}
_SUITE_LINE = 30  # a suite line this long found in an instruction excludes it

_DOC_TEMPLATES = {
    "summarize": "Summarize this documentation:\n\n{text}",
    "key_points": "List the key points of:\n\n{text}",
    "beginner": "Explain this documentation to someone new to Python:\n\n{text}",
    "questions": "Write three questions this documentation answers, each with its answer:\n\n{text}",
    "continue": "Continue the text:\n\n{head}",
}
_CODE_TEMPLATES = {
    "explain": "Explain what this function does:\n\n```python\n{code}\n```",
    "docstring": "Write a docstring for:\n\n```python\n{bare}\n```",
    "signature": "Describe the arguments and the return value of this function:\n\n```python\n{code}\n```",
    "tests": "Suggest test cases for this function:\n\n```python\n{code}\n```",
    "review": "Review this code and suggest one improvement:\n\n```python\n{code}\n```",
    "continue": "Continue the code:\n\n```python\n{head}\n```",
}


# ------------------------------------------------------------------------------------------ library text


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A piece of the standard library and the template fields it fills."""

    kind: str  # "doc" or "code"
    fields: dict


def _cut_paragraphs(text: str, max_chars: int) -> str | None:
    """The leading paragraphs of `text` that fit `max_chars`, or None when they are too short or none fits."""
    kept = ""
    for paragraph in text.strip().split("\n\n"):
        joined = f"{kept}\n\n{paragraph}" if kept else paragraph
        if len(joined) > max_chars:
            break
        kept = joined
    return kept if len(kept) >= MIN_CHARS else None


def _head(text: str) -> str | None:
    """About the first half of `text`, ending at a sentence or line end, for "Continue the text"."""
    middle = len(text) // 2
    cut = max(text.rfind(". ", 0, middle) + 1, text.rfind("\n", 0, middle))
    return text[:cut].rstrip() if cut >= MIN_CHARS // 2 else None


def _doc_unit(doc: str | None, name: str, max_chars: int) -> _Unit | None:
    text = _cut_paragraphs(doc or "", max_chars)
    return None if text is None else _Unit("doc", {"text": text, "head": _head(text), "name": name})


def _first_sentence(doc: str) -> str:
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = first.find(". ")
    return first if end < 0 else first[:end + 1]


def _code_unit(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], max_chars: int) -> _Unit | None:
    """A documented function with a body besides its docstring: its source, and its source without the docstring."""
    if len(node.body) < 2 or ast.get_docstring(node) is None:
        return None
    first, doc = node.lineno - 1, node.body[0]
    code = textwrap.dedent("\n".join(lines[first:node.end_lineno])).strip("\n")
    bare = textwrap.dedent("\n".join(lines[first:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]))
    if not MIN_CHARS <= len(code) <= max_chars:
        return None
    code_lines = code.splitlines()
    head = "\n".join(code_lines[:len(code_lines) // 2]) if len(code_lines) >= 4 else None
    args = node.args
    if args.args and args.args[0].arg in ("self", "cls"):  # a method: asked for as a plain function
        args = ast.arguments(args.posonlyargs, args.args[1:], args.vararg, args.kwonlyargs, args.kw_defaults,
                             args.kwarg, args.defaults[-len(args.args) + 1:] if len(args.args) > 1 else [])
    return _Unit("code", {"code": code, "bare": bare.strip("\n"), "head": head, "name": node.name,
                          "signature": f"{node.name}({ast.unparse(args)})",
                          "summary": _first_sentence(ast.get_docstring(node))})


def _file_units(path: str, module: str, max_chars: int) -> list[_Unit]:
    """Docstrings (module, classes, functions) and documented functions of one source file; [] for a file that
    does not read or parse."""
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    units = [_doc_unit(ast.get_docstring(tree), module, max_chars)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            units.append(_doc_unit(ast.get_docstring(node), node.name, max_chars))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            units.append(_code_unit(node, lines, max_chars))
    return [u for u in units if u is not None]


def _library_units(rng: random.Random, max_chars: int, per_file: int) -> Iterator[_Unit]:
    """Standard-library files in an order shuffled by `rng`, up to `per_file` pieces of each."""
    root, files = data.stdlib_files(_SKIP_DIRS)
    rng.shuffle(files)
    for rel in files:
        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        units = _file_units(os.path.join(root, rel), module, max_chars)
        rng.shuffle(units)
        yield from units[:per_file]


@functools.cache
def _suite_texts() -> tuple[frozenset[str], tuple[str, ...]]:
    """(every message text of the evaluation suite, its lines of at least _SUITE_LINE characters)."""
    texts = frozenset(m["content"] for p in load_suite() for m in p.messages)
    lines = {line.strip() for t in texts for line in t.splitlines() if len(line.strip()) >= _SUITE_LINE}
    return texts, tuple(sorted(lines))


def overlaps_suite(content: str) -> bool:
    """Whether `content` equals a message of the evaluation suite or holds one of its long lines."""
    texts, lines = _suite_texts()
    return content in texts or any(line in content for line in lines)


# ------------------------------------------------------------------------------------------ the "docs" set


def _docs_chats(rng: random.Random, max_chars: int) -> Iterator[list[dict[str, str]]]:
    for unit in _library_units(rng, max_chars, _UNITS_PER_FILE["docs"]):
        templates = _DOC_TEMPLATES if unit.kind == "doc" else _CODE_TEMPLATES
        usable = [name for name, text in templates.items() if "{head}" not in text or unit.fields["head"]]
        yield [{"role": "user", "content": templates[rng.choice(usable)].format(**unit.fields)}]


# ------------------------------------------------------------------------------------------ the "tasks" set

LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch")
TRANSLATE = (
    "Give the {language} version of this text, and nothing else:\n\n{text}",
    "Put this passage into {language}. Answer with the {language} text only.\n\n{text}",
    "Translate to {language}:\n\n{text}",
)
SUMMARIZE = (
    "Write a summary of this passage in {count} sentences.\n\n{text}",
    "In at most {count} sentences, what does this text say?\n\n{text}",
    "Condense the following into {count} short sentences:\n\n{text}",
)
_QUESTION = (
    "Here is a passage from a program's documentation.\n\n{text}\n\nUsing only the passage: what is `{name}` for, "
    "and what does the passage say about how to use it?",
    "Passage:\n{text}\n\nBased on this passage alone, answer: what does `{name}` do?",
    "{text}\n\nAccording to the text above, name two things `{name}` does or allows, and quote where it says so.",
)
_WRITE_CODE = (
    "Write a Python function `{signature}`. What it should do: {summary} Show one example of calling it.",
    "Implement `{signature}` in Python. Its job: {summary}",
    "I need a Python function with the signature `{signature}`. {summary} Please write it and explain it briefly.",
)
_FOLLOW_UPS = (
    "Can you give a short example of using it?",
    "Say that again in simpler words, for a beginner.",
    "Turn that into a list of three short points.",
    "What is one mistake people make with it, and how do they avoid it?",
    "Which other part of the standard library is it often used with, and why?",
)
_FIRST_TURNS = ("What is `{name}` in Python's standard library?", "Tell me about `{name}`.",
                "What does `{name}` do?")
_SOLVE = ("Work it out one step at a time and put the final answer on the last line.",
          "Show your reasoning, then give the answer.", "Explain each step, then state the result.")
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
_ITEMS = ("pencils", "stickers", "marbles", "cookies", "cards", "stamps", "seashells", "buttons", "books", "eggs")


def _word_problem(rng: random.Random) -> tuple[str, int]:
    """(an arithmetic word problem from one of several patterns, its answer: a whole number of at least 1)."""
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    pattern = rng.randrange(6)
    if pattern == 0:
        boxes, per_box = rng.randint(3, 12), rng.randint(4, 15)
        gone = rng.randint(1, boxes * per_box - 1)
        text = (f"{name} buys {boxes} boxes of {item} with {per_box} in each box, then gives {gone} of them to "
                f"{other}. How many {item} does {name} keep?")
        answer = boxes * per_box - gone
    elif pattern == 1:
        price = rng.randint(2, 9)
        count, note = rng.randint(2, 99 // price), rng.choice((100, 200))
        text = (f"One packet of {item} costs {price} dollars. {name} buys {count} packets and pays with a "
                f"{note}-dollar note. How much change does {name} get?")
        answer = note - price * count
    elif pattern == 2:
        speed, hours, extra = rng.randint(30, 90), rng.randint(2, 6), rng.randint(5, 60)
        text = (f"A train travels at {speed} kilometres per hour for {hours} hours, then another {extra} "
                f"kilometres. How far does it travel in all?")
        answer = speed * hours + extra
    elif pattern == 3:
        parts, each, more = rng.randint(2, 6), rng.randint(4, 20), rng.randint(1, 5)
        text = (f"{name} shares {parts * each} {item} equally among {parts} friends and keeps none. {other} then "
                f"gives each friend {more} more. How many {item} does each friend have?")
        answer = each + more
    elif pattern == 4:
        width, length, price = rng.randint(3, 15), rng.randint(4, 20), rng.randint(2, 12)
        text = (f"{name}'s garden is {width} metres wide and {length} metres long. Fencing costs {price} dollars a "
                f"metre. What does it cost to fence the whole garden?")
        answer = 2 * (width + length) * price
    else:
        start, percent = rng.randrange(40, 400, 20), rng.choice((10, 20, 25, 50))
        later = rng.randint(1, start - start * percent // 100 - 1)
        text = (f"A shop has {start} {item}. It sells {percent} percent of them in the morning and {later} more in "
                f"the afternoon. How many are left?")
        answer = start - start * percent // 100 - later
    return f"{text}\n\n{rng.choice(_SOLVE)}", answer


def is_prose(text: str) -> bool:
    """Text that reads as sentences (no code, doctests or tables): worth translating or summarising."""
    letters = sum(c.isalpha() or c in " .,;:'-\n" for c in text)
    return (letters >= 0.9 * len(text) and ">>>" not in text and "::" not in text
            and not re.search(r"^[ \t]+\S", text, re.MULTILINE))


def _reflowed(text: str) -> str:
    """Docstring paragraphs with their line breaks joined (as a person would paste them)."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


def leading_sentences(text: str, limit: int) -> str:
    """The leading sentences of `text` (joined into one paragraph) that fit `limit` characters."""
    words = " ".join(text.split())
    cut = words.rfind(". ", 0, limit)
    return words if len(words) <= limit else words[:cut + 1] if cut > 0 else words[:limit]


def _task_chat(kind: str, unit: _Unit | None, rng: random.Random) -> list[dict[str, str]]:
    user = lambda text: {"role": "user", "content": text}
    if kind == "math":
        return [user(_word_problem(rng)[0])]
    fields = dict(unit.fields, text=_reflowed(unit.fields["text"])) if unit.kind == "doc" else unit.fields
    if kind == "translation":
        text = leading_sentences(fields["text"], 400)
        return [user(rng.choice(TRANSLATE).format(language=rng.choice(LANGUAGES), text=text))]
    if kind == "summarization":
        return [user(rng.choice(SUMMARIZE).format(count=rng.choice(("two", "three")), text=fields["text"]))]
    if kind == "qa":
        return [user(rng.choice(_QUESTION).format(**fields))]
    if kind == "code":
        if rng.random() < 0.5:
            return [user(rng.choice(_WRITE_CODE).format(**fields))]
        return [user(_CODE_TEMPLATES[rng.choice(("explain", "review", "tests"))].format(**fields))]
    # multi_turn: an earlier exchange (the library's own words as the answer), then a follow-up.
    return [user(rng.choice(_FIRST_TURNS).format(**fields)),
            {"role": "assistant", "content": fields["text"]}, user(rng.choice(_FOLLOW_UPS))]


# The suite's categories in turn; each takes the next library piece it fits (math takes none).
_TASK_KINDS = ("translation", "summarization", "qa", "math", "code", "multi_turn")
_is_doc = lambda u: u.kind == "doc"
_is_prose = lambda u: _is_doc(u) and is_prose(u.fields["text"])
_FITS = {"translation": _is_prose, "summarization": _is_prose, "qa": _is_doc, "code": lambda u: u.kind == "code",
         "multi_turn": _is_doc}


def _tasks_chats(rng: random.Random, max_chars: int) -> Iterator[list[dict[str, str]]]:
    units, waiting = _library_units(rng, max_chars, _UNITS_PER_FILE["tasks"]), []
    for kind in itertools.cycle(_TASK_KINDS):
        if kind == "math":
            yield _task_chat(kind, None, rng)
            continue
        fits = _FITS[kind]
        unit = next((u for u in waiting if fits(u)), None)
        if unit is not None:
            waiting.remove(unit)
        while unit is None:
            unit = next(units, None)
            if unit is None:
                return  # the library is used up
            if not fits(unit):
                waiting.append(unit)  # kept for a kind it fits
                unit = None
        yield _task_chat(kind, unit, rng)


# ------------------------------------------------------------------------------------------ the streams


def check_prompt_set(prompt_set) -> None:
    if prompt_set not in PROMPT_SETS:
        raise InputError(f"prompt_set={prompt_set!r} is not one of {sorted(PROMPT_SETS)}")


def iter_instructions(seed: int = 0, max_chars: int = DEFAULT_MAX_CHARS, prompt_set: str = DEFAULT_PROMPT_SET
                      ) -> Iterator[list[dict[str, str]]]:
    """The stream `instruction_prompts` takes its first n from: chats (lists of {"role", "content"} messages
    ending with a user turn), deterministic given `seed`, never repeating one, none overlapping the suite."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_CHARS:
        raise InputError(f"max_chars={max_chars!r} must be an integer of at least {MIN_CHARS}")
    check_prompt_set(prompt_set)
    chats = (_tasks_chats if prompt_set == "tasks" else _docs_chats)(random.Random(seed), max_chars)
    seen = set()
    for chat in chats:
        key = tuple(m["content"] for m in chat)
        if key in seen or any(overlaps_suite(text) for text in key):
            continue
        seen.add(key)
        yield chat


def instruction_prompts(n: int, seed: int = 0, max_chars: int = DEFAULT_MAX_CHARS,
                        prompt_set: str = DEFAULT_PROMPT_SET) -> list[list[dict[str, str]]]:
    """The first n chats of `iter_instructions`; the first m of n are the m of `instruction_prompts(m, ...)`.
    `max_chars` bounds the quoted library text."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n={n!r} must be a non-negative integer")
    prompts = list(itertools.islice(iter_instructions(seed, max_chars, prompt_set), n))
    if len(prompts) < n:
        raise InputError(f"the standard library gives only {len(prompts)} instructions of prompt_set={prompt_set!r} "
                         f"with max_chars={max_chars}; asked for {n}")
    return prompts


def prompt_set_description(seed: int, max_chars: int, prompt_set: str = DEFAULT_PROMPT_SET) -> str:
    """What a self-distillation manifest records of the prompts: the set, the library's Python, the settings."""
    check_prompt_set(prompt_set)
    version = ".".join(map(str, sys.version_info[:3]))
    return f"{PROMPT_SETS[prompt_set]}: Python {version} standard library, seed={seed}, max_chars={max_chars}"
