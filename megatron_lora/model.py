"""Finding LoRA modules in a Megatron model, by their place in the unsplit model.

A model is one module or a list of virtual-pipeline chunks. Inside a chunk, a transformer layer
knows its global `layer_number` (1-based, across pipeline stages), so a LoRA linear is named
`decoder.layers.<global index>.<name in layer>` whatever the TP, PP or virtual-pipeline split:
the names adapter checkpoints, `exclude_modules` and error messages use.
"""

from __future__ import annotations

import torch

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
                modules[path] = module
            else:
                name_in_layer = path[len(layer_path) + 1:]
                modules[qualified_name(layers[layer_path].layer_number, name_in_layer)] = module
    return modules


def lora_tensors(model) -> dict[str, tuple[torch.Tensor, torch.nn.Module]]:
    """Every adapter matrix of this rank by its name in the unsplit model (the module's name,
    then `lora_A.weight` / `lora_B.weight`), with the module that holds it: the names adapter
    checkpoints and the adapter sync use, and what a trainer's global names end with."""
    return {f"{name}.{matrix}.weight": (getattr(module, matrix).weight, module)
            for name, module in lora_modules(model).items() for matrix in ("lora_A", "lora_B")}
