"""LoRA parallel linears: the adapter layer (`parallel_linear.py`, `te_linear.py`), its
sharding rule (`sharding.py`), its communication (`comm.py`) and arithmetic
(`functional.py`), which class gets which mixin (`registry.py`), and where each adapter's
init comes from (`placement.py`)."""

from megatron_lora.layers.factor import LoRAFactor
from megatron_lora.layers.registry import is_lora_linear, lora_linear_class, supports_lora

__all__ = ["LoRAFactor", "is_lora_linear", "lora_linear_class", "supports_lora"]
