"""`LoRAFactor`: one adapter matrix, held as `.weight` so the state-dict name is PEFT's
`lora_A.weight` / `lora_B.weight`."""

from __future__ import annotations

import torch

from megatron_lora.layers.sharded_state import NOT_IN_CHECKPOINT


class LoRAFactor(torch.nn.Module):
    """A (`[r, in]`) or B (`[out, r]`) of a LoRA linear: this rank's shard, no forward.

    Not an `nn.Linear`: constructing one would draw an init from the global RNG, which would
    shift every base weight drawn after it. Values come from the owning layer
    (`reset_lora_parameters`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dist checkpoint without this adapter (`sharded_state.NOT_IN_CHECKPOINT`): leave it
        # as it is, reported as a missing key, as an adapter absent from the state dict is.
        key = f"{prefix}weight"
        if state_dict.get(key) is NOT_IN_CHECKPOINT:
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
