"""A small random HF MoE model (Qwen3-MoE or Mixtral, transformers 5) and the Megatron MoE
`GPTModel` that computes the same thing, at any TP / EP / ETP size.

transformers 5 holds each layer's experts fused: `mlp.experts.gate_up_proj [E, 2F, H]` (rows
`[gate; up]`, Megatron's fc1 layout) and `mlp.experts.down_proj [E, H, F]`; the router is
`mlp.gate.weight [E, H]` (Megatron's `mlp.router.weight`). Both routers take the top-k of the
logits and softmax over them (HF: softmax, top-k, renormalize: the same probabilities). Dense
parameters map as in `hf_llama`.
"""

from __future__ import annotations

import re

import torch

from megatron_lora.interop import hf_params
from support import hf_llama

EXPERTS = 4
TOPK = 2
MOE_FFN = 32

VARIANTS = {
    "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=MOE_FFN, norm_topk_prob=True,
                      head_dim=32, decoder_sparse_step=1, mlp_only_layers=[],
                      intermediate_size=96),
    "mixtral": dict(num_local_experts=EXPERTS, intermediate_size=MOE_FFN, sliding_window=None),
}


def hf_config(model_type: str = "qwen3_moe"):
    from transformers import CONFIG_MAPPING

    from megatron_lora.interop import architectures

    config = CONFIG_MAPPING[model_type](
        vocab_size=hf_llama.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4 * hf_llama.SEQ, rms_norm_eps=1e-4,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=False, attention_dropout=0.0, num_experts_per_tok=TOPK,
        output_router_logits=False, **VARIANTS[model_type])
    config.architectures = [architectures.architecture(config).name]
    return config


def build_hf_model(config, seed: int = 0):
    """The HF model with every parameter redrawn (experts `[E, out, in]` at unit output
    variance; the router at a scale that spreads tokens over all experts)."""
    model = hf_llama.build_hf_model(config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and param.dim() == 3:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return model


def transformer_config(config, grouped: bool = False, **overrides):
    from megatron.core import parallel_state

    from megatron_lora.interop.geometry import Geometry

    geometry = Geometry.from_hf(config)
    fields = dict(
        num_moe_experts=geometry.num_moe_experts, moe_ffn_hidden_size=geometry.moe_ffn_hidden_size,
        moe_router_topk=config.num_experts_per_tok, moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )
    fields.update(overrides)
    return hf_llama.transformer_config(config, **fields)


def block_spec(megatron_config, te: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(megatron_config, use_transformer_engine=te)


def build_gpt(config, spec, megatron_config):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(megatron_config, spec, vocab_size=config.vocab_size,
                    max_sequence_length=config.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=hf_llama.rope_theta(config),
                    share_embeddings_and_output_weights=bool(config.tie_word_embeddings))


_EXPERT = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.mlp\.experts\."
                     r"(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")
_ROUTER = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.mlp\.router\.weight$")


def _expert_value(name: str, hf_state: dict) -> tuple[torch.Tensor, str] | None:
    """(full value, fc) of a Megatron expert weight from the HF fused tensors; None otherwise."""
    from megatron.core import parallel_state

    match = _EXPERT.match(name)
    if match is None:
        return None
    layer = int(match.group(1))
    local = int(match.group(2) if match.group(2) is not None else match.group(5))
    fc = match.group(3) or match.group(4)
    per_rank = EXPERTS // parallel_state.get_expert_model_parallel_world_size()
    expert = parallel_state.get_expert_model_parallel_rank() * per_rank + local
    fused = "gate_up_proj" if fc == "linear_fc1" else "down_proj"
    return hf_state[f"model.layers.{layer}.mlp.experts.{fused}"][expert], fc


def load_hf_state(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy an HF MoE state dict into this rank's shards of a Megatron MoE GPTModel (dense
    parameters as `hf_llama` does; experts by global index, split over expert-TP)."""
    from megatron.core import parallel_state

    from megatron_lora.interop import hf_mapping
    from megatron_lora.interop.geometry import Geometry
    from megatron_lora.layers.sharding import group_size_rank, shard

    geometry = Geometry.from_megatron(model.config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            expert = _expert_value(name, hf_state)
            router = _ROUTER.match(name)
            if expert is not None:
                full, fc = expert
                group = parallel_state.get_expert_tensor_parallel_group()
                dim, stride = (0, 2) if fc == "linear_fc1" else (1, 1)
                world, rank = group_size_rank(group)
                param.copy_(shard(full, dim, rank, world, stride) if world > 1 else full)
                continue
            if router is not None:
                param.copy_(hf_state[f"model.layers.{router.group(1)}.mlp.gate.weight"])
                continue
            mapping = hf_params.hf_param(name)
            parts = [hf_state[n] for n in mapping.hf_names]
            full = (hf_mapping.fuse_target(mapping.target, parts, geometry) if mapping.target
                    else parts[0])
            if getattr(param, "tensor_model_parallel", False):
                world, rank = group_size_rank(parallel_state.get_tensor_model_parallel_group())
                full = shard(full, param.partition_dim, rank, world, param.partition_stride)
            param.copy_(full)


def gpt_from_hf(hf_model, spec=None, te: bool = False, **config_overrides):
    """The Megatron MoE GPTModel (this rank's shards) that computes what `hf_model` computes;
    `spec` defaults to the MoE block spec (SequentialMLP, or TEGroupedMLP with `te`)."""
    megatron_config = transformer_config(hf_model.config, grouped=te, **config_overrides)
    model = build_gpt(hf_model.config, spec if spec is not None else
                      block_spec(megatron_config, te), megatron_config)
    load_hf_state(model, hf_model.state_dict())
    return model.eval()
