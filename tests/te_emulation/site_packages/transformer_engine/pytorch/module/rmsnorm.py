"""`transformer_engine.pytorch.RMSNorm` (TE v2.11 `module/rmsnorm.py`): `weight` only."""

from __future__ import annotations

from .layernorm import _Norm


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x^2) + eps) * gamma over the last dim."""

    normalization = "RMSNorm"
