"""LoRA inside Megatron-core ModuleSpecs, sharded correctly across tensor-parallel ranks.

Spec route:      --spec megatron_lora get_gpt_lora_spec     (or `lora_spec(spec, config)`)
Post-hoc route:  apply_lora_to_megatron_model(model, config)

`import megatron_lora` needs no megatron-core: the entry points Megatron and slime resolve by
name (`get_gpt_lora_spec`, `custom_megatron_init`) and the megatron-free pieces are bound here;
everything that builds on megatron-core is imported on first use, so the offline tools
(`megatron-lora export-peft`, `inspect`) run where megatron-core is not installed.
"""

import importlib

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig, add_lora_arguments
from lora_common.state import is_lora_parameter
from megatron_lora.adapt.gpt_spec import custom_megatron_init, get_gpt_lora_spec, gpt_lora_spec
from megatron_lora.interop.adapter_file import read_lora_checkpoint

# name -> the module that defines it (imported on first access)
_LAZY = {
    "lora_spec": "megatron_lora.adapt.spec",
    "lora_linear_class": "megatron_lora.layers.registry",
    "is_lora_linear": "megatron_lora.layers.registry",
    "apply_lora_to_megatron_model": "megatron_lora.adapt.apply",
    "get_lora_parameters": "megatron_lora.adapt.apply",
    "mark_only_lora_as_trainable": "megatron_lora.adapt.apply",
    "merge_lora_weights": "megatron_lora.merge",
    "unmerge_lora_weights": "megatron_lora.merge",
    "disable_lora": "megatron_lora.merge",
    "iter_merged_weights": "megatron_lora.merge",
    "save_dist_checkpoint": "megatron_lora.persist.dist_checkpoint",
    "load_dist_checkpoint": "megatron_lora.persist.dist_checkpoint",
    "allow_missing_adapters": "megatron_lora.persist.dist_checkpoint",
    "save_lora_checkpoint": "megatron_lora.persist.adapter_checkpoint",
    "load_lora_checkpoint": "megatron_lora.persist.adapter_checkpoint",
    "export_peft_adapter": "megatron_lora.persist.peft",
    "import_peft_adapter": "megatron_lora.persist.peft",
    "merged_weights": "megatron_lora.sync.merged",
    "iter_merged_tensors": "megatron_lora.sync.merged",
    "full_adapter_tensors": "megatron_lora.sync.adapter_tensors",
    "iter_peft_tensors": "megatron_lora.sync.peft_tensors",
    "gather_peft_adapter": "megatron_lora.sync.peft_tensors",
    "check_lora_sync_args": "megatron_lora.sync.slime",
    "rollout_weights": "megatron_lora.sync.slime",
    "iter_rollout_tensors": "megatron_lora.sync.slime",
    "lora_request_fields": "megatron_lora.sync.slime",
    "AdapterSync": "megatron_lora.sync.adapter_sync",
    "lora_load_request": "megatron_lora.interop.sglang",
    "lora_unload_request": "megatron_lora.interop.sglang",
    "weight_version_request": "megatron_lora.interop.sglang",
}

__all__ = ["LoRAConfig", "add_lora_arguments", "MEGATRON_TARGET_MODULES", "is_lora_parameter",
           "get_gpt_lora_spec", "gpt_lora_spec", "custom_megatron_init", "read_lora_checkpoint",
           *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'megatron_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
