"""`apply_lora_to_fsdp_model`: swap the target `nn.Linear`s of a HF model for `LoRALinear`s.

Targets match by PEFT's list rule (`lora_common.targets.matches`): `q_proj` matches every
layer's query projection and `model.layers.0.self_attn.q_proj` just one; `exclude_modules` match
the same way. Every
problem is found before the first module is swapped, so a failed call leaves the model as
it was.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fsdp_lora.full_params import fsdp1_units, hf_module_name, is_fsdp_wrapped
from fsdp_lora.layers.linear import LoRALinear
from fsdp_lora.model import lora_modules
from fsdp_lora.recompute import guard_input_embeddings
from lora_common.config import HF_TARGET_MODULES, LoRAConfig
from lora_common.state import freeze_all_but_adapters, is_lora_parameter
from lora_common.targets import matches


def _linear_names(named: list[tuple[str, nn.Module]]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in named if isinstance(m, nn.Linear)})
    return ", ".join(leaves) or "none"


def _select_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, str, nn.Module]]:
    """`(module path, HF name, linear)` of every module to adapt; raises on any bad target."""
    named = [(path, hf_module_name(path), module) for path, module in model.named_modules()
             if path]
    hf_named = [(name, module) for _, name, module in named]
    model_kind = type(model).__name__
    for pattern in config.target_modules:
        hits = [(name, m) for name, m in hf_named if matches(pattern, name)]
        if not hits:
            raise ValueError(f"LoRA target {pattern!r} matches no module of {model_kind}; "
                             f"its linear layers are named: {_linear_names(hf_named)}")
        for name, module in hits:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {pattern!r} matches {name!r} "
                                 f"({type(module).__name__}); LoRA adapts nn.Linear layers only "
                                 f"(linear layers here: {_linear_names(hf_named)})")
    for pattern in config.exclude_modules:
        if not any(matches(pattern, name) for name, _ in hf_named):
            raise ValueError(f"LoRA exclude_modules entry {pattern!r} matches no module of "
                             f"{model_kind}; its linear layers are named: "
                             f"{_linear_names(hf_named)}")
    return [(path, name, module) for path, name, module in named
            if any(matches(t, name) for t in config.target_modules)
            and not any(matches(e, name) for e in config.exclude_modules)]


def apply_lora_to_fsdp_model(model: nn.Module, args_or_config: Any) -> nn.Module:
    """Add LoRA adapters to `model` in place (and return it), before FSDP wrapping.

    `args_or_config` is a `LoRAConfig`, an argparse namespace with the `--lora-*` flags
    (`LoRAConfig.from_args`) or a mapping of `LoRAConfig` fields (`LoRAConfig.from_dict`).
    `target_modules=None` adapts the seven Llama projections
    (`HF_TARGET_MODULES`). The model may live on the meta device: A and B are then drawn when
    it is materialized (`to_empty`, FSDP1's `reset_parameters`), identically on every rank.
    With `only_trainable`, every non-LoRA parameter is frozen; under activation checkpointing
    the adapters still get their grads (`recompute.py`).
    """
    config = LoRAConfig.coerce(args_or_config, "apply_lora_to_fsdp_model").resolve_targets(
        HF_TARGET_MODULES)
    if is_fsdp_wrapped(model):
        raise ValueError(f"apply_lora_to_fsdp_model: {type(model).__name__} is already wrapped "
                         f"by FSDP; add LoRA first, then call fully_shard / FSDP(...)")
    existing = list(lora_modules(model))
    if existing:
        raise ValueError(f"apply_lora_to_fsdp_model: the model already has LoRA adapters "
                         f"(e.g. {existing[0]!r}); apply LoRA once")
    targets = _select_targets(model, config)
    for path, name, linear in targets:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, LoRALinear.from_linear(linear, config, name))
    if config.only_trainable:
        mark_only_lora_as_trainable(model)
    guard_input_embeddings(model)
    return model


def get_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The A and B weights of every adapter by HF name (`...q_proj.lora_A.weight`), in module
    order: `AdamW(get_lora_parameters(model).values())` is the LoRA-only optimizer. Under FSDP2
    they are the DTensor shards FSDP2 registered."""
    units = fsdp1_units(model)
    if any(not unit._use_orig_params for unit in units):
        raise ValueError("get_lora_parameters: FSDP1 was built with use_orig_params=False, "
                         "which hides the LoRA parameters inside flat parameters; wrap with "
                         "FullyShardedDataParallel(..., use_orig_params=True)")
    params = {hf_module_name(name): param for name, param in model.named_parameters()
              if is_lora_parameter(name)}
    if not params:
        raise ValueError(f"get_lora_parameters: {type(model).__name__} has no LoRA adapters; "
                         f"call apply_lora_to_fsdp_model first")
    return params


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA factors (which become trainable)."""
    get_lora_parameters(model)  # refuses a model without adapters, or with hidden ones
    freeze_all_but_adapters(model)
