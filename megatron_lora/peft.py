"""PEFT adapters in and out of a live Megatron LoRA model (the conversions themselves are
`interop/peft_export.py` and `interop/peft_import.py`).

    export_peft_adapter(model, "out/peft")                      # live, any TP/PP; every rank calls
    export_peft_adapter("ckpt/adapter.safetensors", "out/peft") # offline, no model, no GPU
    config = import_peft_adapter(model, "path/to/peft_adapter") # every rank calls
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.peft_files import read_peft_adapter, write_peft_adapter
from lora_common.state import require_state
from megatron_lora.adapter_checkpoint import load_adapter
from megatron_lora.adapter_tensors import adapter_state
from megatron_lora.apply import apply_lora_to_megatron_model
from megatron_lora.interop import hf_mapping
from megatron_lora.interop.adapter_file import AdapterCheckpoint, read_lora_checkpoint
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.peft_export import export_checkpoint, warn_serving_rank
from megatron_lora.interop.peft_import import fuse_peft_adapter
from megatron_lora.model import lora_modules, model_chunks
from megatron_lora.peft_tensors import gather_peft_adapter


def export_peft_adapter(source, out_dir: str | Path, *,
                        base_model_name_or_path: str | None = None,
                        architecture: str = "LlamaForCausalLM",
                        task_type: str = "CAUSAL_LM") -> None:
    """Export a live Megatron LoRA model (call on every rank; rank 0 writes) or an adapter
    checkpoint file (offline) as a PEFT adapter folder. `architecture` names the HF model the
    adapter is for; the Llama family (Llama, Mistral, Qwen2, Qwen3) shares one layout."""
    hf_mapping.architecture(architecture)  # an unknown architecture is refused by name
    if isinstance(source, (str, Path)):
        export_checkpoint(read_lora_checkpoint(source), out_dir,
                          base_model_name_or_path=base_model_name_or_path, task_type=task_type)
        return
    # Live: exactly what the adapter sync sends (gather_peft_adapter), read from the model's
    # own parameters.
    adapter = gather_peft_adapter(adapter_state(source), source,
                                  base_model_name_or_path=base_model_name_or_path,
                                  task_type=task_type)
    if adapter is not None:
        warn_serving_rank(adapter.config["r"], stacklevel=3)
        write_peft_adapter(out_dir, adapter.config, adapter.modules)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _geometry(model) -> Geometry:
    for chunk in model_chunks(model):
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "num_attention_heads"):
                return Geometry.from_megatron(config)
    raise ValueError("import_peft_adapter: found no TransformerConfig in the model")


def import_peft_adapter(model, adapter_dir: str | Path) -> LoRAConfig:
    """Load a PEFT LoRA adapter (made for the HF twin of this model) into a Megatron model at
    any TP/PP size, exactly, and return the LoRA config it now carries. The model may carry no
    LoRA yet, or LoRA of another rank (it is rebuilt). Call on every rank. Bad input (unknown
    keys, shapes or layers that do not fit the model) raises `ValueError` naming the key,
    before the model is touched."""
    source = str(adapter_dir)
    existing = lora_modules(model)
    if existing:  # the adapters may be rebuilt below: refuse a merged model before that
        require_state(existing, "import_peft_adapter", merged=False, model=model)
    adapter = read_peft_adapter(adapter_dir)
    geometry = _geometry(model)
    tensors, rank, alpha = fuse_peft_adapter(adapter, geometry, source)
    targets = {hf_mapping.parse_megatron_module(k.rsplit(".lora_", 1)[0])[1] for k in tensors}
    existing = list(existing.values())
    previous = existing[0].lora_config if existing else LoRAConfig()
    config = LoRAConfig(
        r=rank, alpha=alpha, dropout=float(adapter.config.get("lora_dropout") or 0.0),
        target_modules=[t for t in MEGATRON_TARGET_MODULES if t in targets],
        use_rslora=bool(adapter.config.get("use_rslora", False)),
        init="gaussian" if adapter.config.get("init_lora_weights") == "gaussian" else "kaiming",
        only_trainable=previous.only_trainable, seed=previous.seed)
    if any(module.lora_config != config for module in existing):
        for module in existing:  # another rank or target set: rebuild the adapters
            module.remove_lora()
    apply_lora_to_megatron_model(model, config)
    load_adapter(model, AdapterCheckpoint(tensors, config, geometry), source)
    return config
