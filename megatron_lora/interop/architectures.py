"""The HuggingFace architectures the interop knows: what each one's layers carry beyond Llama's,
how its MoE experts are named, and how to tell one from an HF config. Names only, no tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertNames:
    """How an HF MoE architecture names its routed experts in the per-expert form PEFT adapters
    use (transformers 4 module names, which SGLang and vLLM read and PEFT converts on load for
    transformers 5's fused experts): `model.layers.{l}.<path>.{e}.<gate|up|down>`."""

    path: str               # the experts inside an HF layer
    gate: str
    up: str
    down: str
    num_experts_field: str  # HF config field: experts per layer
    ffn_field: str          # HF config field: each expert's ffn width


@dataclass(frozen=True)
class Architecture:
    """An HF Llama-family causal LM class and what its layers carry beyond Llama's."""

    name: str        # HF class name, as in `config.architectures`
    model_type: str  # HF `config.model_type`
    qkv_bias: bool   # q/k/v projections have biases (o_proj and the MLP do not)
    qk_norm: bool    # RMSNorm over each head's q and k, before RoPE
    attention: str = "standard"  # "mla": multi-latent attention (see the module docstring)
    moe: ExpertNames | None = None  # routed experts (MoE architectures)
    shared_experts: str | None = None  # the shared experts inside an HF layer (a gated MLP)
    dense_mlp: bool = True  # layers with a dense MLP (`mlp.gate_proj`); Mixtral's are all MoE


QWEN3_MOE_EXPERTS = ExpertNames("mlp.experts", "gate_proj", "up_proj", "down_proj",
                                num_experts_field="num_experts", ffn_field="moe_intermediate_size")
DEEPSEEK_V3_EXPERTS = ExpertNames("mlp.experts", "gate_proj", "up_proj", "down_proj",
                                  num_experts_field="n_routed_experts",
                                  ffn_field="moe_intermediate_size")
MIXTRAL_EXPERTS = ExpertNames("block_sparse_moe.experts", "w1", "w3", "w2",
                              num_experts_field="num_local_experts", ffn_field="intermediate_size")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("LlamaForCausalLM", "llama", qkv_bias=False, qk_norm=False),
        Architecture("MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False),
        Architecture("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
        Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qkv_bias=False, qk_norm=True,
                     moe=QWEN3_MOE_EXPERTS),
        Architecture("MixtralForCausalLM", "mixtral", qkv_bias=False, qk_norm=False,
                     moe=MIXTRAL_EXPERTS, dense_mlp=False),
        # the first_k_dense_replace layers dense, then routed experts beside shared experts
        Architecture("DeepseekV3ForCausalLM", "deepseek_v3", qkv_bias=False, qk_norm=False,
                     attention="mla", moe=DEEPSEEK_V3_EXPERTS,
                     shared_experts="mlp.shared_experts"),
    )
}


def architecture(name_or_config: str | Any) -> Architecture:
    """The known architecture named by a class name, or that of an HF config (its
    `architectures` list, else its `model_type`: configs built in code have no list)."""
    if isinstance(name_or_config, str):
        name = name_or_config
    else:
        names = getattr(name_or_config, "architectures", None) or []
        if len(names) > 1:
            raise ValueError(f"HF config lists several architectures {names}; expected one")
        if names:
            name = names[0]
        else:
            by_type = {a.model_type: a.name for a in ARCHITECTURES.values()}
            model_type = getattr(name_or_config, "model_type", None)
            name = by_type.get(model_type, f"model_type {model_type!r}")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name}; megatron_lora.interop.architectures knows "
                         f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
