"""A tiny Megatron GPTModel with multi-latent attention (DeepSeek-V3's) for CPU tests.

    model = tiny_mla.build(tiny_mla.te_spec())       # the TE spec (needs te_emulation)
    model = tiny_mla.build(tiny_mla.local_spec())    # the local spec

Same settings as `tiny_gpt` (dropout off, `use_cpu_initialization`, fp32), MLA's own RoPE
(GPTModel's position embedding off: MLA asserts it gets none), q compression on
(q_lora_rank), and the batches of `tiny_gpt`. Two things the local spec needs that megatron-core
does not ship for CPU:

- megatron-core's local `DotProductAttention` takes no `k_channels`/`v_channels` (MLA's q/k
  head width differs from v's): `SDPACoreAttention` stands in (causal softmax attention); the
  TE spec's `TEDotProductAttention` (emulated) takes them;
- MLA's duplicated TE down projections draw their init from Megatron's data-parallel RNG
  state, which advances as a model is built: `build` re-seeds Megatron's RNG tracker, so two
  models built in one process get the same weights.
"""

from __future__ import annotations

import torch

from support import tiny_gpt

# Megatron-core's names of the MLA linears of this configuration (q compression on).
TARGETS = ("linear_kv_down_proj", "linear_kv_up_proj", "linear_proj", "linear_q_down_proj",
           "linear_q_up_proj")


def transformer_config(**overrides):
    """MLATransformerConfig: hidden 64, 4 heads, q_lora_rank 32, kv_lora_rank 16, q/k head 16 +
    rope 8, v head 16; 2 layers of SwiGLU MLP, at this rank's TP size."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
        q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        rope_type="rope", rotary_base=10000, apply_rope_fusion=False,
        # the specs' default; megatron-core 0.19 refuses a spec whose q/kv norms the config
        # does not ask for (0.16 reads only the spec)
        qk_layernorm=True,
        normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, bf16=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    fields.update(overrides)
    if fields.get("sequence_parallel") and tp == 1:
        fields["sequence_parallel"] = False  # Megatron rejects SP without TP
    return MLATransformerConfig(**fields)


class SDPACoreAttention(torch.nn.Module):
    """Causal softmax attention with MLA's shapes, for the local spec:
    q, k `[s, b, n, qk_head + rope]`, v `[s, b, n, v_head]` -> `[s, b, n * v_head]`."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None,
                 k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None,
                 **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                packed_seq_params=None, **kwargs):
        s, b, n, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, n * value.shape[-1])


def local_spec(qk_layernorm: bool = True):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm",
                                    qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def te_spec(qk_layernorm: bool = True):
    """The TE layer spec with MLA. Needs TE, or `te_emulation.enable()` as the launcher setup."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True,
                                                      qk_layernorm=qk_layernorm)


def build(spec, *, seed: int = 0, config=None, **config_overrides):
    """Build the model on this rank; its base weights depend only on `seed`, at every TP size."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    config = config or transformer_config(**config_overrides)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return GPTModel(config, spec, vocab_size=tiny_gpt.VOCAB,
                    max_sequence_length=tiny_gpt.SEQ, position_embedding_type="none")
