"""What only the emulation has (real TE has no such module): the FP8 rounding it applies and a
record of what happened, for tests to query.

FP8 numerics: real TE runs the base GEMM on FP8 data with a per-recipe scaling scheme. The
emulation rounds each GEMM operand through a torch FP8 dtype with a per-tensor *current* scale
(`fp8_max / amax`, as TE's Float8CurrentScaling computes it) and multiplies in the activation
dtype. That is exact for current scaling with a full-precision accumulator; for delayed scaling
(scale from the amax history), MXFP8 (a power-of-2 scale per 32 values) and blockwise scaling it
is an approximation with the same character: observably FP8, not bit-identical to a GPU.

`stats` counts, per process: `autocast_entered` (enabled FP8 autocast regions entered) and
`fp8_gemms` / `high_precision_gemms` (forward base GEMMs of Linear and LayerNormLinear).
"""

from __future__ import annotations

import collections

import torch

from ..common.recipe import Format, Recipe

stats: collections.Counter = collections.Counter()


def reset_stats() -> None:
    stats.clear()


def fp8_dtype(recipe: Recipe, forward: bool) -> torch.dtype:
    """E4M3 everywhere, except gradients under HYBRID, which are E5M2 (TE `get_fp8_torch_dtype`)."""
    if recipe.fp8_format == Format.E4M3 or (recipe.fp8_format == Format.HYBRID and forward):
        return torch.float8_e4m3fn
    return torch.float8_e5m2


def quantize(tensor: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Round `tensor` to the FP8 `dtype` with one per-tensor scale and return it dequantized,
    in the tensor's own dtype: `cast(t * s) / s` with `s = fp8_max / amax(t)`."""
    fp8_max = torch.finfo(dtype).max
    amax = tensor.detach().abs().amax().float()
    scale = fp8_max / amax if amax > 0 else torch.ones((), dtype=torch.float32)
    scaled = (tensor.float() * scale).clamp(-fp8_max, fp8_max)
    return (scaled.to(dtype).float() / scale).to(tensor.dtype)
