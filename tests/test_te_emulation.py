"""The TE emulation (tests/te_emulation) computes what megatron-core's local layers compute.

megatron-core's own TE wrappers (TEColumnParallelLinear, TERowParallelLinear,
TELayerNormColumnParallelLinear, TEDotProductAttention, TENorm), built on the emulation, are
compared number for number with ColumnParallelLinear, RowParallelLinear, norm + column linear,
and with a local-spec GPT, at TP=1, TP=2 and TP=2 with sequence parallelism, on megatron-core
0.16 and 0.19. Two launches run every case (te_layer_cases.py, te_gpt_cases.py); the tests below
read their results. The pytest process itself never imports the emulation.
"""

import sys

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks

# bit for bit: the emulation runs the same torch ops as the local layers
from support.compare import assert_same

LAYOUTS = [(2, False), (2, True), (1, False)]
LAYOUT_IDS = ["tp2", "tp2-sp", "tp1"]
NORMS = ["RMSNorm", "LayerNorm"]
RECIPES = ["DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling"]


@pytest.fixture(scope="module")
def layer_results():
    from support import te_layer_cases

    return run_on_ranks(te_layer_cases.all_layer_cases, world_size=2, setup=te_emulation.enable)


@pytest.fixture(scope="module")
def gpt_results():
    from support import te_gpt_cases

    return run_on_ranks(te_gpt_cases.all_gpt_cases, world_size=2, setup=te_emulation.enable)


def test_megatron_sees_the_emulated_te_2_11(gpt_results):
    for rank in gpt_results:
        found = rank["which_te"]
        assert found["version"] == te_emulation.TE_VERSION == "2.11.0"
        assert found["module_file"].startswith(str(te_emulation.SITE_PACKAGES))
        assert found["extension_has_te"] and found["specs_have_te"]


def test_the_pytest_process_never_imports_the_emulation(layer_results, gpt_results):
    assert "transformer_engine" not in sys.modules
    assert str(te_emulation.SITE_PACKAGES) not in sys.path


def _check_linear(case, rank, what):
    for quantity in ("out", "returned_bias", "dx", "dweight", "dbias", "weight"):
        te, local = case[quantity]
        if local is None:
            assert te is None, f"{what} {quantity}"
        else:
            assert_same(te, local, f"{what} rank {rank} {quantity}")
    for quantity in ("weight_attributes", "bias_attributes"):
        te, local = case[quantity]
        assert te == local, f"{what} {quantity}"


@pytest.mark.parametrize("case", ["column", "column[bf16]"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_te_column_parallel_linear_equals_column_parallel_linear(layer_results, layout, case):
    for rank, results in enumerate(layer_results):
        _check_linear(results[layout][case], rank, case)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_frozen_weight_gets_no_wgrad_and_fused_wgrad_lands_in_main_grad(layer_results, layout):
    for rank, results in enumerate(layer_results):
        case = results[layout]["column_wgrad_shortcuts"]
        assert_same(*case["frozen_dx"], f"rank {rank} frozen dx")
        assert case["frozen_grad"] is None
        assert_same(*case["fused_dx"], f"rank {rank} fused dx")
        assert_same(*case["fused_main_grad"], f"rank {rank} main_grad")
        assert case["fused_marked"], "grad_added_to_main_grad was not set"


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_te_row_parallel_linear_equals_row_parallel_linear(layer_results, layout):
    for rank, results in enumerate(layer_results):
        _check_linear(results[layout]["row"], rank, "row")


def _norm_grads(case):
    return {k: case[k] for k in ("dgamma", "dbeta") if k in case}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_te_layernorm_column_linear_equals_norm_then_column_linear(layer_results, layout, norm):
    for rank, results in enumerate(layer_results):
        case = results[layout][f"layernorm_column[{norm}]"]["plain"]
        for quantity in ("out", "dx", "dweight", "weight", *_norm_grads(case)):
            assert_same(*case[quantity], f"rank {rank} {quantity}")
        for quantity in ("weight_attributes", "gamma_attributes"):
            te, local = case[quantity]
            assert te == local, quantity
        assert case["gamma_attributes"][0]["sequence_parallel"] == layout[1]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_zero_centered_gamma_starts_at_zero_and_scales_by_one_plus_gamma(layer_results, layout):
    for rank, results in enumerate(layer_results):
        case = results[layout]["zero_centered_gamma"]
        initial = case["initial_gamma"]
        assert_same(initial, torch.zeros_like(initial), f"rank {rank} initial gamma")
        for quantity in ("out", "dx", "dgamma"):
            assert_same(*case[quantity], f"rank {rank} {quantity}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_returned_layernorm_output_is_the_local_normalized_input_and_its_grad_counts(
        layer_results, layout, norm):
    """return_layernorm_output switched on for a built module: the second output is the norm
    output (this rank's sequence shard under SP), and a loss on it reaches the input and the
    norm weights as it would through norm + column linear."""
    tp, sp = layout
    for rank, results in enumerate(layer_results):
        case = results[layout][f"layernorm_column[{norm}]"]["returned"]
        ln_out, reference = case["norm_output"]
        assert ln_out.shape[0] == 8 // tp if sp else 8  # SEQ = 8
        for quantity in ("out", "norm_output", "dx", *_norm_grads(case)):
            assert_same(*case[quantity], f"rank {rank} {quantity}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gathered_layernorm_output_is_the_full_sequence_and_te_drops_its_grad(
        layer_results, layout, norm):
    """return_layernorm_output_gathered: the whole sequence comes back, and (as in TE's
    `_LayerNormLinear.backward`, through 2.18) the gradient of that output is discarded: the
    input grad equals the local layers' grad of a loss without the norm-output term."""
    for rank, results in enumerate(layer_results):
        case = results[layout][f"layernorm_column[{norm}]"]["gathered"]
        assert case["norm_output"][0].shape[0] == 8
        for quantity in ("out", "norm_output", "dx", *_norm_grads(case)):
            assert_same(*case[quantity], f"rank {rank} {quantity}")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_fp8_autocast_is_recorded_and_quantizes_the_gemm_but_not_the_norm_output(
        layer_results, layout, recipe):
    for rank, results in enumerate(layer_results):
        fp8 = results[layout]["fp8"]
        high, case = fp8["high_precision"], fp8[recipe]
        # The autocast was entered, the module ran in FP8 under its recipe, the state restored.
        assert case["enabled_inside"] and case["module_fp8"]
        module_recipe, given_recipe = case["module_recipe"]
        assert module_recipe == given_recipe  # the module holds the very recipe object given
        assert not case["enabled_after"]
        assert case["stats"] == {"autocast_entered": 1, "fp8_gemms": 1}
        # The GEMM saw FP8-rounded operands: close to, but not, the high-precision output.
        assert not torch.equal(case["out"], high["out"])
        relative = (case["out"] - high["out"]).norm() / high["out"].norm()
        assert 0 < relative < 0.1
        torch.testing.assert_close(case["out"], case["expected_out"])
        # The returned norm output is the high-precision one, not FP8-rounded.
        assert case["norm_output"].dtype == torch.float32
        assert_same(case["norm_output"], high["norm_output"], f"rank {rank} norm output")
        assert not torch.equal(case["quantized_norm_output"], case["norm_output"]), \
            "the norm output lies on the FP8 grid"
        assert torch.isfinite(case["dx"]).all(), case["dx"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_te_spec_gpt_equals_local_spec_gpt(gpt_results, layout):
    """Same seed, same weights (under the TE -> local name mapping), same loss and grads, with
    attention dropout drawn under megatron's RNG tracker on both sides."""
    for rank, results in enumerate(gpt_results):
        case = results[layout]
        assert_same(*case["loss"], f"rank {rank} loss")
        for kind in ("weights", "grads"):
            te, local = case[kind]
            assert set(te) == set(local)
            for name in local:
                assert_same(te[name], local[name], f"rank {rank} {kind} {name}")


def test_te_gpt_state_dict_is_the_local_one_renamed_plus_attention_extra_state(gpt_results):
    """Checkpoint keys: the local spec's under the name mapping (megatron's local linears also
    write `_extra_state`), plus TE attention's `_extra_state` (its FP8 metadata in real TE)."""
    from support import tiny_gpt

    te_keys, local_keys = gpt_results[0][(2, True)]["state_dict_keys"]
    renamed = {tiny_gpt.te_to_local_name(k) for k in te_keys}
    assert set(local_keys) <= renamed
    assert renamed - set(local_keys) == {
        f"decoder.layers.{i}.self_attention.core_attention._extra_state" for i in range(2)}


def test_megatron_te_rng_tracker_runs_on_the_emulated_tracker(gpt_results):
    rank0, rank1 = (r["te_rng_tracker"] for r in gpt_results)
    for rank in (rank0, rank1):
        assert rank["te_tracker_class"] in rank["tracker_classes"]
    assert not torch.equal(rank0["first"], rank1["first"])  # TP ranks draw different masks
    assert not torch.equal(rank0["first"], rank0["second"])  # the stream advances
    assert_same(rank0["default"], rank1["default"], "default stream")  # shared by the ranks


def test_te_init_under_the_rng_tracker_equals_megatron_gpu_init(gpt_results):
    """use_cpu_initialization=False: each rank draws its own shard under the tracker."""
    for rank, results in enumerate(gpt_results):
        te, local = results["gpu_style_init"]
        assert set(te) == set(local)
        for name in local:
            assert_same(te[name], local[name], f"rank {rank} {name}")
    assert not torch.equal(*(r["gpu_style_init"][1]["output_layer.weight"] for r in gpt_results))


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
def test_megatron_fp8_config_runs_the_te_gpt_in_fp8(gpt_results, recipe):
    """TransformerConfig(fp8="hybrid", fp8_recipe=...) at TP=2 with SP: megatron enters the
    emulated fp8_autocast itself, and every base GEMM (4 per layer, 2 layers) runs in FP8."""
    for results in gpt_results:
        case, high = results["fp8"][recipe], results["fp8"]["high_precision"]
        assert case["stats"]["autocast_entered"] >= 1
        assert case["stats"]["fp8_gemms"] == 8
        assert "high_precision_gemms" not in case["stats"]
        assert case["loss"] != high and case["loss"] == pytest.approx(high, rel=1e-3)
        assert [n for n, g in case["grads"].items() if not torch.isfinite(g).all()] == []


def test_context_parallel_attention_equals_attention_over_the_whole_sequences(layer_results):
    """CP=2 in the zigzag layout (each sequence's chunks r and 3 - r on rank r), packed
    sequences with padding inside them, GQA, causal: every rank's output and q / k / v grads are
    its rows of the same attention run on the whole sequences (k / v grads summed back from the
    other rank's queries)."""
    for rank, results in enumerate(layer_results):
        result = results["context_parallel_attention"]
        for what, got, want in zip(("out", "dq", "dk", "dv"), result["cp"], result["whole"],
                                   strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {what}")
        assert result["cp"][2].abs().sum() > 0
