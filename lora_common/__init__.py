"""Backend-neutral pieces shared by `megatron_lora` and `fsdp_lora` (no Megatron import)."""

from lora_common.arguments import add_lora_arguments
from lora_common.config import HF_TARGET_MODULES, MEGATRON_TARGET_MODULES, LoRAConfig

__all__ = ["LoRAConfig", "add_lora_arguments", "MEGATRON_TARGET_MODULES", "HF_TARGET_MODULES"]
