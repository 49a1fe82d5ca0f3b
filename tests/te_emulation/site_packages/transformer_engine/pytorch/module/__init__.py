"""Emulated TE modules (TE v2.11 `pytorch/module/`)."""

from .base import TransformerEngineBaseModule, get_dummy_wgrad  # noqa: F401
from .grouped_linear import GroupedLinear  # noqa: F401
from .layernorm import LayerNorm  # noqa: F401
from .layernorm_linear import LayerNormLinear  # noqa: F401
from .linear import Linear  # noqa: F401
from .rmsnorm import RMSNorm  # noqa: F401
