"""MLA LoRA and HuggingFace DeepSeek-V3, proven against real transformers + peft: a small random
`DeepseekV3ForCausalLM` converted to a Megatron MLA GPT (local spec, TP=2+SP) computes HF's
logits; LoRA on every MLA linear trained there and exported is what PEFT computes on the HF
model; PEFT adapters made by real peft on the HF model import exactly, fused or canonical."""

import json

import pytest

from megatron_cpu.launch import run_on_ranks
from support import hf_deepseek, hf_llama, mla_cases, peft_reference

# The MLA linears' HF names. Real PEFT (0.21.2 with transformers 5) rewrites DeepSeek-V3's
# gate_proj / up_proj / down_proj targets into its fused experts' `target_parameters`, so an
# adapter on the dense MLP never reaches a PeftModel: the oracle covers attention.
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def make_peft_adapter(directory, target_modules, r=4):
    return str(peft_reference.make_peft_adapter(directory, target_modules, r, 16, seed=11,
                                                hf_model=hf_deepseek.build_hf_model()))


def peft_logits(adapter_dir):
    return peft_reference.peft_logits(adapter_dir, hf_deepseek.build_hf_model())[0]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek")
    adapters = [make_peft_adapter(out / "all", MLA_TARGETS),
                make_peft_adapter(out / "attention", ["q_b_proj", "kv_a_proj_with_mqa"], r=8)]
    ranks = run_on_ranks(mla_cases.deepseek_cases, world_size=2, tp=2, args=(str(out), adapters),
                         timeout=600)
    return out, adapters, ranks


def test_the_converted_mla_model_computes_hf_deepseek_v3(deepseek):
    _, _, ranks = deepseek
    hf = hf_llama.hf_logits(hf_deepseek.build_hf_model(), hf_llama.tokens())
    for rank in ranks:
        hf_llama.assert_logits_close(rank["base_logits"], hf)


def test_exported_mla_adapter_in_real_peft_computes_our_logits(deepseek):
    out, _, ranks = deepseek
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0]
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(MLA_TARGETS)
    logits = peft_logits(out / "peft")
    hf_llama.assert_logits_close(ranks[0]["logits"], logits)
    base = hf_llama.hf_logits(hf_deepseek.build_hf_model(), hf_llama.tokens())
    assert (logits - base).abs().max() > 1e-3  # the adapter changes the model


@pytest.mark.parametrize("canonical", [False, True])
def test_peft_adapters_import_exactly(deepseek, canonical):
    _, adapters, ranks = deepseek
    for adapter_dir in adapters:
        expected = peft_logits(adapter_dir)
        for rank in ranks:
            config, logits = rank[(adapter_dir, canonical)]
            hf_llama.assert_logits_close(logits, expected)
    full, attention = (ranks[0][(a, canonical)][0] for a in adapters)
    assert full.canonical is canonical and attention.target_modules == (
        "linear_kv_down_proj", "linear_q_up_proj")
    # MLA fuses no projections: both modes keep PEFT's rank.
    assert (full.r, attention.r) == (4, 8)


def test_an_mla_export_with_dense_mlp_adapters_warns_what_peft_will_ignore():
    from megatron_lora.interop import architectures
    from megatron_lora.interop.peft_export import architecture_warnings

    deepseek = architectures.architecture("DeepseekV3ForCausalLM")
    assert architecture_warnings(deepseek, ("linear_proj", "linear_q_up_proj")) == []
    (note,) = architecture_warnings(deepseek, ("linear_fc1", "linear_proj"))
    assert "ignores the adapters of linear_fc1" in note
    llama = architectures.architecture("LlamaForCausalLM")
    assert architecture_warnings(llama, ("linear_fc1",)) == []
