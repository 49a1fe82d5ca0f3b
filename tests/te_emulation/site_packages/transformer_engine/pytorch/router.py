"""Fused MoE router kernels megatron-core imports unconditionally for TE >= 2.7; not emulated."""

from ._not_emulated import not_emulated_function

fused_topk_with_score_function = not_emulated_function("router.fused_topk_with_score_function")
fused_compute_score_for_moe_aux_loss = not_emulated_function(
    "router.fused_compute_score_for_moe_aux_loss")
fused_moe_aux_loss = not_emulated_function("router.fused_moe_aux_loss")
