"""The model the live rollout engines serve (`engine_tests/`): a small random Qwen2 (GQA, q/k/v
biases) with 32-wide heads (vLLM's CPU attention takes none narrower), written as an HF folder
with the tokenizer slime loads, and the Megatron flags slime needs for the same model.

    write(path)                       # config, fp32 safetensors, tokenizer
    MEGATRON_MODEL_ARGS               # slime's model flags for it
"""

from __future__ import annotations

from pathlib import Path

import torch

from support.slime import tiny_qwen2

VOCAB = 128
HIDDEN = 128
FFN = 256
LAYERS = 2
HEADS = 4  # 32-wide
KV_HEADS = 2
MAX_POSITIONS = 128
ROPE_THETA = 10000.0
NORM_EPS = 1e-6

MEGATRON_MODEL_ARGS = tiny_qwen2.megatron_model_args(
    layers=LAYERS, hidden=HIDDEN, ffn=FFN, heads=HEADS, kv_heads=KV_HEADS, norm_eps=NORM_EPS,
    rope_theta=ROPE_THETA, vocab=VOCAB)
LORA_ARGS: list[str] = []  # slime's default targets (the slime actor layouts' protocol)


def hf_config():
    from support import hf_llama

    return hf_llama.hf_config(
        "qwen2", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def write(path, seed: int = 0) -> Path:
    """The HF folder (fp32 weights drawn by `hf_llama.build_hf_model`: unit-scale activations,
    non-trivial norms and biases) with slime's tokenizer for the tiny Qwen2 vocabulary."""
    from support import hf_llama
    from support.slime.hf_checkpoints import tokenizer

    model = hf_llama.build_hf_model(hf_config(), seed=seed)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return path


def load(path):
    """The fp32 HF model from the folder (what the trainer converts to Megatron)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
