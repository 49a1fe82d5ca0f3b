"""The LoRA linear for HF models (`linear.py`), its adapter matrices (`factor.py`) and its
one-node autograd function (`functional.py`)."""

from fsdp_lora.layers.factor import LoRAFactor
from fsdp_lora.layers.linear import LoRALinear

__all__ = ["LoRAFactor", "LoRALinear"]
