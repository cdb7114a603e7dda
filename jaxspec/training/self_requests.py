"""Requests written by the target itself (Magpie; Xu et al., 2024), for self-distillation sets with
``prompt_set="self"``.

An instruction-tuned model given its chat template only up to where a user's message begins writes a user's
request: sampled at temperature 1, the requests follow what the model was tuned on (general questions, plans,
explanations), not the standard library's text that the "tasks" and "docs" sets quote.

    texts, counts = sample_requests(model, params, tokenizer, 480, seed=0, max_prompt_tokens=256, batch_size=32)

A sampled request is kept when it ends at one of the tokenizer's stop ids within `MAX_REQUEST_TOKENS` (an
unfinished one is usually text that runs on, not a request), holds only ids the tokenizer decodes (a model's
vocabulary may be padded past the tokenizer's), has at least `min_chars` characters, repeats no
kept request, shares no line with the evaluation suite (`instructions.overlaps_suite`), and its rendered chat
fits `max_prompt_tokens`. `counts` says how many were sampled and why the others were left out.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np

from jaxspec.decoding import api
from jaxspec.errors import InputError
from jaxspec.training import instructions

TEMPERATURE = 1.0
MAX_REQUEST_TOKENS = 64  # most finished requests of SmolLM2-135M-Instruct take 10-50 tokens
MIN_REQUEST_CHARS = 12
MAX_SAMPLES_PER_REQUEST = 20  # give up (naming the counts) when fewer than 1 in 20 samples is kept
REJECTIONS = ("unfinished", "unknown_ids", "too_short", "repeated", "overlaps_suite", "too_long")


def request_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where the first user message's content begins: the longest common
    prefix of two one-message chats (a token the template would merge with the content is left to the model)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("prompt_set='self' needs a tokenizer with a chat template: the target writes requests "
                         "after the template's opening of a user turn")
    first, second = (tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=False)
                     for text in ("x", "7"))
    common = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    if common == 0:
        raise InputError("the chat template renders no text before a user's message; prompt_set='self' has no "
                         "prefix to write requests after")
    return first[:common]


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0] >> 1)


def _rejection(finished: bool, decodable: bool, text: str, seen: set[str], prompt_len: int,
               max_prompt_tokens: int, min_chars: int) -> str | None:
    """Why a sampled request is left out (one of REJECTIONS), or None to keep it."""
    if not finished:
        return "unfinished"
    if not decodable:
        return "unknown_ids"
    if len(text) < min_chars:
        return "too_short"
    if text in seen:
        return "repeated"
    if instructions.overlaps_suite(text):
        return "overlaps_suite"
    if prompt_len > max_prompt_tokens:
        return "too_long"
    return None


def sample_requests(model, params, tokenizer, num_requests: int, *, seed: int, max_prompt_tokens: int,
                    batch_size: int, min_chars: int = MIN_REQUEST_CHARS, on_batch=None
                    ) -> tuple[list[str], dict[str, int]]:
    """(the first `num_requests` kept requests, in sampling order; counts of "sampled", "kept" and each of
    `REJECTIONS`). Deterministic given `seed` and `batch_size` (each batch of `batch_size` rows samples with its
    own key). `on_batch(kept_so_far)` is called after each batch (a progress bar)."""
    from jaxspec.training.selfdistill import encode_messages

    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise InputError(f"num_requests={num_requests!r} must be a positive integer")
    prefix = request_prefix(tokenizer)
    stops = frozenset(api.stop_ids(tokenizer.eos_ids))
    if not stops:
        raise InputError("prompt_set='self' needs the tokenizer's stop ids (eos_ids): a request ends at one")
    kept, seen = [], set()
    counts = collections.Counter({key: 0 for key in ("sampled", "kept", *REJECTIONS)})
    for batch in itertools.count():
        if counts["sampled"] >= MAX_SAMPLES_PER_REQUEST * num_requests:
            raise InputError(f"prompt_set='self': {counts['sampled']} sampled requests kept only {len(kept)} of "
                             f"{num_requests} ({dict(counts)}); the target rarely writes a finished request "
                             "after its chat template's user opening")
        result = api.generate(model, params, [prefix] * batch_size, max_new_tokens=MAX_REQUEST_TOKENS,
                              temperature=TEMPERATURE, eos_ids=tokenizer.eos_ids, seed=_batch_seed(seed, batch))
        for ids in result.tokens:
            counts["sampled"] += 1
            finished = bool(ids) and ids[-1] in stops
            decodable = max(ids, default=0) < tokenizer.vocab_size
            text = tokenizer.decode(ids[:-1]).strip() if finished and decodable else ""
            prompt_len = len(encode_messages(tokenizer, [{"role": "user", "content": text}])) if text else 0
            reason = _rejection(finished, decodable, text, seen, prompt_len, max_prompt_tokens, min_chars)
            if reason is not None:
                counts[reason] += 1
                continue
            seen.add(text)
            kept.append(text)
            counts["kept"] += 1
            if len(kept) == num_requests:
                return kept, dict(counts)
        if on_batch is not None:
            on_batch(len(kept))


__all__ = ["MAX_REQUEST_TOKENS", "REJECTIONS", "TEMPERATURE", "request_prefix", "sample_requests"]
