"""A tiny random Qwen3-MoE as slime's Qwen3-30B-A3B recipe runs it (scripts/models/
qwen3-30B-A3B.sh, scaled down: 8 experts, top-2, every layer MoE, q/k norms, softmax router in
fp32, grouped-GEMM experts, the all-to-all dispatcher): the HF config and the Megatron flags.
`--moe-permute-fusion` is left out: TE's fused permute is a CUDA kernel."""

from __future__ import annotations

from pathlib import Path

import torch

from support.slime import hf_checkpoints

ARCHITECTURE = "Qwen3MoeForCausalLM"
VOCAB = hf_checkpoints.VOCAB
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 4, 2, 16
EXPERTS, TOPK, MOE_FFN = 8, 2, 32
NORM_EPS, ROPE_THETA = 1e-6, 1000000

MEGATRON_MODEL_ARGS = [
    "--disable-bias-linear", "--qk-layernorm", "--group-query-attention",
    "--num-attention-heads", str(HEADS), "--num-query-groups", str(KV_HEADS),
    "--kv-channels", str(HEAD_DIM), "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
    "--ffn-hidden-size", "96", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--norm-epsilon", str(NORM_EPS), "--rotary-percent", "1.0", "--swiglu",
    "--untie-embeddings-and-output-weights", "--vocab-size", str(VOCAB),
    "--rotary-base", str(ROPE_THETA),
    # moe
    "--moe-ffn-hidden-size", str(MOE_FFN), "--moe-router-score-function", "softmax",
    "--moe-token-dispatcher-type", "alltoall", "--moe-router-topk", str(TOPK),
    "--moe-layer-freq", "[1,1]", "--num-experts", str(EXPERTS), "--moe-grouped-gemm",
    "--moe-token-drop-policy", "probs", "--moe-router-dtype", "fp32", "--moe-aux-loss-coeff", "0",
]
LORA_ARGS: list[str] = []  # the default targets: attention, and every expert's fc1 and fc2


def hf_config(dtype=torch.float32):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_experts=EXPERTS, num_experts_per_tok=TOPK, moe_intermediate_size=MOE_FFN,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=64, rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
        tie_word_embeddings=False, attention_dropout=0.0, output_router_logits=False,
        torch_dtype=dtype, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = [ARCHITECTURE]
    return config


def write_hf_checkpoint(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    return hf_checkpoints.write(path, hf_config(dtype), dtype, seed,
                                hf_checkpoints.moe_redraw)
