"""Self-distillation sets: the target model's own replies to instructions, stored with its hidden states, so a
drafter (EAGLE-style feature drafters, Medusa / Hydra heads) trains on them without running the target again.

    summary = generate(lm.model, lm.params, lm.tokenizer, "/tmp/sd", num_prompts=64, max_new_tokens=96,
                       seq_len=384, batch_size=8, target_workdir=lm.workdir, tokenizer_name=lm.config.data.tokenizer)
    manifest, arrays = read("/tmp/sd")
    mask = loss_mask(arrays)                              # [N, L]: positions whose next token is a reply token

Instructions come from `jaxspec.training.instructions` (text of the running interpreter's standard library):
the "tasks" set by default (the six kinds of request of the evaluation suite, over library text), or "docs"
(instructions about the library's docstrings and functions); or, with "self", from the target itself
(`jaxspec.training.self_requests`: requests it writes after its chat template's opening of a user turn, sampled
once and kept in ``requests.json``, which a rerun reads); or, with "self_tasks", the suite's prose requests
(translate, summarise, answer from, follow up) over the replies of such a "self" set, `passages_from`
(`jaxspec.training.passage_tasks`). None overlaps the evaluation suite.

Each instruction (a chat ending with a user turn) is rendered through the target's chat template with the generation
prompt (the plain "User: ... Assistant:" form for a tokenizer without a template, as the suite evaluation does), and
the replies are decoded greedily by `jaxspec.decoding.api.generate`, `batch_size` rows together, stopping at the
tokenizer's stop ids (the stop id, when hit, is part of the reply). The decoding records the target's hidden states
as it computes them, the prefill's and each step's (`record_features`), so the stored features need no second
forward (`restream` runs one, over a stored set, to add layers). Every example fits the fixed length `seq_len`:
an instruction whose rendered prompt is longer than ``seq_len - max_new_tokens`` tokens is skipped (never
truncated, which would cut the generation prompt off) and the next instruction of the stream takes its place.

On disk (``FORMAT``), a directory with:

- ``manifest.json``: {"format", "complete", "target_workdir", "tokenizer", "seq_len", "d_model", "vocab_size",
  "feature_layers", "num_examples", "shards", "max_new_tokens", "seed", "prompt_set"}; written with
  ``complete: false`` when a run starts and with ``complete: true`` when every shard is on disk.
- ``shard_00000.npz``, ... one per batch: ``tokens`` int32 [n, L] (prompt then reply, right-padded with 0),
  ``lengths`` int32 [n] (prompt + reply tokens), ``reply_start`` int32 [n] (the prompt's length), ``features``
  float16 [n, L, d] (the hidden state after the final norm at every position, zero from ``lengths`` on), and,
  when ``feature_layers`` is not empty, ``layer_features`` float16 [n, L, len(feature_layers), d] (the residual
  stream after each of those layers, zero from ``lengths`` on). A shard also holds ``fingerprint``, a JSON
  string of the settings and prompt ids that made it (readers ignore it).
- with ``prompt_set="self"``, ``requests.json``: {"settings", "requests" (the kept texts, in sampling order),
  "counts" (sampled, kept, and each reason a sample was left out)}.

Shards and the manifest are written under a temporary name and renamed into place, so a file that exists is
whole. A rerun with the same arguments skips the shards on disk (a run that was stopped continues where it
stopped); a shard made with other arguments (target, tokenizer and its stop ids, seq_len, max_new_tokens,
feature_layers, seed, prompt set, batch_size, or other prompts) is an error naming the file, raised before anything
is written. One directory takes one run at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxspec import zoo
from jaxspec.config import check_same_keys, is_int, require
from jaxspec.decoding import api, engine
from jaxspec.errors import InputError
from jaxspec.eval.suite import SuitePrompt
from jaxspec.training import instructions, passage_tasks, self_requests

FORMAT = "jaxspec-selfdistill-1"
MANIFEST = "manifest.json"
MANIFEST_KEYS = ("format", "complete", "target_workdir", "tokenizer", "seq_len", "d_model", "vocab_size",
                 "feature_layers", "num_examples", "shards", "max_new_tokens", "seed", "prompt_set")
SHARD_ARRAYS = ("tokens", "lengths", "reply_start", "features")  # plus layer_features with feature_layers
FINGERPRINT = "fingerprint"
REQUESTS = "requests.json"  # a "self" set's requests, written by the target
SELF_WRITTEN = "self"
SELF_TASKS = "self_tasks"  # the suite's prose requests over a "self" set's replies (passage_tasks)
PROMPT_SETS = (*instructions.PROMPT_SETS, SELF_WRITTEN, SELF_TASKS)

_MAX_SKIPPED_PER_PROMPT = 10  # prompts too long to fit, per prompt wanted, before giving up


def encode_messages(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a chat ending where the reply starts: the chat template with its generation prompt, or the
    plain "User: ... Assistant:" form for a tokenizer without one (as `suite_eval.encode_suite`)."""
    if tokenizer.chat_template is not None:
        return tokenizer.encode_chat(list(messages), add_generation_prompt=True)
    return tokenizer.encode_prompt(SuitePrompt("", "", tuple(messages)).as_plain_prompt())


def plan_prompts(tokenizer, num_prompts: int, seed: int, max_chars: int, max_prompt_tokens: int,
                 prompt_set: str = instructions.DEFAULT_PROMPT_SET) -> tuple[list[list[int]], int]:
    """(ids of the first `num_prompts` instructions whose rendered prompt fits `max_prompt_tokens`, how many
    were skipped as too long)."""
    return fitting_prompts(tokenizer, instructions.iter_instructions(seed, max_chars, prompt_set), num_prompts,
                           max_prompt_tokens, f"prompt_set={prompt_set!r} with max_chars={max_chars}",
                           f"max_prompt_chars={max_chars}")


def fitting_prompts(tokenizer, chats, num_prompts: int, max_prompt_tokens: int, stream: str, shorter: str
                    ) -> tuple[list[list[int]], int]:
    """(ids of the first `num_prompts` chats whose rendered prompt fits `max_prompt_tokens`, how many were
    skipped as too long); an error names the `stream` when it runs out, and the setting that gives `shorter`
    prompts when too many are too long."""
    kept, skipped = [], 0
    for messages in chats:
        ids = encode_messages(tokenizer, messages)
        if 0 < len(ids) <= max_prompt_tokens:
            kept.append(ids)
            if len(kept) == num_prompts:
                return kept, skipped
            continue
        skipped += 1
        if skipped > _MAX_SKIPPED_PER_PROMPT * num_prompts + 100:
            raise InputError(f"only {len(kept)} of {num_prompts} instructions fit seq_len - max_new_tokens = "
                             f"{max_prompt_tokens} prompt tokens ({skipped} were longer); raise seq_len or lower "
                             f"{shorter}")
    raise InputError(f"{stream} gives only {len(kept) + skipped} instructions ({len(kept)} fit seq_len - "
                     f"max_new_tokens = {max_prompt_tokens} prompt tokens); {num_prompts} were asked for")


# ------------------------------------------------------------------------------------------ generation


@dataclasses.dataclass
class Summary:
    """What a `generate` call did."""

    manifest: dict
    reply_tokens: int  # reply tokens in the whole set
    generated_tokens: int  # reply tokens decoded by this call (skipped shards excluded)
    generate_s: float  # decoding time of this call, compilation excluded
    compile_s: float  # compilation of the decode loop
    feature_s: float  # restream's feature forwards, their compilation included (0 for generate: no forward)
    shards_written: int
    shards_skipped: int
    prompts_too_long: int  # instructions skipped because prompt + max_new_tokens > seq_len
    bytes_on_disk: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.generate_s, 1e-9)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def _write_atomically(path: str, write) -> None:
    """`write(file)` into a temporary file beside `path`, renamed to `path` only when complete."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _write_json(path: str, record: dict) -> None:
    _write_atomically(path, lambda fh: fh.write((json.dumps(record, indent=1) + "\n").encode("utf-8")))


def _write_manifest(out_dir: str, manifest: dict) -> None:
    _write_json(os.path.join(out_dir, MANIFEST), manifest)


def _config_digest(model_cfg) -> str:
    text = json.dumps(ml_collections.ConfigDict(model_cfg).to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _ids_digest(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()[:16]


def _stored_fingerprint(path: str) -> tuple[dict, int]:
    """(the fingerprint of an existing shard, its reply tokens), or an InputError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            stored = json.loads(str(shard[FINGERPRINT]))
            replies = int(np.sum(shard["lengths"] - shard["reply_start"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path} is not a readable self-distillation shard ({err}); delete it and run again"
                         ) from err
    return stored, replies


def _check_fingerprint(path: str, expected: dict) -> int:
    stored, replies = _stored_fingerprint(path)
    if stored != expected:
        differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        detail = ", ".join(f"{k}: {stored.get(k)!r} there, {expected.get(k)!r} now" for k in differ)
        raise InputError(f"{path} was made with other arguments ({detail}); delete it or write to another "
                         "directory")
    return replies


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_features(model, params, tokens, layers: tuple[int, ...]):
    """The final hidden state (after the final norm) and the residual stream after `layers`, in float16."""
    out = model.apply({"params": params}, tokens, return_hidden=True)
    hidden = out.hidden.astype(jnp.float16)
    if not layers:
        return hidden, None
    return hidden, jnp.stack([out.layer_hidden[i] for i in layers], axis=2).astype(jnp.float16)


def feature_pass(model, params, tokens: np.ndarray, lengths: np.ndarray, feature_layers: Sequence[int]
                 ) -> dict[str, np.ndarray]:
    """One full forward of `model` over right-padded `tokens` [B, L]: ``features`` [B, L, d] and, with
    feature_layers, ``layer_features`` [B, L, k, d], float16 and zero from each row's length on.

    The forward runs over the first ``bucket_len(max(lengths))`` columns only (a multiple of 64, so a few
    shapes compile): in a causal model the padding after a row's end reaches none of its positions."""
    L = tokens.shape[1]
    width = min(L, engine.bucket_len(int(np.max(lengths))))
    hidden, layered = _forward_features(model, params, jnp.asarray(tokens[:, :width], jnp.int32),
                                        tuple(feature_layers))
    return stored_features(hidden, layered, lengths, L)


def stored_features(final, layered, lengths: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The shard arrays of hidden states over each row's first positions, final [B, W, d] and layered
    [B, W, k, d] or None: ``features`` [B, seq_len, d] and ``layer_features``, float16, zero from each row's
    length on (whatever the source held there), checked finite."""
    width = min(seq_len, final.shape[1])
    valid = np.arange(width)[None, :] < np.asarray(lengths)[:, None]

    def stored(array):
        array = np.asarray(array)[:, :width]
        mask = valid.reshape(valid.shape + (1,) * (array.ndim - 2))
        full = np.zeros((array.shape[0], seq_len, *array.shape[2:]), np.float16)
        full[:, :width] = np.where(mask, array, np.float16(0))
        return full

    out = {"features": stored(final)}
    if layered is not None:
        out["layer_features"] = stored(layered)
    for name, array in out.items():
        if not np.all(np.isfinite(array)):
            raise InputError(f"{name} overflow float16 (values beyond +-65504): the target's activations are too "
                             "large to store in this format")
    return out


def _check_arguments(model, num_prompts, max_new_tokens, seq_len, batch_size, feature_layers) -> tuple[int, ...]:
    cfg = model.model_cfg
    for name, value in (("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens), ("seq_len", seq_len),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{name}={value!r} must be a positive integer")
    if max_new_tokens >= seq_len:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in seq_len={seq_len}")
    # The decode state holds prompt width + new tokens + one node + 1 (engine.required_max_len).
    if seq_len + 2 > cfg.max_len:
        raise InputError(f"seq_len={seq_len} needs a decode state of {seq_len + 2} positions, longer than the "
                         f"target's model.max_len={cfg.max_len}")
    layers = tuple(feature_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.n_layers]
    if bad or len(set(layers)) != len(layers):
        raise InputError(f"feature_layers={layers} must be distinct layer indices in 0..{cfg.n_layers - 1}")
    return layers


def generate(model, params, tokenizer, out_dir: str, *, num_prompts: int, max_new_tokens: int, seq_len: int,
             batch_size: int, feature_layers: Sequence[int] = (), seed: int = 0,
             max_prompt_chars: int = instructions.DEFAULT_MAX_CHARS, target_workdir: str = "",
             tokenizer_name: str = "", progress: bool = True,
             prompt_set: str = instructions.DEFAULT_PROMPT_SET, passages_from: str = "") -> Summary:
    """Write (or complete) the self-distillation set of `model` into `out_dir` and return what was done.

    `target_workdir` and `tokenizer_name` (the target's ``data.tokenizer``) are recorded in the manifest and in each
    shard's fingerprint. The first `num_prompts` instructions of `instructions.instruction_prompts(..., seed,
    max_prompt_chars, prompt_set)` whose prompt fits ``seq_len - max_new_tokens`` tokens are decoded greedily in
    batches of `batch_size` (the last batch filled with copies of its last prompt, so every batch has `batch_size`
    rows; prompt widths are bucketed as `api.generate` does, so a set compiles its loop once per width bucket).
    The set holds them in order of prompt length (stable), so that a batch's rows have similar lengths: a batch is
    prefilled at its longest prompt's bucketed width, and its steps attend over a cache of that width. In stream
    order, one long prompt in each batch set most batches' width (SmolLM2's "tasks" prompts: 58-245 tokens).
    With ``prompt_set="self"`` the prompts are `num_prompts` requests the target writes
    (`self_requests.sample_requests`, batches of `batch_size`), each rendered as a one-message chat. With
    ``prompt_set="self_tasks"`` they are the suite's prose requests (`passage_tasks.iter_chats`) over the replies of
    the "self" set `passages_from`.
    """
    if prompt_set not in PROMPT_SETS:
        raise InputError(f"prompt_set={prompt_set!r} is not one of {sorted(PROMPT_SETS)}")
    layers = _check_arguments(model, num_prompts, max_new_tokens, seq_len, batch_size, feature_layers)
    cfg = model.model_cfg
    # Everything already on disk is checked before anything is written, so a refused run changes nothing.
    _check_existing_manifest(out_dir)
    if passages_from and prompt_set != SELF_TASKS:
        raise InputError(f"passages_from={passages_from!r} is read only with prompt_set={SELF_TASKS!r}, not "
                         f"{prompt_set!r}")
    if prompt_set == SELF_TASKS:
        if not passages_from:
            raise InputError(f"prompt_set={SELF_TASKS!r} needs passages_from: a set made with prompt_set='self', "
                             "whose replies are the passages")
        exchanges = passage_tasks.read_exchanges(passages_from, tokenizer)
        prompt_description = passage_tasks.description(passages_from, _read_manifest(passages_from)["prompt_set"],
                                                       seed, max_prompt_chars)
        prompts, too_long = fitting_prompts(
            tokenizer, passage_tasks.iter_chats(exchanges, seed, max_prompt_chars), num_prompts,
            seq_len - max_new_tokens, f"prompt_set={SELF_TASKS!r} over the {len(exchanges)} replies of "
            f"{passages_from}", f"max_prompt_chars={max_prompt_chars}")
    elif prompt_set == SELF_WRITTEN:
        prompt_description = self_written_description(seed)
        prompts, too_long = _self_written_prompts(
            model, params, tokenizer, out_dir, progress,
            dict(seed=seed, num_prompts=num_prompts, max_prompt_tokens=seq_len - max_new_tokens, batch_size=batch_size,
                 model=_config_digest(cfg), target_workdir=str(target_workdir), tokenizer=str(tokenizer_name),
                 temperature=self_requests.TEMPERATURE, max_request_tokens=self_requests.MAX_REQUEST_TOKENS,
                 min_chars=self_requests.MIN_REQUEST_CHARS))
    else:
        prompt_description = instructions.prompt_set_description(seed, max_prompt_chars, prompt_set)
        prompts, too_long = plan_prompts(tokenizer, num_prompts, seed, max_prompt_chars, seq_len - max_new_tokens,
                                         prompt_set)
    prompts = sorted(prompts, key=len)  # stable: one order for one stream, rerun after rerun
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    manifest = dict(format=FORMAT, complete=False, target_workdir=str(target_workdir),
                    tokenizer=str(tokenizer_name), seq_len=seq_len, d_model=cfg.d_model, vocab_size=cfg.vocab_size,
                    feature_layers=list(layers), num_examples=len(prompts),
                    shards=[shard_name(i) for i in range(len(batches))], max_new_tokens=max_new_tokens, seed=seed,
                    prompt_set=prompt_description)
    settings = {k: manifest[k] for k in ("format", "target_workdir", "tokenizer", "seq_len", "feature_layers",
                                         "max_new_tokens", "seed", "prompt_set")}
    settings.update(model=_config_digest(cfg), eos_ids=list(api.stop_ids(tokenizer.eos_ids)), batch_size=batch_size)
    fingerprints = [dict(settings, shard=i, prompts=_ids_digest(batch)) for i, batch in enumerate(batches)]
    summary = Summary(manifest, 0, 0, 0.0, 0.0, 0.0, 0, 0, too_long, 0)
    done = set()
    for index, fingerprint in enumerate(fingerprints):
        path = os.path.join(out_dir, shard_name(index))
        if os.path.exists(path):
            summary.reply_tokens += _check_fingerprint(path, fingerprint)
            done.add(index)
    os.makedirs(out_dir, exist_ok=True)
    _write_manifest(out_dir, manifest)
    with tqdm(total=len(prompts), desc="selfdistill", unit="prompt", disable=not progress) as bar:
        for index, batch in enumerate(batches):
            path = os.path.join(out_dir, shard_name(index))
            if index in done:
                summary.shards_skipped += 1
            else:
                arrays = _make_shard(model, params, tokenizer, batch, batch_size, max_new_tokens, seq_len, layers,
                                     summary)
                arrays[FINGERPRINT] = np.asarray(json.dumps(fingerprints[index], sort_keys=True))
                _write_atomically(path, lambda fh, arrays=arrays: np.savez(fh, **arrays))
                summary.shards_written += 1
            bar.update(len(batch))
    manifest["complete"] = True
    _write_manifest(out_dir, manifest)
    files = [MANIFEST, *manifest["shards"]]
    summary.bytes_on_disk = sum(os.path.getsize(os.path.join(out_dir, name)) for name in files)
    return summary


_SAME_IN_COMBINED = ("target_workdir", "tokenizer", "seq_len", "d_model", "vocab_size", "feature_layers")


def combine(sources: Sequence[str], out_dir: str) -> dict:
    """Write one set into the new (or empty) `out_dir` holding every example of the complete `sources`, in order,
    and return its manifest: shards are hard-linked (copied across file systems) and renumbered, nothing is
    decoded; the set appears whole or not at all (it is written beside `out_dir` and renamed onto it). The
    sources must agree on target, tokenizer, seq_len, d_model, vocab_size and feature_layers (an error names the
    first key and the two sets that differ); the manifest's ``sources`` lists each one's directory, prompt set,
    seed, max_new_tokens and examples, and its ``prompt_set`` joins theirs with " + "."""
    if isinstance(sources, str) or len(sources) < 2:
        raise InputError(f"combine needs two or more self-distillation sets; got {sources!r}")
    if len({os.path.realpath(s) for s in sources}) != len(sources):
        raise InputError(f"combine got the same set twice: {list(sources)}")
    manifests = [_read_manifest(source) for source in sources]
    for source, manifest in zip(sources[1:], manifests[1:]):
        for key in _SAME_IN_COMBINED:
            if manifest[key] != manifests[0][key]:
                raise InputError(f"{source} has {key}={manifest[key]!r} but {sources[0]} has {manifests[0][key]!r}: "
                                 "sets of one combined set must agree on it")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise InputError(f"{out_dir} exists and is not an empty directory; combine writes a new set")
    for source, manifest in zip(sources, manifests):  # every shard must be there before anything is written
        for name in manifest["shards"]:
            if not os.path.isfile(os.path.join(source, name)):
                raise InputError(f"{source}: shard {name} listed in {MANIFEST} is missing")
    # Written into a hidden sibling renamed onto out_dir last: a killed run leaves no set that looks whole.
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.makedirs(staging)
    shards = []
    for source, manifest in zip(sources, manifests):
        for shard in manifest["shards"]:
            target = os.path.join(staging, shard_name(len(shards)))
            try:
                os.link(os.path.join(source, shard), target)
            except OSError:
                shutil.copyfile(os.path.join(source, shard), target)
            shards.append(os.path.basename(target))
    combined = {key: manifests[0][key] for key in ("format", *_SAME_IN_COMBINED)}
    combined.update(
        complete=True, shards=shards, num_examples=sum(m["num_examples"] for m in manifests),
        max_new_tokens=max(m["max_new_tokens"] for m in manifests), seed=manifests[0]["seed"],
        prompt_set=" + ".join(m["prompt_set"] for m in manifests),
        sources=[dict(source=os.path.abspath(source), **{k: m[k] for k in ("prompt_set", "seed", "max_new_tokens",
                                                                           "num_examples")})
                 for source, m in zip(sources, manifests)])
    _write_manifest(staging, combined)
    os.rename(staging, out_dir)  # onto a missing or empty directory
    return combined


def restream(model, params, source: str, out_dir: str, feature_layers: Sequence[int], target_workdir: str = "",
             progress: bool = True) -> Summary:
    """Write into `out_dir` the set that `generate` with `feature_layers` would have made of `source`'s prompts:
    the same replies and final features, with the residual streams of those layers added (EAGLE-3's fused
    streams for a set made without them). No decoding: one feature forward per shard over its stored tokens,
    in the shard's batch shape (the last shard filled with copies of its last row, as `generate` fills it). The
    streams equal those `generate` records in its decode steps up to float32 rounding. `model` must be the set's
    target: the model config it was made with, or the same `target_workdir` (a config that gained keys since).
    Resumable as `generate`."""
    manifest = _read_manifest(source)
    layers = _check_arguments(model, manifest["num_examples"], manifest["max_new_tokens"], manifest["seq_len"], 1,
                              feature_layers)
    digest = _config_digest(model.model_cfg)
    new_manifest = dict(manifest, feature_layers=list(layers), complete=False)
    summary = Summary(new_manifest, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0, 0)
    plans = []  # (output path, its fingerprint, the source shard's path) for every shard, checked up front
    for name in manifest["shards"]:
        path = os.path.join(source, name)
        stored, replies = _stored_fingerprint(path)
        summary.reply_tokens += replies
        same_workdir = bool(target_workdir) and bool(manifest["target_workdir"]) and zoo.same_target(
            target_workdir, manifest["target_workdir"])
        if stored.get("model") != digest and not same_workdir:
            raise InputError(f"{path} was made by another model (config digest {stored.get('model')}, this model "
                             f"{digest}; target {manifest['target_workdir']!r}, this one {target_workdir!r}): "
                             "restream a set with the target that made it")
        plans.append((os.path.join(out_dir, name), dict(stored, feature_layers=list(layers), model=digest), path))
    _check_existing_manifest(out_dir)
    done = set()
    for out, fingerprint, _ in plans:
        if os.path.exists(out):
            _check_fingerprint(out, fingerprint)  # a shard made otherwise is refused before anything is written
            done.add(out)
    os.makedirs(out_dir, exist_ok=True)
    _write_manifest(out_dir, new_manifest)
    for out, fingerprint, path in tqdm(plans, desc="restream", unit="shard", disable=not progress):
        if out in done:
            summary.shards_skipped += 1
            continue
        arrays = _read_shard(source, os.path.basename(path), manifest)
        n, batch = len(arrays["tokens"]), fingerprint["batch_size"]
        fill = np.minimum(np.arange(batch), n - 1)  # rows past the shard's end repeat its last row
        start = time.perf_counter()
        streams = feature_pass(model, params, arrays["tokens"][fill], arrays["lengths"][fill], layers)
        summary.feature_s += time.perf_counter() - start
        arrays["layer_features"] = streams["layer_features"][:n]
        arrays[FINGERPRINT] = np.asarray(json.dumps(fingerprint, sort_keys=True))
        _write_atomically(out, lambda fh, arrays=arrays: np.savez(fh, **arrays))
        summary.shards_written += 1
    new_manifest["complete"] = True
    _write_manifest(out_dir, new_manifest)
    files = [MANIFEST, *new_manifest["shards"]]
    summary.bytes_on_disk = sum(os.path.getsize(os.path.join(out_dir, name)) for name in files)
    return summary


def self_written_description(seed: int) -> str:
    """What a manifest records of a "self" set's prompts."""
    return (f"target-written-1: requests the target wrote after its chat template's user opening, seed={seed}, "
            f"temperature={self_requests.TEMPERATURE}, up to {self_requests.MAX_REQUEST_TOKENS} tokens")


def _self_written_prompts(model, params, tokenizer, out_dir: str, progress: bool, settings: dict
                          ) -> tuple[list[list[int]], int]:
    """(prompt ids of the requests in `out_dir`'s requests.json, sampled with `settings` and written there first
    when it is absent; how many samples were too long): a stored file made with other settings is an error
    naming them."""
    num_prompts = settings["num_prompts"]
    path = os.path.join(out_dir, REQUESTS)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                stored = json.load(fh)
            texts, counts, stored_settings = stored["requests"], stored["counts"], stored["settings"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path} is not a readable requests file ({err!r}); delete it to sample again") from err
        if stored_settings != settings:
            changed = sorted(k for k in {*settings, *stored_settings} if settings.get(k) != stored_settings.get(k))
            raise InputError(f"{path} holds requests sampled with other settings ({', '.join(changed)}); write to "
                             "another directory, or delete it to sample again")
        if len(texts) != num_prompts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{path} holds {len(texts)} requests, not the {num_prompts} its settings say")
    else:
        with tqdm(total=num_prompts, desc="requests", unit="request", disable=not progress) as bar:
            texts, counts = self_requests.sample_requests(
                model, params, tokenizer, num_prompts, seed=settings["seed"],
                max_prompt_tokens=settings["max_prompt_tokens"], batch_size=settings["batch_size"],
                on_batch=lambda kept: bar.update(kept - bar.n))
        os.makedirs(out_dir, exist_ok=True)
        _write_json(path, dict(settings=settings, requests=texts, counts=counts))
    prompts = [encode_messages(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    return prompts, int(counts.get("too_long", 0))


def _check_existing_manifest(out_dir: str) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {REQUESTS}:
            raise InputError(f"{out_dir} holds files but no {MANIFEST}: it is not a self-distillation set; write to "
                             "a new or empty directory")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise InputError(f"{out_dir} exists and is not a directory")
        return
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} exists but is not readable JSON ({err}); delete it or write to another "
                         "directory") from err
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        got = old.get("format") if isinstance(old, dict) else type(old).__name__
        raise InputError(f"{path} is not a {FORMAT} manifest (format {got!r}); write to another directory")


def example_rows(prompts, replies, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's [prompt + reply], right-padded with 0 to seq_len (int32 [B, seq_len]), and its length [B]."""
    tokens = np.zeros((len(prompts), seq_len), np.int32)
    lengths = np.asarray([len(p) + len(r) for p, r in zip(prompts, replies)], np.int32)
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        tokens[row, :lengths[row]] = prompt + reply
    return tokens, lengths


def _make_shard(model, params, tokenizer, batch, batch_size, max_new_tokens, seq_len, layers, summary
                ) -> dict[str, np.ndarray]:
    """Decode one batch, recording the target's hidden states as it goes, and return the shard's arrays."""
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    result = api.generate(model, params, padded, method="ar", max_new_tokens=max_new_tokens, temperature=0.0,
                          eos_ids=tokenizer.eos_ids, record_features=layers)
    replies = result.tokens[:len(batch)]
    summary.generate_s += result.wall_time_s
    summary.compile_s += result.compile_s
    summary.generated_tokens += sum(map(len, replies))
    summary.reply_tokens += sum(map(len, replies))
    tokens, lengths = example_rows(padded, result.tokens, seq_len)
    features = stored_features(result.features.final, result.features.layers, lengths, seq_len)
    n = len(batch)
    return dict(tokens=tokens[:n], lengths=lengths[:n], reply_start=np.asarray([len(p) for p in batch], np.int32),
                **{name: array[:n] for name, array in features.items()})


# ------------------------------------------------------------------------------------------ reading


def _read_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise InputError(f"{out_dir}: no {MANIFEST}; not a self-distillation set (or its run never started)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{out_dir}: {MANIFEST} is not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{out_dir}: {MANIFEST} has format {got!r}, not {FORMAT!r}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{out_dir}: {MANIFEST} lacks the keys {missing}")
    if manifest["complete"] is not True:
        raise InputError(f"{out_dir}: the set is incomplete ({MANIFEST} says complete={manifest['complete']!r}): "
                         "its run did not finish; run it again with the same arguments to complete it")
    for key in ("seq_len", "d_model", "vocab_size", "num_examples"):
        if isinstance(manifest[key], bool) or not isinstance(manifest[key], int) or manifest[key] < 0:
            raise InputError(f"{out_dir}: {MANIFEST} has {key}={manifest[key]!r}, not a non-negative integer")
    if not isinstance(manifest["shards"], list) or not all(isinstance(s, str) for s in manifest["shards"]):
        raise InputError(f"{out_dir}: {MANIFEST} has shards={manifest['shards']!r}, not a list of file names")
    if not isinstance(manifest["feature_layers"], list):
        raise InputError(f"{out_dir}: {MANIFEST} has feature_layers={manifest['feature_layers']!r}, not a list")
    return manifest


def _expected_shapes(manifest: dict, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    L, d, k = manifest["seq_len"], manifest["d_model"], len(manifest["feature_layers"])
    shapes = dict(tokens=((n, L), np.int32), lengths=((n,), np.int32), reply_start=((n,), np.int32),
                  features=((n, L, d), np.float16))
    if k:
        shapes["layer_features"] = ((n, L, k, d), np.float16)
    return shapes


def _read_shard(out_dir: str, name: str, manifest: dict) -> dict[str, np.ndarray]:
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        raise InputError(f"{out_dir}: shard {name} listed in {MANIFEST} is missing")
    try:
        with np.load(path, allow_pickle=False) as shard:
            arrays = {key: shard[key] for key in shard.files if key != FINGERPRINT}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{out_dir}: shard {name} is not a readable .npz ({err})") from err
    n = len(arrays["tokens"]) if "tokens" in arrays else 0
    expected = _expected_shapes(manifest, n)
    if sorted(arrays) != sorted(expected):
        raise InputError(f"{out_dir}: shard {name} holds {sorted(arrays)}; the manifest's format needs "
                         f"{sorted(expected)}")
    for key, (shape, dtype) in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise InputError(f"{out_dir}: shard {name} has {key} {arrays[key].dtype}{list(arrays[key].shape)}; the "
                             f"manifest says {np.dtype(dtype)}{list(shape)}")
    start, lengths = arrays["reply_start"], arrays["lengths"]
    if np.any(start < 1) or np.any(lengths < start) or np.any(lengths > manifest["seq_len"]):
        raise InputError(f"{out_dir}: shard {name} has lengths or reply_start outside 1 <= reply_start <= lengths "
                         f"<= seq_len={manifest['seq_len']}")
    return arrays


def read(out_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, arrays): every shard of a complete set, concatenated along the example axis. Refuses, naming
    `out_dir` and the problem, an incomplete set, a missing or unreadable shard, a manifest of another format,
    and arrays whose shapes or dtypes disagree with the manifest."""
    manifest = _read_manifest(out_dir)
    shards = [_read_shard(out_dir, name, manifest) for name in manifest["shards"]]
    total = sum(len(s["tokens"]) for s in shards)
    if total != manifest["num_examples"]:
        raise InputError(f"{out_dir}: the shards hold {total} examples; {MANIFEST} says num_examples="
                         f"{manifest['num_examples']}")
    expected = _expected_shapes(manifest, 0)
    arrays = {key: np.concatenate([s[key] for s in shards]) if shards else np.zeros(shape, dtype)
              for key, (shape, dtype) in expected.items()}
    return manifest, arrays


def loss_mask(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool [N, L]: positions t whose next token t + 1 is a reply token, reply_start - 1 <= t < lengths - 1 (the
    positions a drafter is trained to predict from)."""
    positions = np.arange(arrays["tokens"].shape[1])[None, :]
    start = np.asarray(arrays["reply_start"])[:, None]
    end = np.asarray(arrays["lengths"])[:, None]
    return (positions >= start - 1) & (positions < end - 1)


def token_frequencies(arrays: Mapping[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each token occurs in the replies (for trimming a draft vocabulary to the
    target's most frequent tokens)."""
    tokens = np.asarray(arrays["tokens"])
    positions = np.arange(tokens.shape[1])[None, :]
    in_reply = (positions >= np.asarray(arrays["reply_start"])[:, None]) & (
        positions < np.asarray(arrays["lengths"])[:, None])
    replies = tokens[in_reply]
    if replies.size and (replies.min() < 0 or replies.max() >= vocab_size):
        raise InputError(f"reply tokens span [{replies.min()}, {replies.max()}], outside vocab_size={vocab_size}")
    return np.bincount(replies, minlength=vocab_size).astype(np.int64)


# ------------------------------------------------------------------------------------------ configs


def config_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        target="smollm2-135m-instruct",  # a zoo name or a jaxspec workdir
        num_prompts=64,
        max_new_tokens=96,
        seq_len=384,  # L: prompt + reply tokens of every example
        batch_size=8,  # rows decoded together; one shard per batch
        feature_layers=(),  # residual-stream layers stored besides the final hidden state (EAGLE-3: low, mid, high)
        seed=0,
        max_prompt_chars=instructions.DEFAULT_MAX_CHARS,  # longest quoted text of an instruction
        prompt_set=instructions.DEFAULT_PROMPT_SET,  # "tasks" (the suite's kinds of request), "docs", "self"
        # or "self_tasks" (the suite's prose requests over the replies of the "self" set passages_from)
        passages_from="",
        progress_bar=True,
    ))


def validate_config(config) -> None:
    """Raise ConfigError naming the key, the value and what is allowed (layers are checked against the model
    when it is loaded)."""
    check_same_keys(config, config_defaults())
    require(isinstance(config.target, str) and bool(config.target), "target", config.target,
             "a zoo model name or a jaxspec workdir")
    for key in ("num_prompts", "max_new_tokens", "seq_len", "batch_size"):
        require(is_int(config[key]) and config[key] > 0, key, config[key], "a positive integer")
    require(config.max_new_tokens < config.seq_len, "max_new_tokens", config.max_new_tokens,
             f"fewer than seq_len={config.seq_len} (the prompt needs room)")
    require(is_int(config.seed) and config.seed >= 0, "seed", config.seed, "a non-negative integer")
    require(is_int(config.max_prompt_chars) and config.max_prompt_chars >= instructions.MIN_CHARS,
            "max_prompt_chars", config.max_prompt_chars, f"an integer of at least {instructions.MIN_CHARS}")
    require(config.prompt_set in PROMPT_SETS, "prompt_set", config.prompt_set, f"one of {sorted(PROMPT_SETS)}")
    require(isinstance(config.passages_from, str), "passages_from", config.passages_from, "a directory path")
    if config.prompt_set == SELF_TASKS:
        require(bool(config.passages_from), "passages_from", config.passages_from,
                f"a set made with prompt_set='self' (prompt_set={SELF_TASKS!r} asks over its replies)")
    else:
        require(not config.passages_from, "passages_from", config.passages_from,
                f"empty unless prompt_set={SELF_TASKS!r} (prompt_set is {config.prompt_set!r})")
    layers = config.feature_layers
    require(isinstance(layers, (tuple, list)) and all(is_int(i) and i >= 0 for i in layers)
             and len(set(layers)) == len(layers), "feature_layers", layers,
             "a tuple of distinct non-negative layer indices, e.g. (2, 15, 27)")
    require(isinstance(config.progress_bar, bool), "progress_bar", config.progress_bar, "True or False")


def run(config, out_dir: str) -> Summary:
    """Validate `config`, load its target (a zoo model is fetched and converted once) and `generate`."""
    validate_config(config)
    target = api.load(config.target)
    return generate(target.model, target.params, target.tokenizer, out_dir, num_prompts=config.num_prompts,
                    max_new_tokens=config.max_new_tokens, seq_len=config.seq_len, batch_size=config.batch_size,
                    feature_layers=tuple(config.feature_layers), seed=config.seed,
                    max_prompt_chars=config.max_prompt_chars, target_workdir=target.workdir,
                    tokenizer_name=target.config.data.tokenizer, progress=config.progress_bar,
                    prompt_set=config.prompt_set, passages_from=config.passages_from)


__all__ = ["FORMAT", "MANIFEST", "PROMPT_SETS", "REQUESTS", "Summary", "combine", "config_defaults", "encode_messages",
           "feature_pass", "fitting_prompts", "generate", "loss_mask", "plan_prompts", "read", "restream", "run",
           "self_written_description", "token_frequencies", "validate_config"]
