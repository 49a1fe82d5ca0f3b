"""LoRA for HuggingFace models under torch FSDP. Needs torch, not megatron-core."""

from lora_common import HF_TARGET_MODULES, LoRAConfig, add_lora_arguments

__all__ = ["LoRAConfig", "add_lora_arguments", "HF_TARGET_MODULES"]
