"""LoRA on megatron-core's Transformer Engine wrappers, on the CPU emulation of TE (see
tests/te_emulation and README: what this proves and what only a GPU with real TE can)."""

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import te_lora_cases
from support.compare import assert_same

LAYOUTS = [(2, True), (2, False), (1, False)]


@pytest.fixture(scope="module")
def compared():
    return run_on_ranks(te_lora_cases.te_vs_local, world_size=2, args=(LAYOUTS,),
                        setup=te_emulation.enable)


def test_get_gpt_lora_spec_builds_te_lora_layers(compared):
    assert compared[0][(1, False)]["classes"] == ["LoRAFactor",
        "LoRATELayerNormColumnParallelLinear", "LoRATERowParallelLinear", "LoRATransformerLayer"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_b_zero_equals_the_te_base_model(compared, layout):
    for rank in compared:
        assert_same(*rank[layout]["b0_logits"], "TE LoRA logits with B = 0 vs the TE base model")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_te_lora_model_equals_local_lora_model(compared, layout):
    reference = compared[0][(1, False)]
    for rank in compared:
        te_loss, local_loss = rank[layout]["losses"]
        assert te_loss == pytest.approx(local_loss, rel=1e-6)
        assert te_loss == pytest.approx(reference["losses"][1], rel=1e-5)
        te_grads, local_grads = rank[layout]["grads"]
        assert te_grads.keys() == local_grads.keys() and len(te_grads) == 16
        for name, grad in local_grads.items():
            torch.testing.assert_close(te_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(grad, reference["grads"][1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_te_lora_merged_equals_unmerged(compared, layout):
    for rank in compared:
        assert rank[layout]["merged_error"] < 1e-5


def test_fused_norm_adapter_sees_the_normalized_input():
    (out,) = run_on_ranks(te_lora_cases.adapter_input_is_normalized, world_size=1,
                          setup=te_emulation.enable)
    assert out["class"] == "LoRATELayerNormColumnParallelLinear"
    assert out["normalized_error"] < 1e-5
    assert out["pre_norm_error"] > 1e-2


def test_lora_matmuls_run_in_the_activation_dtype_inside_fp8_autocast():
    (out,) = run_on_ranks(te_lora_cases.lora_matmuls_under_fp8, world_size=1,
                          setup=te_emulation.enable)
    assert out["fp8_gemms"] > 0          # the base GEMMs did go through FP8
    assert out["lora_matmuls"] >= 4 * 2  # forward and backward of the adapters ran
    assert out["lora_dtypes"] == ["torch.bfloat16"]


CANONICAL_LAYOUTS = [(2, True), (1, False)]


@pytest.fixture(scope="module")
def canonical():
    return run_on_ranks(te_lora_cases.te_canonical_vs_local, world_size=2,
                        args=(CANONICAL_LAYOUTS,), setup=te_emulation.enable)


@pytest.mark.parametrize("layout", CANONICAL_LAYOUTS)
def test_canonical_lora_on_te_equals_canonical_lora_on_local_layers(canonical, layout):
    reference = canonical[0][(1, False)]
    for rank in canonical:
        got = rank[layout]
        assert got["classes"] == ["CanonicalLoRATELayerNormColumnParallelLinear",
                                  "LoRATERowParallelLinear"]
        assert_same(*got["b0_logits"], "canonical TE LoRA with B = 0 vs the TE base model")
        te_loss, local_loss = got["losses"]
        assert te_loss == pytest.approx(local_loss, rel=1e-6)
        assert te_loss == pytest.approx(reference["losses"][1], rel=1e-5)
        te_grads, local_grads = got["grads"]
        assert te_grads.keys() == local_grads.keys() and len(te_grads) == 2 * 2 * 7
        for name, grad in local_grads.items():
            torch.testing.assert_close(te_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(grad, reference["grads"][1][name], rtol=1e-4, atol=1e-6)
        assert got["merged_error"] < 1e-5
