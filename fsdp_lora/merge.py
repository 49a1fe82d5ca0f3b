"""Folding the adapter into the base weight: in place (`merge_lora_weights`,
`unmerge_lora_weights`) or as a stream of merged copies (`iter_merged_weights`).

The update `s * B @ A` is computed in fp32 and cast to the weight's dtype once. Under FSDP2
the merge is local: a weight and its B are both split on dim 0 into the same row blocks, so
a rank adds `s * B_rows @ A` to its own rows after all-gathering only A (`[r, in]`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from fsdp_lora.factor import LoRAFactor
from fsdp_lora.full_params import copy_full_value_, full_value, owned_modules
from fsdp_lora.layer import LoRALinear
from fsdp_lora.parameters import lora_layers


def _rows_split_alike(weight, lora_b) -> bool:
    """True when the DTensors `weight` [out, in] and `lora_b` [out, r] hold the same rows on
    every rank (FSDP2's default dim-0 sharding, optionally replicated as in HSDP)."""
    return (weight.device_mesh == lora_b.device_mesh and weight.placements == lora_b.placements
            and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in weight.placements))


@torch.no_grad()
def _add_delta_(layer: LoRALinear, sign: float) -> None:
    from torch.distributed.tensor import DTensor

    weight = layer.weight
    if not isinstance(weight, DTensor):
        weight.copy_((weight.float() + sign * layer.delta_weight()).to(weight.dtype))
        return
    lora_a = full_value(layer.lora_A.weight)
    lora_b = layer.lora_B.weight
    if _rows_split_alike(weight, lora_b):
        local = weight.to_local()
        local.copy_((local.float() + sign * layer.delta_weight(lora_a, lora_b.to_local()))
                    .to(local.dtype))
    else:  # an unusual shard_placement_fn: merge the full weight, keep this rank's part
        merged = full_value(weight).float() + sign * layer.delta_weight(lora_a, full_value(lora_b))
        copy_full_value_(weight, merged.to(weight.dtype))


def _set_merged(model: nn.Module, merged: bool) -> None:
    verb = "merge_lora_weights" if merged else "unmerge_lora_weights"
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{verb}: {type(model).__name__} has no LoRA adapters")
    wrong = [layer.lora_name for layer in layers if layer.merged == merged]
    if wrong:
        raise RuntimeError(f"{verb}: {len(wrong)} LoRA module(s) are already "
                           f"{'merged' if merged else 'unmerged'}, e.g. {wrong[0]!r}")
    disabled = [layer.lora_name for layer in layers if not layer.lora_enabled]
    if disabled:
        raise RuntimeError(f"{verb}: called inside disable_lora ({disabled[0]!r} is disabled)")
    for _, module, _ in owned_modules(model, writeback=True):
        if isinstance(module, LoRALinear):
            _add_delta_(module, 1.0 if merged else -1.0)
            module.merged = merged


def merge_lora_weights(model: nn.Module) -> None:
    """`W += s * B @ A` in place for every adapter; the forward is then the base GEMM alone.
    Merging a merged model raises `RuntimeError`."""
    _set_merged(model, True)


def unmerge_lora_weights(model: nn.Module) -> None:
    """`W -= s * B @ A`: the base weights back, up to one rounding in W's dtype. Unmerging an
    unmerged model raises `RuntimeError`."""
    _set_merged(model, False)


def iter_merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(HF name, full tensor)` for every base parameter, with each active adapter folded
    into its weight, without changing the model: what a rollout engine loads (and what the
    model computes: inside `disable_lora` these are the base weights).

    One parameter is gathered at a time (FSDP2), or one FSDP1 unit is summoned at a time;
    LoRA factors are not yielded, tied parameters once. Under FSDP every rank must run the
    loop to the end (the gathers are collectives). Tensors of an unsharded model may share
    storage with the model: copy them before changing them.
    """
    from torch.distributed.fsdp._flat_param import FlatParameter

    seen: set[int] = set()
    for name, module, summoned in owned_modules(model):
        if isinstance(module, LoRAFactor):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or isinstance(param, FlatParameter):
                continue
            seen.add(id(param))
            key = f"{name}.{param_name}" if name else param_name
            if isinstance(module, LoRALinear) and param_name == "weight" and module.lora_active:
                weight = full_value(param)
                delta = module.delta_weight(full_value(module.lora_A.weight),
                                            full_value(module.lora_B.weight))
                yield key, (weight.float() + delta).to(weight.dtype)
            else:
                value = full_value(param)
                yield key, value.clone() if summoned else value
