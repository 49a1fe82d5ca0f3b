"""Model-level verbs on the adapters' state: merge, unmerge, disable, and the merged-weight
stream (the LoRA state protocol is `lora_common.state`).

The update `s * B @ A` is computed in fp32 and cast to the weight's dtype once
(`lora_common.delta`). Under FSDP2 the merge is local: a weight and its B are both split on
dim 0 into the same row blocks, so a rank adds `s * B_rows @ A` to its own rows after
all-gathering only A (`[r, in]`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fsdp_lora.full_params import copy_full_value_, full_value, owned_modules
from fsdp_lora.layers.factor import LoRAFactor
from fsdp_lora.layers.linear import LoRALinear
from fsdp_lora.model import lora_modules
from lora_common.delta import merged_value
from lora_common.state import lora_disabled, require_state


def _rows_split_alike(weight, lora_b) -> bool:
    """True when the DTensors `weight` [out, in] and `lora_b` [out, r] hold the same rows on
    every rank (FSDP2's default dim-0 sharding, optionally replicated as in HSDP)."""
    return (weight.device_mesh == lora_b.device_mesh and weight.placements == lora_b.placements
            and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in weight.placements))


@torch.no_grad()
def _add_delta_(layer: LoRALinear, sign: float) -> None:
    from torch.distributed.tensor import DTensor

    weight, scaling = layer.weight, layer.lora_scaling
    if not isinstance(weight, DTensor):
        weight.copy_(merged_value(weight, layer.lora_A.weight, layer.lora_B.weight, scaling, sign))
        return
    lora_a = full_value(layer.lora_A.weight)
    lora_b = layer.lora_B.weight
    if _rows_split_alike(weight, lora_b):
        local = weight.to_local()
        local.copy_(merged_value(local, lora_a, lora_b.to_local(), scaling, sign))
    else:  # an unusual shard_placement_fn: merge the full weight, keep this rank's part
        copy_full_value_(weight, merged_value(full_value(weight), lora_a, full_value(lora_b),
                                              scaling, sign))


def _set_merged(model: nn.Module, merged: bool) -> None:
    verb = "merge_lora_weights" if merged else "unmerge_lora_weights"
    require_state(lora_modules(model), verb, merged=not merged,
                  disabled=False if merged else None, model=model)
    for _, module, _ in owned_modules(model, writeback=True):
        if isinstance(module, LoRALinear):
            _add_delta_(module, 1.0 if merged else -1.0)
            module.lora_merged = merged


def merge_lora_weights(model: nn.Module) -> None:
    """`W += s * B @ A` in place for every adapter; the forward is then the base GEMM alone.
    Refused on a merged model and inside `disable_lora`."""
    _set_merged(model, True)


def unmerge_lora_weights(model: nn.Module) -> None:
    """`W -= s * B @ A`: the base weights back, up to one rounding in W's dtype. Refused
    unless every module is merged."""
    _set_merged(model, False)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes exactly what its base model computes (RL reference
    log-probs with no second copy of the weights). Nests; restores on exceptions. Refused on
    a merged model, whose weights hold the adapter."""
    with lora_disabled(lora_modules(model), model):
        yield model


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
                yield key, merged_value(full_value(param), full_value(module.lora_A.weight),
                                        full_value(module.lora_B.weight), module.lora_scaling)
            else:
                value = full_value(param)
                yield key, value.clone() if summoned else value
