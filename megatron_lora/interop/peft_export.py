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

MoE routed experts export per expert (`hf_experts.py`): `mlp.experts.{e}.gate_proj` and so on,
(shared experts, where the architecture has them, as its `mlp.shared_experts.gate_proj`, ...),
with the global expert index, the form SGLang and vLLM serve and PEFT converts for
transformers 5. With `shared_outer` adapters the factors the experts share are written once in
SGLang's form (`mlp.experts.gate_proj.lora_A.weight` `[1, r, H]`), or, with
`expand_shared=True`, copied into every expert (the per-expert form vLLM and PEFT read: the same
model, bigger file).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lora_common.config import MEGATRON_TARGET_MODULES
from lora_common.peft_files import adapter_config_dict, write_peft_adapter
from lora_common.targets import PROJECTIONS
from megatron_lora.interop import architectures, hf_experts, hf_mapping
from megatron_lora.interop.adapter_file import AdapterCheckpoint
from megatron_lora.interop.adapter_keys import DENSE, EXPERTS, SHARED_EXPERTS, parse_adapter_key

# vLLM serves adapters of rank <= its --max-lora-rank, which defaults to 16 and must be one of
# these values (vLLM's LoRAConfig); SGLang has a --max-lora-rank too.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


Pair = tuple  # (A or None, B or None)


def peft_modules(checkpoint: AdapterCheckpoint, architecture: str = "LlamaForCausalLM",
                 expand_shared: bool = True) -> tuple[dict[str, Pair], dict[str, Pair]]:
    """(HF module name -> (A, B), shared expert module -> ([1, ...] A or None, B or None)) for
    every adapter in a Megatron adapter checkpoint. Without `expand_shared`, an expert's factor
    shared by the layer's experts is None in the first dict and given once in the second."""
    arch = architectures.architecture(architecture)
    if checkpoint.geometry.num_moe_experts and arch.moe is None:
        hf_experts.require_experts(arch)
    require_targets_of(arch, checkpoint.config.target_modules or MEGATRON_TARGET_MODULES)
    units: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, tensor in checkpoint.tensors.items():
        k = parse_adapter_key(key)
        if k.kind == DENSE and not arch.dense_mlp:
            raise ValueError(f"{arch.name} has no dense MLP (every layer's MLP is MoE): the "
                             f"adapter of {k.module} has no HF counterpart")
        units.setdefault((k.layer, k.kind, k.target, k.expert, k.projection), {})[k.matrix] = tensor
    adapters, shared = {}, {}
    for (layer, kind, target, expert, projection), matrices in sorted(units.items(),
                                                                      key=_unit_order):
        if kind == SHARED_EXPERTS:
            if arch.shared_experts is None:
                raise ValueError(f"{arch.name} has no shared experts: the adapter of "
                                 f"decoder.layers.{layer}.mlp.shared_experts.{target} has no HF "
                                 f"counterpart (leave shared_experts out of target_modules)")
            A, B = matrices["A"], matrices["B"]
            parts = hf_mapping.split_fc1(B) if target == "linear_fc1" else (B,)
            for name, part in zip(hf_experts.shared_module_names(arch, layer, target), parts,
                                  strict=True):
                adapters[name] = (A.clone(), part.contiguous())
            continue
        if projection is not None:  # canonical: one projection's own adapter, as it is
            adapters[hf_mapping.hf_projection_module(layer, target, projection)] = (
                matrices["A"], matrices["B"])
            continue
        if kind != EXPERTS:
            A, B = matrices["A"], matrices["B"]
            parts = hf_mapping.split_target(target, B, checkpoint.geometry)
            for name, part in zip(hf_mapping.hf_module_names(layer, target), parts, strict=True):
                adapters[name] = (A.clone(), part.contiguous())
            continue
        names = hf_experts.require_experts(arch)
        if expert is None:  # shared by the experts: written once (SGLang) or into each expert
            if not expand_shared:
                for name in hf_experts.module_names(names, layer, target, None):
                    shared[name] = _shared_pair(matrices)
            continue
        common = units.get((layer, kind, target, None, None), {})
        A, B = matrices.get("A", common.get("A")), matrices.get("B", common.get("B"))
        B_parts = hf_mapping.split_fc1(B) if target == "linear_fc1" else (B,)
        modules = hf_experts.module_names(names, layer, target, expert)
        for name, part in zip(modules, B_parts, strict=True):
            adapters[name] = (None if "A" in common and not expand_shared else A.clone(),
                              None if "B" in common and not expand_shared else part.clone())
    return adapters, shared


# Targets of one attention kind only: an adapter on them has no module in the other kind's HF
# architecture (HF's q_proj is a third of linear_qkv in one, MLA's uncompressed q in the other).
_ATTENTION_ONLY = {"standard": ("linear_qkv", *PROJECTIONS["linear_qkv"]),
                   "mla": hf_mapping.MLA_TARGETS}


def require_targets_of(arch: architectures.Architecture, targets) -> None:
    """Refuse target entries of an attention kind `arch` does not have (an MLA adapter exported
    as Llama would write DeepSeek-V3's names into a Llama adapter, which no engine maps to a
    module), naming the targets and the architectures that have them."""
    for kind, only in _ATTENTION_ONLY.items():
        foreign = sorted(t for t in targets if t.rsplit(".", 1)[-1] in only)
        if kind == arch.attention or not foreign:
            continue
        fitting = [a.name for a in architectures.ARCHITECTURES.values() if a.attention == kind]
        what = "multi-latent" if kind == "mla" else "standard (fused q/k/v)"
        raise ValueError(f"the adapter targets {', '.join(foreign)}, linears of {what} "
                         f"attention, which {arch.name} does not have; name the architecture "
                         f"of the base model ({', '.join(fitting)})")


def _unit_order(item):
    (layer, kind, target, expert, projection), _ = item
    return layer, kind, target, -1 if expert is None else expert, projection or ""


def _shared_pair(matrices: dict) -> Pair:
    """SGLang's `[1, ...]` tensor of a matrix the experts share (fc1's A goes to gate and up
    alike: B @ A restricted to either's rows uses all of A)."""
    if "A" in matrices:
        return matrices["A"][None].clone(), None
    return None, matrices["B"][None].clone()


def _hf_names(layer: int, target: str, projection: str) -> tuple[str, ...]:
    """The HF modules of a target, or of one canonical projection of it."""
    if projection:
        return (hf_mapping.hf_projection_module(layer, target, projection),)
    return hf_mapping.hf_module_names(layer, target)


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


def peft_config(checkpoint: AdapterCheckpoint, keys, adapters, shared, *,
                base_model_name_or_path: str | None = None,
                task_type: str = "CAUSAL_LM") -> dict:
    """The `adapter_config.json` dict of the PEFT adapter made of `adapters` and `shared` (HF
    module names, every layer's) for the adapter checkpoint keys `keys` (every layer's) and
    `checkpoint`'s config and geometry (its tensors are not read)."""
    # Modules of a target (or canonical projection) that carry no adapter (excluded in
    # Megatron) are excluded in PEFT too, so PEFT adapts exactly the modules that have tensors.
    parsed = [parse_adapter_key(k) for k in keys]
    dense_targets = sorted({(k.target, k.projection or "") for k in parsed
                            if k.kind not in (EXPERTS, SHARED_EXPERTS)})
    excluded = [name for layer in range(checkpoint.geometry.num_layers)
                for target, projection in dense_targets
                for name in _hf_names(layer, target, projection) if name not in adapters]
    leaves = {name.rsplit(".", 1)[1] for name in (*adapters, *shared)}
    return adapter_config_dict(
        checkpoint.config, sorted(leaves), exclude_modules=excluded,
        task_type=task_type, base_model_name_or_path=base_model_name_or_path)


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
                      task_type: str = "CAUSAL_LM", architecture: str = "LlamaForCausalLM",
                      expand_shared: bool = False) -> dict:
    """Write `checkpoint` as a PEFT adapter folder; returns the adapter_config written."""
    adapters, shared = peft_modules(checkpoint, architecture, expand_shared)
    config = peft_config(checkpoint, checkpoint.tensors, adapters, shared,
                         base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    warn_serving_rank(checkpoint.config.r)
    write_peft_adapter(out_dir, config, adapters, shared)
    return config


def warn_serving_rank(r: int, stacklevel: int = 4) -> None:
    """Warn (from the caller's caller's caller, by default) what serving engines say of rank r."""
    for note in serving_warnings(r):
        warnings.warn(f"export_peft_adapter: {note}", stacklevel=stacklevel)
