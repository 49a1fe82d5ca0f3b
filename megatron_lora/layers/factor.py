"""`LoRAFactor`: one adapter matrix, held as `.weight` so the state-dict name is PEFT's
`lora_A.weight` / `lora_B.weight`."""

from __future__ import annotations

import torch


class LoRAFactor(torch.nn.Module):
    """A (`[r, in]`) or B (`[out, r]`) of a LoRA linear: this rank's shard, no forward.

    Not an `nn.Linear`: constructing one would draw an init from the global RNG, which would
    shift every base weight drawn after it. Values come from the owning layer
    (`reset_lora_parameters`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
