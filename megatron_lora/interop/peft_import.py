"""HuggingFace PEFT adapters -> Megatron LoRA, exactly: the fusion of PEFT's per-projection
tensors into full Megatron adapter tensors, with no model and no Megatron import (the verb on a
live model is `megatron_lora.import_peft_adapter`, `megatron_lora/peft.py`).

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

import torch

from lora_common.peft_files import adapter_tensor_key
from megatron_lora.interop import hf_mapping
from megatron_lora.interop.geometry import Geometry


def _in_features(target: str, geometry: Geometry) -> int | None:
    """A's input width of a standard-attention target; None where the geometry does not say
    (MLA's linears: the adapter's own shapes are used, and the load checks them)."""
    return {"linear_qkv": geometry.hidden_size, "linear_fc1": geometry.hidden_size,
            "linear_proj": geometry.num_attention_heads * geometry.kv_channels,
            "linear_fc2": geometry.ffn_hidden_size}.get(target)


def _out_features(target: str, geometry: Geometry) -> int | None:
    return {"linear_qkv": geometry.qkv_rows, "linear_fc1": geometry.fc1_rows,
            "linear_proj": geometry.hidden_size, "linear_fc2": geometry.hidden_size}.get(target)


def group_by_target(adapter, geometry: Geometry, source: str, attention: str = "standard"
                    ) -> dict[tuple[int, str], dict[str, tuple]]:
    """`{(layer, Megatron target): {HF leaf: (A, B)}}` of a read PEFT adapter, with unknown
    modules and layers the model lacks named by their tensor key."""
    grouped: dict[tuple[int, str], dict[str, tuple]] = {}
    for module, (A, B) in adapter.adapters.items():
        try:
            layer, leaf = hf_mapping.parse_hf_module(module)
            target = hf_mapping.megatron_target(leaf, attention)
        except ValueError as error:
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')}: {error}") from None
        if layer >= geometry.num_layers:
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} is for layer {layer}; "
                             f"the model has {geometry.num_layers} layers")
        grouped.setdefault((layer, target), {})[leaf] = (A, B)
    return grouped


def fuse_peft_adapter(adapter, geometry: Geometry, source: str, attention: str = "standard"):
    """(fused full tensors by Megatron name, rank R, alpha for rank R) from a read PEFT adapter.
    Raises `ValueError` naming the tensor key for anything that does not fit `geometry`."""
    r, alpha = adapter.config["r"], adapter.config["lora_alpha"]
    grouped = group_by_target(adapter, geometry, source, attention)
    observed = {target: (A.shape[1], B.shape[0]) for (_, target), parts in grouped.items()
                for A, B in parts.values()}  # single-module targets the geometry cannot size

    rank = max(len(parts) for parts in grouped.values()) * r
    # A target the adapter leaves out in some layers (PEFT's layers_to_transform) gets zeros
    # there: Megatron's LoRA covers a target in every layer.
    for layer in range(geometry.num_layers):
        for target in {target for _, target in grouped}:
            grouped.setdefault((layer, target), {})
    dtype = next(iter(adapter.adapters.values()))[0].dtype
    tensors = {}
    for (layer, target), parts in sorted(grouped.items()):
        leaves = hf_mapping.hf_leaves(target)
        in_features = _in_features(target, geometry) or observed[target][0]
        rows = [t.shape[0] for t in hf_mapping.split_target(
            target, torch.empty(_out_features(target, geometry) or observed[target][1], 1),
            geometry)]
        A_fused = torch.zeros(rank, in_features, dtype=dtype)
        B_parts = [torch.zeros(n, rank, dtype=A_fused.dtype) for n in rows]
        offset = 0
        for index, (leaf, n_rows) in enumerate(zip(leaves, rows)):
            if leaf not in parts:
                continue  # an HF module without an adapter: its block stays zero
            A, B = parts[leaf]
            module = hf_mapping.hf_module_names(layer, target)[index]
            if tuple(A.shape) != (r, in_features):
                raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} has shape "
                                 f"{list(A.shape)}, the model needs {[r, in_features]}")
            if tuple(B.shape) != (n_rows, r):
                raise ValueError(f"{source}: {adapter_tensor_key(module, 'B')} has shape "
                                 f"{list(B.shape)}, the model needs {[n_rows, r]}")
            A_fused[offset:offset + r] = A
            B_parts[index][:, offset:offset + r] = B
            offset += r
        name = hf_mapping.megatron_module_name(layer, target)
        tensors[f"{name}.lora_A.weight"] = A_fused
        tensors[f"{name}.lora_B.weight"] = hf_mapping.fuse_target(target, B_parts, geometry)
    use_rslora = bool(adapter.config.get("use_rslora", False))
    ratio = math.sqrt(rank / r) if use_rslora else rank / r
    return tensors, rank, alpha * ratio
