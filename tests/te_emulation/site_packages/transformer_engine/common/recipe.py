"""FP8/FP4 recipes: which formats and scaling strategy an autocast region uses.

Mirrors `transformer_engine/common/recipe/__init__.py` at TE v2.11 (a package there, a module
here; the import path `transformer_engine.common.recipe` is the same). The recipes are data only:
megatron-core builds them (`fp8_utils.get_fp8_recipe`, `TEDelayedScaling`) and hands them to
`autocast`. TE declares them as pydantic dataclasses, which ignore unknown keyword arguments;
megatron-core still passes `override_linear_precision` (removed from TE in 2.0), so these
dataclasses ignore unknown keywords too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(Enum):
    """FP8/FP4 formats. HYBRID: E4M3 in the forward pass, E5M2 for gradients."""

    E2M1 = _FormatHelper(max_fwd=6, max_bwd=6)
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


def _recipe(cls):
    """`dataclass` whose __init__ drops keywords that are not fields (pydantic's default)."""
    cls = dataclasses.dataclass(cls)
    init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls)}

    def __init__(self, *args, **kwargs):
        init(self, *args, **{k: v for k, v in kwargs.items() if k in names})

    cls.__init__ = __init__
    return cls


@dataclasses.dataclass(frozen=True)
class MMParams:
    use_split_accumulator: bool = True


@dataclasses.dataclass(frozen=True)
class QParams:
    power_2_scale: bool = False
    amax_epsilon: float = 0.0
    random_hadamard_transform: bool = False
    stochastic_rounding: bool = False
    fp4_2d_quantization: bool = False


class Recipe:
    """Base recipe, with TE's type predicates."""

    def nvfp4(self):
        return isinstance(self, NVFP4BlockScaling)

    def mxfp8(self):
        return isinstance(self, MXFP8BlockScaling)

    def delayed(self):
        return isinstance(self, DelayedScaling)

    def float8_current_scaling(self):
        return isinstance(self, Float8CurrentScaling)

    def float8_per_tensor_scaling(self):
        return isinstance(self, (DelayedScaling, Float8CurrentScaling))

    def float8_block_scaling(self):
        return isinstance(self, Float8BlockScaling)

    def custom(self):
        return isinstance(self, CustomRecipe)


def _no_pure_e5m2(recipe) -> None:
    assert recipe.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


@_recipe
class DelayedScaling(Recipe):
    """Scale from the amax history of previous steps (the emulation scales per current tensor)."""

    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    scaling_factor_compute_algo: Callable | None = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        _no_pure_e5m2(self)


@_recipe
class Float8CurrentScaling(Recipe):
    """Per-tensor scale from the tensor's own amax."""

    use_power_2_scales: bool = os.getenv("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", "0") == "1"
    fp8_format: Format = Format.HYBRID
    fp8_gemm_fprop: MMParams = MMParams(use_split_accumulator=False)
    fp8_gemm_dgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_wgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        _no_pure_e5m2(self)
        quant = QParams(power_2_scale=self.use_power_2_scales, amax_epsilon=0.0)
        self.fp8_quant_fwd_inp = self.fp8_quant_fwd_weight = self.fp8_quant_bwd_grad = quant


@_recipe
class MXFP8BlockScaling(Recipe):
    """E8M0 scale per 32 consecutive values (the emulation scales per tensor)."""

    margin: int = 0
    fp8_format: Format = Format.E4M3
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        _no_pure_e5m2(self)


@_recipe
class Float8BlockScaling(Recipe):
    """1D/2D block scales (the emulation scales per tensor)."""

    use_f32_scales: bool = os.getenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") == "1"
    fp8_format: Format = Format.E4M3
    x_block_scaling_dim: int = 1
    w_block_scaling_dim: int = 2
    grad_block_scaling_dim: int = 1
    fp8_gemm_fprop: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_dgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_wgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        _no_pure_e5m2(self)


@_recipe
class NVFP4BlockScaling(Recipe):
    """FP4 (E2M1) recipe: constructible, but FP4 GEMMs are not emulated."""

    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    fp4_format: Format = Format.E2M1
    fp8_format: Format = Format.E4M3
    fp8_dpa: bool = False
    fp8_mha: bool = False


@_recipe
class CustomRecipe(Recipe):
    """User quantizer factories: constructible, but not emulated."""

    qfactory: Callable[..., Any] = None
    fp8_dpa: bool = False
    fp8_mha: bool = False
