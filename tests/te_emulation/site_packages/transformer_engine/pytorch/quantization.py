"""Global FP8 state and the autocast / model-init contexts (TE v2.11 `pytorch/quantization.py`).

`autocast(enabled, calibrating, recipe, amax_reduction_group)` saves the global state, calls
`FP8GlobalStateManager.autocast_enter`, and restores the saved state on exit; modules read the
state when their forward starts (`TransformerEngineBaseModule.init_fp8_metadata`) and set their
`fp8` attribute and `fp8_meta["recipe"]` from it. `fp8_autocast` is TE 2.11's deprecated wrapper
(`fp8_recipe`, `fp8_group`), still what megatron-core 0.16 and 0.19 call. Every recipe counts as
supported (the emulation needs no FP8 hardware); delayed scaling keeps no amax history, so the
amax reduction at autocast exit is a no-op.

`quantized_model_init` / `fp8_model_init` set `FP8GlobalStateManager.FP8_PARAMETERS` as in TE;
the emulated modules refuse to build FP8 primary weights (not emulated).
"""

from __future__ import annotations

from contextlib import contextmanager

from ..common.recipe import (  # noqa: F401 - re-exported like TE
    CustomRecipe,
    DelayedScaling,
    Float8BlockScaling,
    Float8CurrentScaling,
    Format,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
    Recipe,
)
from . import emulation


def check_fp8_support() -> tuple[bool, str]:
    return True, ""


check_mxfp8_support = check_nvfp4_support = check_fp8_block_scaling_support = check_fp8_support


def check_recipe_support(recipe: Recipe | None) -> None:
    """Every recipe is supported by the emulation."""


def get_default_fp8_recipe() -> Recipe:
    """TE picks MXFP8 on Blackwell, current scaling on compute capability 12, else delayed."""
    return DelayedScaling()


get_default_recipe = get_default_fp8_recipe


def _availability(return_reason: bool = False) -> bool | tuple[bool, str]:
    return (True, "") if return_reason else True


is_fp8_available = is_mxfp8_available = _availability
is_fp8_block_scaling_available = is_nvfp4_available = _availability


def get_fp8_max(fp8_recipe: Recipe, fprop_tensor: bool = True) -> float:
    if fp8_recipe.fp8_format == Format.E4M3 or (
        fp8_recipe.fp8_format == Format.HYBRID and fprop_tensor
    ):
        return Format.E4M3.value.max_fwd
    return Format.E5M2.value.max_fwd


class FP8GlobalStateManager:
    """Process-wide FP8 state; class attributes and methods as in TE."""

    FP8_ENABLED = False
    FP8_CALIBRATION = False
    FP8_RECIPE = None
    FP8_DISTRIBUTED_GROUP = None
    FP8_PARAMETERS = False
    HIGH_PRECISION_INIT_VAL = False
    IS_FIRST_FP8_MODULE = False
    FP8_GRAPH_CAPTURING = False
    AUTOCAST_DEPTH = 0
    autocast_arguments = {}
    skip_fp8_weight_update_tensor = None

    @classmethod
    def reset(cls) -> None:
        cls.FP8_ENABLED = cls.FP8_CALIBRATION = cls.FP8_PARAMETERS = False
        cls.HIGH_PRECISION_INIT_VAL = cls.IS_FIRST_FP8_MODULE = cls.FP8_GRAPH_CAPTURING = False
        cls.FP8_RECIPE = cls.FP8_DISTRIBUTED_GROUP = cls.skip_fp8_weight_update_tensor = None
        cls.AUTOCAST_DEPTH = 0
        cls.autocast_arguments = {}

    @classmethod
    def is_fp8_available(cls) -> tuple[bool, str]:
        return check_fp8_support()

    is_mxfp8_available = is_fp8_block_scaling_available = is_nvfp4_available = is_fp8_available

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def is_fp8_calibration(cls) -> bool:
        return cls.FP8_CALIBRATION

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return cls.FP8_PARAMETERS

    @classmethod
    def with_high_precision_init_val(cls) -> bool:
        return cls.HIGH_PRECISION_INIT_VAL

    @classmethod
    def fp8_graph_capturing(cls) -> bool:
        return cls.FP8_GRAPH_CAPTURING

    @classmethod
    def is_first_fp8_module(cls) -> bool:
        """True only for the first call inside one autocast region."""
        first, cls.IS_FIRST_FP8_MODULE = cls.IS_FIRST_FP8_MODULE, False
        return first

    @classmethod
    def get_fp8_recipe(cls) -> Recipe:
        return cls.FP8_RECIPE if cls.FP8_RECIPE is not None else get_default_fp8_recipe()

    @classmethod
    def get_fp8_group(cls):
        return cls.FP8_DISTRIBUTED_GROUP

    @classmethod
    def set_skip_fp8_weight_update_tensor(cls, skip: bool) -> None:
        cls.skip_fp8_weight_update_tensor = skip

    @classmethod
    def get_skip_fp8_weight_update_tensor(cls):
        return cls.skip_fp8_weight_update_tensor

    @classmethod
    def get_autocast_state(cls):
        return (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP,
                cls.IS_FIRST_FP8_MODULE, cls.FP8_GRAPH_CAPTURING)

    @classmethod
    def set_autocast_state(cls, state) -> None:
        (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP,
         cls.IS_FIRST_FP8_MODULE, cls.FP8_GRAPH_CAPTURING) = state

    @classmethod
    def get_unique_autocast_key(cls, recipe=None, group=None) -> str:
        return f"{recipe}:{hash(group)}"

    @classmethod
    def autocast_enter(cls, enabled=False, calibrating=False, fp8_recipe=None, fp8_group=None,
                       _graph=False) -> None:
        fp8_recipe = get_default_fp8_recipe() if fp8_recipe is None else fp8_recipe
        cls.autocast_arguments[cls.get_unique_autocast_key(fp8_recipe, fp8_group)] = (
            fp8_recipe, fp8_group)
        cls.FP8_ENABLED = enabled
        cls.FP8_CALIBRATION = calibrating
        cls.FP8_RECIPE = fp8_recipe
        cls.FP8_DISTRIBUTED_GROUP = fp8_group
        cls.FP8_GRAPH_CAPTURING = _graph
        if cls.AUTOCAST_DEPTH == 0:
            cls.IS_FIRST_FP8_MODULE = True
        cls.AUTOCAST_DEPTH += 1
        if enabled:
            emulation.stats["autocast_entered"] += 1

    @classmethod
    def autocast_exit(cls, enabled: bool, _graph: bool) -> None:
        cls.AUTOCAST_DEPTH -= 1

    @classmethod
    def reduce_and_update_fp8_tensors(cls, forward: bool = True) -> None:
        """Delayed scaling's amax reduction: nothing to reduce without an amax history."""

    @classmethod
    def add_fp8_tensors_to_global_buffer(cls, fp8_meta) -> None:
        """Delayed scaling bookkeeping; nothing to register in the emulation."""


@contextmanager
def quantized_model_init(enabled: bool = True, recipe: Recipe | None = None,
                         preserve_high_precision_init_val: bool = False):
    """Build modules with FP8 primary weights. The emulated modules raise inside it."""
    saved = (FP8GlobalStateManager.FP8_PARAMETERS, FP8GlobalStateManager.FP8_RECIPE,
             FP8GlobalStateManager.HIGH_PRECISION_INIT_VAL)
    FP8GlobalStateManager.FP8_PARAMETERS = enabled
    FP8GlobalStateManager.FP8_RECIPE = get_default_fp8_recipe() if recipe is None else recipe
    FP8GlobalStateManager.HIGH_PRECISION_INIT_VAL = preserve_high_precision_init_val
    try:
        yield
    finally:
        (FP8GlobalStateManager.FP8_PARAMETERS, FP8GlobalStateManager.FP8_RECIPE,
         FP8GlobalStateManager.HIGH_PRECISION_INIT_VAL) = saved


@contextmanager
def fp8_model_init(enabled: bool = True, recipe: Recipe | None = None,
                   preserve_high_precision_init_val: bool = False):
    """Deprecated alias of `quantized_model_init` (TE 2.11)."""
    with quantized_model_init(enabled=enabled, recipe=recipe,
                              preserve_high_precision_init_val=preserve_high_precision_init_val):
        yield


@contextmanager
def autocast(enabled: bool = True, calibrating: bool = False, recipe: Recipe | None = None,
             amax_reduction_group=None, _graph: bool = False):
    """Run the enclosed TE modules' GEMMs in FP8 (`recipe`), restoring the outer state on exit."""
    if enabled:
        check_recipe_support(recipe)
    saved = FP8GlobalStateManager.get_autocast_state()
    FP8GlobalStateManager.autocast_enter(enabled=enabled, calibrating=calibrating,
                                         fp8_recipe=recipe, fp8_group=amax_reduction_group,
                                         _graph=_graph)
    try:
        yield
    finally:
        FP8GlobalStateManager.set_autocast_state(saved)
        FP8GlobalStateManager.autocast_exit(enabled, _graph=_graph)


@contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False,
                 fp8_recipe: Recipe | None = None, fp8_group=None, _graph: bool = False):
    """Deprecated spelling of `autocast` (TE 2.11), the one megatron-core calls."""
    with autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe,
                  amax_reduction_group=fp8_group, _graph=_graph):
        yield
