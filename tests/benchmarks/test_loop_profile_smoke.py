"""benchmarks/loop_profile.py on a tiny model: op kinds are instruction names without their numbers, and a
profiled speculative call's ops are found and summed by kind beside the call's wall time. Speed is not
asserted."""

import types


def test_op_kind_drops_the_instruction_number(benchmark_script):
    bench = benchmark_script("loop_profile")
    assert bench.op_kind("fusion.12") == "fusion"
    assert bench.op_kind("copy_bitcast_fusion.3") == "copy_bitcast_fusion"
    assert bench.op_kind("dot.1.2") == "dot"
    assert bench.op_kind("ffi_call") == "ffi_call"


def test_profiled_calls_summed_by_kind(benchmark_script, make_model, tmp_path):
    bench = benchmark_script("loop_profile")
    model, params = make_model("A", seed=1, max_len=96)
    lm = types.SimpleNamespace(model=model, params=params, tokenizer=types.SimpleNamespace(eos_ids=None))
    prompts = [[3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1, 4], [5, 9, 2, 6]]
    wall_ms, kinds, outs = bench.profile_calls(lm, prompts, dict(method="lookup", tree="chain:3"), 8, 16,
                                               str(tmp_path))
    assert len(outs) == 2 and all(int(out.new_tokens[0]) == 8 for out in outs)
    assert wall_ms > 0 and kinds
    assert not any(kind.startswith("$") for kind in kinds)  # Python frames are not ops
    assert "while" in kinds  # the decode loop itself
    assert all(count > 0 and ms >= 0 for count, ms in kinds.values())
