"""The post-hoc route: LoRA on a Megatron model that is already built, plus parameter helpers.

`apply_lora_to_megatron_model(model, config)` turns each target linear into the same LoRA class
the spec route builds, in place (base weights kept), and places the adapters exactly as the
spec route does, so both routes give identical models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.state import freeze_all_but_adapters, is_lora_parameter
from lora_common.targets import target_of_module
from megatron_lora.adapt import moe
from megatron_lora.adapt.placement import (
    add_lora_in_place,
    check_exclusions,
    place_adapter,
    place_lora,
    selected_projections,
)
from megatron_lora.adapt.recompute import guard_stacks
from megatron_lora.adapt.selection import selectable_names, selecting
from megatron_lora.layers.canonical import projection_layout
from megatron_lora.layers.registry import is_lora_linear, lora_linear_class, supports_lora
from megatron_lora.modules import model_chunks, transformer_layers


def apply_lora_to_megatron_model(model, args_or_config) -> Any:
    """Add LoRA to a built Megatron model (one module, or a list of virtual-pipeline chunks)
    in place and return it. `args_or_config`: a `LoRAConfig`, an argparse namespace of
    `--lora-*` flags, or a mapping of `LoRAConfig` fields. Apply before wrapping in DDP: the
    new parameters must exist when
    DDP allocates its grad buffers. Freezes every non-LoRA parameter when `only_trainable`.
    Applying the same config twice is a no-op; another config raises."""
    config = LoRAConfig.coerce(args_or_config, "apply_lora_to_megatron_model").resolve_targets(
        MEGATRON_TARGET_MODULES)
    chunks = model_chunks(model)
    _check_not_wrapped(chunks)
    modules = config.module_targets()
    targets = set(modules)
    # Validate everything before touching anything.
    found, linears, to_convert = set(), set(), []
    check_model_supports(chunks, config)
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if supports_lora(type(module)):
                linears |= selectable_names(name)
            selected = selecting(targets, name)
            if not selected:
                continue
            found |= selected
            if not supports_lora(type(module)):
                raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, "
                                 f"not a Megatron parallel linear LoRA supports")
            # Raises for a LoRA module of another config, and for a class it cannot make.
            projections = selected_projections(config, name)
            try:
                lora_linear_class(type(module), config, projections)
            except (ValueError, TypeError) as error:
                raise type(error)(f"LoRA target {name!r}: {error}") from None
            if not is_lora_linear(module):
                if projections:
                    projection_layout(module, projections)  # canonical: refuses a geometry
                to_convert.append((name, module))
    missing = sorted(target_of_module(m, config.target_modules) for m in targets - found)
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} match no module of the model; "
                         f"its parallel linears are {sorted(linears)}"
                         f"{moe.no_experts_hint(missing, linears)}")
    configs = [m.config for chunk in chunks for m in chunk.modules() if hasattr(m, "config")]
    check_exclusions(config, configs[0].num_layers if configs else None)

    if not to_convert:
        return model  # already carries this LoRA
    for name, module in to_convert:
        add_lora_in_place(module, config, name)
    for chunk in chunks:
        layers = transformer_layers(chunk)
        for layer in layers.values():
            place_lora(layer, config)
        for name, module in list(chunk.named_modules()):
            if is_lora_linear(module) and not any(name.startswith(f"{p}.") for p in layers):
                place_adapter(module, config, None, name, chunk)  # an adapter outside any layer
        if config.only_trainable:
            freeze_all_but_adapters(chunk)
        guard_stacks(chunk)
    return model


def check_model_supports(model, config: LoRAConfig) -> None:
    """Refuse, before anything changes, MoE parts of the model `config` cannot adapt
    (`moe.py`)."""
    chunks = model_chunks(model)
    configs = [m.config for chunk in chunks for m in chunk.modules() if hasattr(m, "config")]
    if configs:
        moe.check_moe_config(configs[0], config)
    for chunk in chunks:
        for name, module in chunk.named_modules():
            moe.check_experts_class(name, type(module), config)


def _check_not_wrapped(chunks: Iterable[torch.nn.Module]) -> None:
    """Megatron's DDP allocates its grad buffers when it wraps a model, and points each
    parameter's `main_grad` into them: adapters added afterwards would get no buffer and no
    grad reduction. The mark is on the parameters, so the inner module of a DDP is caught too."""
    for chunk in chunks:
        wrapped = isinstance(chunk, DistributedDataParallel) or next(
            (name for name, p in chunk.named_parameters() if hasattr(p, "main_grad")), None)
        if wrapped:
            where = "" if wrapped is True else f" (parameter {wrapped!r} has a DDP main_grad)"
            raise ValueError(f"apply_lora_to_megatron_model: the model is already wrapped in "
                             f"Megatron DDP{where}; apply LoRA to the unwrapped model, "
                             f"then wrap it")


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
