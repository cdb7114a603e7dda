"""Mixed batches (Sarathi-Serve's stall-free batching): a serving loop over a fixed number of slots in which a
long prompt is prefilled in chunks while the other slots keep decoding, in the same forward.

    forward = MixedForward(model, params, slots=4, max_len=1088)    # decode layout built once
    requests = [Request(short_ids, arrival=0), Request(long_ids, arrival=8)]
    result = serve(forward, requests, Schedule(chunk=128), max_new=64, eos_ids=tokenizer.eos_ids)
    result.requests[1].tokens, result.requests[1].ttft_s, result.requests[0].gaps_s, result.iteration_s

Every iteration is ONE extend forward of the whole slot batch, [slots, width] tokens with a per-row count
(`num_new`): a prefilling row feeds the next piece of its prompt (up to `chunk` tokens), a decoding row its last
token, an idle row nothing. A row whose prompt is complete takes its first token from the logits at its last
prompt position; decoding is greedy, so every request's tokens are those of autoregressive decoding of its prompt
alone. A row stops at `max_new` tokens or after a stop id and frees its slot; the next request admitted there
starts from an empty row (length 0, recurrent states as new), inside the next forward.

The schedules differ in one switch (`Schedule`):
  chunked (Sarathi)  `Schedule(chunk=C)`: decoding rows ride along with every prefill chunk, so a long prompt
                     delays them by one chunk's forward per iteration, never by the whole prompt;
  prefill first      `Schedule.prefill_first(width)`: an iteration that prefills feeds no decoding row (they
                     wait), and with `width` >= the longest prompt every prompt goes in one forward.
An iteration is as wide as its longest piece, rounded up to a power of two (at least 16) and capped at the
chunk; one with no prefill is one token wide. Each width compiles once per `MixedForward`.

All rows share the forward's width, so an iteration costs slots x width token columns whatever the rows feed:
decoding rows pay a chunk's width while a prompt is prefilled (in both schedules alike: the total prefill
columns are slots x prompt length either way). A packed batch (only the live tokens, with per-token rows and
positions) would remove that; the model's extend forward takes a row layout only.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding import api, engine
from jaxspec.errors import InputError
from jaxspec.models.decode_layout import for_decoding
from jaxspec.models.lm import DecoderLM
from jaxspec.state import DecodeState, KVCache, init_decode_state


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What an iteration feeds. chunk: the most prompt tokens a row feeds per iteration; decode_with_prefill:
    whether decoding rows feed their token in an iteration that also prefills (False: they wait)."""

    chunk: int
    decode_with_prefill: bool = True

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, (int, np.integer)) or self.chunk <= 0:
            raise InputError(f"chunk={self.chunk!r} must be a positive number of tokens")

    @classmethod
    def prefill_first(cls, width: int) -> Schedule:
        """The baseline: whole prompts (up to `width` tokens) in one forward while decoding rows wait."""
        return cls(chunk=width, decode_with_prefill=False)

    @property
    def name(self) -> str:
        return f"chunked {self.chunk}" if self.decode_with_prefill else f"prefill first ({self.chunk})"


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]  # token ids
    arrival: int = 0  # the iteration from which the request may be admitted to a free slot


def clear_rows(state: DecodeState, rows, empty: DecodeState) -> DecodeState:
    """`state` with `rows` [B] bool set back to `empty` (a new state of the same shape): length 0, recurrent
    states as new. Plain KV caches keep their entries: beyond a row's length they are never read, and the next
    request overwrites them as it goes."""
    def renewed(olds, news, group_axes: int):
        """Each entry with the rows renewed (batch axis after `group_axes` stacked ones); None, KV caches kept."""
        def renew(old, new):
            return jnp.where(rows.reshape((1,) * group_axes + (-1,) + (1,) * (old.ndim - 1 - group_axes)), new, old)

        return tuple(old if old is None or isinstance(old, KVCache) else jax.tree.map(renew, old, new)
                     for old, new in zip(olds, news, strict=True))

    stacked = None if state.stacked is None else renewed(state.stacked, empty.stacked, 1)
    return state.replace(lengths=jnp.where(rows, 0, state.lengths), layers=renewed(state.layers, empty.layers, 0),
                         stacked=stacked)


def _mixed_step(model: DecoderLM, params, state: DecodeState, tokens, num_new, reset):
    """Empty the `reset` rows, append num_new[b] of tokens[b] to each row, and return each row's greedy next token
    (from the logits at its last new position; meaningless where num_new is 0) and the new state."""
    # A new state's arrays are constants under jit; XLA keeps only what clear_rows uses of them.
    state = clear_rows(state, reset, init_decode_state(model.model_cfg, tokens.shape[0], state.max_len))
    out, state = model.apply({"params": params}, tokens, state=state, num_new=num_new, return_hidden=True)
    last_hidden = out.hidden[jnp.arange(tokens.shape[0]), jnp.maximum(num_new - 1, 0)]
    # Only the last positions go through the LM head; the forward's own logits are unused, so XLA drops them.
    logits = model.apply({"params": params}, last_hidden, method="project")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), state


_STEP = jax.jit(_mixed_step, static_argnums=0, donate_argnums=2)


class MixedForward:
    """The one forward of a mixed batch for `slots` rows and a decode state of `max_len`, compiled once per
    width (ahead of time, so a caller can keep compile time out of its timings)."""

    def __init__(self, model: DecoderLM, params, *, slots: int, max_len: int):
        for name, value in (("slots", slots), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InputError(f"{name}={value!r} must be a positive integer")
        self.model, self.params = for_decoding(model, params)
        self.slots, self.max_len = int(slots), int(max_len)
        self._executables: dict[int, object] = {}
        self.compile_s = 0.0  # all compiles so far

    @property
    def vocab_size(self) -> int:
        return self.model.model_cfg.vocab_size

    def empty_state(self) -> DecodeState:
        return init_decode_state(self.model.model_cfg, self.slots, self.max_len)

    def compile(self, width: int) -> float:
        """Compile the forward of `width` tokens per row unless done before; returns the seconds it took."""
        if width in self._executables:
            return 0.0
        start = time.perf_counter()
        tokens = jax.ShapeDtypeStruct((self.slots, width), jnp.int32)
        counts = jax.ShapeDtypeStruct((self.slots,), jnp.int32)
        reset = jax.ShapeDtypeStruct((self.slots,), jnp.bool_)
        self._executables[width] = _STEP.lower(self.model, self.params, jax.eval_shape(self.empty_state), tokens,
                                               counts, reset).compile()
        seconds = time.perf_counter() - start
        self.compile_s += seconds
        return seconds

    def __call__(self, state: DecodeState, tokens: np.ndarray, num_new: np.ndarray, reset: np.ndarray):
        """(next token per row [slots] on the host, new state); `state` is consumed (donated)."""
        self.compile(tokens.shape[1])
        next_tokens, state = self._executables[tokens.shape[1]](self.params, state, tokens, num_new, reset)
        return np.asarray(next_tokens), state


@dataclasses.dataclass
class RequestRecord:
    """One request's record. Times are seconds on the run's clock (compilation excluded)."""

    prompt_len: int
    arrival: int  # iteration
    arrival_s: float = float("nan")  # when the iteration `arrival` began
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_s: list[float] = dataclasses.field(default_factory=list)  # when each token was on the host
    token_iteration: list[int] = dataclasses.field(default_factory=list)  # the iteration that made each token

    @property
    def ttft_s(self) -> float:
        """Time to first token: from arrival (waiting for a slot included) to the first token."""
        return self.token_s[0] - self.arrival_s

    @property
    def gaps_s(self) -> np.ndarray:
        """The inter-token gaps after the first token."""
        return np.diff(np.asarray(self.token_s))


@dataclasses.dataclass
class ServeResult:
    requests: list[RequestRecord]  # in the order given
    iteration_s: list[float]  # wall time of each iteration (one forward and its host work)
    iteration_width: list[int]  # tokens per row of each iteration's forward
    prefill_tokens: list[int]  # prompt tokens fed per iteration
    decode_tokens: list[int]  # decoding rows' tokens fed per iteration
    wall_s: float  # the whole run, compilation excluded
    compile_s: float  # forwards this run compiled

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of all requests per second of the run."""
        return sum(len(r.tokens) for r in self.requests) / max(self.wall_s, 1e-9)


def iteration_width(longest_piece: int, chunk: int) -> int:
    """Tokens per row of an iteration whose longest row feeds `longest_piece`: one for a decode-only iteration,
    else the piece rounded up to a power of two (at least 16), capped at the chunk: few compiled widths."""
    return 1 if longest_piece <= 1 else min(chunk, engine.bucket_width(longest_piece))


def plan_iteration(wants: Sequence[Sequence[int]], prefilling: Sequence[bool], schedule: Schedule
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [rows, width], num_new [rows]) of one iteration. wants[b]: what row b would feed (the rest of its
    prompt, its last token, or nothing); prefilling[b]: whether that is prompt."""
    any_prefill = any(p and len(w) for w, p in zip(wants, prefilling, strict=True))
    decode_fed = not any_prefill or schedule.decode_with_prefill
    take = np.asarray([min(len(w), schedule.chunk) if p else (len(w) if decode_fed else 0)
                       for w, p in zip(wants, prefilling, strict=True)], np.int32)
    tokens = np.zeros((len(wants), iteration_width(int(take.max(initial=0)), schedule.chunk)), np.int32)
    for row, (want, n) in enumerate(zip(wants, take, strict=True)):
        tokens[row, :n] = want[:n]
    return tokens, take


def check_requests(requests: Sequence[Request], vocab_size: int, max_len: int, max_new: int) -> None:
    if not requests:
        raise InputError("requests is empty: serve needs at least one Request")
    api.check_prompts([r.prompt for r in requests], vocab_size)
    for i, r in enumerate(requests):
        if isinstance(r.arrival, bool) or not isinstance(r.arrival, (int, np.integer)) or r.arrival < 0:
            raise InputError(f"requests[{i}].arrival={r.arrival!r} must be an iteration index >= 0")
        if len(r.prompt) + max_new > max_len:
            raise InputError(f"requests[{i}]: a prompt of {len(r.prompt)} tokens + max_new={max_new} does not fit "
                             f"the decode state (max_len={max_len})")


@dataclasses.dataclass
class _Slot:
    request: int | None = None  # index of the request it serves
    fed: int = 0  # prompt tokens of that request fed so far
    admitted: bool = False  # since the last forward: its row is emptied in the next one


def _admit(slots: list[_Slot], waiting: deque, requests: Sequence[Request], records: list[RequestRecord],
           iteration: int) -> None:
    """Give free slots to the requests that have arrived by `iteration`, first come first served."""
    for index, slot in enumerate(slots):
        if slot.request is None and waiting and requests[waiting[0]].arrival <= iteration:
            slots[index] = _Slot(waiting.popleft(), 0, True)
            records[slots[index].request].slot = index


def _wants(slot: _Slot, requests: Sequence[Request], records: list[RequestRecord]) -> tuple[Sequence[int], bool]:
    """(what the slot's row would feed now, whether that is prompt): the rest of the prompt, else the last token."""
    if slot.request is None:
        return (), False
    prompt = requests[slot.request].prompt
    if slot.fed < len(prompt):
        return prompt[slot.fed:], True
    return records[slot.request].tokens[-1:], False


def serve(forward: MixedForward, requests: Sequence[Request], schedule: Schedule, *, max_new: int,
          eos_ids=()) -> ServeResult:
    """Serve `requests` through `forward`'s slots under `schedule`, greedily, first come first served (by
    arrival, then by order given); see the module docstring. Returns every request's tokens and timings."""
    if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or max_new <= 0:
        raise InputError(f"max_new={max_new!r} must be a positive integer")
    if schedule.chunk > forward.max_len:
        raise InputError(f"chunk={schedule.chunk} is wider than the decode state (max_len={forward.max_len})")
    check_requests(requests, forward.vocab_size, forward.max_len, max_new)
    stops = set(api.stop_ids(eos_ids))
    records = [RequestRecord(len(r.prompt), int(r.arrival)) for r in requests]
    waiting = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival))
    slots = [_Slot() for _ in range(forward.slots)]
    state = forward.empty_state()
    log = ServeResult(records, iteration_s=[], iteration_width=[], prefill_tokens=[], decode_tokens=[],
                      wall_s=0.0, compile_s=0.0)
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start - log.compile_s  # the run's clock stops while compiling
    iteration = 0
    while waiting or any(slot.request is not None for slot in slots):
        if all(slot.request is None for slot in slots):  # nothing runs until the next arrival
            iteration = max(iteration, requests[waiting[0]].arrival)
        began = clock()
        for i in waiting:
            if requests[i].arrival <= iteration and np.isnan(records[i].arrival_s):
                records[i].arrival_s = began
        _admit(slots, waiting, requests, records, iteration)
        wants, prefilling = zip(*(_wants(slot, requests, records) for slot in slots), strict=True)
        tokens, num_new = plan_iteration(wants, prefilling, schedule)
        log.compile_s += forward.compile(tokens.shape[1])
        began = clock()
        next_tokens, state = forward(state, tokens, num_new, np.asarray([slot.admitted for slot in slots]))
        now = clock()
        log.iteration_s.append(now - began)
        log.iteration_width.append(tokens.shape[1])
        log.prefill_tokens.append(int(num_new[np.asarray(prefilling)].sum()))
        log.decode_tokens.append(int(num_new.sum()) - log.prefill_tokens[-1])
        for index, slot in enumerate(slots):
            slot.admitted = False
            slot.fed += int(num_new[index]) if prefilling[index] else 0
            if num_new[index] == 0 or slot.fed < records[slot.request].prompt_len:  # no token for this row yet
                continue
            record = records[slot.request]
            token = int(next_tokens[index])
            record.tokens.append(token)
            record.token_s.append(now)
            record.token_iteration.append(iteration)
            if token in stops or len(record.tokens) == max_new:
                slots[index] = _Slot()
        iteration += 1
    log.wall_s = clock()
    return log
