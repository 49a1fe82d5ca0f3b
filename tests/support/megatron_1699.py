"""A test-only fix for Megatron-LM issue #1699: in multi-latent attention at TP > 1, the grad
of the shared rope key is not summed over the TP group.

MLA's rope key `k_pos_emb` `[s, b, 1, rope]` is one head shared by all heads. Each TP rank
expands it over its own heads only (`k_pos_emb.expand(..., heads / tp, ...)`), so its grad is
a partial sum per rank. It is summed only where it came through
`gather_from_sequence_parallel_region` (the TE spec with sequence parallelism, whose duplicated
down projection leaves it a sequence shard): everywhere else the rope rows of
`linear_kv_down_proj`'s grad, and everything upstream of them, are wrong at TP > 1, and the
"replicated" duplicated weights drift apart between ranks (measured on megatron-core 0.16.1 and
0.19.2; upstream PR #6839 is open). That is Megatron's bug, not LoRA's: the tests that compare
TP sizes run the TE spec with SP, where megatron-core is exact, and use this fix elsewhere.

`sum_shared_rope_key_grad()` routes `k_pos_emb` through `copy_to_tensor_model_parallel_region`
(identity forward, all-reduce of the grad in backward) before MLA applies RoPE to it. Never
apply it with the TE spec under SP: there the grad is already summed.
"""

from __future__ import annotations

import functools


def sum_shared_rope_key_grad() -> None:
    """Patch megatron-core's MLA in this process (idempotent)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
    from megatron.core.transformer import multi_latent_attention as mla

    original = mla.apply_rotary_pos_emb
    if getattr(original, "_sums_shared_rope_key_grad", False):
        return

    @functools.wraps(original)
    def apply_rotary_pos_emb(t, *args, **kwargs):
        if t.dim() == 4 and t.shape[-2] == 1:  # the shared k_pos_emb [s, b, 1, rope]
            t = copy_to_tensor_model_parallel_region(t)
        return original(t, *args, **kwargs)

    apply_rotary_pos_emb._sums_shared_rope_key_grad = True
    mla.apply_rotary_pos_emb = apply_rotary_pos_emb
