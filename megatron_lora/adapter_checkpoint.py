"""Adapter-only checkpoints: the LoRA tensors, full and unsharded, in one safetensors file.

    save_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; rank 0 writes
    load_lora_checkpoint(model, "run/adapter.safetensors")   # every rank calls; any TP/PP size

Tensor names are the adapters' places in the unsplit model
(`decoder.layers.3.mlp.linear_fc1.lora_B.weight`), whatever the TP, PP or virtual-pipeline
split. The safetensors metadata carries a JSON header: the `LoRAConfig`, the model geometry
(enough to split fused adapters offline, e.g. for a PEFT export) and a SHA-256 of every tensor,
so a corrupted file is detected instead of loaded as garbage. The file is written atomically:
a process killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_common import LoRAConfig
from lora_common.atomic import atomic_save_safetensors
from megatron_lora import sharding
from megatron_lora.hf_layout import Geometry
from megatron_lora.lora_layer import canonical_lora_modules, model_chunks

FORMAT = "megatron-lora-adapter"
FORMAT_VERSION = 1
HEADER_KEY = "megatron_lora"
# Fields of LoRAConfig that change what an adapter computes; a checkpoint must agree on them.
FUNCTIONAL_FIELDS = ("r", "alpha", "use_rslora", "target_modules")


@dataclass(frozen=True)
class AdapterCheckpoint:
    """An adapter checkpoint read into memory: full tensors by name, and its header."""

    tensors: dict[str, torch.Tensor]
    config: LoRAConfig
    geometry: Geometry


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


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
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    return {name: module for chunk in model_chunks(model)
            for name, module in canonical_lora_modules(chunk)}


def _config_and_geometry(modules: dict) -> tuple[LoRAConfig, Geometry]:
    if not modules:
        raise ValueError("the model has no LoRA modules")
    first = next(iter(modules.values()))
    return first.lora_config, Geometry.from_megatron(first.config)


def save_lora_checkpoint(model, path: str | Path) -> None:
    """Write the adapters (gathered over TP and PP to rank 0) and the header to `path`.
    Call on every rank, like a collective."""
    modules = _lora_modules(model)
    config, geometry = _config_and_geometry(modules)
    tensors = {}
    for name, module in modules.items():
        for matrix in ("lora_A", "lora_B"):
            param = getattr(module, matrix).weight
            tensors[f"{name}.{matrix}.weight"] = sharding.full_tensor(param, module.tp_group).cpu()
    # Pipeline stages hold different layers; TP ranks (after the gather) and data-parallel
    # replicas hold the same ones: one copy of each travels to rank 0.
    gathered = {}
    for received in _gather_to_rank0(tensors if _is_first_replica() else {}):
        gathered.update(received)
    _, rank = _world()
    if rank == 0:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "lora_config": config.to_dict(), "geometry": geometry.to_dict(),
                  "sha256": {name: _digest(t) for name, t in sorted(gathered.items())}}
        atomic_save_safetensors(gathered, path, metadata={HEADER_KEY: json.dumps(header)})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_lora_checkpoint(path: str | Path) -> AdapterCheckpoint:
    """Read and verify an adapter checkpoint (no model needed). Raises `ValueError` naming the
    file and the problem: unreadable or truncated file, foreign format, a tensor whose bytes do
    not match the recorded SHA-256."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: no megatron-lora header; not an adapter checkpoint") from error
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
    digests = header.get("sha256", {})
    if sorted(digests) != sorted(tensors):
        raise ValueError(f"{path}: header lists tensors {sorted(set(digests) ^ set(tensors))} "
                         f"that the file does not hold, or the reverse")
    for name, tensor in tensors.items():
        if _digest(tensor) != digests[name]:
            raise ValueError(f"{path}: tensor {name} is corrupted (SHA-256 mismatch)")
    return AdapterCheckpoint(tensors, LoRAConfig.from_dict(header["lora_config"]),
                             Geometry.from_dict(header["geometry"]))


def _problems(checkpoint: AdapterCheckpoint, modules: dict, path: Path) -> list[str]:
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
        for matrix in ("lora_A", "lora_B"):
            key = f"{name}.{matrix}.weight"
            if key not in checkpoint.tensors:
                problems.append(f"{path} lacks tensor {key}")
                continue
            param = getattr(module, matrix).weight
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False) and module.tp_group is not None:
                shape[param.partition_dim] *= module.tp_group.size()
            if list(checkpoint.tensors[key].shape) != shape:
                problems.append(f"{path}: tensor {key} has shape "
                                f"{list(checkpoint.tensors[key].shape)}, the model needs {shape}")
    return problems


def load_lora_checkpoint(model, path: str | Path) -> None:
    """Load an adapter checkpoint into the model's LoRA parameters, at any TP/PP size. Call on
    every rank. Every mismatch (config, geometry, a missing or extra tensor, a shape) raises
    `ValueError` naming it on every rank, before any parameter is touched."""
    path = Path(path)
    checkpoint = read_lora_checkpoint(path)
    modules = _lora_modules(model)
    local_problems = _problems(checkpoint, modules, path)
    # The expected key set spans every pipeline stage; each rank knows only its own layers.
    expected, problems = set(), []
    for keys, rank_problems in _all_gather_objects(
            ({f"{n}.{m}.weight" for n in modules for m in ("lora_A", "lora_B")}, local_problems)):
        expected |= keys
        problems += [p for p in rank_problems if p not in problems]
    extra = sorted(set(checkpoint.tensors) - expected)
    if extra:
        problems.append(f"{path} holds tensor(s) the model has no adapter for: {extra}")
    if problems:
        raise ValueError("cannot load adapter checkpoint: " + "; ".join(problems))
    with torch.no_grad():
        for name, module in modules.items():
            for matrix in ("lora_A", "lora_B"):
                param = getattr(module, matrix).weight
                full = checkpoint.tensors[f"{name}.{matrix}.weight"]
                param.copy_(sharding.local_shard(full, param, module.tp_group))
