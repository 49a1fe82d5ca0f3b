"""PEFT export and import of LoRA on MoE experts, against real transformers 5 + peft on small
random Qwen3-MoE and Mixtral models (fused experts, which PEFT fills from per-expert adapters).

Our export writes experts per expert with the global index (`mlp.experts.{e}.gate_proj`), the
form SGLang and vLLM serve and PEFT converts on load; shared-outer adapters go once in SGLang's
shared form, or expanded into every expert (`expand_shared=True`) for vLLM and PEFT.
"""

import re

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import hf_llama, moe_peft_cases

EXPORTS = [  # name, HF model, expert layout, TE grouped experts, expand shared factors
    ("qwen3_moe per_expert", "qwen3_moe", "per_expert", False, False),
    ("qwen3_moe shared_outer sglang", "qwen3_moe", "shared_outer", True, False),
    ("qwen3_moe shared_outer expanded", "qwen3_moe", "shared_outer", True, True),
    ("mixtral per_expert", "mixtral", "per_expert", True, False),
]
PEFT_READS = [name for name, *_ in EXPORTS if "sglang" not in name]
# PEFT's own conversion of per-expert adapters into fused experts warns about the rank and
# alpha patterns it adds for gate_up_proj; transformers warns about a deprecated property.
KNOWN_PEFT_NOTES = ("rank_pattern keys did not match", "alpha_pattern keys did not match",
                    "is_gradient_checkpointing")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_peft")
    ours, = run_on_ranks(moe_peft_cases.export_cases, world_size=1, args=(str(out), EXPORTS),
                         setup=te_emulation.enable, timeout=900)
    return out, ours


def folder(out, name):
    return str(out / name)


@pytest.mark.parametrize("name", PEFT_READS)
def test_exported_expert_adapter_in_real_peft_gives_our_logits(exported, name):
    out, ours = exported
    model_type = next(t for n, t, *_ in EXPORTS if n == name)
    logits, notes = moe_peft_cases.peft_logits(folder(out, name), model_type)
    hf_llama.assert_logits_close(logits, ours[name]["logits"])
    assert not [n for n in notes if not any(known in n for known in KNOWN_PEFT_NOTES)], notes


@pytest.mark.parametrize("name", [name for name, *_ in EXPORTS])
def test_merged_expert_model_equals_unmerged(exported, name):
    _, ours = exported
    hf_llama.assert_logits_close(ours[name]["merged"], ours[name]["logits"])


def test_shared_outer_is_written_in_sglangs_shared_form(exported):
    from safetensors import safe_open

    from lora_common.peft_files import read_peft_adapter

    out, _ = exported
    with safe_open(f"{folder(out, 'qwen3_moe shared_outer sglang')}/adapter_model.safetensors",
                   "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert shapes[f"{prefix}.gate_proj.lora_A.weight"] == [1, 4, 64]
    assert shapes[f"{prefix}.up_proj.lora_A.weight"] == [1, 4, 64]
    assert shapes[f"{prefix}.down_proj.lora_B.weight"] == [1, 64, 4]
    assert shapes[f"{prefix}.3.gate_proj.lora_B.weight"] == [32, 4]
    assert shapes[f"{prefix}.3.down_proj.lora_A.weight"] == [4, 32]
    assert f"{prefix}.3.gate_proj.lora_A.weight" not in shapes
    assert f"{prefix}.3.down_proj.lora_B.weight" not in shapes
    # Read back, the shared form is exactly the expanded one.
    shared = read_peft_adapter(folder(out, "qwen3_moe shared_outer sglang"))
    expanded = read_peft_adapter(folder(out, "qwen3_moe shared_outer expanded"))
    assert sorted(shared.adapters) == sorted(expanded.adapters)
    for module, (A, B) in expanded.adapters.items():
        assert torch.equal(shared.adapters[module][0], A), module
        assert torch.equal(shared.adapters[module][1], B), module
    assert shared.shared == {f"model.layers.{layer}.mlp.experts.{leaf}": factor
                             for layer in (0, 1) for leaf, factor in
                             (("gate_proj", "A"), ("up_proj", "A"), ("down_proj", "B"))}
    assert expanded.shared == {}


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    out, _ = exported
    imports = {
        "per_expert into SequentialMLP": (folder(out, "qwen3_moe per_expert"), "qwen3_moe", False),
        "sglang shared into TEGroupedMLP": (folder(out, "qwen3_moe shared_outer sglang"),
                                            "qwen3_moe", True),
        "mixtral per_expert into TEGroupedMLP": (folder(out, "mixtral per_expert"), "mixtral",
                                                 True),
        "sglang shared into SequentialMLP": (folder(out, "qwen3_moe shared_outer sglang"),
                                             "qwen3_moe", False),
    }
    rank, = run_on_ranks(moe_peft_cases.import_cases, world_size=1, args=(imports,),
                         setup=te_emulation.enable, timeout=900)
    rank["shared experts export"] = run_on_ranks(
        moe_peft_cases.shared_experts_export, world_size=1,
        args=(str(tmp_path_factory.mktemp("shared")),))[0]
    return rank


@pytest.mark.parametrize("name, source, layout", [
    ("per_expert into SequentialMLP", "qwen3_moe per_expert", "per_expert"),
    ("sglang shared into TEGroupedMLP", "qwen3_moe shared_outer sglang", "shared_outer"),
    ("mixtral per_expert into TEGroupedMLP", "mixtral per_expert", "per_expert"),
])
def test_import_is_exact(exported, imported, name, source, layout):
    _, ours = exported
    got = imported[name]
    hf_llama.assert_logits_close(got["logits"], ours[source]["logits"])
    assert got["config"]["expert_layout"] == layout
    assert got["config"]["target_modules"] == ["experts.linear_fc1", "experts.linear_fc2",
                                               "linear_proj", "linear_qkv"]


def test_bad_expert_adapters_are_named(imported):
    refused = imported["sglang shared into SequentialMLP"]
    assert re.search(r"'shared_outer' cannot be held by decoder.layers.0.mlp.experts "
                     r"\(SequentialMLP\)", refused["error"]), refused["error"]
    assert refused["untouched"]
    assert "Qwen3MoeForCausalLM has no shared experts" in imported["shared experts export"]


def test_deepseek_v3_experts_and_shared_experts_round_trip(tmp_path):
    """DeepSeek-V3's layout (a dense first layer, then routed experts beside a shared expert,
    MLA attention): every exported module is a weight of HF's `DeepseekV3ForCausalLM` (per
    expert, `mlp.shared_experts.*`, the dense layer's `mlp.*`, MLA's `self_attn.*`), and the
    adapter imported back into the plain model gives the LoRA model's logits."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out, = run_on_ranks(moe_peft_cases.deepseek_v3_round_trip, world_size=1,
                        args=(str(tmp_path / "peft"),))
    config = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1)
    DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        weights = set(f.keys())
    modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
               for key in out["modules"]}
    assert {f"{m}.weight" for m in modules} <= weights, sorted(
        f"{m}.weight" for m in modules if f"{m}.weight" not in weights)
    assert {m.split(".mlp.")[-1] for m in modules if ".mlp." in m} == {
        "gate_proj", "up_proj", "down_proj",
        *(f"{kind}.{leaf}" for kind in ("shared_experts",) for leaf in
          ("gate_proj", "up_proj", "down_proj")),
        *(f"experts.{e}.{leaf}" for e in range(4) for leaf in ("gate_proj", "up_proj",
                                                               "down_proj"))}
    ours, imported = out["logits"]
    torch.testing.assert_close(imported, ours, rtol=1e-5, atol=1e-5)
