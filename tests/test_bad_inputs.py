"""Bad inputs a new user tries, and the message each gets: the table of docs/reliability.md, in the same order.

Every case is one realistic mistake, at the entry point a user meets it: a launch flag (run as `python -m
launch.NAME`, which must end with exit status 1, no traceback and the message on stderr), or a library call
(which must raise InputError). Each message must match a pattern that names the problem: the key, the file,
the value or the shape. Nothing here compiles a model: every check runs before any compute.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from jaxspec.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # the test id
    tried: str  # what the user tried, in words (the docs table's first column)
    where: str  # the entry point and the input (its second column)
    pattern: str  # a regex the message must match (re.search)
    cli: tuple[str, ...] = ()  # python -m launch.X arguments; "{tmp}" is the case's own directory
    call: Callable | None = None  # call(env) raises; env has .tmp (a pathlib.Path) and .model() (a tiny LM)
    setup: Callable | None = None  # setup(tmp) writes the files a CLI case reads


# ---------------------------------------------------------------------------------------------- small inputs


def write_gguf(path, cut: int | None = None) -> str:
    """A GGUF file holding one embedding tensor and no hyperparameters; `cut` keeps only its first bytes (cut < 0:
    all but the last -cut)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[:cut])
    return str(path)


def not_gguf(path) -> str:
    """A file named .gguf that starts with the magic and then holds nothing a reader can parse."""
    path.write_bytes(b"GGUF" + bytes(range(7)))
    return str(path)


LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)


def hf_dir(tmp, config: dict | None = None, weights: bool = False) -> str:
    """A Hugging Face checkpoint directory with `config` as config.json (None: none) and, when `weights`, a
    model.safetensors file (its content does not matter: each case fails before reading it)."""
    path = tmp / "hf"
    path.mkdir(exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"\x00" * 8)
    return str(path)


def corpus(tmp, docs: int = 4) -> str:
    """A directory of a few short text files."""
    path = tmp / "corpus"
    path.mkdir(exist_ok=True)
    for i in range(docs):
        (path / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox. " * 20)
    return str(path)


def data_config(**overrides):
    from jaxspec import config as config_lib

    cfg = config_lib.data_defaults()
    cfg.update(overrides)
    return cfg


def model_config(**overrides):
    """The default model config with `overrides`, built as a config read from JSON is (no type checks on the way
    in, as for a hand-edited config.json)."""
    import ml_collections

    from jaxspec import config as config_lib

    return ml_collections.ConfigDict({**config_lib.model_defaults().to_dict(), **overrides})


def generate(env, prompts=((1, 2, 3),), **kwargs):
    from jaxspec.decoding import api

    model, params = env.model()
    prompts = [list(p) for p in prompts] if isinstance(prompts, tuple) else prompts
    return api.generate(model, params, prompts, **{"max_new_tokens": 4, **kwargs})


def make_method(name, **fields):
    from jaxspec.decoding import methods

    return methods.make(name, **fields)


def load_gguf(path):
    from jaxspec.interop import gguf as gguf_import

    return gguf_import.load_gguf_checkpoint(path)


def load_hf(path):
    from jaxspec.interop import hf

    return hf.load_hf_checkpoint(path)


def restore(path):
    from jaxspec.training import checkpoint

    return checkpoint.restore_params(str(path))


def import_into(source, workdir):
    from jaxspec.interop import workdir as workdir_lib

    return workdir_lib.import_checkpoint(source, str(workdir))


def make_datasets(cfg):
    from jaxspec.training import data

    return data.make_datasets(cfg)


def mesh_sizes(sizes, devices):
    from jaxspec.parallel import mesh

    return mesh.resolve_axis_sizes(sizes, devices)


def load_model(name):
    from jaxspec.decoding import api

    return api.load(name)


def zoo_workdir(name):
    from jaxspec import zoo

    return zoo.model_workdir(name)


def validate_model(cfg):
    from jaxspec import config as config_lib

    return config_lib.validate_model_config(cfg)


def used_workdir(tmp):
    (tmp / "used").mkdir()
    (tmp / "used" / "notes.txt").write_text("mine")
    return tmp / "used"


TRAIN = ("launch.train", "--config=configs/lm.py:tiny", "--workdir={tmp}/run")
DECODE = ("launch.decode", "--workdir={tmp}", "--prompt=x")  # {tmp}: a directory, enough to reach the checks

CASES = [
    # ------------------------------------------------------------------- launch flags and config overrides
    Case("override_unknown_key", "override of a key that does not exist", "launch.train --config.data.pth=x",
         r"--config\.data\.pth: configs/lm\.py:tiny has no key config\.data\.pth; keys of config\.data: .*source",
         cli=(*TRAIN, "--config.data.pth=x")),
    Case("override_wrong_type", "override with a value of the wrong type", "launch.train --config.train.steps=abc",
         r"flag --config\.train\.steps=abc: invalid literal for int\(\)", cli=(*TRAIN, "--config.train.steps=abc")),
    Case("override_bad_value", "override with a value not allowed", "launch.train --config.model.d_model=-8",
         r"config\.model\.d_model=-8 is not allowed: a positive integer", cli=(*TRAIN, "--config.model.d_model=-8")),
    Case("config_arg_unknown", "config arg the config file does not know",
         "launch.train --config=configs/lm.py:size=huge",
         r"--config=configs/lm\.py:size=huge: .*size='huge' is not one of \['base', 'small', 'tiny'\]",
         cli=("launch.train", "--config=configs/lm.py:size=huge", "--workdir={tmp}/run")),
    Case("config_file_missing", "config file that does not exist", "launch.train --config=configs/lmm.py:tiny",
         r"--config=configs/lmm\.py:tiny: config file 'configs/lmm\.py' does not exist",
         cli=("launch.train", "--config=configs/lmm.py:tiny", "--workdir={tmp}/run")),
    Case("train_source_no_files", "data source matching no files", "launch.train --config.data.source=DIR/*.txt",
         r"data source '.*/nowhere/\*\.txt' matches no files",
         cli=(*TRAIN, "--config.data.source={tmp}/nowhere/*.txt")),
    Case("train_mesh_does_not_fit", "mesh that does not fit the devices", "launch.train --config.mesh.data=3",
         r"config\.mesh sizes \(data=3, fsdp=1, tensor=1, sequence=1\) multiply to 3, but there are 1 devices",
         cli=(*TRAIN, "--config.mesh.data=3")),
    Case("train_seq_len_past_max_len", "training sequences longer than the model's context",
         "launch.train --config.data.seq_len=4096", r"config\.data\.seq_len=4096 is not allowed: at most "
         r"model\.max_len=\d+", cli=(*TRAIN, "--config.data.seq_len=4096")),
    Case("decode_missing_workdir", "workdir that does not exist", "launch.decode --workdir=MISSING",
         r"--workdir='.*/missing' is not a directory", cli=("launch.decode", "--workdir={tmp}/missing", "--prompt=x")),
    Case("decode_unknown_model", "model name the zoo does not have", "launch.decode --model=llama-7b",
         r"unknown model 'llama-7b': the zoo has \['gemma3-270m', 'smollm2-135m-instruct'\]",
         cli=("launch.decode", "--model=llama-7b", "--prompt=x")),
    Case("decode_unknown_method", "method that does not exist", "launch.decode --method=beam",
         r"flag --method=beam: value should be one of <ar\|del\|draft\|", cli=(*DECODE, "--method=beam")),
    Case("decode_option_of_another_method", "option the method does not take",
         "launch.decode --method=lookup --granularity=0",
         r"--granularity does not apply to --method=lookup; its options: --tree, --adaptive, --min_ngram",
         cli=(*DECODE, "--method=lookup", "--granularity=0")),
    Case("decode_tree_without_drafts", "tree of the root alone", "launch.decode --method=lookup --tree=chain:0",
         r"method 'lookup': tree='chain:0' is not allowed: a tree with at least one draft node",
         cli=(*DECODE, "--method=lookup", "--tree=chain:0")),
    Case("decode_lossy_when_lossless_required", "lossy mode when lossless decoding is required",
         "launch.decode --method=skiplayers --require_lossless", r"method 'skiplayers' is lossy \(its output is not "
         r"the target's\) and lossless decoding was required", cli=(*DECODE, "--method=skiplayers",
                                                                    "--require_lossless")),
    Case("decode_prompts_file_missing", "prompts file that does not exist", "launch.decode --prompts_file=MISSING",
         r"--prompts_file='.*/prompts\.jsonl' could not be read: .*No such file",
         cli=("launch.decode", "--workdir={tmp}", "--prompts_file={tmp}/prompts.jsonl")),
    Case("convert_corrupt_gguf", "corrupt GGUF file", "launch.convert --gguf=CORRUPT",
         r"GGUF file '.*/bad\.gguf' could not be read \(truncated or corrupt\)",
         cli=("launch.convert", "--gguf={tmp}/bad.gguf", "--workdir={tmp}/out"),
         setup=lambda tmp: not_gguf(tmp / "bad.gguf")),
    Case("convert_hf_dir_without_config", "HF directory with weights but no config.json",
         "launch.convert --hf_dir=DIR", r"file '.*/hf/config\.json' does not exist",
         cli=("launch.convert", "--hf_dir={tmp}/hf", "--workdir={tmp}/out"),
         setup=lambda tmp: hf_dir(tmp, None, weights=True)),
    # ------------------------------------------------------------------------------ methods and token trees
    Case("method_argument_it_does_not_take", "argument the method does not take",
         "api.generate(method='lookup', granularity=0)",
         r"method 'lookup' takes no argument 'granularity'; it takes: tree, adaptive, min_ngram, max_ngram",
         call=lambda env: generate(env, method="lookup", granularity=0)),
    Case("method_unknown", "method that does not exist", "api.generate(method='beam')",
         r"unknown decoding method 'beam'; allowed: \('ar', 'del', 'draft', ",
         call=lambda env: generate(env, method="beam")),
    Case("tree_without_drafts", "tree of the root alone", "methods.make('lookup', tree='chain:0')",
         r"method 'lookup': tree='chain:0' is not allowed: a tree with at least one draft node",
         call=lambda env: make_method("lookup", tree="chain:0")),
    Case("tree_unknown", "tree spec that does not exist", "methods.make('lookup', tree='foo')",
         r"method 'lookup': unknown tree spec 'foo'; allowed: 'chain:<k>', 'branching:<b1>,<b2>,\.\.\.'",
         call=lambda env: make_method("lookup", tree="foo")),
    Case("tree_not_an_integer", "tree spec with a missing number", "methods.make('medusa', tree='branching:2,,1')",
         r"tree spec 'branching:2,,1': '' is not an integer",
         call=lambda env: make_method("medusa", tree="branching:2,,1")),
    # ----------------------------------------------------------------------------------- a generate request
    Case("prompt_longer_than_max_len", "prompt longer than the model's context",
         "api.generate(a 40-token prompt; max_len 32)",
         r"prompt of 40 tokens \+ max_new_tokens=4 \+ a tree of 1 nodes needs a context of 46, longer than "
         r"model\.max_len=32", call=lambda env: generate(env, prompts=((1,) * 40,))),
    Case("max_new_tokens_zero", "no tokens to generate", "api.generate(max_new_tokens=0)",
         r"max_new_tokens=0 must be a positive integer", call=lambda env: generate(env, max_new_tokens=0)),
    Case("max_new_tokens_not_integer", "a fractional token count", "api.generate(max_new_tokens=2.5)",
         r"max_new_tokens=2\.5 must be a positive integer", call=lambda env: generate(env, max_new_tokens=2.5)),
    Case("temperature_negative", "negative temperature", "api.generate(temperature=-1)",
         r"temperature=-1\.0 must be >= 0", call=lambda env: generate(env, temperature=-1)),
    Case("top_p_above_one", "top_p above 1", "api.generate(temperature=1, top_p=1.5)",
         r"top_p = 1\.5 must be in \(0, 1\]", call=lambda env: generate(env, temperature=1.0, top_p=1.5)),
    Case("prompts_not_a_batch", "one prompt not wrapped in a batch", "api.generate(prompts=[1, 2, 3])",
         r"prompts\[0\] = 1 is not a list of token ids; pass a batch",
         call=lambda env: generate(env, prompts=[1, 2, 3])),
    Case("prompts_as_text", "text instead of token ids", "api.generate(prompts='hello')",
         r"prompts must be a non-empty list of token-id lists .*; encode text first",
         call=lambda env: generate(env, prompts="hello")),
    Case("prompt_id_outside_vocab", "token id outside the vocabulary", "api.generate(prompts=[[5, 1000]]; vocab 64)",
         r"prompts\[0\]\[1\] = 1000 lies outside the model's vocabulary \[0, 64\)",
         call=lambda env: generate(env, prompts=[[5, 1000]])),
    Case("eos_id_outside_vocab", "stop id outside the vocabulary", "api.generate(eos_ids=64; vocab 64)",
         r"eos_ids=\(64,\) lie outside the model's vocabulary \[0, 64\)", call=lambda env: generate(env, eos_ids=64)),
    Case("shared_prefix_of_nothing", "a shared prefix of prompts that share none",
         "api.generate(prompts=[[1, 2], [3, 4]], shared_prefix=True)",
         r"shared_prefix=True needs prompts that begin with the same tokens; these share none",
         call=lambda env: generate(env, prompts=[[1, 2], [3, 4]], shared_prefix=True)),
    # ------------------------------------------------------------------------------- models and workdirs
    Case("load_unknown_name", "name that is neither a zoo model nor a directory", "api.load('llama-7b')",
         r"'llama-7b' is neither a zoo model \(one of \['gemma3-270m', 'smollm2-135m-instruct'\]\) nor a workdir",
         call=lambda env: load_model("llama-7b")),
    Case("zoo_unknown_model", "model name the zoo does not have", "zoo.model_workdir('llama-7b')",
         r"unknown model 'llama-7b': the zoo has", call=lambda env: zoo_workdir("llama-7b")),
    Case("workdir_missing", "workdir that does not exist", "checkpoint.restore_params(MISSING)",
         r"workdir '.*/missing' does not exist", call=lambda env: restore(env.tmp / "missing")),
    Case("workdir_not_a_run", "directory that is not a run", "checkpoint.restore_params(an empty directory)",
         r"workdir '.*' has no config\.json; is it a training workdir\?", call=lambda env: restore(env.tmp)),
    Case("import_into_used_workdir", "import into a directory that holds files",
         "workdir.import_checkpoint(HF_DIR, a non-empty directory)",
         r"workdir '.*/used' is not empty \(\['notes\.txt'\]\); import into a fresh workdir",
         call=lambda env: import_into(hf_dir(env.tmp, LLAMA, weights=True), used_workdir(env.tmp))),
    # -------------------------------------------------------------------------------- checkpoint files
    Case("gguf_not_a_gguf", "file named .gguf that is not one", "gguf.load_gguf_checkpoint(garbage.gguf)",
         r"GGUF file '.*/garbage\.gguf' could not be read \(truncated or corrupt\)",
         call=lambda env: load_gguf(not_gguf(env.tmp / "garbage.gguf"))),
    Case("gguf_truncated", "truncated GGUF file", "gguf.load_gguf_checkpoint(cut.gguf)",
         r"GGUF file '.*/cut\.gguf' could not be read \(truncated or corrupt\)",
         call=lambda env: load_gguf(write_gguf(env.tmp / "cut.gguf", cut=-16))),
    Case("gguf_without_hyperparameters", "GGUF file of tensors without hyperparameters",
         "gguf.load_gguf_checkpoint(bare.gguf)", r"GGUF file '.*/bare\.gguf' lacks the metadata key 'llama\.",
         call=lambda env: load_gguf(write_gguf(env.tmp / "bare.gguf"))),
    Case("hf_dir_without_config", "HF directory with weights but no config.json", "hf.load_hf_checkpoint(DIR)",
         r"file '.*/hf/config\.json' does not exist", call=lambda env: load_hf(hf_dir(env.tmp, None, weights=True))),
    Case("hf_config_missing_keys", "HF config.json without the model's sizes", "hf.load_hf_checkpoint(DIR)",
         r"config\.json: required key\(s\) \['vocab_size', 'hidden_size', 'num_hidden_layers', "
         r"'num_attention_heads'\] are missing",
         call=lambda env: load_hf(hf_dir(env.tmp, {"architectures": ["LlamaForCausalLM"]}))),
    Case("hf_unsupported_architecture", "HF architecture jaxspec does not hold", "hf.load_hf_checkpoint(DIR)",
         r"config\.json: architecture \['GPT2LMHeadModel'\] .*is not supported; supported: \['Gemma3ForCausalLM'",
         call=lambda env: load_hf(hf_dir(env.tmp, {**LLAMA, "architectures": ["GPT2LMHeadModel"]}))),
    Case("hf_dir_without_weights", "HF directory with config.json but no weights", "hf.load_hf_checkpoint(DIR)",
         r"'.*/hf' has neither model\.safetensors nor model\.safetensors\.index\.json \(only safetensors",
         call=lambda env: load_hf(hf_dir(env.tmp, LLAMA))),
    # ------------------------------------------------------------------------------------ model config
    Case("config_value_wrong_type", "config value of the wrong type",
         "config.validate_model_config(mamba.d_state='4')",
         r"config\.model\.mamba\.d_state='4' is not allowed: a positive integer",
         call=lambda env: validate_model(model_config(mamba=dict(d_state="4", d_conv=4, expand=2, dt_rank=0,
                                                                 ffn=False)))),
    Case("config_heads_do_not_divide", "KV heads that do not divide the heads",
         "config.validate_model_config(n_heads=3, n_kv_heads=2)",
         r"config\.model\.n_kv_heads=2 is not allowed: a divisor of n_heads=3",
         call=lambda env: validate_model(model_config(n_heads=3, d_model=96))),
    # ---------------------------------------------------------------------------------------------- data
    Case("data_source_matches_no_files", "data source matching no files", "data.make_datasets(source='DIR/*.txt')",
         r"data source '.*/nowhere/\*\.txt' matches no files; use 'stdlib', a file, a directory or a glob",
         call=lambda env: make_datasets(data_config(source=str(env.tmp / "nowhere" / "*.txt")))),
    Case("data_seq_len_too_large", "seq_len longer than the corpus holds",
         "data.make_datasets(seq_len=4096; a small corpus)",
         r"train split of data source '.*/corpus': \d+ windows of 4097 tokens cannot fill one batch of 8; lower "
         r"batch_size or seq_len", call=lambda env: make_datasets(data_config(source=corpus(env.tmp), seq_len=4096))),
    Case("data_val_fraction", "validation fraction above 1", "data.make_datasets(val_fraction=1.5)",
         r"data\.val_fraction=1\.5 is invalid; expected a number in \(0, 1\)",
         call=lambda env: make_datasets(data_config(val_fraction=1.5))),
    # ---------------------------------------------------------------------------------------------- mesh
    Case("mesh_axis_does_not_divide", "mesh axis that does not divide the devices",
         "mesh.resolve_axis_sizes(data=-1, tensor=3; 8 devices)",
         r"config\.mesh sizes \(data=-1, fsdp=1, tensor=3, sequence=1\) cannot fill 8 devices: 8 is not a "
         r"multiple of the fixed sizes' product 3", call=lambda env: mesh_sizes({"data": -1, "tensor": 3}, 8)),
    Case("mesh_product_differs", "mesh whose sizes multiply to another count",
         "mesh.resolve_axis_sizes(data=2, tensor=2; 8 devices)",
         r"config\.mesh sizes \(data=2, fsdp=1, tensor=2, sequence=1\) multiply to 4, but there are 8 devices",
         call=lambda env: mesh_sizes({"data": 2, "tensor": 2}, 8)),
    Case("mesh_two_free_axes", "two mesh axes set to -1", "mesh.resolve_axis_sizes(data=-1, fsdp=-1)",
         r"config\.mesh has more than one axis set to -1 \(data=-1, fsdp=-1, tensor=1, sequence=1\)",
         call=lambda env: mesh_sizes({"data": -1, "fsdp": -1}, 8)),
]

CLI_CASES = [c for c in CASES if c.cli]


def test_every_case_is_one_kind_and_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES) >= 15
    assert all(bool(c.cli) != (c.call is not None) for c in CASES)


# ---------------------------------------------------------------------------------------------- running them


def _run_cli(env: dict, case: Case, tmp) -> subprocess.CompletedProcess:
    if case.setup is not None:
        case.setup(tmp)
    env = dict(env, JAXSPEC_CACHE=str(tmp / "cache"))
    module, *args = case.cli
    return subprocess.run([sys.executable, "-m", module, *(a.format(tmp=tmp) for a in args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, subprocess_env):
    """name -> finished process of every CLI case, run two at a time (imports dominate; CI has 2 cores)."""
    env = subprocess_env()  # one CPU device, as the mesh case expects
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(_run_cli, env, c, tmp_path_factory.mktemp(c.name)) for c in CLI_CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture
def env(tmp_path, make_model):
    class Env:
        tmp = tmp_path

        @staticmethod
        def model():
            return make_model("A")

    return Env


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_message_naming_the_problem(case, request):
    if case.cli:
        proc = request.getfixturevalue("cli_results")[case.name]
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert re.search(case.pattern, proc.stderr), proc.stderr[-3000:]
        ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(ours) <= 1 and (not ours or re.search(case.pattern, ours[0])), proc.stderr[-3000:]
    else:
        with pytest.raises(InputError) as raised:
            case.call(request.getfixturevalue("env"))
        assert re.search(case.pattern, str(raised.value)), str(raised.value)


def test_cases_match_the_docs_table():
    """docs/reliability.md lists the cases in this order, one table row each: what was tried and where."""
    with open(os.path.join(ROOT, "docs", "reliability.md")) as fh:
        rows = [line for line in fh if line.startswith("| ")][1:]  # the header first
    cells = [[cell.strip().strip("`") for cell in row.strip().strip("|").split(" | ")] for row in rows]
    assert [(row[0], row[1]) for row in cells] == [(c.tried, c.where) for c in CASES]
