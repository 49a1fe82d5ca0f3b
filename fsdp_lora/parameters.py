"""Adapter-parameter helpers, kept apart from the layer: find, list and freeze around LoRA."""

from __future__ import annotations

from torch import nn

from fsdp_lora.factor import LoRAFactor


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every `LoRALinear` of `model`, in module order."""
    from fsdp_lora.layer import LoRALinear

    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def get_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The A and B weights of every adapter by HF name (`...q_proj.lora_A.weight`), in module
    order: `AdamW(get_lora_parameters(model).values())` is the LoRA-only optimizer. Under FSDP2
    they are the DTensor shards FSDP2 registered."""
    from fsdp_lora.full_params import fsdp1_units, hf_module_name

    units = fsdp1_units(model)
    if any(not unit._use_orig_params for unit in units):
        raise ValueError("get_lora_parameters: FSDP1 was built with use_orig_params=False, "
                         "which hides the LoRA parameters inside flat parameters; wrap with "
                         "FullyShardedDataParallel(..., use_orig_params=True)")
    params = {f"{hf_module_name(name)}.weight": module.weight
              for name, module in model.named_modules() if isinstance(module, LoRAFactor)}
    if not params:
        raise ValueError(f"get_lora_parameters: {type(model).__name__} has no LoRA adapters; "
                         f"call apply_lora_to_fsdp_model first")
    return params


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA factors (which become trainable)."""
    lora = {id(p) for p in get_lora_parameters(model).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in lora)
