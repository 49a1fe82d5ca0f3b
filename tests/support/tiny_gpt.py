"""A tiny Megatron GPTModel for CPU tests: GQA, SwiGLU, RMSNorm, RoPE, no bias, dropout off.

Built with `use_cpu_initialization=True`, so the same seed gives the same full weights at every
tensor-parallel size, and a TP=2 run can be compared number for number with a TP=1 run.
"""

from __future__ import annotations

import dataclasses

import torch

VOCAB = 128
SEQ = 16
BATCH = 2


def transformer_config(**overrides):
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    fields.update(overrides)
    if fields.get("sequence_parallel") and tp == 1:
        fields["sequence_parallel"] = False  # Megatron rejects SP without TP
    return TransformerConfig(**fields)


def local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt(spec=None, *, seed: int = 0, config=None, **config_overrides):
    """Build the model on this rank; the base weights depend only on `seed`."""
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(**config_overrides)
    torch.manual_seed(seed)
    return GPTModel(
        config, spec if spec is not None else local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope",
    )


def batch(step: int = 0, rows: int = BATCH):
    """Deterministic tokens, positions and labels, the same on every rank."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(rows, -1)
    return tokens, positions, labels


def loss(model, step: int = 0) -> torch.Tensor:
    tokens, positions, labels = batch(step)
    return model(tokens, positions, None, labels=labels).float().mean()


def logits(model, step: int = 0) -> torch.Tensor:
    """Full-vocabulary logits [batch, seq, vocab] (gathered over TP)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, positions, _ = batch(step)
    out = model(tokens, positions, None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        out = gather_from_tensor_model_parallel_region(out)
    return out


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter of this rank, detached and cloned (for comparisons)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The default geometry above, for analytic formulas in tests."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    groups: int = 2
    ffn: int = 96

    @property
    def kv_channels(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.groups) * self.kv_channels


def te_spec():
    """The Transformer Engine layer spec. Needs TE, or `te_emulation.enable()` as the rank's
    launcher `setup` (before megatron is imported)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


# The TE spec fuses the pre-attention and pre-MLP norms into linear_qkv and linear_fc1; every
# other parameter has the same name in both specs.
TE_TO_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def te_to_local_name(name: str) -> str:
    """The local-spec name of a TE-spec parameter, e.g.
    `decoder.layers.0.self_attention.linear_qkv.layer_norm_weight` ->
    `decoder.layers.0.input_layernorm.weight`."""
    for te_suffix, local_suffix in TE_TO_LOCAL_NAMES.items():
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name
