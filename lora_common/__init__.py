"""Pieces with no Megatron import that more than one part of the project shares: the config and
its flags, the target names and the one target rule (`targets.py`), the LoRA state protocol,
the fused linears' row layouts (`fused_rows.py`), atomic writes, the PEFT file format, and
putting modules back as they were when a verb fails midway (`rollback.py`)."""

from lora_common.arguments import add_lora_arguments
from lora_common.config import HF_TARGET_MODULES, MEGATRON_TARGET_MODULES, LoRAConfig

__all__ = ["LoRAConfig", "add_lora_arguments", "MEGATRON_TARGET_MODULES", "HF_TARGET_MODULES"]
