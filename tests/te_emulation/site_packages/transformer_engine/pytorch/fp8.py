"""Deprecated alias of `quantization` that megatron-core still imports from (TE v2.11 `fp8.py`)."""

from ..common.recipe import (  # noqa: F401
    CustomRecipe,
    DelayedScaling,
    Float8BlockScaling,
    Float8CurrentScaling,
    Format,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
    Recipe,
)
from .quantization import (  # noqa: F401
    FP8GlobalStateManager,
    check_fp8_support,
    check_recipe_support,
    fp8_autocast,
    fp8_model_init,
    get_default_fp8_recipe,
    get_fp8_max,
)
