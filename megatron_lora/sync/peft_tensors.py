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
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state

from lora_common.peft_files import adapter_tensor_key
from megatron_lora.interop.adapter_file import AdapterCheckpoint
from megatron_lora.interop.peft_export import peft_config, peft_modules
from megatron_lora.modules import config_and_geometry, lora_modules
from megatron_lora.sync.adapter_tensors import full_adapter_tensors
from megatron_lora.sync.gather import gather_to_rank0, raise_on_every_rank


@dataclass(frozen=True)
class PeftTensors:
    """A PEFT adapter in memory: `adapter_config.json` as a dict, `{HF module name: (A [r, in],
    B [out, r])}` (full tensors, on the CPU), and, for MoE experts that share a factor
    (`shared_outer`, unexpanded), `{...experts.<module>: ([1, r, in] A or None, [1, out, r] B
    or None)}` in SGLang's form, the experts' own entries then holding None for it."""

    config: dict[str, Any]
    modules: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    shared: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The PEFT tensor keys and values, as `adapter_model.safetensors` holds them."""
        return dict(_keyed([*self.shared.items(), *self.modules.items()]))


def _keyed(modules) -> Iterator[tuple[str, torch.Tensor]]:
    for module, (A, B) in modules:
        if A is not None:
            yield adapter_tensor_key(module, "A"), A
        if B is not None:
            yield adapter_tensor_key(module, "B"), B


def _partial_checkpoint(tensors: Mapping[str, torch.Tensor], model) -> AdapterCheckpoint:
    """This rank's full adapter tensors with the model's config and geometry: an adapter
    checkpoint of some of the layers (and experts), which is all the PEFT split of a module
    needs."""
    config, geometry = config_and_geometry(model, lora_modules(model))
    full = full_adapter_tensors(tensors, model, beside_experts=True)
    return AdapterCheckpoint(full, config, geometry)


def _peft_modules(tensors, model, architecture: str, expand_shared: bool):
    """`peft_modules` of this rank's contribution; the experts' shared factors (which every
    expert-parallel rank needs for its experts) are contributed by expert-parallel rank 0."""
    checkpoint = _partial_checkpoint(tensors, model)
    try:  # refused on every rank, before the gathers of gather_peft_adapter
        (adapters, shared), error = peft_modules(checkpoint, architecture, expand_shared), None
    except ValueError as refusal:
        error = refusal
    raise_on_every_rank(error)
    if parallel_state.model_parallel_is_initialized() and \
            parallel_state.get_expert_model_parallel_rank() != 0:
        shared = {}
    return checkpoint, adapters, shared


def iter_peft_modules(tensors: Mapping[str, torch.Tensor], model, *,
                      architecture: str = "LlamaForCausalLM", expand_shared: bool = False
                      ) -> Iterator[tuple[str, tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """This rank's contribution as `(HF module name, (A, B))`, the experts' shared factors first.
    Collective over TP: the gathers run before the first item, so a consumer may stop early."""
    _, adapters, shared = _peft_modules(tensors, model, architecture, expand_shared)
    yield from shared.items()
    yield from adapters.items()


def iter_peft_tensors(tensors: Mapping[str, torch.Tensor], model, *,
                      architecture: str = "LlamaForCausalLM", expand_shared: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's contribution of the adapter under HF PEFT tensor keys
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`; routed experts
    `...mlp.experts.{global e}.gate_proj...`), full CPU tensors in the trainer's dtype.
    `tensors`: this rank's shards by name (live parameters or slime's CPU backup; adapters under
    any prefix, global layer and expert indices). Call on every rank."""
    yield from _keyed(iter_peft_modules(tensors, model, architecture=architecture,
                                        expand_shared=expand_shared))


def gather_peft_adapter(tensors: Mapping[str, torch.Tensor], model, *,
                        base_model_name_or_path: str | None = None,
                        task_type: str = "CAUSAL_LM", architecture: str = "LlamaForCausalLM",
                        expand_shared: bool = False) -> PeftTensors | None:
    """The whole adapter as PEFT holds it, on rank 0 (None elsewhere): every pipeline stage's
    (and expert-parallel rank's) contribution and the `adapter_config` dict PEFT writes for it.
    Call on every rank."""
    checkpoint, adapters, shared = _peft_modules(tensors, model, architecture, expand_shared)
    # every layer's and expert's modules, and the checkpoint keys they came from (the config's
    # exclusions are per dense target)
    adapters, shared = gather_to_rank0(adapters), gather_to_rank0(shared)
    keys = gather_to_rank0(dict.fromkeys(checkpoint.tensors))
    if adapters is None:
        return None
    config = peft_config(checkpoint, keys, adapters, shared,
                         base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    return PeftTensors(config, adapters, shared)
