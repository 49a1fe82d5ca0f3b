"""A tiny random Qwen2 as slime starts from it (slime's scripts/models/qwen2.5-*.sh, scaled
down): the HF config and the Megatron flags that describe the same model.

    write_hf_checkpoint(path, dtype=torch.float32)
    MEGATRON_MODEL_ARGS
"""

from __future__ import annotations

from pathlib import Path

import torch

from support.slime import hf_checkpoints

ARCHITECTURE = "Qwen2ForCausalLM"
VOCAB = hf_checkpoints.VOCAB
HIDDEN = 64
FFN = 96
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 64
ROPE_THETA = 10000.0
NORM_EPS = 1e-6



def megatron_model_args(*, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                        norm_eps: float, rope_theta: float, vocab: int) -> list[str]:
    """slime's (Megatron's) model flags for a Qwen2 of these sizes: SwiGLU, GQA, RoPE, RMSNorm,
    q/k/v biases only, an untied head."""
    return [
        "--swiglu", "--num-layers", str(layers), "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(ffn), "--num-attention-heads", str(heads),
        "--group-query-attention", "--num-query-groups", str(kv_heads),
        "--use-rotary-position-embeddings", "--disable-bias-linear", "--add-qkv-bias",
        "--normalization", "RMSNorm", "--norm-epsilon", str(norm_eps),
        "--rotary-base", str(int(rope_theta)), "--vocab-size", str(vocab),
        "--untie-embeddings-and-output-weights",
    ]


MEGATRON_MODEL_ARGS = megatron_model_args(
    layers=LAYERS, hidden=HIDDEN, ffn=FFN, heads=HEADS, kv_heads=KV_HEADS, norm_eps=NORM_EPS,
    rope_theta=ROPE_THETA, vocab=VOCAB)
LORA_ARGS: list[str] = []  # the default targets: linear_qkv linear_proj linear_fc1 linear_fc2


def hf_config(dtype=torch.float32):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA, rms_norm_eps=NORM_EPS, tie_word_embeddings=False,
        hidden_act="silu", attention_dropout=0.0, torch_dtype=dtype, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = [ARCHITECTURE]
    return config


def _redraw(name, param, generator):
    if name.endswith(".bias") or "norm" in name:  # non-zero biases: the qkv bias path runs
        return param + torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1
    return None


def write_hf_checkpoint(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    return hf_checkpoints.write(path, hf_config(dtype), dtype, seed, _redraw)
