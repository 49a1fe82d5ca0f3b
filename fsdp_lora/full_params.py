"""Reaching a module's full parameters and HF names through FSDP1, FSDP2 or no wrapper at all.

- FSDP2 (`fully_shard`) keeps module names and registers each parameter as a DTensor shard;
  `full_value` all-gathers one parameter, `copy_full_value_` writes one back, locally.
- FSDP1 inserts `_fsdp_wrapped_module.` into names and flattens parameters; a unit's full
  parameters exist only inside `summon_full_params`, which `owned_modules` enters one unit at
  a time (recurse=False), so at most one unit is ever unsharded.
- Activation checkpointing and `torch.compile` insert `_checkpoint_wrapped_module.` and
  `_orig_mod.`; `hf_module_name` strips all three, giving the names of the bare HF model.

Everything that gathers is a collective: every rank must make the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

__all__ = ["hf_module_name", "full_value", "copy_full_value_", "owned_modules",
           "fsdp1_units", "is_fsdp_wrapped"]


def hf_module_name(name: str) -> str:
    """`model.layers.0._fsdp_wrapped_module.self_attn` -> `model.layers.0.self_attn`."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def fsdp1_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """True once FSDP1 or FSDP2 has taken the model's parameters over."""
    from torch.distributed.tensor import DTensor

    return bool(fsdp1_units(model)) or any(isinstance(p, DTensor) for p in model.parameters())


def full_value(param: torch.Tensor) -> torch.Tensor:
    """The whole value of `param` (all-gathered if it is a DTensor shard), detached."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.detach().full_tensor()
    return param.detach()


def copy_full_value_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write `full` (the whole, unsharded value) into `param`, which may be a DTensor shard
    (FSDP2): each rank keeps its own slice, with no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already holds `full`; slice locally, send nothing.
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def _reshard_fsdp2(model: nn.Module) -> None:
    # After a forward without backward, FSDP2 may leave plain unsharded tensors registered;
    # reshard so every parameter is its DTensor shard again (a no-op when it already is).
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def owned_modules(model: nn.Module, *, writeback: bool = False
                  ) -> Iterator[tuple[str, nn.Module, bool]]:
    """Yield `(hf_name, module, summoned)` for every module of `model`, in module order.

    While a step runs, the module's own parameters (`recurse=False`) are readable: plain
    tensors, DTensor shards (FSDP2: use `full_value`), or, when `summoned` is True, full
    FSDP1 tensors that are freed after the step (clone what you keep) and written back to
    the shards when `writeback` is True.
    """
    units = fsdp1_units(model)
    if not units:
        _reshard_fsdp2(model)
        for name, module in model.named_modules():
            yield hf_module_name(name), module, False
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Which FSDP1 unit owns each module: the nearest enclosing one (None above the root unit).
    owner: dict[int, nn.Module | None] = {}

    def assign(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, FSDP) else unit
        owner[id(module)] = unit
        for child in module.children():
            assign(child, unit)

    assign(model, None)
    named = list(model.named_modules())
    for unit in [None, *units]:
        members = [(hf_module_name(n), m) for n, m in named if owner[id(m)] is unit]
        context = nullcontext() if unit is None else FSDP.summon_full_params(
            unit, recurse=False, writeback=writeback)
        with context:
            for name, module in members:
                yield name, module, unit is not None
