"""Finding LoRA modules in a Megatron model, by their place in the unsplit model.

A model is one module or a list of virtual-pipeline chunks. Inside a chunk, a transformer layer
knows its global `layer_number` (1-based, across pipeline stages), so a LoRA linear is named
`decoder.layers.<global index>.<name in layer>` whatever the TP, PP or virtual-pipeline split:
the names adapter checkpoints, `exclude_modules` and error messages use. An expert of a
`SequentialMLP` is named by its global expert index (`...experts.local_experts.<global>...`),
whatever the expert-parallel split.
"""

from __future__ import annotations

import re

import torch

from lora_common import LoRAConfig
from megatron_lora.interop.geometry import Geometry
from megatron_lora.layers.registry import is_lora_linear


def model_chunks(model) -> list[torch.nn.Module]:
    """A model, or a list of virtual-pipeline chunks, as a list of chunks."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def qualified_name(layer_number: int | None, name_in_layer: str) -> str:
    """The module's path in an unsplit GPTModel (`decoder.layers.<index>.<name>`)."""
    if layer_number is None:
        return name_in_layer
    return f"decoder.layers.{layer_number - 1}.{name_in_layer}"


def transformer_layers(chunk: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The built transformer layers of a model chunk by path: modules with an int
    `layer_number` and no such ancestor (attention modules inside a layer carry one too)."""
    layers: dict[str, torch.nn.Module] = {}
    for name, module in chunk.named_modules():
        if isinstance(getattr(module, "layer_number", None), int) and not any(
                name.startswith(outer + ".") for outer in layers):
            layers[name] = module
    return layers


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """Every LoRA linear of the model (or list of chunks), by its name in the unsplit model."""
    modules = {}
    for chunk in model_chunks(model):
        layers = transformer_layers(chunk)
        for path, module in chunk.named_modules():
            if not is_lora_linear(module):
                continue
            layer_path = next((p for p in layers if path.startswith(p + ".")), None)
            if layer_path is None:  # an adapter outside any transformer layer
                name = path
            else:
                name = qualified_name(layers[layer_path].layer_number, path[len(layer_path) + 1:])
            expert = getattr(module, "lora_expert", None)
            modules[name if expert is None else global_expert_name(name, expert.index)] = module
    return modules


def global_expert_name(name: str, index: int) -> str:
    """`...experts.local_experts.<local>.x` -> `...experts.local_experts.<index>.x`."""
    return re.sub(r"(?<=local_experts\.)\d+(?=\.)", str(index), name, count=1)


def lora_tensors(model) -> dict[str, tuple[torch.Tensor, torch.nn.Module]]:
    """Every adapter matrix of this rank by its name in an adapter checkpoint (the module's
    name in the unsplit model, then `lora_A.weight`; per expert of a grouped or sequential
    MoE linear `lora_A.weight<global expert index>`), with the module holding it."""
    tensors = {}
    for name, module in lora_modules(model).items():
        for tensor_name, param in module.lora_tensors(name).items():
            tensors[tensor_name] = (param, module)
    return tensors


def model_config(model):
    """The model's own `TransformerConfig` (not a SequentialMLP's copy with the expert ffn size):
    that of the outermost module carrying one."""
    for chunk in model_chunks(model):
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "num_attention_heads"):
                return config
    raise ValueError("found no TransformerConfig in the model")


def config_and_geometry(model, modules: dict) -> tuple[LoRAConfig, Geometry]:
    """The LoRA config the model's adapters carry and the model's geometry (`modules`: its LoRA
    modules, `lora_modules(model)`); refused for a model without adapters."""
    if not modules:
        raise ValueError("the model has no LoRA modules")
    first = next(iter(modules.values()))
    return first.lora_config, Geometry.from_megatron(model_config(model))
