"""Adapter-only checkpoints of a live model (the file format: `interop/adapter_file.py`).

    save_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; rank 0 writes
    load_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; any TP/PP size

Saving gathers each adapter over TP (an expert's over expert-TP) to its full tensor and the
pipeline stages' and expert-parallel ranks' tensors to rank 0; loading checks on every rank that
the file fits the model (config, geometry, names, shapes) before it writes this rank's shard of
each tensor. MoE experts are named by global expert index
(`decoder.layers.0.mlp.experts.linear_fc1.lora_A.weight5`), the same for SequentialMLP and
grouped experts, so a checkpoint reloads at any EP and ETP size and into either implementation.
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
from megatron_lora.model import lora_modules, lora_tensors, model_config

# Fields of LoRAConfig that change what an adapter computes; a checkpoint must agree on them.
FUNCTIONAL_FIELDS = ("r", "alpha", "use_rslora", "target_modules", "expert_layout", "canonical")


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


def _is_writer(module, param) -> bool:
    """Whether this rank writes `param`'s full value: rank 0 of every group it is replicated
    over (TP and DP; for experts expert-TP and expert-DP, and EP for a matrix shared by the
    experts)."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    return all(sharding.group_size_rank(group)[1] == 0
               for group in module.lora_replica_groups(param))


def _config_and_geometry(model, modules: dict) -> tuple[LoRAConfig, Geometry]:
    if not modules:
        raise ValueError("the model has no LoRA modules")
    first = next(iter(modules.values()))
    return first.lora_config, Geometry.from_megatron(model_config(model))


def gather_adapter(model) -> AdapterCheckpoint | None:
    """The model's adapters as full tensors named by their place in the unsplit model, with
    config and geometry: on rank 0; None on the other ranks. Call on every rank."""
    config, geometry = _config_and_geometry(model, lora_modules(model))
    tensors = {}
    for name, (param, module) in lora_tensors(model).items():
        full = sharding.full_tensor(param, module.lora_tp_group).cpu()  # every TP rank gathers
        if _is_writer(module, param):
            tensors[name] = full
    # Pipeline stages and expert-parallel ranks hold different adapters; replicas send none.
    gathered = {}
    for received in _gather_to_rank0(tensors):
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


def _problems(checkpoint: AdapterCheckpoint, model, path: str) -> list[str]:
    """Every way the checkpoint does not fit this rank's part of the model."""
    config, geometry = _config_and_geometry(model, lora_modules(model))
    problems = []
    for field in FUNCTIONAL_FIELDS:
        mine, theirs = getattr(config, field), getattr(checkpoint.config, field)
        if mine != theirs:
            problems.append(f"LoRAConfig.{field} is {mine!r} in the model, {theirs!r} in {path}")
    try:
        checkpoint.geometry.require_equal(geometry, "the model")
    except ValueError as error:
        problems.append(f"{path}: {error}")
    lacking = []
    for key, (param, module) in lora_tensors(model).items():
        if key not in checkpoint.tensors:
            lacking.append(key)
            continue
        shape = sharding.full_shape(param, module.lora_tp_group)
        if list(checkpoint.tensors[key].shape) != shape:
            problems.append(f"{path}: tensor {key} has shape "
                            f"{list(checkpoint.tensors[key].shape)}, the model needs {shape}")
    if lacking:  # one line for all of them: another expert count lacks hundreds
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        problems.append(f"{path} lacks tensor {', '.join(lacking[:3])}{more}")
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
    local_problems = _problems(checkpoint, model, source)
    tensors = lora_tensors(model)
    # The expected key set spans every pipeline stage and expert-parallel rank; each rank
    # knows only its own layers and experts.
    expected, problems = set(), []
    for keys, rank_problems in _all_gather_objects((set(tensors), local_problems)):
        expected |= keys
        problems += [p for p in rank_problems if p not in problems]
    extra = sorted(set(checkpoint.tensors) - expected)
    if extra:
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        problems.append(f"{source} holds tensor(s) the model has no adapter for: "
                        f"{extra[:8]}{more}")
    if problems:
        raise ValueError(f"cannot load adapter from {source}: " + "; ".join(problems))
    with torch.no_grad():
        for key, (param, module) in tensors.items():
            param.copy_(sharding.local_shard(checkpoint.tensors[key], param, module.lora_tp_group))
