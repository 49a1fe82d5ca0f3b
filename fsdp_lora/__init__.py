"""LoRA for HuggingFace models under torch FSDP (FSDP2 `fully_shard` or FSDP1 with
`use_orig_params=True`). Needs torch, not megatron-core.

    model = apply_lora_to_fsdp_model(model, LoRAConfig(r=16, alpha=32))   # before wrapping
    fully_shard(...)                                                      # then shard
    optimizer = torch.optim.AdamW(get_lora_parameters(model).values(), lr=1e-4)
    save_peft_adapter(model, "adapter/")                                  # PEFT format
"""

from fsdp_lora.apply import (
    apply_lora_to_fsdp_model,
    get_lora_parameters,
    mark_only_lora_as_trainable,
)
from fsdp_lora.layers import LoRAFactor, LoRALinear
from fsdp_lora.merge import (
    disable_lora,
    iter_merged_weights,
    merge_lora_weights,
    unmerge_lora_weights,
)
from fsdp_lora.peft import load_peft_adapter, save_peft_adapter
from lora_common import HF_TARGET_MODULES, LoRAConfig, add_lora_arguments

__all__ = [
    "LoRAConfig", "add_lora_arguments", "HF_TARGET_MODULES",
    "apply_lora_to_fsdp_model", "LoRALinear", "LoRAFactor",
    "merge_lora_weights", "unmerge_lora_weights", "disable_lora", "iter_merged_weights",
    "get_lora_parameters", "mark_only_lora_as_trainable",
    "save_peft_adapter", "load_peft_adapter",
]
