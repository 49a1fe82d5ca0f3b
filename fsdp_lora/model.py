"""Finding LoRA modules in a HF model, by their HF names (FSDP1, checkpointing and compile
wrapper segments stripped: `full_params.hf_module_name`)."""

from __future__ import annotations

from torch import nn

from fsdp_lora.full_params import hf_module_name
from fsdp_lora.layers.linear import LoRALinear


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` of `model` by HF name, in module order."""
    return {hf_module_name(name): module for name, module in model.named_modules()
            if isinstance(module, LoRALinear)}
