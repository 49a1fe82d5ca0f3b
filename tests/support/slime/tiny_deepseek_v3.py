"""A tiny random DeepSeek-V3-architecture model as slime's GLM-4.7-Flash / Moonlight recipes run
theirs (scripts/models/glm4.7-30B-A3B.sh, moonlight.sh, scaled down): multi-latent attention
with q and kv latent ranks and latent norms, the first layer dense (`--moe-layer-freq`), then MoE
with a shared expert, a sigmoid router with expert bias and a top-k scaling factor. Yarn with
factor 1 and mscale 1 (moonlight.sh's flags) is plain rope, HF's default for this config.
`--moe-permute-fusion` is left out (TE's fused permute is a CUDA kernel), and so is the
recipe's `--moe-token-dispatcher-type flex --moe-enable-deepep` (DeepEP: CUDA): all-to-all,
as moonlight.sh runs."""

from __future__ import annotations

from pathlib import Path

import torch

from support.slime import hf_checkpoints

ARCHITECTURE = "DeepseekV3ForCausalLM"
VOCAB = hf_checkpoints.VOCAB
LAYERS, HIDDEN, FFN, HEADS = 2, 64, 96, 4
Q_RANK, KV_RANK, QK_HEAD, ROPE_HEAD, V_HEAD = 32, 16, 16, 8, 16
EXPERTS, TOPK, MOE_FFN, SHARED, SCALING = 8, 2, 32, 1, 1.8
NORM_EPS, ROPE_THETA = 1e-6, 10000

MEGATRON_MODEL_ARGS = [
    "--moe-layer-freq", "[0]*1+[1]*1", "--num-experts", str(EXPERTS),
    "--moe-shared-expert-intermediate-size", str(MOE_FFN * SHARED),
    "--moe-router-topk", str(TOPK), "--moe-grouped-gemm", "--moe-ffn-hidden-size", str(MOE_FFN),
    "--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax",
    "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0",
    "--moe-router-load-balancing-type", "seq_aux_loss",
    "--moe-router-topk-scaling-factor", str(SCALING), "--moe-aux-loss-coeff", "0",
    "--moe-router-dtype", "fp32", "--moe-token-dispatcher-type", "alltoall",
    "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN), "--ffn-hidden-size", str(FFN),
    "--num-attention-heads", str(HEADS), "--disable-bias-linear", "--swiglu",
    "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
    "--no-position-embedding", "--normalization", "RMSNorm", "--norm-epsilon", str(NORM_EPS),
    "--qk-layernorm", "--multi-latent-attention", "--q-lora-rank", str(Q_RANK),
    "--kv-lora-rank", str(KV_RANK), "--qk-head-dim", str(QK_HEAD), "--v-head-dim", str(V_HEAD),
    "--kv-channels", str(QK_HEAD), "--qk-pos-emb-head-dim", str(ROPE_HEAD),
    "--vocab-size", str(VOCAB), "--rotary-base", str(ROPE_THETA), "--no-rope-fusion",
    "--rotary-scaling-factor", "1", "--mscale", "1.0", "--mscale-all-dim", "1.0",
]
# every MLA linear, and the MLPs' fc1 / fc2: dense, shared expert and routed experts
LORA_ARGS = ["--lora-target-modules", "linear_q_down_proj", "linear_q_up_proj",
             "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj", "linear_fc1",
             "linear_fc2"]


def hf_config(dtype=torch.float32):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=Q_RANK,
        kv_lora_rank=KV_RANK, qk_nope_head_dim=QK_HEAD, qk_rope_head_dim=ROPE_HEAD,
        v_head_dim=V_HEAD, n_routed_experts=EXPERTS, num_experts_per_tok=TOPK,
        n_shared_experts=SHARED, moe_intermediate_size=MOE_FFN, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=SCALING,
        rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA, rope_interleave=True,
        max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
        attention_dropout=0.0, torch_dtype=dtype, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    config.architectures = [ARCHITECTURE]
    return config


def write_hf_checkpoint(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    return hf_checkpoints.write(path, hf_config(dtype), dtype, seed,
                                hf_checkpoints.moe_redraw)
