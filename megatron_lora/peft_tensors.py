"""The adapter as a rollout engine (or a PEFT folder) wants it: HF PEFT names, full tensors,
and the `adapter_config` dict, read from a trainer's own `{name: tensor}` mapping.

    for key, tensor in iter_peft_tensors(backup, model):   # every rank iterates (TP gathers)
        ...   # "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": full tensor
    adapter = gather_peft_adapter(backup, model)            # rank 0: PeftTensors; else None

`iter_peft_tensors` yields this rank's contribution: on the first TP / data-parallel rank of each
pipeline stage, that stage's layers (global indices), fused layers split as PEFT adapts them
(`linear_qkv` -> q/k/v, `linear_fc1` -> gate/up: `interop/peft_export.peft_modules`, the code the
offline export runs); nothing elsewhere. `gather_peft_adapter` brings every stage's contribution
to rank 0 with the config. `export_peft_adapter(model, ...)` writes exactly what
`gather_peft_adapter` returns for the model's own parameters: export and sync cannot diverge.

Only adapter tensors move, and only the TP-split one of each pair (`adapter_tensors.py`): a
Qwen3-8B adapter of r=16 on every linear is 0.53% of the model's bytes in this form
(`benchmarks/sync_bytes.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lora_common.peft_files import adapter_tensor_key
from megatron_lora.adapter_checkpoint import config_and_geometry, gather_to_rank0
from megatron_lora.adapter_tensors import full_adapter_tensors
from megatron_lora.interop.adapter_file import AdapterCheckpoint
from megatron_lora.interop.peft_export import peft_config, peft_modules
from megatron_lora.model import lora_modules


@dataclass(frozen=True)
class PeftTensors:
    """A PEFT adapter in memory: `adapter_config.json` as a dict, and `{HF module name: (A [r,
    in], B [out, r])}` (full tensors, on the CPU)."""

    config: dict[str, Any]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The PEFT tensor keys and values, as `adapter_model.safetensors` holds them."""
        return dict(_keyed(self.modules.items()))


def _keyed(modules) -> Iterator[tuple[str, torch.Tensor]]:
    for module, (A, B) in modules:
        yield adapter_tensor_key(module, "A"), A
        yield adapter_tensor_key(module, "B"), B


def _partial_checkpoint(tensors: Mapping[str, torch.Tensor], model) -> AdapterCheckpoint:
    """This rank's full adapter tensors with the model's config and geometry: an adapter
    checkpoint of some of the layers, which is all the PEFT split of a module needs."""
    config, geometry = config_and_geometry(lora_modules(model))
    return AdapterCheckpoint(full_adapter_tensors(tensors, model), config, geometry)


def iter_peft_modules(tensors: Mapping[str, torch.Tensor], model
                      ) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's contribution as `(HF module name, (A, B))`. Collective over TP: the gathers
    run before the first item, so a consumer may stop early."""
    yield from peft_modules(_partial_checkpoint(tensors, model)).items()


def iter_peft_tensors(tensors: Mapping[str, torch.Tensor], model
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's contribution of the adapter under HF PEFT tensor keys
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), full CPU tensors in
    the trainer's dtype. `tensors`: this rank's shards by name (live parameters or slime's CPU
    backup; adapters under any prefix, global layer indices). Call on every rank."""
    yield from _keyed(iter_peft_modules(tensors, model))


def gather_peft_adapter(tensors: Mapping[str, torch.Tensor], model, *,
                        base_model_name_or_path: str | None = None,
                        task_type: str = "CAUSAL_LM") -> PeftTensors | None:
    """The whole adapter as PEFT holds it, on rank 0 (None elsewhere): every pipeline stage's
    contribution and the `adapter_config` dict PEFT writes for it. Call on every rank."""
    checkpoint = _partial_checkpoint(tensors, model)
    modules = gather_to_rank0(peft_modules(checkpoint))
    if modules is None:
        return None
    config = peft_config(checkpoint, modules, base_model_name_or_path=base_model_name_or_path,
                         task_type=task_type)
    return PeftTensors(config, modules)
