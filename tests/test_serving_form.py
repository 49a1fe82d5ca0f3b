"""`--lora-sync adapter` for MoE and multi-latent-attention models (`sync/serving_form.py`): the
HF architecture that names the adapter (from `--hf-checkpoint`), the experts' form SGLang is
sent, and every refusal of what SGLang 0.5.15.post1 cannot serve, naming the flag and the
reason. The sync itself runs on slime's own code in test_slime_actor.py (its MoE and MLA
layouts), and SGLang's loader on the payload in test_sglang_adapter.py."""

from __future__ import annotations

import argparse
import json

import pytest

from lora_common import add_lora_arguments
from megatron_lora import check_lora_sync_args
from megatron_lora.sync.serving_form import peft_form

SERVED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLA_SERVED = ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj", "gate_proj",
              "up_proj", "down_proj"]
MLA_TARGETS = ("--lora-target-modules", "linear_q_down_proj", "linear_q_up_proj",
               "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj", "linear_fc1",
               "linear_fc2")


def slime_args(*argv, **flags):
    """slime's args as `check_lora_sync_args` reads them: the LoRA flags parsed, SGLang's
    served for a dense model's every linear, NCCL transport."""
    args = add_lora_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    defaults = dict(sglang_enable_lora=True, sglang_max_lora_rank=16,
                    sglang_lora_target_modules=SERVED, sglang_dp_size=1,
                    sglang_max_loaded_loras=None, debug_train_only=False,
                    update_weight_transport="nccl", update_weight_mode="full")
    for key, value in {**defaults, **flags}.items():
        setattr(args, key, value)
    return args


def checkpoint(tmp_path, architecture: str | None):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": [architecture]} if architecture else {}))
    return str(tmp_path)


def moe_args(tmp_path, *argv, architecture="Qwen3MoeForCausalLM", **flags):
    flags = {"num_experts": 8, "hf_checkpoint": checkpoint(tmp_path, architecture), **flags}
    return slime_args("--use-lora", "--lora-sync", "adapter", *argv, **flags)


def mla_args(tmp_path, *argv, architecture="DeepseekV3ForCausalLM", **flags):
    flags = {"num_experts": 8, "moe_shared_expert_intermediate_size": 32,
             "multi_latent_attention": True, "sglang_lora_target_modules": MLA_SERVED,
             "hf_checkpoint": checkpoint(tmp_path, architecture), **flags}
    return slime_args("--use-lora", "--lora-sync", "adapter", *(argv or MLA_TARGETS), **flags)


def test_moe_and_mla_runs_that_sglang_serves_pass(tmp_path):
    check_lora_sync_args(moe_args(tmp_path))
    check_lora_sync_args(moe_args(tmp_path, "--lora-expert-layout", "shared_outer",
                                  sglang_experts_shared_outer_loras=True))
    check_lora_sync_args(moe_args(tmp_path, "--lora-target-modules", "experts.linear_fc1",
                                  "experts.linear_fc2", "linear_qkv"))
    check_lora_sync_args(moe_args(tmp_path, architecture="MixtralForCausalLM"))
    check_lora_sync_args(mla_args(tmp_path))
    # attention only: the experts are not adapted, whatever serves them
    check_lora_sync_args(moe_args(tmp_path, "--lora-target-modules", "linear_qkv",
                                  sglang_lora_target_modules=["q_proj", "k_proj", "v_proj"]))


def test_the_adapter_is_named_by_the_checkpoints_architecture(tmp_path):
    assert peft_form(moe_args(tmp_path)) == ("Qwen3MoeForCausalLM", True)
    # SGLang's shared-outer form only for a server started for it; else every expert a copy
    assert peft_form(moe_args(tmp_path, sglang_experts_shared_outer_loras=True)) == (
        "Qwen3MoeForCausalLM", False)
    assert peft_form(mla_args(tmp_path))[0] == "DeepseekV3ForCausalLM"
    # dense models keep the Llama-family names, whatever their architecture is called
    dense = slime_args("--use-lora", hf_checkpoint=checkpoint(tmp_path, "Glm4ForCausalLM"))
    assert peft_form(dense)[0] == "LlamaForCausalLM"
    assert peft_form(slime_args("--use-lora"))[0] == "LlamaForCausalLM"


@pytest.mark.parametrize("case, culprit", [
    ("unknown architecture", "--hf-checkpoint's architecture is Glm4MoeLiteForCausalLM"),
    ("no checkpoint", "--hf-checkpoint's architecture is not given"),
    ("per_expert into a shared-outer server",
     "--sglang-experts-shared-outer-loras holds one gate/up A and one down B per layer"),
    ("experts without down_proj on the server",
     "SGLang adapts an MoE layer's experts only when both gate_up_proj"),
    ("shared experts of Qwen3-MoE", "Qwen3MoeForCausalLM has no shared experts"),
])
def test_moe_runs_sglang_cannot_serve_are_refused_naming_why(tmp_path, case, culprit):
    args = {
        "unknown architecture": lambda: moe_args(tmp_path, architecture="Glm4MoeLiteForCausalLM"),
        "no checkpoint": lambda: moe_args(tmp_path, architecture=None),
        "per_expert into a shared-outer server": lambda: moe_args(
            tmp_path, sglang_experts_shared_outer_loras=True),
        "experts without down_proj on the server": lambda: moe_args(
            tmp_path, "--lora-target-modules", "linear_qkv", "experts.linear_fc1",
            sglang_lora_target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        "shared experts of Qwen3-MoE": lambda: moe_args(
            tmp_path, moe_shared_expert_intermediate_size=32),
    }[case]()
    with pytest.raises(ValueError, match=culprit):
        check_lora_sync_args(args)


@pytest.mark.parametrize("targets, culprit", [
    (("linear_q_proj", "linear_kv_up_proj"),
     "linear_q_proj \\(MLA without q compression, HF q_proj\\): SGLang 0.5.15 folds every "
     "q_proj adapter into a q/k/v slot"),
    (("linear_kv_down_proj", "linear_q_up_proj"),
     "linear_kv_down_proj without linear_q_down_proj: SGLang 0.5.15 fills its fused q_a / kv_a "
     "slot from a q_a_proj adapter only"),
])
def test_mla_targets_sglang_has_no_slot_for_are_refused_with_the_reason(tmp_path, targets,
                                                                        culprit):
    args = mla_args(tmp_path, "--lora-target-modules", *targets, debug_train_only=True)
    with pytest.raises(ValueError, match=culprit):
        check_lora_sync_args(args)


def test_mla_under_another_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multi-latent attention under Qwen3MoeForCausalLM"):
        check_lora_sync_args(mla_args(tmp_path, architecture="Qwen3MoeForCausalLM",
                                      moe_shared_expert_intermediate_size=None))
