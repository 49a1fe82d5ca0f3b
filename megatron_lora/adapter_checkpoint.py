"""Adapter-only checkpoints of a live model (the file format: `interop/adapter_file.py`).

    save_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; rank 0 writes
    load_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; any TP/PP size

Saving gathers each adapter over TP to its full tensor and the pipeline stages' tensors to
rank 0; loading checks on every rank that the file fits the model (config, geometry, names,
shapes) before it writes this rank's shard of each tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from lora_common import LoRAConfig
from lora_common.state import require_state
from megatron_lora.interop.adapter_file import (
    AdapterCheckpoint,
    read_lora_checkpoint,
    write_adapter_checkpoint,
)
from megatron_lora.interop.geometry import Geometry
from megatron_lora.layers import sharding
from megatron_lora.model import lora_modules

# Fields of LoRAConfig that change what an adapter computes; a checkpoint must agree on them.
FUNCTIONAL_FIELDS = ("r", "alpha", "use_rslora", "target_modules", "canonical")


def _world() -> tuple[int, int]:
    if not torch.distributed.is_initialized():
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def _gather_to_rank0(obj) -> list:
    world, rank = _world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out or []


def _all_gather_objects(obj) -> list:
    world, _ = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _is_first_replica() -> bool:
    if not parallel_state.model_parallel_is_initialized():
        return True
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _config_and_geometry(modules: dict) -> tuple[LoRAConfig, Geometry]:
    if not modules:
        raise ValueError("the model has no LoRA modules")
    first = next(iter(modules.values()))
    return first.lora_config, Geometry.from_megatron(first.config)


def gather_adapter(model) -> AdapterCheckpoint | None:
    """The model's adapters as full tensors named by their place in the unsplit model, with
    config and geometry: on rank 0; None on the other ranks. Call on every rank."""
    modules = lora_modules(model)
    config, geometry = _config_and_geometry(modules)
    tensors = {}
    for name, module in modules.items():
        for key, param in module.lora_parameters().items():
            tensors[f"{name}.{key}"] = sharding.full_tensor(param, module.lora_tp_group).cpu()
    # Pipeline stages hold different layers; TP ranks (after the gather) and data-parallel
    # replicas hold the same ones: one copy of each travels to rank 0.
    gathered = {}
    for received in _gather_to_rank0(tensors if _is_first_replica() else {}):
        gathered.update(received)
    _, rank = _world()
    return AdapterCheckpoint(dict(sorted(gathered.items())), config, geometry) if rank == 0 else None


def save_lora_checkpoint(model, path: str | Path) -> None:
    """Write the adapters (gathered over TP and PP to rank 0) and the header to `path`.
    Call on every rank, like a collective."""
    checkpoint = gather_adapter(model)
    if checkpoint is not None:
        write_adapter_checkpoint(checkpoint, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _problems(checkpoint: AdapterCheckpoint, modules: dict, path: str) -> list[str]:
    """Every way the checkpoint does not fit this rank's part of the model."""
    config, geometry = _config_and_geometry(modules)
    problems = []
    for field in FUNCTIONAL_FIELDS:
        mine, theirs = getattr(config, field), getattr(checkpoint.config, field)
        if mine != theirs:
            problems.append(f"LoRAConfig.{field} is {mine!r} in the model, {theirs!r} in {path}")
    try:
        checkpoint.geometry.require_equal(geometry, "the model")
    except ValueError as error:
        problems.append(f"{path}: {error}")
    for name, module in modules.items():
        for relative, param in module.lora_parameters().items():
            key = f"{name}.{relative}"
            if key not in checkpoint.tensors:
                problems.append(f"{path} lacks tensor {key}")
                continue
            shape = sharding.full_shape(param, module.lora_tp_group)
            if list(checkpoint.tensors[key].shape) != shape:
                problems.append(f"{path}: tensor {key} has shape "
                                f"{list(checkpoint.tensors[key].shape)}, the model needs {shape}")
    return problems


def load_lora_checkpoint(model, path: str | Path) -> None:
    """Load an adapter checkpoint into the model's LoRA parameters, at any TP/PP size. Call on
    every rank. Every mismatch (config, geometry, a missing or extra tensor, a shape) raises
    `ValueError` naming it on every rank, before any parameter is touched."""
    load_adapter(model, read_lora_checkpoint(path), str(path))


def load_adapter(model, checkpoint: AdapterCheckpoint, source: str) -> None:
    """Copy full adapter tensors into this rank's LoRA parameters, after checking on every
    rank that they fit (`source` names them in errors). Call on every rank. Refused into a
    merged model, whose W would keep the old adapter's delta."""
    modules = lora_modules(model)
    require_state(modules, f"loading the adapter from {source}", merged=False, model=model)
    local_problems = _problems(checkpoint, modules, source)
    # The expected key set spans every pipeline stage; each rank knows only its own layers.
    expected, problems = set(), []
    for keys, rank_problems in _all_gather_objects(
            ({f"{n}.{key}" for n, m in modules.items() for key in m.lora_parameters()},
             local_problems)):
        expected |= keys
        problems += [p for p in rank_problems if p not in problems]
    extra = sorted(set(checkpoint.tensors) - expected)
    if extra:
        problems.append(f"{source} holds tensor(s) the model has no adapter for: {extra}")
    if problems:
        raise ValueError(f"cannot load adapter from {source}: " + "; ".join(problems))
    with torch.no_grad():
        for name, module in modules.items():
            for key, param in module.lora_parameters().items():
                full = checkpoint.tensors[f"{name}.{key}"]
                param.copy_(sharding.local_shard(full, param, module.lora_tp_group))
