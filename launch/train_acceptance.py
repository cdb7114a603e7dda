"""Train SpecDec++'s acceptance head for one drafter of a target, on a self-distillation set of that target.

  python -m launch.selfdistill --config=configs/selfdistill.py:small --out=/tmp/sd       # the target's replies
  python -m launch.train_acceptance --model=smollm2-135m-instruct --data=/tmp/sd --method=layerskip \\
      --skip_layers=4,5,7,14,17,25 --out=/tmp/accept
  python -m launch.decode --model=smollm2-135m-instruct --method=layerskip --skip_layers=4,5,7,14,17,25 \\
      --acceptance_head=/tmp/accept --stop_threshold=0.5 --prompt=...

The head learns, from the drafter's hidden state and next-token distribution at a position, whether its top
token is the target's (jaxspec/training/acceptance.py); it is saved with the drafter it was trained for, and
decoding with any other drafter refuses it. Prints the head's validation log-loss and accuracy against the
constant predictor of the base rate.
"""

from __future__ import annotations

import json

from absl import app, flags

from jaxspec import cli

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "the target: a zoo name or a workdir")
_DATA = flags.DEFINE_string("data", None, "a self-distillation set of this target (launch.selfdistill)")
_OUT = flags.DEFINE_string("out", None, "where to save the head (a new workdir)")
_METHOD = flags.DEFINE_string("method", "layerskip", "the drafting method the head is for (draft, layerskip, "
                              "matformer, or another model-drafting method)")
_FIELDS = {
    "skip_layers": flags.DEFINE_string("skip_layers", None, "the drafter's skipped layers (layerskip), e.g. 4,5,7"),
    "granularity": flags.DEFINE_string("granularity", None, "the drafter's MatFormer granularity (matformer)"),
    "draft_workdir": flags.DEFINE_string("draft_workdir", None, "the draft model (draft)"),
}
_EXAMPLES = flags.DEFINE_integer("examples", 0, "use the set's first N replies (0: all; each costs a forward of the "
                                 "drafter over the whole sequence)")
_HIDDEN = flags.DEFINE_integer("hidden", 0, "the head's hidden width (0: logistic regression)")
_STEPS = flags.DEFINE_integer("steps", 2000, "AdamW steps (the best on held-out replies is kept)")
_BATCH = flags.DEFINE_integer("batch_size", 512, "positions per step")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-2, "AdamW's weight decay")
_VAL = flags.DEFINE_float("val_fraction", 0.1, "replies held out to score the head (as many again choose the step)")
_SEED = flags.DEFINE_integer("seed", 0, "split and initialisation seed")
flags.mark_flags_as_required(["data", "out"])


@cli.error_boundary("model", "data", "out")
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_libraries()
    from jaxspec.decoding import api, methods
    from jaxspec.decoding.method import ModelDrafting, Target
    from jaxspec.errors import InputError
    from jaxspec.training import acceptance, selfdistill

    fields = {name: cli.parse_method_flag(name, holder.value) for name, holder in _FIELDS.items()
              if holder.value is not None}
    spec = methods.make(_METHOD.value, **fields)
    if not isinstance(spec, ModelDrafting):
        drafting = sorted(n for n in methods.names() if issubclass(methods.get(n), ModelDrafting))
        raise InputError(f"--method={_METHOD.value}: an acceptance head stops a model-drafting method's branches; "
                         f"that is one of {drafting}")
    settings = acceptance.HeadSettings(hidden=_HIDDEN.value, steps=_STEPS.value, batch_size=_BATCH.value,
                                       learning_rate=_LR.value, weight_decay=_WEIGHT_DECAY.value,
                                       val_fraction=_VAL.value, seed=_SEED.value)
    target = api.load(_MODEL.value)
    _, arrays = selfdistill.read(_DATA.value)
    if _EXAMPLES.value < 0:
        raise InputError(f"--examples={_EXAMPLES.value} must be >= 0 (0: every reply of the set)")
    if _EXAMPLES.value:
        arrays = {key: value[:_EXAMPLES.value] for key, value in arrays.items()}
    drafter, params = spec.build(Target(target.model, target.params, target.workdir))
    features, labels, index = acceptance.acceptance_examples(drafter, params, arrays)
    head, head_params, metrics = acceptance.train_head(features, labels, index, settings)
    acceptance.save_head(_OUT.value, head, head_params, spec.drafted_by(), metrics, target.workdir)
    print(json.dumps(metrics, indent=1))
    val = metrics["validation"]
    print(f"validation: log-loss {val['log_loss']:.3f} (constant {val['base_log_loss']:.3f}), accuracy "
          f"{val['accuracy']:.3f} (constant {val['base_accuracy']:.3f}) over {val['examples']} positions; "
          f"saved to {_OUT.value}", flush=True)


if __name__ == "__main__":
    app.run(main)
