"""LayerNorm and RMSNorm as TE's kernels compute them: statistics in fp32, output in the input
dtype, and with `zero_centered_gamma` the scale is `1 + gamma` (TE `layernorm_fwd`/`rmsnorm_fwd`).
Backward is plain autograd through the same expression."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
              normalization: str, zero_centered_gamma: bool) -> torch.Tensor:
    """Normalize over the last dim; returns x's dtype."""
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    shape = (x.shape[-1],)
    if normalization == "LayerNorm":
        beta = bias.float() if bias is not None else None
        out = F.layer_norm(x.float(), shape, gamma, beta, eps)
    elif normalization == "RMSNorm":
        out = F.rms_norm(x.float(), shape, gamma, eps)
    else:
        raise ValueError(f"Unsupported normalization type {normalization!r}")
    return out.to(x.dtype)
