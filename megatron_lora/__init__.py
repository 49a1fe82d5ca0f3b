"""LoRA inside Megatron-core ModuleSpecs, sharded correctly across tensor-parallel ranks."""

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig, add_lora_arguments

__all__ = ["LoRAConfig", "add_lora_arguments", "MEGATRON_TARGET_MODULES"]
