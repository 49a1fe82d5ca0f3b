"""Megatron adapters -> HuggingFace PEFT adapters, which vLLM and SGLang serve: the
conversion of full (gathered) adapter tensors, with no model and no Megatron import, so the
offline export (`megatron-lora export-peft`) runs anywhere. The verb on a live model is
`megatron_lora.export_peft_adapter` (`megatron_lora/peft.py`).

Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`; PEFT adapts them apart.
A fused adapter splits exactly: `B_fused @ A` restricted to q's rows is `B_q @ A`, so q, k and
v each get the fused A (copied) and their rows of the fused B, read with Megatron's per-group
layout `[q heads of group g; k_g; v_g]` (`hf_mapping.split_qkv`). The split runs on full
tensors, after the TP gather, where fc1's B is `[gate; up]` again. A canonical adapter
(`linear_qkv.lora_q`) is already its HF module's: it is written as it is, at its own rank.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lora_common.peft_files import adapter_config_dict, write_peft_adapter
from megatron_lora.interop import hf_mapping
from megatron_lora.interop.adapter_file import AdapterCheckpoint

# vLLM serves adapters of rank <= its --max-lora-rank, which defaults to 16 and must be one of
# these values (vLLM's LoRAConfig); SGLang has a --max-lora-rank too.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def peft_modules(checkpoint: AdapterCheckpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name -> (A, B) for every adapter in a Megatron adapter checkpoint."""
    adapters = {}
    for key in checkpoint.tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        layer, target, projection = hf_mapping.parse_megatron_adapter(module)
        A = checkpoint.tensors[key]
        B = checkpoint.tensors[f"{module}.lora_B.weight"]
        if projection is not None:  # canonical: one projection's own adapter
            adapters[hf_mapping.hf_projection_module(layer, target, projection)] = (A, B)
            continue
        parts = hf_mapping.split_target(target, B, checkpoint.geometry)
        for name, part in zip(hf_mapping.hf_module_names(layer, target), parts):
            adapters[name] = (A.clone(), part.contiguous())
    return adapters


def serving_warnings(r: int) -> list[str]:
    """What a serving engine will say about rank `r`."""
    if r <= VLLM_DEFAULT_MAX_LORA_RANK:
        return []
    fitting = [m for m in VLLM_MAX_LORA_RANKS if m >= r]
    if not fitting:
        return [f"rank {r} is above the largest --max-lora-rank vLLM accepts "
                f"({VLLM_MAX_LORA_RANKS[-1]}): vLLM cannot serve this adapter"]
    return [f"rank {r} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
            f"serve with vLLM --max-lora-rank {fitting[0]} (SGLang: --max-lora-rank {r} or more)"]


def architecture_warnings(architecture: hf_mapping.Architecture, targets) -> list[str]:
    """What real PEFT will do differently with an export for `architecture`."""
    mlp = sorted(t for t in targets if t.startswith(("linear_fc1", "linear_fc2")))
    if architecture.attention != "mla" or not mlp:
        return []
    return [f"{architecture.name}: PEFT (with transformers 5) re-targets gate_proj / up_proj / "
            f"down_proj to the fused MoE experts' parameters, so a PeftModel ignores the "
            f"adapters of {', '.join(mlp)} on the dense layers (the attention adapters load)"]


def export_checkpoint(checkpoint: AdapterCheckpoint, out_dir: str | Path, *,
                      base_model_name_or_path: str | None = None,
                      task_type: str = "CAUSAL_LM") -> dict:
    """Write `checkpoint` as a PEFT adapter folder; returns the adapter_config written."""
    adapters = peft_modules(checkpoint)
    targets = checkpoint.config.target_modules
    # Modules of a target that carry no adapter (excluded in Megatron) are excluded in PEFT too,
    # so PEFT adapts exactly the modules that have tensors.
    excluded = [name for layer in range(checkpoint.geometry.num_layers) for target in targets
                for name in hf_mapping.hf_module_names(layer, target) if name not in adapters]
    config = adapter_config_dict(
        checkpoint.config, hf_mapping.hf_target_modules(targets), exclude_modules=excluded,
        task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    for note in serving_warnings(checkpoint.config.r):
        warnings.warn(f"export_peft_adapter: {note}", stacklevel=3)
    write_peft_adapter(out_dir, config, adapters)
    return config
