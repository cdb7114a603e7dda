"""A tiny run of benchmarks/step_cost.py's tables on a random model: every layout gives a row in every table and
the same greedy tokens as the standard layout (float) or a row of its own (int8). Speed is not asserted."""

from __future__ import annotations

import types

import jax
import pytest

from jaxspec import config as config_lib
from jaxspec.models.lm import build_model, init_params
from jaxspec.ops import small_rows_matmul


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("step_cost")


@pytest.fixture(scope="module")
def variants(script):
    cfg = config_lib.model_defaults()
    cfg.update(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64))
    model = build_model(cfg)
    lm = types.SimpleNamespace(model=model, params=init_params(model, jax.random.key(0)),
                               config=types.SimpleNamespace(model=cfg))
    return script.layout_variants(lm, ["standard", "decode", "int8"])


def table_rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under the heading that starts with `title`."""
    block = text.split(f"## {title}")[1].split("\n## ")[0]
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| layout")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_every_table_has_a_row_per_layout(script, variants, capsys):
    prompt = list(range(1, 9))
    script.ar_table(variants, prompt, 4, roofline_gbs=10.0, rounds=1)
    script.loops_table(variants, prompt, 4, rounds=1)
    script.curve_table(variants, [1, 2], context=6, rounds=1)
    out = capsys.readouterr().out
    ar = table_rows(out, "Autoregressive decoding")
    assert [row[0] for row in ar] == ["standard", "decode", "int8"]
    assert ar[1][-1] == "same"  # the decode layout decodes the standard layout's tokens
    assert [row[:2] for row in table_rows(out, "Decode loops")] == [
        [layout, method] for layout in ("standard", "decode", "int8") for method in ("ar", "lookup chain:4")]
    curve = table_rows(out, "Tree forward")
    assert {(row[0], row[1]) for row in curve} == {(layout, part) for layout in ("standard", "decode", "int8")
                                                    for part in ("whole", "layers", "head")} | {
        ("standard", "head: x @ E^T")}
    assert all(len(row) == 2 + 2 + 1 for row in curve)  # layout, part, K=1 ms, K=2 ms, K=2/K=1


def test_streamed_bytes_leave_out_an_untied_embedding(script):
    params = {"embed": {"embedding": jax.numpy.zeros((10, 4))}, "lm_head": {"kernel": jax.numpy.zeros((4, 10))}}
    assert script.streamed_bytes(params) == 4 * 40
    assert script.streamed_bytes({"embed": params["embed"]}) == 4 * 40


def test_products_table_covers_every_weight_product_of_a_forward(script, variants, capsys):
    products = script.decode_products(variants["decode"][1])
    # per layer: qkv, o, gate/up, down; plus the tied head, which counts once
    assert sorted((name, len(weights)) for (name, _), weights in products.items()) == sorted(
        [("LM head [V, d]", 1), ("down_proj", 2), ("gate_up", 2), ("o_proj", 2), ("qkv", 2)])
    script.products_table(variants, [1, 2], rounds=1, square_n=64)
    out = capsys.readouterr().out
    rows = [row for row in table_rows(out, "Weight products") if row[0] not in ("product", "K")]  # no headers
    names = {name for name, _ in products}
    kernel = small_rows_matmul.available()  # where the CPU kernel builds, each group has a row on it too
    assert {row[0] for row in rows if not row[0][0].isdigit()} == names | (
        {f"{name}, CPU kernel" for name in names} if kernel else set())
    summary = [row for row in rows if row[0].isdigit()]
    assert [row[0] for row in summary] == ["1", "2"] and summary[0][2] == "1.00"


def test_batches_table_has_a_row_per_batch(script, variants, capsys):
    script.batch_table(variants, list(range(1, 9)), 4, [1, 2], rounds=1)
    rows = [row for row in table_rows(capsys.readouterr().out, "Batched") if row[0] != "batch"]
    assert [row[0] for row in rows] == ["1", "2"] and rows[0][3] == "1.00x"


def test_prefill_table_has_a_row_per_width_and_chunk(script, variants, capsys):
    # 12 tokens bucket to a width of 16: one forward, chunks of 4 (the fourth chunk is padding in every row, and
    # skipped) and of 8; padded to 32, in one forward and with the prefill also at 16; the prompt's own width. A
    # chunk as wide as the bucket is left out.
    script.prefill_table(variants, list(range(1, 9)), [12], [4, 8, 16], rounds=1)
    rows = [row for row in table_rows(capsys.readouterr().out, "Prefill") if row[0] != "prompt tokens"]
    assert [row[1] for row in rows] == ["width 16, one forward", "width 16, chunks of 4", "width 16, chunks of 8",
                                        "width 32, one forward", "width 32, prefill also at 16",
                                        "width 12 (no padding), one forward"]
    assert rows[0][4] == "1.00x"
    assert [row[5] for row in rows] == ["yes"] * 6  # the same first token however the prompt is prefilled
