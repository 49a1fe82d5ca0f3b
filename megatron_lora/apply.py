"""The post-hoc route: LoRA on a Megatron model that is already built, plus parameter helpers.

`apply_lora_to_megatron_model(model, config)` turns each target linear into the same LoRA class
the spec route builds, in place (base weights kept), and places the adapters exactly as the
spec route does, so both routes give identical models.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from megatron_lora.lora_layer import (
    freeze_base_parameters,
    model_chunks,
    place_adapter,
    place_lora,
    transformer_layers,
)
from megatron_lora.lora_linear import LoRAMatrix, is_lora_linear, lora_linear_class, supports_lora


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
            if is_lora_linear(module) and not any(name.startswith(f"{l}.") for l in layers):
                place_adapter(module, config, None, name)  # an adapter outside any layer
        if config.only_trainable:
            freeze_base_parameters(chunk)
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
        for name, module in chunk.named_modules():
            if isinstance(module, LoRAMatrix):
                params[f"{prefix}{name}.weight"] = module.weight
    return params


def mark_only_lora_as_trainable(model) -> None:
    """Freeze every parameter but the adapters' (which are made trainable)."""
    for chunk in model_chunks(model):
        freeze_base_parameters(chunk)


def custom_megatron_init(args: argparse.Namespace) -> None:
    """For slime's `--custom-megatron-init-path megatron_lora.custom_megatron_init`.

    slime calls it at the end of Megatron's initialization, before any model is built. With
    `--use-lora` it points `--spec` at `get_gpt_lora_spec` (a `--spec` the user set becomes
    `--lora-base-spec`, the base that LoRA wraps) and, with `--lora-only-trainable`, tells slime's own freezing step
    (`--only-train-params-name-list`) to keep only the adapters trainable, which also freezes
    the embedding and output layer that the layer spec does not reach.
    """
    if not getattr(args, "use_lora", False):
        return
    config = as_lora_config(args)  # validate the flags early, with a clear error
    ours = ["megatron_lora", "get_gpt_lora_spec"]
    spec = list(args.spec) if getattr(args, "spec", None) else None
    if spec and spec != ours:
        if getattr(args, "lora_base_spec", None):
            raise ValueError(f"--use-lora: both --spec {' '.join(spec)} and --lora-base-spec "
                             f"are set; give the base spec once, as --lora-base-spec")
        args.lora_base_spec = spec  # LoRA wraps the spec the user chose
    args.spec = ours
    if config.only_trainable:
        args.only_train_params_name_list = [r"\.lora_[AB]\.weight$"]
