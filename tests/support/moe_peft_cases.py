"""Rank-side cases for test_moe_peft.py: LoRA on a Megatron MoE GPT converted from a small
random HF Qwen3-MoE (or Mixtral), exported to PEFT, and PEFT adapters imported back."""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import hf_llama, hf_moe, lora_helpers, moe_cases, peft_reference


def lora_gpt(hf, expert_layout: str, te: bool):
    """The converted GPT with LoRA on every linear (experts included), non-zero B."""
    from megatron_lora import lora_spec

    config = LoRAConfig(r=4, alpha=8, expert_layout=expert_layout)
    megatron_config = hf_moe.transformer_config(hf.config, grouped=te)
    spec = lora_spec(hf_moe.block_spec(megatron_config, te), config)
    model = hf_moe.gpt_from_hf(hf, spec, te=te)
    lora_helpers.set_nonzero_B(model, seed=0, scale=0.3)
    return model


def export_cases(out_dir: str, cases):
    """For each (name, HF model type, expert layout, TE grouped experts, expand shared): export
    the LoRA model to `out_dir/<name>` and return our logits (and the merged model's)."""
    from megatron_lora import export_peft_adapter, merge_lora_weights, save_lora_checkpoint

    out = {}
    for name, model_type, layout, te, expand in cases:
        hf = hf_moe.build_hf_model(hf_moe.hf_config(model_type))
        model = lora_gpt(hf, layout, te)
        export_peft_adapter(model, f"{out_dir}/{name}", base_model_name_or_path="tiny-moe",
                            architecture=hf.config.architectures[0], expand_shared=expand)
        save_lora_checkpoint(model, f"{out_dir}/{name}.safetensors")
        logits = hf_llama.gpt_logits(model, hf_llama.tokens())
        merge_lora_weights(model)
        out[name] = {"logits": logits, "merged": hf_llama.gpt_logits(model, hf_llama.tokens())}
    return out


def import_cases(imports: dict[str, tuple[str, str, bool]]):
    """Import each PEFT adapter folder (name -> (folder, HF model type, TE grouped experts))
    into the plain converted GPT: our logits and the config the import chose, or the error."""
    from megatron_lora import import_peft_adapter
    from megatron_lora.modules import lora_modules

    out = {}
    for name, (adapter_dir, model_type, te) in imports.items():
        hf = hf_moe.build_hf_model(hf_moe.hf_config(model_type))
        model = hf_moe.gpt_from_hf(hf, te=te)
        try:
            config = import_peft_adapter(model, adapter_dir)
        except ValueError as error:
            out[name] = {"error": str(error), "untouched": not lora_modules(model)}
            continue
        out[name] = {"logits": hf_llama.gpt_logits(model, hf_llama.tokens()),
                     "config": config.to_dict()}
    return out


def shared_experts_export(out_dir: str) -> str | None:
    """Exporting adapters of MoE shared experts for Qwen3-MoE (which has none) is refused."""
    from megatron_lora import export_peft_adapter

    megatron_config = moe_cases.tiny_moe.transformer_config(moe_shared_expert_intermediate_size=48)
    from megatron_lora import lora_spec

    model = moe_cases.tiny_moe.build(
        lora_spec(moe_cases.tiny_moe.block_spec(megatron_config), LoRAConfig(r=4)), megatron_config)
    try:
        export_peft_adapter(model, out_dir, architecture="Qwen3MoeForCausalLM")
    except ValueError as error:
        return str(error)
    return None


def peft_logits(adapter_dir: str, model_type: str) -> tuple[torch.Tensor, list[str]]:
    """Real PEFT on the HF MoE model (in the test process: no Megatron): logits and warnings."""
    hf = hf_moe.build_hf_model(hf_moe.hf_config(model_type))
    return peft_reference.peft_logits(adapter_dir, hf)


def deepseek_v3_round_trip(out_dir: str) -> dict:
    """An MLA MoE GPT as DeepSeek-V3 lays it out (layer 0 dense, layer 1 routed experts beside a
    shared expert), LoRA on every MLA linear and every MLP (non-zero B): exported under
    DeepSeek-V3's names, imported into the same model without LoRA. The exported module names,
    both models' logits and full adapters by checkpoint name."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_lora import export_peft_adapter, import_peft_adapter, lora_spec
    from support import tiny_mla

    config = tiny_mla.transformer_config(
        num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_layer_freq=[0, 1],
        moe_shared_expert_intermediate_size=32, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = tiny_mla.SDPACoreAttention
    lora = LoRAConfig(r=4, alpha=8, target_modules=[*tiny_mla.TARGETS, "linear_fc1",
                                                     "linear_fc2"])
    model = tiny_mla.build(lora_spec(block, lora), config=config)
    lora_helpers.set_nonzero_B(model, seed=0, scale=0.3)
    export_peft_adapter(model, out_dir, architecture="DeepseekV3ForCausalLM")
    plain = tiny_mla.build(block, config=config)
    import_peft_adapter(plain, out_dir)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    return {"modules": sorted(peft_reference.read_peft_folder(out_dir)[1]),
            "logits": [m(tokens, positions, None).detach() for m in (model, plain)],
            "adapters": [moe_cases.adapter_full_tensors(m) for m in (model, plain)]}
