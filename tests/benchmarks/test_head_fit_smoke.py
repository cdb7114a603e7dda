"""benchmarks/head_fit.py on a tiny target: the suite rows are the target's greedy replies with its hidden states,
and the heads' accuracy is the figure the trainer reports on its validation batch. Speed is not measured."""

import copy
import types

import numpy as np

from configs import hydra as hydra_config
from configs import lm as lm_config
from jaxspec.decoding import api
from jaxspec.training import checkpoint, selfdistill
from jaxspec.training.data import split_documents
from jaxspec.training.trainer import train


def test_suite_rows_and_the_trainers_validation_accuracy(benchmark_script, make_model, tiny_config, chat_tokenizer,
                                                         apply, tmp_path):
    bench = benchmark_script("head_fit")
    model, params = make_model("A", seed=2, vocab_size=260, max_len=192)
    tokenizer = copy.copy(chat_tokenizer)
    tokenizer.eos_ids = (chat_tokenizer.eos_id,)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=tokenizer, workdir=str(tmp_path / "target"))

    prompts = [[256, 60 + n, 61, 62] * (n + 1) for n in range(3)]
    rows = bench.suite_rows(lm, prompts, max_new_tokens=5)
    replies = api.generate(model, params, prompts, max_new_tokens=5, eos_ids=tokenizer.eos_ids).tokens
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        n = len(prompt) + len(reply)
        assert rows["tokens"][i, :n].tolist() == prompt + list(reply) and rows["lengths"][i] == n
        assert rows["reply_start"][i] == len(prompt)
        hidden = apply(model, params, rows["tokens"][i:i + 1, :n], return_hidden=True).hidden[0]
        np.testing.assert_allclose(rows["features"][i, :n], np.asarray(hidden), rtol=0.02, atol=0.02)

    config = lm_config.get_config("tiny")
    config.model = tiny_config("A", vocab_size=260, max_len=192)
    with checkpoint.CheckpointManager(lm.workdir) as manager:
        manager.save(1, {"params": params}, {}, config, force=True)
    sd = str(tmp_path / "sd")
    selfdistill.generate(model, params, tokenizer, sd, num_prompts=8, max_new_tokens=24, seq_len=160, batch_size=8,
                         max_prompt_chars=60, target_workdir=lm.workdir, tokenizer_name="bytes", progress=False,
                         prompt_set="docs")
    config = hydra_config.get_config("heads=2,vocab=48,steps=4")
    config.target_workdir, config.data.source = lm.workdir, sd
    config.data.seq_len, config.data.batch_size, config.data.val_fraction = 127, 2, 0.25
    t = config.train
    t.warmup_steps, t.log_every, t.eval_every, t.eval_batches, t.save_every, t.progress_bar = 1, 2, 0, 1, 4, False
    final = train(config, str(tmp_path / "hydra"))

    _, arrays = selfdistill.read(sd)
    val = np.asarray(split_documents([str(i) for i in range(len(arrays["tokens"]))], 0.25)[1][:2])
    # The trainer's examples (configs/hydra.py's data.window="reply"): seq_len + 1 positions from each reply's
    # root, the position before its first token.
    width, root = config.data.seq_len + 1, arrays["reply_start"][val] - 1
    assert config.data.window == "reply" and (arrays["lengths"][val] - root <= width).all()
    padded = lambda name: np.pad(arrays[name], [(0, 0), (0, width)] + [(0, 0)] * (arrays[name].ndim - 2))
    cut = lambda name: np.stack([padded(name)[v, r:r + width] for v, r in zip(val, root)])
    val_rows = dict(tokens=cut("tokens"), features=cut("features"), reply_start=np.ones(len(val), np.int32),
                    lengths=arrays["lengths"][val] - root)
    fit = bench.head_accuracy(lm, str(tmp_path / "hydra"), val_rows, {"val": np.arange(len(val))})
    np.testing.assert_allclose(fit["val"], [final["val_head0_acc"], final["val_head1_acc"]], atol=1e-6)
