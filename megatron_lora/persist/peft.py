"""PEFT adapters in and out of a live Megatron LoRA model (the conversions themselves are
`interop/peft_export.py` and `interop/peft_import.py`).

    export_peft_adapter(model, "out/peft")                      # live, any TP/PP; every rank calls
    export_peft_adapter("ckpt/adapter.safetensors", "out/peft") # offline, no model, no GPU
    config = import_peft_adapter(model, "path/to/peft_adapter") # every rank calls
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lora_common import LoRAConfig
from lora_common.peft_files import read_peft_adapter, write_peft_adapter
from lora_common.rollback import restored_on_error
from lora_common.state import require_state
from megatron_lora.adapt.apply import apply_lora_to_megatron_model, check_model_supports
from megatron_lora.interop import architectures, hf_experts
from megatron_lora.interop.adapter_file import AdapterCheckpoint, read_lora_checkpoint
from megatron_lora.interop.adapter_keys import DENSE, EXPERTS, parse_adapter_key
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.peft_export import (
    architecture_warnings,
    export_checkpoint,
    warn_serving_rank,
)
from megatron_lora.interop.peft_import import fuse_peft_adapter
from megatron_lora.interop.peft_import_canonical import peft_adapter_per_projection
from megatron_lora.modules import lora_modules, model_config
from megatron_lora.persist.adapter_checkpoint import load_adapter
from megatron_lora.sync.adapter_tensors import adapter_state
from megatron_lora.sync.gather import raise_on_every_rank
from megatron_lora.sync.peft_tensors import gather_peft_adapter


def export_peft_adapter(source, out_dir: str | Path, *,
                        base_model_name_or_path: str | None = None,
                        architecture: str = "LlamaForCausalLM",
                        task_type: str = "CAUSAL_LM", expand_shared: bool = False) -> None:
    """Export a live Megatron LoRA model (call on every rank; rank 0 writes) or an adapter
    checkpoint file (offline) as a PEFT adapter folder. `architecture` names the HF model the
    adapter is for: the Llama family (Llama, Mistral, Qwen2, Qwen3), the MoE Qwen3-MoE and
    Mixtral, and DeepseekV3ForCausalLM (multi-latent attention: each MLA linear maps 1:1).
    Experts' shared-outer factors go once in SGLang's form, or into every expert with
    `expand_shared` (vLLM, PEFT)."""
    arch = architectures.architecture(architecture)  # an unknown architecture is refused by name
    if isinstance(source, (str, Path)):
        checkpoint = read_lora_checkpoint(source)
        export_checkpoint(checkpoint, out_dir,
                          base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                          architecture=arch.name, expand_shared=expand_shared)
        _warn_architecture(arch, checkpoint.config)  # once the export fits the architecture
        return
    # what rank 0 would refuse, refused on every rank (the others wait in a barrier)
    _check_exportable(source, arch)
    # Live: exactly what the adapter sync sends (gather_peft_adapter), read from the model's
    # own parameters.
    adapter = gather_peft_adapter(adapter_state(source), source,
                                  base_model_name_or_path=base_model_name_or_path,
                                  task_type=task_type, architecture=arch.name,
                                  expand_shared=expand_shared)
    if adapter is not None:
        _warn_architecture(arch, next(iter(lora_modules(source).values())).lora_config)
        warn_serving_rank(adapter.config["r"], stacklevel=3)
        write_peft_adapter(out_dir, adapter.config, adapter.modules, adapter.shared)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _warn_architecture(arch, config: LoRAConfig) -> None:
    for note in architecture_warnings(arch, config.target_modules):
        warnings.warn(f"export_peft_adapter: {note}", stacklevel=4)


def _megatron_targets(tensors, moe: bool) -> list[str]:
    """The target entries selecting exactly the fused tensors' modules: Megatron's names in a
    dense model; in an MoE model, `experts.` / `mlp.` in front of the MLP targets, so dense and
    expert MLPs are told apart."""
    targets = set()
    for key in tensors:
        k = parse_adapter_key(key)
        prefix = {EXPERTS: "experts.", DENSE: "mlp."}.get(k.kind, "") if moe else ""
        targets.add(prefix + k.target)
    return sorted(targets)


def _check_exportable(model, arch) -> None:
    if Geometry.from_megatron(model_config(model)).num_moe_experts and arch.moe is None:
        hf_experts.require_experts(arch)
    shared = [name for name in lora_modules(model) if ".shared_experts." in name]
    if shared and arch.shared_experts is None:
        raise ValueError(f"{arch.name} has no shared experts: the adapter of {shared[0]} has no "
                         f"HF counterpart (leave shared_experts out of target_modules)")


def _geometry(model) -> Geometry:
    try:
        return Geometry.from_megatron(model_config(model))
    except ValueError as error:
        raise ValueError(f"import_peft_adapter: {error}") from None


def import_peft_adapter(model, adapter_dir: str | Path, canonical: bool | None = None
                        ) -> LoRAConfig:
    """Load a PEFT LoRA adapter (made for the HF twin of this model) into a Megatron model at
    any TP/PP size, exactly, and return the LoRA config it now carries. The model may carry no
    LoRA yet, or LoRA of another rank (it is rebuilt). Call on every rank. Bad input (unknown
    keys, shapes or layers that do not fit the model) raises `ValueError` naming the key; a
    refused import leaves every module, parameter and `requires_grad` as it was (what only a
    rebuilt adapter can reveal is checked inside `restored_on_error`).

    `canonical=True`: each PEFT module's adapter becomes its projection's own adapter, at
    PEFT's rank (`interop/peft_import_canonical.py`): PEFT's model, also once it trains.
    `canonical=False`: q/k/v (gate/up) fuse into one adapter of the stacked rank with a
    block-structured B (`interop/peft_import.py`): PEFT's function, not its training. None:
    the mode of the LoRA the model carries, else `LoRAConfig`'s default (fused)."""
    source = str(adapter_dir)
    existing = lora_modules(model)
    if existing:  # the adapters may be rebuilt below: refuse a merged model before that
        require_state(existing, "import_peft_adapter", merged=False, model=model)
    existing = list(existing.values())
    previous = existing[0].lora_config if existing else LoRAConfig()
    canonical = previous.canonical if canonical is None else canonical
    adapter = read_peft_adapter(adapter_dir)
    geometry = _geometry(model)
    mla = getattr(model_config(model), "multi_latent_attention", False)
    attention = "mla" if mla else "standard"
    if canonical:
        if adapter.shared or geometry.num_moe_experts:
            raise ValueError(f"import_peft_adapter({source}, canonical=True): canonical LoRA "
                             f"covers dense models; import an MoE adapter with canonical=False")
        tensors, target_modules = peft_adapter_per_projection(adapter, geometry, source, attention)
        rank, alpha = adapter.config["r"], adapter.config["lora_alpha"]
        layout = previous.expert_layout
    else:
        tensors, rank, alpha, layout = fuse_peft_adapter(adapter, geometry, source, attention)
        target_modules = _megatron_targets(tensors, moe=bool(geometry.num_moe_experts))
    config = LoRAConfig(
        r=rank, alpha=alpha, dropout=float(adapter.config.get("lora_dropout") or 0.0),
        target_modules=target_modules, canonical=canonical,
        use_rslora=bool(adapter.config.get("use_rslora", False)),
        init="gaussian" if adapter.config.get("init_lora_weights") == "gaussian" else "kaiming",
        only_trainable=previous.only_trainable, seed=previous.seed, expert_layout=layout)
    check_model_supports(model, config)
    # All or nothing: what only a built adapter can tell (a target matching no module, an MLA
    # adapter's shape, a model wrapped in DDP that cannot take new adapters) refuses the import
    # with the model's LoRA modules and adapters put back as they were.
    with restored_on_error(model):
        if not existing or any(module.lora_config != config for module in existing):
            for module in existing:  # another rank or target set: rebuild the adapters
                module.remove_lora()
            refusal = None
            try:
                apply_lora_to_megatron_model(model, config)
            except (ValueError, TypeError) as error:  # say which verb refused
                refusal = type(error)(f"import_peft_adapter({source}): {error}")
            # a pipeline stage may refuse alone; every rank refuses before the load's gathers
            raise_on_every_rank(refusal)
        load_adapter(model, AdapterCheckpoint(tensors, config, geometry), source)
    return config
