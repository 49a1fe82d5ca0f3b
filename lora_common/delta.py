"""The adapter's weight update, as both backends compute it: in fp32, cast once.

    delta  = s * B @ A                      [out, in] (or the rows / columns a shard holds)
    merged = W + sign * s * B @ A           one addmm, no output-sized temporary for the delta

Merge, unmerge and every merged-weight stream go through these two functions, so a merged
weight is the same bits whichever verb produced it.
"""

from __future__ import annotations

import torch


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`scaling * B @ A` in fp32: A `[r, in]`, B `[out, r]` -> `[out, in]`."""
    return (B.detach().float() @ A.detach().float()) * scaling


def merged_value(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 sign: float = 1.0) -> torch.Tensor:
    """`W + sign * scaling * B @ A` as a new tensor in W's dtype (fp32 arithmetic, one cast);
    all three on one device. `sign=-1` undoes a merge, up to the rounding of W's dtype."""
    merged = torch.addmm(weight.detach().float(), B.detach().float(), A.detach().float(),
                         alpha=sign * scaling)
    return merged.to(weight.dtype)
