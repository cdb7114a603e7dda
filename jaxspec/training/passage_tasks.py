"""The suite's kinds of request over passages the target wrote itself, for self-distillation sets with
``prompt_set="self_tasks"``.

The evaluation suite asks for translations, summaries, answers and follow-ups over everyday prose; the "tasks" set
asks the same kinds of request over standard-library text, and a drafter trained on it predicts the target far
worse on the suite's prose than on its code and arithmetic. A "self" set (`self_requests`) holds requests the
target wrote and the target's replies to them: everyday prose that ships with no machine but any target can
write. This set asks the suite's prose requests over those replies:

    exchanges = read_exchanges("/root/sd_self480", tokenizer)    # (request, reply) pairs of a "self" set
    chats = itertools.islice(iter_chats(exchanges, seed=0), 720)

- translation: the passage's leading sentences into one of several languages;
- summarization: the passage in two or three sentences;
- qa: the passage, then the request it answers as the question (answered from the passage alone);
- multi_turn: the request, the reply as the assistant's turn, then an everyday follow-up.

Each passage serves every kind once, in turn: the first pass over the exchanges gives passage i the kind
i mod 4, the next pass the kind after it, and so on, so that any first n chats of the stream hold the four kinds
about equally, over as many passages as there are. Only replies that read as sentences are translated. A chat
equal to, or sharing a line of 30 characters or more with, the evaluation suite is left out, and none repeats.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence

from jaxspec.decoding import api
from jaxspec.errors import InputError
from jaxspec.training import instructions

NAME = "self-tasks-1"
KINDS = ("translation", "summarization", "qa", "multi_turn")
MIN_PASSAGE_CHARS = 120  # shorter replies hold too little to translate or summarise
_QUESTION = (
    "Passage:\n{text}\n\nUsing nothing but the passage, answer this: {request}",
    "{text}\n\nFrom the text above alone: {request}",
    "Here is some text.\n\n{text}\n\nAnswer from the text only. {request}",
)
_FOLLOW_UPS = (
    "Can you make that shorter?",
    "Could you give me one more example?",
    "Please put that into a short list.",
    "Explain that as you would to a ten-year-old.",
    "What should I do first?",
    "Thanks! Can you add one tip that most people do not know?",
    "Which part of that matters most, and why?",
)


def passage(reply: str, max_chars: int) -> str | None:
    """The reply's leading text that fits `max_chars`, cut after a sentence or a line (a reply that hit the
    token limit ends mid-sentence); None when less than MIN_PASSAGE_CHARS is left."""
    text = reply.strip()
    if len(text) > max_chars:
        cut = max(text.rfind(". ", 0, max_chars) + 1, text.rfind("\n", 0, max_chars))
        text = text[:cut].rstrip()
    return text if len(text) >= MIN_PASSAGE_CHARS else None


def read_exchanges(set_dir: str, tokenizer) -> list[tuple[str, str]]:
    """(request, reply text) of every example of the "self" set `set_dir`, in the order its requests were sampled.

    The set's ``requests.json`` gives the requests; each stored example's prompt is matched to the request it
    renders, and its reply is decoded without the stop id that ended it. A reply holding an id the tokenizer does
    not decode (a vocabulary padded past the tokenizer's) is left out."""
    from jaxspec.training import selfdistill

    path = os.path.join(set_dir, selfdistill.REQUESTS)
    if not os.path.isfile(path):
        raise InputError(f"passages_from={set_dir!r} has no {selfdistill.REQUESTS}: passages come from a set made "
                         "with prompt_set='self' (the target's requests and its replies)")
    try:
        with open(path, encoding="utf-8") as fh:
            requests = json.load(fh)["requests"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a readable requests file ({err!r})") from err
    _, arrays = selfdistill.read(set_dir)
    by_prompt = {tuple(selfdistill.encode_messages(tokenizer, [{"role": "user", "content": text}])): text
                 for text in requests}
    stops = frozenset(api.stop_ids(tokenizer.eos_ids))
    replies = {}
    for row, start, length in zip(arrays["tokens"], arrays["reply_start"], arrays["lengths"]):
        request = by_prompt.get(tuple(row[:start].tolist()))
        if request is None:
            raise InputError(f"{set_dir}: an example's prompt renders none of its {selfdistill.REQUESTS}'s requests "
                             "with this tokenizer; read the set with the tokenizer of the target that made it")
        reply = row[start:length].tolist()
        if reply and reply[-1] in stops:
            reply = reply[:-1]
        replies[request] = tokenizer.decode(reply) if max(reply, default=0) < tokenizer.vocab_size else None
    missing = [text for text in requests if text not in replies]
    if missing:
        raise InputError(f"{set_dir}: {len(missing)} of its {len(requests)} requests have no example (first: "
                         f"{missing[0]!r})")
    return [(text, replies[text]) for text in requests if replies[text] is not None]


def _chat(kind: str, request: str, text: str, rng: random.Random) -> list[dict[str, str]] | None:
    user = lambda content: {"role": "user", "content": content}
    if kind == "translation":
        if not instructions.is_prose(text):
            return None
        return [user(rng.choice(instructions.TRANSLATE).format(language=rng.choice(instructions.LANGUAGES),
                                                                text=instructions.leading_sentences(text, 400)))]
    if kind == "summarization":
        return [user(rng.choice(instructions.SUMMARIZE).format(count=rng.choice(("two", "three")), text=text))]
    if kind == "qa":
        return [user(rng.choice(_QUESTION).format(text=text, request=request))]
    return [user(request), {"role": "assistant", "content": text}, user(rng.choice(_FOLLOW_UPS))]


def iter_chats(exchanges: Sequence[tuple[str, str]], seed: int = 0,
               max_chars: int = instructions.DEFAULT_MAX_CHARS) -> Iterator[list[dict[str, str]]]:
    """Chats (ending with a user turn) of the four prose kinds over the exchanges' replies, deterministic given
    `seed`, never repeating one, none overlapping the suite; the stream ends when every passage has served every
    kind. A reply shorter than MIN_PASSAGE_CHARS serves none, and a reply given twice serves once."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_PASSAGE_CHARS:
        raise InputError(f"max_chars={max_chars!r} must be an integer of at least {MIN_PASSAGE_CHARS}")
    rng = random.Random(seed)
    usable, passages = [], set()
    for request, reply in exchanges:
        text = passage(reply, max_chars)
        if text is not None and text not in passages:  # a reply given twice is one passage
            passages.add(text)
            usable.append((request, text))
    seen = set()
    for shift, (i, (request, text)) in itertools.product(range(len(KINDS)), enumerate(usable)):
        chat = _chat(KINDS[(i + shift) % len(KINDS)], request, text, rng)
        if chat is None:
            continue
        key = tuple(m["content"] for m in chat)
        if key in seen or any(instructions.overlaps_suite(content) for content in key):
            continue
        seen.add(key)
        yield chat


def description(set_dir: str, source_prompt_set: str, seed: int, max_chars: int) -> str:
    """What a self-distillation manifest records of this set's prompts."""
    return (f"{NAME}: the suite's prose requests over the replies of {os.path.abspath(set_dir)} "
            f"({source_prompt_set}), seed={seed}, max_chars={max_chars}")


__all__ = ["KINDS", "MIN_PASSAGE_CHARS", "NAME", "description", "iter_chats", "passage", "read_exchanges"]
