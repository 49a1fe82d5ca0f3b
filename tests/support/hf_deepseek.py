"""A small random HF `DeepseekV3ForCausalLM` (dense layers only) and the Megatron MLA
`GPTModel` that computes the same thing (local spec, `tiny_mla.SDPACoreAttention`).

    hf = build_hf_model()                       # random weights, no download
    gpt = gpt_from_hf(hf, spec)                 # this rank's shards, any TP size (+SP)

The linears' names come from the production mapping (`megatron_lora.interop.hf_mapping`'s MLA
table, 1:1); `_NORMS` below adds the norms. What must agree, and where it is set: HF's q/kv
latent norms use eps 1e-6 whatever `rms_norm_eps` says, and Megatron uses one
`layernorm_epsilon` for every norm, so `rms_norm_eps` is 1e-6 here; `rope_interleave=True` (HF's
default, DeepSeek-V3's checkpoints) is Megatron MLA's rope layout, so no row is permuted; q/kv
latent norms are Megatron's `qk_layernorm`; embeddings untied.
"""

from __future__ import annotations

import re

import torch

from megatron_lora.interop import hf_mapping, hf_params
from support import hf_llama, tiny_mla

CONFIG = dict(
    vocab_size=hf_llama.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rms_norm_eps=1e-6,
    max_position_embeddings=4 * hf_llama.SEQ, tie_word_embeddings=False, attention_bias=False,
    attention_dropout=0.0, rope_interleave=True,
    # every layer dense: the routed experts (which this converter does not map) are never built
    first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    moe_intermediate_size=32,
)


def hf_config():
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**CONFIG)
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def build_hf_model(seed: int = 0):
    """The HF model in fp32 eval mode (eager attention), every parameter drawn from `seed`
    (norms near one, so a misplaced norm changes the logits)."""
    return hf_llama.build_hf_model(hf_config(), seed)


def transformer_config(**overrides):
    """The Megatron MLATransformerConfig of `CONFIG` at this rank's TP size."""
    c = CONFIG
    fields = dict(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"], ffn_hidden_size=c["intermediate_size"],
        q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
        qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"], layernorm_epsilon=c["rms_norm_eps"], qk_layernorm=True,
    )
    fields.update(overrides)
    return tiny_mla.transformer_config(**fields)


def gpt_from_hf(hf_model, spec=None, **config_overrides):
    """The Megatron GPTModel (this rank's shards) that computes what `hf_model` computes."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(**config_overrides)
    model = GPTModel(config, spec if spec is not None else tiny_mla.local_spec(),
                     vocab_size=hf_model.config.vocab_size,
                     max_sequence_length=hf_model.config.max_position_embeddings,
                     position_embedding_type="none", share_embeddings_and_output_weights=False)
    load_hf_state(model, hf_model.state_dict())
    return model.eval()


_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
}
_LAYER_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.weight$")


def hf_sources(name: str) -> tuple[tuple[str, ...], str | None]:
    """(HF tensor names, the target that fuses them or None) of a Megatron base parameter."""
    if name in hf_params.GLOBAL_PARAMS:
        return (hf_params.GLOBAL_PARAMS[name],), None
    match = _LAYER_PARAM.match(name)
    layer, rest = int(match.group(1)), match.group(2) + ".weight"
    if rest in _NORMS:
        return (f"model.layers.{layer}.{_NORMS[rest]}",), None
    for target in (*hf_mapping.MLA_TARGETS, "linear_proj", "linear_fc1", "linear_fc2"):
        if name == hf_mapping.megatron_module_name(layer, target) + ".weight":
            names = tuple(f"{n}.weight" for n in hf_mapping.hf_module_names(layer, target))
            return names, target if len(names) > 1 else None
    raise ValueError(f"no DeepSeek-V3 counterpart for Megatron parameter {name!r}")


def load_hf_state(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy an HF state dict into this rank's shards (every base parameter found, every HF
    tensor used; LoRA parameters left as they are)."""
    from megatron.core import parallel_state

    from megatron_lora.interop.geometry import Geometry
    from megatron_lora.layers.sharding import shard

    geometry = Geometry.from_megatron(model.config)
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            names, target = hf_sources(name)
            parts = [hf_state[n] for n in names]
            full = hf_mapping.fuse_target(target, parts, geometry) if target else parts[0]
            if getattr(param, "tensor_model_parallel", False) and param.shape != full.shape:
                full = shard(full, param.partition_dim, rank, world, param.partition_stride)
            param.copy_(full)
            used.update(names)
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"HF tensors with no Megatron parameter: {unused}")
