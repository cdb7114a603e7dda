"""Convert between checkpoints (Hugging Face directories, GGUF files) and jaxspec workdirs.

  python -m launch.convert --hf_dir=DIR --workdir=OUT         # import a Hugging Face checkpoint into OUT
  python -m launch.convert --gguf=FILE --workdir=OUT          # import a GGUF file into OUT
  python -m launch.convert --export_hf_dir=DIR --workdir=IN   # export IN's latest checkpoint to a HF directory

Import (`jaxspec.interop.workdir.import_checkpoint`) writes a fresh workdir that restores like a training
workdir, so `launch.decode --workdir=OUT` serves the converted model: the orbax checkpoint (step 0, params),
config.json, and the checkpoint's tokenizer as a Hugging Face tokenizer directory OUT/tokenizer, named by
`config.data.tokenizer`. Export writes LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases) or Gemma3ForCausalLM
(Gemma features) in safetensors, with the workdir tokenizer's special ids (and its tokenizer.json).

Both directions publish their result last: an import renames a finished staging directory onto the workdir, an
export renames its config.json in after the other files. A conversion killed midway leaves nothing that loads.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxspec import cli
from jaxspec import config as config_lib
from jaxspec.interop import hf
from jaxspec.interop.workdir import checkpoint_format, import_checkpoint
from jaxspec.training import checkpoint as checkpoint_lib
from jaxspec.training import tokenizer as tokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory to import into --workdir.")
flags.DEFINE_string("gguf", None, "GGUF file to import into --workdir.")
flags.DEFINE_string("export_hf_dir", None, "Directory to write --workdir's model to, as a HF checkpoint.")
flags.DEFINE_string("workdir", None, "jaxspec workdir: the import's output or the export's input.")
flags.DEFINE_enum("dtype", "float32", list(config_lib.DTYPES), "Parameter dtype of the result.")
flags.DEFINE_integer("max_len", 0, "Import: decode-state length (0: the checkpoint's context length).")
flags.DEFINE_integer("step", -1, "Export: checkpoint step (-1: the latest).")
flags.DEFINE_integer("granularity", -1, "Export: MatFormer granularity index (-1: the full model).")


def export_from_workdir(workdir: str, export_dir: str, step: int | None = None, granularity=None,
                        dtype: str = "float32") -> str:
    """Export a workdir's checkpoint (latest, or `step`) as a HF checkpoint; returns its config.json path."""
    params, config = checkpoint_lib.restore_params(workdir, step)
    tokenizer = None
    if "data" in config:
        tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
    return hf.export_hf_checkpoint(params, config.model, export_dir, granularity=granularity, dtype=dtype,
                                   tokenizer=tokenizer)


@cli.error_boundary("hf_dir", "gguf", "export_hf_dir", "workdir")
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    chosen = [name for name in ("hf_dir", "gguf", "export_hf_dir") if FLAGS[name].value]
    if len(chosen) != 1:
        raise app.UsageError("pass exactly one of --hf_dir or --gguf (import) and --export_hf_dir (export); got "
                             f"{['--' + name for name in chosen] or 'none'}")
    if FLAGS.export_hf_dir:
        path = export_from_workdir(FLAGS.workdir, FLAGS.export_hf_dir, None if FLAGS.step < 0 else FLAGS.step,
                                   None if FLAGS.granularity < 0 else FLAGS.granularity, FLAGS.dtype)
        print(f"exported {FLAGS.workdir} -> {os.path.dirname(path)}")
        return
    source = FLAGS.hf_dir or FLAGS.gguf
    flag, want = ("gguf", "gguf") if FLAGS.gguf else ("hf_dir", "hf")
    if checkpoint_format(source) != want:
        raise app.UsageError(f"--{flag}={source} is not a {'GGUF file' if FLAGS.gguf else 'directory'}")
    config = import_checkpoint(source, FLAGS.workdir, FLAGS.dtype, FLAGS.max_len or None)
    print(f"imported {source} -> {FLAGS.workdir} (layer_pattern={config.model.layer_pattern}, "
          f"d_model={config.model.d_model}, n_layers={config.model.n_layers}, tokenizer={config.data.tokenizer})")


if __name__ == "__main__":
    app.run(main)
