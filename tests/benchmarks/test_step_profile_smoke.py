"""benchmarks/step_profile.py on a tiny model: every traced op of the AR loop is found in the compiled HLO,
the ops of each decode step are grouped across layers (one thunk per layer and step), and the shape and byte
helpers read HLO shapes correctly."""


def test_shape_bytes_and_hlo_parsing(benchmark_script):
    bench = benchmark_script("step_profile")
    assert bench.shape_bytes("f32[576,3072]{1,0}") == 4 * 576 * 3072
    assert bench.shape_bytes("s8[10]{0}") == 10
    assert bench.shape_bytes("(f32[2], s32[])") == 0
    hlo = bench.parse_hlo('  %dot.1 = f32[1,8]{1,0} dot(%a, %w), lhs_contracting_dims={1}\n'
                          '  %a = f32[1,4]{1,0} parameter(0)\n  %w = f32[4,8]{1,0} parameter(1)\n'
                          '  %fusion.2 = f32[8]{0} fusion(%dot.1), kind=kLoop, calls=%c, metadata={op_name='
                          '"jit(f)/while/body/DecoderLM/DecoderLM.run_layers/layer_7/ffn/mul" stack_frame_id=1}\n')
    assert hlo["dot.1"] == ("f32[1,8]{1,0}", "dot", ["a", "w"], "")
    assert bench.group_of("dot.1", hlo) == "dot f32[1,4] x f32[4,8] -> f32[1,8]"
    assert bench.group_of("fusion.2", hlo) == "ffn: mul (fusion)"


def test_profile_of_a_tiny_ar_loop_groups_each_layers_ops(benchmark_script, make_model, tmp_path):
    from jaxspec.models.decode_layout import for_decoding

    bench = benchmark_script("step_profile")
    # vocab 48: the [V, d] head's product has a shape of its own (the qkv weight is [64, d]), left out below
    model, params = for_decoding(*make_model("A", n_layers=3, max_len=64, vocab_size=48))
    new_tokens = 6
    executables, dynamic = bench.ar_executables(model, params, [1, 2, 3, 4], new_tokens)
    hlo, events, wall_ms = bench.profiled_run(executables[new_tokens], dynamic, str(tmp_path))
    assert events and wall_ms > sum(e.get("dur", 0.0) for e in events) / 1e3 * 0.5
    groups = bench.op_table(events, hlo, new_tokens - 1)
    # Each product with an [n, d_model] weight (the decode layout's [out, in] q/k/v, o, gate/up) runs once per
    # layer and step: its three layers' products are one row of 3 thunks a step.
    d = model.model_cfg.d_model
    head = f"x f32[{model.model_cfg.vocab_size},{d}]"  # the LM head's product: once a step
    products = [g for g in groups if g.startswith(f"dot f32[{d},1] x f32[") and f",{d}] -> " in g and head not in g]
    assert len(products) == 3, sorted(groups)
    assert [groups[g][0] for g in products] == [3 * (new_tokens - 1)] * 3
    assert all(count >= new_tokens - 1 and micros > 0 and nbytes > 0 for count, micros, nbytes in groups.values())
