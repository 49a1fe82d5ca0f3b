"""The post-hoc route: LoRA on a Megatron model that is already built, plus parameter helpers.

`apply_lora_to_megatron_model(model, config)` turns each target linear into the same LoRA class
the spec route builds, in place (base weights kept), and places the adapters exactly as the
spec route does, so both routes give identical models.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.state import freeze_all_but_adapters, is_lora_parameter
from megatron_lora.layers.placement import place_adapter, place_lora
from megatron_lora.layers.registry import is_lora_linear, lora_linear_class, supports_lora
from megatron_lora.model import model_chunks, transformer_layers


def as_lora_config(args_or_config: LoRAConfig | argparse.Namespace | Any) -> LoRAConfig:
    if isinstance(args_or_config, LoRAConfig):
        return args_or_config
    return LoRAConfig.from_args(args_or_config)


def apply_lora_to_megatron_model(model, args_or_config) -> Any:
    """Add LoRA to a built Megatron model (one module, or a list of virtual-pipeline chunks)
    in place and return it. Apply before wrapping in DDP: the new parameters must exist when
    DDP allocates its grad buffers. Freezes every non-LoRA parameter when `only_trainable`.
    Applying the same config twice is a no-op; another config raises."""
    config = as_lora_config(args_or_config).resolve_targets(MEGATRON_TARGET_MODULES)
    chunks = model_chunks(model)
    _check_not_wrapped(chunks)
    targets = set(config.target_modules)
    # Validate everything before touching anything.
    found, linears, to_convert = set(), set(), []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if supports_lora(type(module)):
                linears.add(leaf)
            if leaf not in targets:
                continue
            found.add(leaf)
            if not supports_lora(type(module)):
                raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, "
                                 f"not a Megatron parallel linear LoRA supports")
            if is_lora_linear(module):
                lora_linear_class(type(module), config)  # raises if its config differs
            else:
                to_convert.append(module)
    missing = sorted(targets - found)
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} match no module of the model; "
                         f"its parallel linears are {sorted(linears)}")

    if not to_convert:
        return model  # already carries this LoRA
    for module in to_convert:
        module.__class__ = lora_linear_class(type(module), config)
        module.add_lora()
    for chunk in chunks:
        layers = transformer_layers(chunk)
        for layer in layers.values():
            place_lora(layer, config)
        for name, module in list(chunk.named_modules()):
            if is_lora_linear(module) and not any(name.startswith(f"{p}.") for p in layers):
                place_adapter(module, config, None, name)  # an adapter outside any layer
        if config.only_trainable:
            freeze_all_but_adapters(chunk)
    return model


def _check_not_wrapped(chunks: Iterable[torch.nn.Module]) -> None:
    for chunk in chunks:
        if hasattr(chunk, "buffers") and hasattr(chunk, "ddp_config"):
            raise ValueError("apply_lora_to_megatron_model: the model is already wrapped in "
                             "Megatron DDP; apply LoRA to the unwrapped model, then wrap it")


def get_lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter parameters (`...lora_A.weight`, `...lora_B.weight`) by name."""
    params = {}
    for index, chunk in enumerate(model_chunks(model)):
        prefix = f"{index}." if isinstance(model, (list, tuple)) else ""
        for name, param in chunk.named_parameters():
            if is_lora_parameter(name):
                params[prefix + name] = param
    return params


def mark_only_lora_as_trainable(model) -> None:
    """Freeze every parameter but the adapters' (which are made trainable)."""
    for chunk in model_chunks(model):
        freeze_all_but_adapters(chunk)
