"""The HF name of every Megatron GPT base parameter of a Llama-family model (Llama, Mistral,
Qwen2, Qwen3): what converts a Megatron model to an HF folder a rollout engine serves, and an HF
checkpoint into Megatron. The LoRA targets' names and fused layouts are `hf_mapping`'s; this
adds the base-only names (embeddings, norms). Local and TE spec names alike.

    hf_param("decoder.layers.0.self_attention.linear_qkv.weight")
    # ParamMapping(hf_names=("model.layers.0.self_attn.q_proj.weight", ...k_proj, ...v_proj),
    #              target="linear_qkv")        # split / fused by hf_mapping's layout
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_lora.interop import hf_mapping


@dataclass(frozen=True)
class ParamMapping:
    """Where a Megatron parameter's full value comes from in an HF state dict: one HF tensor
    copied, or several fused by `hf_mapping.fuse_target(target, ...)`."""

    hf_names: tuple[str, ...]
    target: str | None = None  # the LoRA target whose layout fuses `hf_names`; None: a copy


_LAYER_NORMS = {
    # local spec (separate norm modules) and TE spec (norm fused into the next linear)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# Model-wide parameters: the same names in every HF decoder family here (hf_deepseek uses them).
GLOBAL_PARAMS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_PARAM = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.(.+)$")


def hf_param(megatron_name: str) -> ParamMapping:
    """The HF source of a Megatron GPT base parameter (local or TE spec names; not LoRA's)."""
    name = re.sub(r"^(?:module\.)*", "", megatron_name)
    if name in GLOBAL_PARAMS:
        return ParamMapping((GLOBAL_PARAMS[name],))
    match = _LAYER_PARAM.match(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if rest in _LAYER_NORMS:
            return ParamMapping((f"model.layers.{layer}.{_LAYER_NORMS[rest]}",))
        module, _, kind = name.rpartition(".")
        for target in hf_mapping.TARGETS:
            if (module == hf_mapping.megatron_module_name(layer, target)
                    and kind in ("weight", "bias")):
                names = tuple(f"{n}.{kind}" for n in hf_mapping.hf_module_names(layer, target))
                return ParamMapping(names, target if len(names) > 1 else None)
    raise ValueError(f"no HF Llama-family counterpart for Megatron parameter {megatron_name!r}")
