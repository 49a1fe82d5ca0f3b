"""`transformer_engine.pytorch.LayerNorm` (TE v2.11 `module/layernorm.py`, an op-based module).

Parameters `weight` (ones, or zeros with zero_centered_gamma) and `bias` (zeros), each marked
`sequence_parallel` when that legacy flag is given, and an (empty) `_extra_state` (megatron
then all-reduces their grads over
the TP group). Accepts TE's deprecated `hidden_size` / `params_dtype` spellings, which
megatron-core 0.16 uses (0.19 passes `normalized_shape`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..utils import resolve_device
from ._norm import normalize


def _norm_shape(normalized_shape, hidden_size) -> int:
    if normalized_shape is None:
        if hidden_size is None:
            raise RuntimeError("Neither `normalized_shape` nor `hidden_size` (deprecated) args "
                               "are provided")
        normalized_shape = hidden_size
    elif hidden_size is not None:
        raise RuntimeError("Both `normalized_shape` and `hidden_size` (deprecated) args are "
                           "provided")
    if not isinstance(normalized_shape, int):
        (normalized_shape,) = tuple(normalized_shape)
    return normalized_shape


class _Norm(torch.nn.Module):
    normalization = ""

    def __init__(self, normalized_shape: Iterable[int] | int | None = None,
                 eps: float = 1e-5, sequence_parallel: bool | None = None,
                 params_dtype: torch.dtype | None = None, zero_centered_gamma: bool = False,
                 hidden_size: int | None = None, *, device=None, dtype=None, sm_margin=0):
        super().__init__()
        size = _norm_shape(normalized_shape, hidden_size)
        dtype = dtype if dtype is not None else params_dtype
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.sequence_parallel = sequence_parallel
        device = resolve_device(device)
        self.weight = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, defer_init: bool | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.normalization == "LayerNorm":
                self.bias.zero_()
        if self.sequence_parallel is not None:
            for param in self.parameters():
                param.sequence_parallel = self.sequence_parallel

    def get_extra_state(self) -> torch.Tensor:
        """TE's op-based norms keep quantizer state here; a standalone norm has none, so it is
        empty (the key still appears in state dicts, as with real TE)."""
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Nothing to restore (see get_extra_state)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return normalize(inp, self.weight, getattr(self, "bias", None), self.eps,
                         self.normalization, self.zero_centered_gamma)


class LayerNorm(_Norm):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dim."""

    normalization = "LayerNorm"
