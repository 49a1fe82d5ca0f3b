"""HuggingFace PEFT adapters -> Megatron LoRA, exactly.

    config = import_peft_adapter(model, "path/to/peft_adapter")   # every rank calls

PEFT adapts q/k/v (and gate/up) separately, each with rank r; Megatron fuses them. Their sum is
one fused adapter of rank `len(parts) * r`, stacking the A's and giving B a block structure:

    A = [A_q; A_k; A_v]      B = per-group rows of [[B_q, 0, 0], [0, B_k, 0], [0, 0, B_v]]

so `B @ A` restricted to q's rows is `B_q @ A_q`: the Megatron model computes what the PEFT
model computes. Megatron's LoRA has one rank for all targets, so every adapter is brought to
the largest fused rank R with zero rows in A and zero columns in B (they contribute nothing,
get zero gradients, and stay zero in training), and alpha is rescaled so that the scaling
(`alpha / r`, or `alpha / sqrt(r)` with rsLoRA) is PEFT's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.peft_files import adapter_tensor_key, read_peft_adapter
from megatron_lora import hf_layout
from megatron_lora.adapter_checkpoint import AdapterCheckpoint, load_adapter
from megatron_lora.apply import apply_lora_to_megatron_model
from megatron_lora.lora_layer import model_chunks
from megatron_lora.merge import lora_modules


def _geometry(model) -> hf_layout.Geometry:
    for chunk in model_chunks(model):
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "num_attention_heads"):
                return hf_layout.Geometry.from_megatron(config)
    raise ValueError("import_peft_adapter: found no TransformerConfig in the model")


def _in_features(target: str, geometry: hf_layout.Geometry) -> int:
    return {"linear_qkv": geometry.hidden_size, "linear_fc1": geometry.hidden_size,
            "linear_proj": geometry.num_attention_heads * geometry.kv_channels,
            "linear_fc2": geometry.ffn_hidden_size}[target]


def _out_features(target: str, geometry: hf_layout.Geometry) -> int:
    return {"linear_qkv": geometry.qkv_rows, "linear_fc1": geometry.fc1_rows,
            "linear_proj": geometry.hidden_size, "linear_fc2": geometry.hidden_size}[target]


def fuse_peft_adapter(adapter, geometry: hf_layout.Geometry, source: str):
    """(fused full tensors by Megatron name, rank R, alpha for rank R) from a read PEFT adapter.
    Raises `ValueError` naming the tensor key for anything that does not fit `geometry`."""
    r, alpha = adapter.config["r"], adapter.config["lora_alpha"]
    grouped: dict[tuple[int, str], dict[str, tuple]] = {}
    for module, (A, B) in adapter.adapters.items():
        try:
            layer, leaf = hf_layout.parse_hf_module(module)
        except ValueError as error:
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')}: {error}") from None
        if layer >= geometry.num_layers:
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} is for layer {layer}; "
                             f"the model has {geometry.num_layers} layers")
        grouped.setdefault((layer, hf_layout.megatron_target(leaf)), {})[leaf] = (A, B)

    rank = max(len(parts) for parts in grouped.values()) * r
    # A target the adapter leaves out in some layers (PEFT's layers_to_transform) gets zeros
    # there: Megatron's LoRA covers a target in every layer.
    for layer in range(geometry.num_layers):
        for target in {target for _, target in grouped}:
            grouped.setdefault((layer, target), {})
    dtype = next(iter(adapter.adapters.values()))[0].dtype
    tensors = {}
    for (layer, target), parts in sorted(grouped.items()):
        leaves = hf_layout.hf_leaves(target)
        in_features = _in_features(target, geometry)
        rows = [t.shape[0] for t in hf_layout.split_target(
            target, torch.empty(_out_features(target, geometry), 1), geometry)]
        A_fused = torch.zeros(rank, in_features, dtype=dtype)
        B_parts = [torch.zeros(n, rank, dtype=A_fused.dtype) for n in rows]
        offset = 0
        for index, (leaf, n_rows) in enumerate(zip(leaves, rows)):
            if leaf not in parts:
                continue  # an HF module without an adapter: its block stays zero
            A, B = parts[leaf]
            module = hf_layout.hf_module_names(layer, target)[index]
            if tuple(A.shape) != (r, in_features):
                raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} has shape "
                                 f"{list(A.shape)}, the model needs {[r, in_features]}")
            if tuple(B.shape) != (n_rows, r):
                raise ValueError(f"{source}: {adapter_tensor_key(module, 'B')} has shape "
                                 f"{list(B.shape)}, the model needs {[n_rows, r]}")
            A_fused[offset:offset + r] = A
            B_parts[index][:, offset:offset + r] = B
            offset += r
        name = hf_layout.megatron_module_name(layer, target)
        tensors[f"{name}.lora_A.weight"] = A_fused
        tensors[f"{name}.lora_B.weight"] = hf_layout.fuse_target(target, B_parts, geometry)
    use_rslora = bool(adapter.config.get("use_rslora", False))
    ratio = math.sqrt(rank / r) if use_rslora else rank / r
    return tensors, rank, alpha * ratio


def import_peft_adapter(model, adapter_dir: str | Path) -> LoRAConfig:
    """Load a PEFT LoRA adapter (made for the HF twin of this model) into a Megatron model at
    any TP/PP size, exactly, and return the LoRA config it now carries. The model may carry no
    LoRA yet, or LoRA of another rank (it is rebuilt). Call on every rank. Bad input (unknown
    keys, shapes or layers that do not fit the model) raises `ValueError` naming the key,
    before the model is touched."""
    source = str(adapter_dir)
    adapter = read_peft_adapter(adapter_dir)
    geometry = _geometry(model)
    tensors, rank, alpha = fuse_peft_adapter(adapter, geometry, source)
    targets = {hf_layout.parse_megatron_module(k.rsplit(".lora_", 1)[0])[1] for k in tensors}
    existing = lora_modules(model)
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
