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

MoE experts (`hf_experts.py`) fuse per expert the same way into
`decoder.layers.{l}.mlp.experts.linear_fc1.lora_A.weight{e}`. An adapter in SGLang's
shared-outer form (gate/up A and down B shared by a layer's experts) becomes a `shared_outer`
one: `...experts.linear_fc1.lora_A.weight` once per layer.
"""

from __future__ import annotations

import math

import torch

from lora_common.peft_files import adapter_tensor_key
from megatron_lora.interop import hf_experts, hf_mapping
from megatron_lora.interop.adapter_keys import (
    ATTENTION,
    DENSE,
    EXPERTS,
    SHARED_EXPERTS,
    AdapterKey,
)
from megatron_lora.interop.geometry import Geometry


def _ffn(kind: str, geometry: Geometry) -> int:
    return geometry.ffn_size(_mlp_kind(kind))


def _in_features(target: str, geometry: Geometry, kind: str = DENSE,
                 attention: str = "standard") -> int | None:
    """A's input width of a standard-attention or MLP target; None where the geometry does not
    say (MLA's linears, and MLA's linear_proj: the adapter's own shapes are used, and the load
    checks them against the model)."""
    return geometry.features(target, _mlp_kind(kind), attention)[0]


def _out_features(target: str, geometry: Geometry, kind: str = DENSE) -> int | None:
    return geometry.features(target, _mlp_kind(kind))[1]


def _mlp_kind(kind: str) -> str:
    """The geometry's name for the MLP an adapter unit of `kind` sits in (attention's: dense)."""
    return {EXPERTS: "experts", SHARED_EXPERTS: "shared_experts"}.get(kind, "dense")


def group_by_target(adapter, geometry: Geometry, source: str, attention: str = "standard"
                    ) -> dict[tuple[int, str], dict[str, tuple]]:
    """`{(layer, Megatron target): {HF leaf: (A, B)}}` of a read PEFT adapter of a dense model
    (the canonical import's grouping), with unknown modules and layers the model lacks named by
    their tensor key."""
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


def _hf_place(module: str, geometry: Geometry, source: str, attention: str = "standard"):
    """(layer, kind, Megatron target, expert, HF leaf, HF module names of the unit, leaves of
    the unit) of one HF adapter module."""
    shared = hf_experts.parse_shared_module(module)
    if shared is not None:
        arch, layer, leaf = shared
        target = hf_experts.target_of(arch.moe, leaf)
        return (layer, SHARED_EXPERTS, target, None, leaf,
                hf_experts.shared_module_names(arch, layer, target),
                hf_experts.leaves(arch.moe, target))
    expert = hf_experts.parse_module(module)
    if expert is not None:
        names, layer, leaf, index = expert
        target = hf_experts.target_of(names, leaf)
        modules = hf_experts.module_names(names, layer, target, index)
        return layer, EXPERTS, target, index, leaf, modules, hf_experts.leaves(names, target)
    try:
        layer, leaf = hf_mapping.parse_hf_module(module)
    except ValueError as error:
        raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')}: {error}") from None
    try:
        target = hf_mapping.megatron_target(leaf, attention)
    except ValueError as error:
        raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')}: {error}") from None
    kind = DENSE if target in ("linear_fc1", "linear_fc2") else ATTENTION
    return (layer, kind, target, None, leaf, hf_mapping.hf_module_names(layer, target),
            hf_mapping.hf_leaves(target))


def fuse_peft_adapter(adapter, geometry: Geometry, source: str, attention: str = "standard"):
    """(fused full tensors by Megatron name, rank R, alpha for rank R, expert layout) from a
    read PEFT adapter. Raises `ValueError` naming the tensor key for anything that does not fit
    `geometry`."""
    r, alpha = adapter.config["r"], adapter.config["lora_alpha"]
    layout = _expert_layout(adapter, source)
    grouped: dict[tuple, dict[str, tuple]] = {}
    places = {}
    for module, (A, B) in adapter.adapters.items():
        layer, kind, target, expert, leaf, modules, leaves = _hf_place(module, geometry, source,
                                                                       attention)
        if layer >= geometry.num_layers:
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} is for layer {layer}; "
                             f"the model has {geometry.num_layers} layers")
        if kind == EXPERTS and not (geometry.num_moe_experts and expert < geometry.num_moe_experts):
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} is for expert {expert}; "
                             f"the model has {geometry.num_moe_experts or 'no'} experts per layer")
        unit = (layer, kind, target, expert)
        grouped.setdefault(unit, {})[leaf] = (A, B)
        places[unit] = (modules, leaves)
    # single-module targets the geometry cannot size (MLA's): each unit's own shapes (a layer
    # the adapter leaves out takes another layer's); the load checks them against the model,
    # naming the layer whose tensor does not fit
    observed = {unit: (A.shape[1], B.shape[0]) for unit, parts in grouped.items()
                for A, B in parts.values()}
    observed.update({unit[2]: shape for unit, shape in observed.items()})

    rank = max(len(parts) for parts in grouped.values()) * r  # e.g. q, k, v present: 3r
    # A dense target the adapter leaves out in some layers (PEFT's layers_to_transform) gets
    # zeros there: Megatron's LoRA covers a target in every layer. (Attention only in an MoE
    # model: which layers have a dense MLP, shared or routed experts is not the geometry's.)
    filled = (ATTENTION,) if geometry.num_moe_experts else (ATTENTION, DENSE)
    for layer in range(geometry.num_layers):
        for _, kind, target, _ in {u for u in grouped if u[1] in filled}:
            unit = (layer, kind, target, None)
            if unit not in grouped:
                grouped[unit] = {}
                places[unit] = (hf_mapping.hf_module_names(layer, target),
                                hf_mapping.hf_leaves(target))
    dtype = next(iter(adapter.adapters.values()))[0].dtype
    tensors = {}
    for unit, parts in sorted(grouped.items(), key=lambda item: (*item[0][:3], item[0][3] or 0)):
        layer, kind, target, expert = unit
        modules, leaves = places[unit]
        A, B = _fuse_unit(parts, modules, leaves, rank, r, dtype, target, kind, geometry, source,
                          observed.get(unit, observed.get(target)), attention)
        key = AdapterKey(layer, kind, target, "A", expert)
        shared = layout == "shared_outer" and kind == EXPERTS
        a_name = AdapterKey(layer, kind, target, "A", None if shared and target == "linear_fc1"
                            else expert).name
        b_name = AdapterKey(layer, kind, target, "B", None if shared and target == "linear_fc2"
                            else expert).name
        for name, value in ((a_name, A), (b_name, B)):
            if name in tensors and not torch.equal(tensors[name], value):
                raise ValueError(f"{source}: the experts of {key.module} disagree on the "
                                 f"factor they share ({name})")
            tensors[name] = value
    use_rslora = bool(adapter.config.get("use_rslora", False))
    ratio = math.sqrt(rank / r) if use_rslora else rank / r
    return tensors, rank, alpha * ratio, layout


def _expert_layout(adapter, source: str) -> str:
    """`shared_outer` for SGLang's form (gate/up A and down B shared by the experts), else
    `per_expert`; another sharing is no layout Megatron's LoRA holds."""
    if not adapter.shared:
        return "per_expert"
    for module, factor in adapter.shared.items():
        found = hf_experts.parse_module(module)
        if found is None:
            raise ValueError(f"{source}: {adapter_tensor_key(module, factor)} is shared by "
                             f"experts of no known MoE architecture")
        names, _, leaf, _ = found
        wanted = "B" if leaf == names.down else "A"
        if factor != wanted:
            raise ValueError(f"{source}: {adapter_tensor_key(module, factor)}: the experts "
                             f"share {leaf}'s {factor}; the shared-outer layout shares "
                             f"{names.gate}/{names.up} A and {names.down} B")
    return "shared_outer"


def _fuse_unit(parts, modules, leaves, rank, r, dtype, target, kind, geometry, source,
               observed=None, attention="standard"):
    """One Megatron adapter (A `[R, in]`, B `[out, R]`) from its HF modules' adapters;
    `observed` (in, out) sizes a target the geometry does not (MLA's)."""
    in_features = _in_features(target, geometry, kind, attention) or observed[0]
    rows = ([_ffn(kind, geometry)] * 2 if kind == EXPERTS and target == "linear_fc1" else
            [geometry.hidden_size] if kind == EXPERTS else
            [t.shape[0] for t in hf_mapping.split_target(
                target, torch.empty(_out_features(target, geometry, kind) or observed[1], 1),
                geometry)])
    A_fused = torch.zeros(rank, in_features, dtype=dtype)
    B_parts = [torch.zeros(n, rank, dtype=dtype) for n in rows]
    offset = 0
    for index, (leaf, n_rows) in enumerate(zip(leaves, rows, strict=True)):
        if leaf not in parts:
            continue  # an HF module without an adapter: its block stays zero
        A, B = parts[leaf]
        module = modules[index]
        if tuple(A.shape) != (r, in_features):
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'A')} has shape "
                             f"{list(A.shape)}, the model needs {[r, in_features]}")
        if tuple(B.shape) != (n_rows, r):
            raise ValueError(f"{source}: {adapter_tensor_key(module, 'B')} has shape "
                             f"{list(B.shape)}, the model needs {[n_rows, r]}")
        A_fused[offset:offset + r] = A
        B_parts[index][:, offset:offset + r] = B
        offset += r
    if kind in (EXPERTS, SHARED_EXPERTS):
        return A_fused, torch.cat(B_parts, dim=0)  # fc1: [gate; up]
    return A_fused, hf_mapping.fuse_target(target, B_parts, geometry)
