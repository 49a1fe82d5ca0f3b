"""A small random HF Llama-family model and the Megatron `GPTModel` that computes the same thing.

    hf = build_hf_model(hf_config("qwen3"))          # random weights, no download
    gpt = gpt_from_hf(hf)                             # this rank's shards, any TP size (+SP)
    compare_logits(hf, gpt, tokens())                 # asserts, returns the max abs difference

Module names and fused layouts come from `megatron_lora.interop.hf_mapping` (the production
mapping; `interop/hf_params.py` adds the base-only names: embeddings and norms), shards from
`megatron_lora.layers.sharding` driven by each parameter's own Megatron attributes
(`partition_dim`, `partition_stride`), so this utility tests those as much as it uses them.

Numerics that must agree, and where they are set: RoPE base (`rotary_base`, HF
`rope_parameters["rope_theta"]`), RMSNorm eps (`layernorm_epsilon`, HF `rms_norm_eps`, also
for Qwen3's q/k norms), per-head width (`kv_channels`, HF `head_dim`, which Qwen3 sets apart
from hidden / heads: Megatron's default softmax scale 1/sqrt(kv_channels) then matches HF's
head_dim ** -0.5), biases (none but Qwen2's q/k/v), tied embeddings.
"""

from __future__ import annotations

import torch

from megatron_lora.interop import architectures, hf_mapping
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.hf_params import hf_param
from megatron_lora.layers.sharding import shard

VOCAB = 128
SEQ = 16
BATCH = 2

# model_type -> settings beyond the common ones below, chosen to exercise each variant:
# Mistral as MQA (one kv group: at TP=2 Megatron splits inside a group), Qwen2 as MHA with
# q/k/v biases, Qwen3 with a head width unlike hidden / heads, q/k norms and tied embeddings.
VARIANTS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(num_key_value_heads=4),
    "qwen3": dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def hf_config(model_type: str = "llama", **overrides):
    """A small config of a known Llama-family architecture: GQA, SwiGLU, RMSNorm, RoPE.

    eps and RoPE base are off both libraries' defaults (HF 1e-6 / 10000, Megatron 1e-5 /
    10000), so a converter that drops either one fails the logits comparison."""
    from transformers import CONFIG_MAPPING

    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=4 * SEQ, rms_norm_eps=1e-4,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=False, attention_dropout=0.0,
    )
    fields.update(VARIANTS[model_type])
    fields.update(overrides)
    config = CONFIG_MAPPING[model_type](**fields)
    config.architectures = [architectures.architecture(config).name]
    return config


def build_hf_model(config, seed: int = 0):
    """The HF causal LM for `config` in fp32 eval mode, every parameter drawn from `seed`.

    HF initializes norms to one and biases to zero; redrawing them too means a misplaced norm
    or bias changes the logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="eager")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:  # [out, in]: unit-variance outputs for unit-variance inputs
                param.copy_(noise / param.shape[1] ** 0.5)
    return model.eval()


def rope_theta(config) -> float:
    """RoPE base of a default-RoPE config (transformers 5 `rope_parameters`, or 4.x fields)."""
    params = getattr(config, "rope_parameters", None) or {
        "rope_type": (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"),
        "rope_theta": getattr(config, "rope_theta", 10000.0),
    }
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE type {params['rope_type']!r} is not converted (only 'default')")
    return params["rope_theta"]


def check_convertible(config) -> hf_mapping.Architecture:
    """The architecture of `config`, or a ValueError naming what Megatron would compute
    differently."""
    arch = architectures.architecture(config)
    rope_theta(config)
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (SwiGLU needs 'silu')")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True (o_proj bias)")
    if getattr(config, "sliding_window", None) is not None:
        problems.append(f"sliding_window={config.sliding_window} (no sliding window in Megatron's "
                        "local attention)")
    if problems:
        raise ValueError(f"{arch.name} config not convertible: {'; '.join(problems)}")
    return arch


def transformer_config(config, **overrides):
    """The Megatron `TransformerConfig` of an HF config, at this rank's TP/PP sizes (the
    CPU-test settings and the SP guard come from `tiny_gpt.transformer_config`)."""
    from support import tiny_gpt

    arch = check_convertible(config)
    geometry = Geometry.from_hf(config)
    fields = dict(
        num_layers=geometry.num_layers, hidden_size=geometry.hidden_size,
        num_attention_heads=geometry.num_attention_heads,
        num_query_groups=geometry.num_query_groups, kv_channels=geometry.kv_channels,
        ffn_hidden_size=geometry.ffn_hidden_size, layernorm_epsilon=config.rms_norm_eps,
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
    )
    fields.update(overrides)
    return tiny_gpt.transformer_config(**fields)


def local_spec(config):
    """Megatron's local (no TE) layer spec for an HF config: RMSNorm, q/k norms if Qwen3."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm",
                                    qk_layernorm=architectures.architecture(config).qk_norm)


def build_gpt(config, spec=None, **config_overrides):
    """An (uninitialized-weights) Megatron GPTModel with the geometry and numerics of `config`."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        transformer_config(config, **config_overrides),
        spec if spec is not None else local_spec(config),
        vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope", rotary_base=rope_theta(config),
        share_embeddings_and_output_weights=bool(config.tie_word_embeddings),
    )


def load_hf_state(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy an HF state dict into this rank's shards of a Megatron GPTModel (local or TE spec
    names). Every Megatron base parameter must be found and every HF tensor used; LoRA
    parameters (`lora_` in the name) are not base weights and are left as they are."""
    from megatron.core import parallel_state

    geometry = Geometry.from_megatron(model.config)
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            mapping = hf_param(name)
            missing = [n for n in mapping.hf_names if n not in hf_state]
            if missing:
                raise KeyError(f"HF state dict lacks {missing} for Megatron parameter {name!r}")
            parts = [hf_state[n] for n in mapping.hf_names]
            full = (hf_mapping.fuse_target(mapping.target, parts, geometry) if mapping.target
                    else parts[0])
            if getattr(param, "tensor_model_parallel", False):
                full = shard(full, param.partition_dim, rank, world, param.partition_stride)
            if full.shape != param.shape:
                raise ValueError(f"{name}: this rank's shard of {mapping.hf_names} has shape "
                                 f"{tuple(full.shape)}, the parameter {tuple(param.shape)}")
            param.copy_(full)
            used.update(mapping.hf_names)
    if model.share_embeddings_and_output_weights:
        used.add("lm_head.weight")  # HF lists the tied head; Megatron reuses the embedding
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"HF tensors with no Megatron parameter: {unused}")


def gpt_from_hf(hf_model, spec=None, **config_overrides):
    """The Megatron GPTModel (this rank's shards) that computes what `hf_model` computes."""
    model = build_gpt(hf_model.config, spec, **config_overrides)
    load_hf_state(model, hf_model.state_dict())
    return model.eval()


def tokens(seed: int = 0) -> torch.Tensor:
    """Deterministic [BATCH, SEQ] token ids, the same on every rank."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def gpt_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [batch, seq, vocab] of a Megatron GPTModel (gathered over TP)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    out = model(input_ids, positions, None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        out = gather_from_tensor_model_parallel_region(out)
    return out


@torch.no_grad()
def hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=input_ids).logits


# fp32 on CPU the two stacks differ only in summation order: a few ulp of the largest values
# (exactly 0 for most variants at TP=1). Rounding scales with the logits (O(1) untied, O(50)
# tied), so the tolerance is relative to the largest logit: 2e-6 of it, about 17 fp32 ulp.
LOGIT_TOLERANCE = 2e-6


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor,
                        tolerance: float = LOGIT_TOLERANCE) -> float:
    """Assert |actual - expected| <= tolerance * max|expected| everywhere; return the largest
    difference relative to that scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=tolerance * scale, rtol=0)
    return (actual - expected).abs().max().item() / scale


def compare_logits(hf_model, model, input_ids: torch.Tensor,
                   tolerance: float = LOGIT_TOLERANCE) -> float:
    """Assert the HF model and the Megatron GPTModel give the same logits (see
    `assert_logits_close`); return the largest difference relative to the largest logit."""
    return assert_logits_close(gpt_logits(model, input_ids), hf_logits(hf_model, input_ids),
                               tolerance)
