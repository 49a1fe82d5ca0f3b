"""HuggingFace PEFT adapters -> canonical (per-projection) Megatron LoRA, exactly and at PEFT's
rank: each PEFT module's adapter becomes the Megatron adapter of the same projection, as it is.

    q_proj  -> linear_qkv.lora_q          gate_proj -> linear_fc1.lora_gate
    o_proj  -> linear_proj                q_a_proj  -> linear_q_down_proj   (MLA)

Nothing is fused and nothing padded: a q/v-only adapter of rank r imports at rank r, and the
model is PEFT's model (its adapters train as PEFT's would), not merely the same function. No
model and no Megatron import (the verb on a live model is `megatron_lora.import_peft_adapter`
with `canonical=True`).
"""

from __future__ import annotations

import torch

from lora_common.peft_files import adapter_tensor_key
from lora_common.targets import PROJECTIONS
from megatron_lora.interop import hf_mapping
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.peft_import import _in_features, _out_features, group_by_target


def _expected_shapes(target: str, projection: str | None, geometry: Geometry, r: int,
                     attention: str = "standard"):
    """(A shape, B shape) of a standard-attention projection, or None where the geometry does
    not say (MLA's linears: the load checks them against the model)."""
    in_features = _in_features(target, geometry, attention=attention)
    out_features = _out_features(target, geometry)
    if in_features is None:
        return None
    rows = hf_mapping.split_target(target, torch.empty(out_features, 1), geometry)
    index = 0 if projection is None else list(PROJECTIONS[target].values()).index(projection)
    return (r, in_features), (rows[index].shape[0], r)


def _projection(target: str, leaf: str) -> str | None:
    """The projection an HF leaf is inside a fused Megatron target (None: the whole target)."""
    if target not in PROJECTIONS:
        return None
    return list(PROJECTIONS[target].values())[hf_mapping.hf_leaves(target).index(leaf)]


def peft_adapter_per_projection(adapter, geometry: Geometry, source: str,
                                attention: str = "standard"):
    """(full tensors by Megatron name, target names) from a read PEFT adapter, at its rank r.
    A target the adapter leaves out in some layers (PEFT's `layers_to_transform`) gets zero
    A and B there, which contribute nothing and stay zero in training, as PEFT has no adapter
    there. Raises `ValueError` naming the tensor key for anything that does not fit."""
    r = adapter.config["r"]
    adapters: dict[tuple[str, str | None], dict[int, tuple]] = {}
    for (layer, target), parts in group_by_target(adapter, geometry, source, attention).items():
        for leaf, (A, B) in parts.items():
            projection = _projection(target, leaf)
            module = f"model.layers.{layer}.{_hf_path(target, leaf)}"
            expected = _expected_shapes(target, projection, geometry, r, attention)
            for factor, tensor, shape in zip("AB", (A, B), expected or (None, None), strict=True):
                if shape is not None and tuple(tensor.shape) != shape:
                    raise ValueError(f"{source}: {adapter_tensor_key(module, factor)} has shape "
                                     f"{list(tensor.shape)}, the model needs {list(shape)}")
            adapters.setdefault((target, projection), {})[layer] = (A, B)
    tensors, targets = {}, set()
    for (target, projection), by_layer in sorted(adapters.items(), key=str):
        A0, B0 = next(iter(by_layer.values()))
        suffix = "" if projection is None else f".lora_{projection}"
        for layer in range(geometry.num_layers):
            A, B = by_layer.get(layer, (torch.zeros_like(A0), torch.zeros_like(B0)))
            name = hf_mapping.megatron_module_name(layer, target) + suffix
            tensors[f"{name}.lora_A.weight"] = A.clone()
            tensors[f"{name}.lora_B.weight"] = B.clone()
        targets.add(target if projection is None else next(
            t for t, p in PROJECTIONS[target].items() if p == projection))
    return tensors, sorted(targets)


def _hf_path(target: str, leaf: str) -> str:
    """`self_attn.q_proj` for (linear_qkv, q_proj): the HF path of a leaf inside a layer."""
    return next(name for name in hf_mapping.hf_module_names(0, target)
                if name.endswith("." + leaf)).split(".", 3)[3]
