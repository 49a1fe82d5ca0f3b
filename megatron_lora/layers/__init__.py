"""LoRA parallel linears, and only them (nothing else of megatron_lora is imported here): the
adapter layer (`parallel_linear.py`, `te_linear.py`), its sharding rule (`sharding.py`), its
communication (`comm.py`) and arithmetic (`functional.py`), canonical per-projection adapters
(`canonical.py`, `projection_layout.py`), MoE expert adapters (`expert.py`, `grouped_linear.py`,
`grouped_matmul.py`), the adapter factors (`factor.py`), the dist-checkpoint description
(`sharded_state.py`), and which class gets which mixin (`registry.py`)."""

from megatron_lora.layers.factor import LoRAFactor
from megatron_lora.layers.registry import is_lora_linear, lora_linear_class, supports_lora

__all__ = ["LoRAFactor", "is_lora_linear", "lora_linear_class", "supports_lora"]
