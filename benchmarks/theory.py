"""FLOP model of a decoder-block training step: the theoretical LoRA / full fine-tuning and
LoRA / frozen-base ratios each measured geometry is compared with.

Counted: the GEMMs (2 flops per multiply-add). Linears: forward, input grad and weight grad each
cost `2 T in out`. Attention core (QK^T and AV, unfused, causal masking does not skip work):
forward `4 T s heads kv`, backward twice that. LoRA per target: forward `2 T r (in + out)`,
backward twice that (dh, dB, dA, dx). Not counted: elementwise work (norms, softmax, SwiGLU)
and Adam, which the theory treats as free; the measured ratios include them.

Per TP rank (the sharding rule in megatron_lora/layers/sharding.py): the base work splits over
`tp`; so does LoRA's under sequence parallelism. Without SP the replicated matrix works on all
tokens on every rank: A of a column target (`in`) and B of a row target (`out`).
"""

from __future__ import annotations

from benchmarks.decoder_stack import Geometry


def lora_linear_flops(tokens: int, in_features: int, out_features: int, r: int) -> float:
    """Forward + backward GEMM flops of one adapter: A x, B h; dh, dB, dA, dx."""
    return 6 * tokens * r * (in_features + out_features)


def step_flops(geometry: Geometry, r: int = 16, tp: int = 1, sp: bool = False) -> dict[str, float]:
    """Per-rank GEMM flops of one step of each variant."""
    T = geometry.tokens
    base = lora = 0.0
    for in_f, out_f, split in geometry.linears().values():
        base += 2 * T * in_f * out_f / tp
        if sp:
            lora += lora_linear_flops(T, in_f, out_f, r) / tp
        elif split == "column":  # A replicated: full input on every rank
            lora += lora_linear_flops(T, in_f, out_f / tp, r)
        else:  # row: B replicated
            lora += lora_linear_flops(T, in_f / tp, out_f, r)
    attention = 4 * T * geometry.seq * geometry.heads * geometry.kv_channels / tp
    per_layer_frozen = 2 * base + 3 * attention  # forward + input grad
    frozen = geometry.layers * per_layer_frozen
    return {
        "frozen": frozen,
        "full": frozen + geometry.layers * base,  # + weight grads
        "lora": frozen + geometry.layers * lora,
    }


def ratios(geometry: Geometry, r: int = 16, tp: int = 1, sp: bool = False) -> dict[str, float]:
    flops = step_flops(geometry, r, tp, sp)
    return {"lora/full": flops["lora"] / flops["full"],
            "lora/frozen": flops["lora"] / flops["frozen"]}
