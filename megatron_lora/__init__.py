"""LoRA inside Megatron-core ModuleSpecs, sharded correctly across tensor-parallel ranks.

Spec route:      --spec megatron_lora get_gpt_lora_spec     (or `lora_spec(spec, config)`)
Post-hoc route:  apply_lora_to_megatron_model(model, config)
"""

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig, add_lora_arguments
from megatron_lora.apply import (
    apply_lora_to_megatron_model,
    custom_megatron_init,
    get_lora_parameters,
    mark_only_lora_as_trainable,
)
from megatron_lora.adapter_checkpoint import (
    load_lora_checkpoint,
    read_lora_checkpoint,
    save_lora_checkpoint,
)
from megatron_lora.dist_checkpoint import (
    allow_missing_adapters,
    load_dist_checkpoint,
    save_dist_checkpoint,
)
from megatron_lora.gpt_spec import get_gpt_lora_spec, gpt_lora_spec
from megatron_lora.lora_linear import is_lora_linear, lora_linear_class
from megatron_lora.merge import (
    disable_lora,
    iter_merged_weights,
    merge_lora_weights,
    unmerge_lora_weights,
)
from megatron_lora.peft_export import export_peft_adapter
from megatron_lora.peft_import import import_peft_adapter
from megatron_lora.spec import lora_spec
from megatron_lora.weight_sync import is_lora_parameter, iter_merged_tensors, merged_weights

__all__ = [
    "LoRAConfig", "add_lora_arguments", "MEGATRON_TARGET_MODULES",
    "get_gpt_lora_spec", "gpt_lora_spec", "lora_spec", "lora_linear_class", "is_lora_linear",
    "apply_lora_to_megatron_model", "custom_megatron_init", "get_lora_parameters",
    "mark_only_lora_as_trainable", "merge_lora_weights", "unmerge_lora_weights", "disable_lora",
    "iter_merged_weights", "save_dist_checkpoint", "load_dist_checkpoint", "allow_missing_adapters",
    "save_lora_checkpoint", "load_lora_checkpoint", "read_lora_checkpoint",
    "export_peft_adapter", "import_peft_adapter",
    "merged_weights", "iter_merged_tensors", "is_lora_parameter",
]
