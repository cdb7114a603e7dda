"""Decode prompts with a real or trained model, autoregressively or speculatively.

  python -m launch.decode --model=smollm2-135m-instruct --chat --prompt="What is a prime number?" \
      --method=lookup --max_new_tokens=64 --stream
  python -m launch.decode --workdir=/tmp/lm --method=draft --draft_workdir=/tmp/draft --verify=rejection \
      --temperature=0.8 --prompts_file=prompts.jsonl --output_json=out.json

`--model` names a model of the zoo (fetched and converted once, then cached); `--workdir` a jaxspec workdir
(a training run or an imported checkpoint). `--chat` renders each prompt as one user message through the
checkpoint's chat template; `--prompts_file` rows are {"prompt": "..."} or {"messages": [...]} (a
conversation, always rendered through the template). Every request is checked before any compute. The JSON
holds, per prompt, the reply text (special tokens dropped), the generated ids, the count, target steps, tau
(tokens committed per target forward) and speed; and the run's settings with compile seconds and the number
of compilations (decode times exclude compilation; nothing is generated twice).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from jaxspec import cli, zoo
from jaxspec.decoding import api, methods
from jaxspec.decoding.verify import RULES
from jaxspec.errors import InputError
from jaxspec.models.lm import reconfigured
from jaxspec.parallel import distributed

_MODEL = flags.DEFINE_string("model", None, "a zoo model name, e.g. smollm2-135m-instruct (or use --workdir)")
_WORKDIR = flags.DEFINE_string("workdir", None, "a jaxspec workdir: a training run or an imported checkpoint")
_METHOD = flags.DEFINE_enum("method", "ar", list(methods.names()), "decoding method (jaxspec/decoding/methods/)")
_VERIFY = flags.DEFINE_enum("verify", None, list(RULES),
                            "verification rule (default: greedy at temperature 0, rejection otherwise; kseq: SpecTr)")
_PROMPT = flags.DEFINE_string("prompt", None, "one prompt")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None,
                                    'JSONL file, one {"prompt": "..."} or {"messages": [...]} per line')
_CHAT = flags.DEFINE_bool("chat", False, "render each prompt as a user message through the chat template")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
# The method's own options: each is passed to the method's spec only when given, and a method that does not take
# one refuses it by name.
_METHOD_FLAGS = {
    "tree": flags.DEFINE_string("tree", None, "token tree: chain:K, branching:b1,b2,..., medusa_63, medusa_small "
                                 "(default: the method's own)"),
    "draft_workdir": flags.DEFINE_string("draft_workdir", None, "draft model run (draft), Medusa heads run "
                                          "(medusa), EAGLE drafter run (eagle) or Kangaroo adapter run (kangaroo)"),
    "granularity": flags.DEFINE_string("granularity", None, "MatFormer granularity that drafts (matformer): one "
                                        "index, or one per layer as 0,1,1,..."),
    "skip_layers": flags.DEFINE_string("skip_layers", None, "layers skipped (layerskip: the self-draft's, default "
                                        "every other layer of the upper two thirds; skiplayers: the decoding "
                                        "model's, default from --target_speedup; swift: the first set of its "
                                        "search), e.g. 20-29,31"),
    "acceptance_head": flags.DEFINE_string("acceptance_head", None, "SpecDec++ stop (draft, layerskip, matformer, "
                                            "...): a head trained for this drafter by launch.train_acceptance"),
    "stop_threshold": flags.DEFINE_float("stop_threshold", None, "with --acceptance_head: a branch stops once its "
                                         "predicted P(at least one rejection) would pass this"),
    "budget": flags.DEFINE_integer("budget", None, "h2o, h2o_draft: keys each attention layer keeps per row and KV "
                                   "head (a budgeted heavy-hitter cache)"),
    "recent": flags.DEFINE_integer("recent", None, "h2o, h2o_draft: of the budget, the latest positions always kept"),
    "skip_ffn": flags.DEFINE_string("skip_ffn", None, "layers whose FFN the self-draft leaves out (ffnskip), e.g. "
                                     "12-17; default: the num_skip_ffn most input-preserving"),
    "num_skip_ffn": flags.DEFINE_integer("num_skip_ffn", None, "ffnskip: how many FFNs to leave out when --skip_ffn "
                                         "is not given (0: a fifth of the layers)"),
    "max_exit": flags.DEFINE_integer("max_exit", None, "skipdecode (lossy): layers run at positions up to "
                                     "--decay_start (0: all)"),
    "min_exit": flags.DEFINE_integer("min_exit", None, "skipdecode: layers run from --decay_end on (0: half)"),
    "decay_start": flags.DEFINE_integer("decay_start", None, "skipdecode: the position where the exit starts to "
                                        "fall"),
    "decay_end": flags.DEFINE_integer("decay_end", None, "skipdecode: the position where the exit reaches "
                                      "--min_exit (0: the model's max_len)"),
    "target_speedup": flags.DEFINE_float("target_speedup", None, "skiplayers (lossy): run ceil(n_layers / this) "
                                          "layers, spread evenly from the first to the last"),
    "adaptive": flags.DEFINE_integer("adaptive", None, "adaptive draft length starting here (0 = off)"),
    "confidence_threshold": flags.DEFINE_float("confidence_threshold", None, "stop a draft below this top "
                                                "probability (draft, matformer, layerskip; kangaroo: default 0.6)"),
    "without_replacement": flags.DEFINE_bool("without_replacement", None, "sampled siblings drawn without "
                                             "replacement, as RSD (draft, layerskip, matformer)"),
    "min_ngram": flags.DEFINE_integer("min_ngram", None, "shortest n-gram prompt lookup matches (lookup)"),
    "max_ngram": flags.DEFINE_integer("max_ngram", None, "longest n-gram prompt lookup matches (lookup)"),
    "table_size": flags.DEFINE_integer("table_size", None, "buckets per n-gram table, a power of two (ngram)"),
    "slots": flags.DEFINE_integer("slots", None, "successors kept per n-gram context (ngram)"),
    "expand": flags.DEFINE_integer("expand", None, "EAGLE-2 dynamic tree (eagle, hydra, medusa): the best nodes per "
                                   "depth, each expanded by its best children (0: the static --tree)"),
    "depth": flags.DEFINE_integer("depth", None, "depth of the dynamic tree (with --expand)"),
    "nodes": flags.DEFINE_integer("nodes", None, "drafts kept in the dynamic tree (with --expand)"),
    "exit_layers": flags.DEFINE_list("exit_layers", None, "del: candidate exits E (the draft runs the first E "
                                     "layers over the target's cache), e.g. 15,19,22,26"),
    "decay": flags.DEFINE_float("decay", None, "del: share of the acceptance statistics a round keeps, in (0, 1)"),
    "verify_costs": flags.DEFINE_list("verify_costs", None, "del: cost of verifying 1, 2, 4, ... nodes in "
                                      "autoregressive steps (default: measured on SmolLM2)"),
    "skip_ratio": flags.DEFINE_float("skip_ratio", None, "swift: share of the layers the searched skip set skips"),
    "search_rounds": flags.DEFINE_integer("search_rounds", None, "swift: rounds of the skip-set search (0: none, "
                                          "draft with --skip_layers throughout)"),
    "trial_rounds": flags.DEFINE_integer("trial_rounds", None, "swift: rounds each candidate skip set drafts"),
    "context_window": flags.DEFINE_integer("context_window", None, "swift: score each candidate skip set on the "
                                           "last N committed tokens instead of by trial rounds (0: trials)"),
    "search_seed": flags.DEFINE_integer("search_seed", None, "swift: seed of the skip-set search"),
}
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "run the target's repeated layers as one scan "
                                  "(model.scan_layers: compiles 3-5x faster; same tokens)")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "stop a row at the checkpoint's end-of-sequence ids")
_STREAM = flags.DEFINE_bool("stream", False, "print each reply as rounds commit")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 0, "prefill each prompt in chunks of this many tokens (a "
                                     "power of two; 0 = one forward); the output is the same")
_SAMPLES = flags.DEFINE_integer("samples", 1, "decode each prompt this many times (samples at --temperature > 0), "
                                "in one batch")
_SHARED_PREFIX = flags.DEFINE_bool("shared_prefix", False, "prefill the prompts' common beginning (one prompt with "
                                   "--samples > 1, or one system prompt) once and attend to it once for all rows "
                                   "(Hydragen); same output")
_CHECK = flags.DEFINE_bool("check_invariants", False, "debug mode: check the in-jit preconditions (num_new "
                           "ranges, traced trees, lengths within the cache) and stop on the first violation")
_REQUIRE_LOSSLESS = flags.DEFINE_bool("require_lossless", False, "refuse a lossy request (a lossy decoding mode such "
                                      "as a compressed cache or early exit, or --verify=typical) before decoding")
_OUTPUT = flags.DEFINE_string("output_json", None, "write results here")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None,
                                 "jax's persistent compilation cache (default: <cache>/xla; '' = off)")


def read_requests() -> list[dict]:
    """[{"prompt": text} | {"messages": [...]}] from --prompt or --prompts_file."""
    if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
        raise InputError("give exactly one of --prompt and --prompts_file")
    if _PROMPT.value is not None:
        return [{"prompt": _PROMPT.value}]
    requests = []
    try:
        with open(_PROMPTS_FILE.value) as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise InputError(f"--prompts_file={_PROMPTS_FILE.value!r} could not be read: {err}") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{_PROMPTS_FILE.value}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not JSON ({err})") from err
        if not isinstance(row, dict) or (("prompt" in row) == ("messages" in row)):
            raise InputError(f"{where}: expected a JSON object with a 'prompt' string or a 'messages' list")
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise InputError(f"{where}: 'prompt' must be a string")
        if "messages" in row and not (isinstance(row["messages"], list) and row["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"])):
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        requests.append(row)
    if not requests:
        raise InputError(f"{_PROMPTS_FILE.value} holds no prompts")
    return requests


def encode_request(tokenizer, request: dict, chat: bool) -> list[int]:
    if "messages" in request or chat:
        messages = request.get("messages") or [{"role": "user", "content": request["prompt"]}]
        if tokenizer.chat_template is None:
            raise InputError(f"the tokenizer {tokenizer!r} has no chat template; drop --chat and give plain prompts")
        return tokenizer.encode_chat(messages, add_generation_prompt=True)
    return tokenizer.encode_prompt(request["prompt"])


class StreamPrinter:
    """Prints each row's reply as its tokens commit (decoding the whole reply so far, so multi-token
    characters come out whole)."""

    def __init__(self, tokenizer, rows: int):
        self.tokenizer, self.tokens, self.shown = tokenizer, [[] for _ in range(rows)], [""] * rows

    def __call__(self, new: list[list[int]]) -> None:
        for i, toks in enumerate(new):
            if not toks:
                continue
            self.tokens[i] += toks
            text = self.tokenizer.decode(self.tokens[i])
            delta, self.shown[i] = text[len(self.shown[i]):], text
            prefix = f"\n[{i}] " if len(self.tokens) > 1 else ""
            print(prefix + delta, end="", flush=True)


def method_arguments() -> dict:
    """The method options given on the command line, parsed; a flag that was not given is left out, and one
    the method does not take is an error naming the flag."""
    takes = methods.field_names(_METHOD.value)
    given = {}
    for field, holder in _METHOD_FLAGS.items():
        if holder.value is None:
            continue
        if field not in takes:
            raise InputError(f"--{field} does not apply to --method={_METHOD.value}; its options: "
                             f"{', '.join('--' + t for t in takes) or 'none'}")
        given[field] = cli.parse_method_flag(field, holder.value)
    return given


@cli.error_boundary("workdir", "draft_workdir", "prompts_file", "output_json")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        cli.quiet_libraries()
    cli.enable_compilation_cache(_CACHE_DIR.value)
    distributed.maybe_initialize()
    if (_MODEL.value is None) == (_WORKDIR.value is None):
        raise InputError("give exactly one of --model (a zoo name) and --workdir")
    if _MODEL.value is not None:
        zoo.get_entry(_MODEL.value)  # an unknown name is an error naming the zoo's models, not a missing workdir
    elif not os.path.isdir(_WORKDIR.value):
        raise InputError(f"--workdir={_WORKDIR.value!r} is not a directory (a training run or an imported "
                         "checkpoint; or use --model with a zoo name)")
    if _SAMPLES.value < 1:
        raise InputError(f"--samples={_SAMPLES.value} must be at least 1")
    requests = [request for request in read_requests() for _ in range(_SAMPLES.value)]
    spec = methods.make(_METHOD.value, **method_arguments())
    if _REQUIRE_LOSSLESS.value:  # before the model loads
        api.check_lossless(spec, _VERIFY.value or ("greedy" if _TEMPERATURE.value == 0 else "rejection"))
    target = api.load(_MODEL.value or _WORKDIR.value)
    model = reconfigured(target.model, scan_layers=True) if _SCAN_LAYERS.value else target.model
    tok = target.tokenizer
    prompts = [encode_request(tok, r, _CHAT.value) for r in requests]
    printer = StreamPrinter(tok, len(prompts)) if _STREAM.value else None
    result = api.generate(model, target.params, prompts, max_new_tokens=_MAX_NEW.value,
                          temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                          rule=_VERIFY.value, eos_ids=tok.eos_ids if _STOP_AT_EOS.value else None,
                          seed=_SEED.value, on_tokens=printer, method=spec, target_workdir=target.workdir,
                          check_invariants=_CHECK.value, prefill_chunk=_PREFILL_CHUNK.value,
                          require_lossless=_REQUIRE_LOSSLESS.value, shared_prefix=_SHARED_PREFIX.value)
    if printer is not None:
        print()
    rows = []
    for i, request in enumerate(requests):
        rows.append(dict(**request, prompt_tokens=len(prompts[i]), text=tok.decode(result.tokens[i]),
                         tokens=result.tokens[i], new_tokens=int(result.new_tokens[i]),
                         target_steps=int(result.target_steps[i]), mean_accepted=float(result.mean_accepted[i]),
                         wall_time_s=result.wall_time_s,
                         tokens_per_s=float(result.new_tokens[i] / max(result.wall_time_s, 1e-9))))
        if printer is None:
            print(f"--- prompt {i}: {request.get('prompt', request.get('messages'))!r}\n{rows[-1]['text']}")
        print(f"[tau={rows[-1]['mean_accepted']:.2f}, {rows[-1]['new_tokens']} tokens]")
    settings = dict(model=_MODEL.value, workdir=target.workdir, method=_METHOD.value, method_fields=spec.fields(),
                    verify=_VERIFY.value or ("greedy" if _TEMPERATURE.value == 0 else "rejection"), chat=_CHAT.value,
                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                    max_new_tokens=_MAX_NEW.value, tree=spec.tree_spec or None, scan_layers=_SCAN_LAYERS.value,
                    eos_ids=list(tok.eos_ids) if _STOP_AT_EOS.value else [],
                    prompt_width=result.prompt_width, max_len=result.max_len, compile_s=result.compile_s,
                    compilations=result.compilations, batch_wall_time_s=result.wall_time_s,
                    batch_tokens_per_s=result.tokens_per_s)
    print(f"{_METHOD.value}: {result.tokens_per_s:.1f} tokens/s, tau={float(result.mean_accepted.mean()):.2f}, "
          f"decode {result.wall_time_s:.2f} s, compile {result.compile_s:.1f} s")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(dict(settings=settings, results=rows), f, indent=1)


if __name__ == "__main__":
    app.run(main)
