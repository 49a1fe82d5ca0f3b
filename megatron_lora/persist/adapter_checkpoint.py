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

from lora_common.state import require_state
from megatron_lora.interop.adapter_file import (
    AdapterCheckpoint,
    read_lora_checkpoint,
    write_adapter_checkpoint,
)
from megatron_lora.layers import sharding
from megatron_lora.modules import config_and_geometry, lora_modules, lora_tensors
from megatron_lora.sync.adapter_tensors import adapter_state, full_adapter_tensors
from megatron_lora.sync.gather import all_gather_objects, gather_to_rank0

# Fields of LoRAConfig that change what an adapter computes; a checkpoint must agree on them.
FUNCTIONAL_FIELDS = ("r", "alpha", "use_rslora", "target_modules", "expert_layout", "canonical")


def gather_adapter(model) -> AdapterCheckpoint | None:
    """The model's adapters as full tensors named by their place in the unsplit model, with
    config and geometry: on rank 0; None on the other ranks. Call on every rank."""
    config, geometry = config_and_geometry(model, lora_modules(model))
    # TP-gathered (an expert's over expert-TP: the adapter sync's producer, reading the live
    # parameters); pipeline stages and expert-parallel ranks hold different adapters, so each
    # rank's contribution travels to rank 0 (replicas contribute none).
    tensors = gather_to_rank0(full_adapter_tensors(adapter_state(model), model))
    return None if tensors is None else AdapterCheckpoint(tensors, config, geometry)


def save_lora_checkpoint(model, path: str | Path) -> None:
    """Write the adapters (gathered over TP and PP to rank 0) and the header to `path`.
    Call on every rank, like a collective."""
    checkpoint = gather_adapter(model)
    if checkpoint is not None:
        write_adapter_checkpoint(checkpoint, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _problems(checkpoint: AdapterCheckpoint, model, path: str) -> list[str]:
    """Every way the checkpoint does not fit this rank's part of the model (the caller names
    the file once, in front of them all)."""
    config, geometry = config_and_geometry(model, lora_modules(model))
    problems = []
    for field in FUNCTIONAL_FIELDS:
        mine, theirs = getattr(config, field), getattr(checkpoint.config, field)
        if mine != theirs:
            problems.append(f"LoRAConfig.{field} is {mine!r} in the model, {theirs!r} in {path}")
    try:
        checkpoint.geometry.require_equal(geometry, "the model")
    except ValueError as error:
        problems.append(str(error))
    lacking = []
    for key, (param, module) in lora_tensors(model).items():
        if key not in checkpoint.tensors:
            lacking.append(key)
            continue
        shape = sharding.full_shape(param, module.lora_tp_group)
        if list(checkpoint.tensors[key].shape) != shape:
            problems.append(f"tensor {key} has shape "
                            f"{list(checkpoint.tensors[key].shape)}, the model needs {shape}")
    if lacking:  # one line for all of them: another expert count lacks hundreds
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        problems.append(f"it lacks tensor {', '.join(lacking[:3])}{more}")
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
    for keys, rank_problems in all_gather_objects((set(tensors), local_problems)):
        expected |= keys
        problems += [p for p in rank_problems if p not in problems]
    extra = sorted(set(checkpoint.tensors) - expected)
    if extra:
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        problems.append(f"it holds tensor(s) the model has no adapter for: "
                        f"{extra[:8]}{more}")
    if problems:
        raise ValueError(f"cannot load adapter from {source}: " + "; ".join(problems))
    with torch.no_grad():
        for key, (param, module) in tensors.items():
            param.copy_(sharding.local_shard(checkpoint.tensors[key], param, module.lora_tp_group))
