"""A tiny run of benchmarks/kernels.py's shared-prefix (Hydragen) table: a row per (B, K) with the errors against
the replicated-prefix baseline near zero and every timing and ratio filled in. Speed is not asserted."""

from __future__ import annotations

import sys

import pytest

TINY = ["--prefix_len=40", "--suffix_len=8", "--prefix_heads=4", "--prefix_kv_heads=2", "--prefix_head_dim=8",
        "--warmup=0", "--iters=1"]


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("kernels")


def table_rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under the heading that starts with `title`."""
    block = text.split(f"### {title}")[1]
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| B ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_shared_prefix_table_from_the_command_line(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--ops=shared_prefix", "--prefix_batches=2,3",
                                      "--prefix_tree_sizes=1", *TINY])
    script.main()
    rows = table_rows(capsys.readouterr().out, "Shared-prefix attention (Hydragen)")
    assert [row[:4] for row in rows] == [[str(b), "40", "8", str(k)] for b, k in ((2, 1), (3, 1))]
    for row in rows:
        assert len(row) == 12  # B, P, suffix, K, 3 errors, 2 KV MB, 2 timings, ratio (no kernel timing on CPU)
        assert all(float(error) < 1e-5 for error in row[4:7])
        assert float(row[7]) > float(row[8])  # the replicated prefix is read B times, the shared one once
        assert float(row[9]) > 0 and float(row[10]) > 0 and row[11].endswith("x")
    assert not script.failures


def test_shared_prefix_rows_time_the_kernel_when_asked(script):
    args = script.parse_args(["--prefix_batches=2", "--prefix_tree_sizes=2", *TINY])
    headers, rows = script.shared_prefix_rows(args, timing=True, kernel_timing=True)
    assert headers[-2:] == ["kernel ms", "replicated / kernel"]
    (row,) = rows
    assert len(row) == len(headers) and float(row[-2]) > 0 and row[-1].endswith("x")
    assert not script.failures
