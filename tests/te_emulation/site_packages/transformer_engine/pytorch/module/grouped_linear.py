"""`GroupedLinear` (MoE experts): megatron-core subclasses it at import; not emulated."""

from .._not_emulated import not_emulated_class
from .base import TransformerEngineBaseModule

GroupedLinear = not_emulated_class("pytorch.GroupedLinear", TransformerEngineBaseModule)
