"""Placing LoRA in a transformer layer: each adapter gets its A from its place in the model.

A LoRA linear does not know at construction which layer it belongs to; the transformer layer
does (`layer_number`, global across pipeline stages). `place_lora(layer, config)` runs once the
layer is built: it seeds each adapter's A from `(config.seed, layer_number, name inside the
layer)`, removes LoRA from modules the config excludes, and freezes the layer's base
parameters when `config.only_trainable`. The spec route runs it from the LoRA subclass of the
layer class (`lora_layer_class`); the post-hoc route calls it on each built layer. Both routes
therefore give the same adapters.
"""

from __future__ import annotations

import functools

import torch

from lora_common import LoRAConfig
from megatron_lora.lora_linear import LoRAMatrix, is_lora_linear


def qualified_name(layer_number: int | None, name_in_layer: str) -> str:
    """The module's path in an unsplit GPTModel (`decoder.layers.<index>.<name>`), used to
    match `exclude_modules` the same way whatever the pipeline split."""
    if layer_number is None:
        return name_in_layer
    return f"decoder.layers.{layer_number - 1}.{name_in_layer}"


def is_excluded(qualified: str, exclude_modules: tuple[str, ...]) -> bool:
    """An exclude entry matches a module whose qualified name equals it or ends with
    `.<entry>` (so `linear_fc2`, `mlp.linear_fc2` and `layers.3.mlp.linear_fc2` all work)."""
    return any(qualified == entry or qualified.endswith("." + entry) for entry in exclude_modules)


def place_lora(layer: torch.nn.Module, config: LoRAConfig) -> None:
    """Initialize, exclude and freeze the adapters inside one built transformer layer."""
    layer_number = getattr(layer, "layer_number", None)
    for name, module in list(layer.named_modules()):
        if is_lora_linear(module):
            place_adapter(module, config, layer_number, name)
    if config.only_trainable:
        freeze_base_parameters(layer)


def place_adapter(module, config: LoRAConfig, layer_number: int | None, name: str) -> None:
    """Seed one adapter's A from its place, or remove the adapter if the config excludes it."""
    if is_excluded(qualified_name(layer_number, name), config.exclude_modules):
        module.remove_lora()
    else:
        module.reset_lora_parameters(layer_number, name)


def model_chunks(model) -> list[torch.nn.Module]:
    """A model, or a list of virtual-pipeline chunks, as a list of chunks."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def transformer_layers(chunk: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The built transformer layers of a model chunk by path: modules with an int
    `layer_number` and no such ancestor (attention modules inside a layer carry one too)."""
    layers: dict[str, torch.nn.Module] = {}
    for name, module in chunk.named_modules():
        if isinstance(getattr(module, "layer_number", None), int) and not any(
                name.startswith(outer + ".") for outer in layers):
            layers[name] = module
    return layers


def canonical_lora_modules(chunk: torch.nn.Module):
    """`(qualified name, module)` for each LoRA linear of the chunk, named by its place in the
    unsplit model (`decoder.layers.<global index>.<name in layer>`), whatever the pipeline or
    virtual-pipeline split: the names an adapter checkpoint uses."""
    layers = transformer_layers(chunk)
    for path, module in chunk.named_modules():
        if not is_lora_linear(module):
            continue
        layer_path = next((p for p in layers if path.startswith(p + ".")), None)
        if layer_path is None:
            yield path, module
        else:
            yield qualified_name(layers[layer_path].layer_number, path[len(layer_path) + 1:]), module


def freeze_base_parameters(module: torch.nn.Module) -> None:
    """`requires_grad=False` on every parameter that is not an adapter matrix's. A frozen
    base weight is where LoRA's speed comes from: Megatron's linears then skip the
    weight-grad GEMM and do not save their input."""
    adapter = {id(p) for m in module.modules() if isinstance(m, LoRAMatrix) for p in m.parameters()}
    for param in module.parameters():
        param.requires_grad_(id(param) in adapter)


class LoRATransformerLayerMixin:
    """Runs `place_lora` as the last step of building the layer."""

    lora_config: LoRAConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        place_lora(self, self.lora_config)


def is_lora_layer_class(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, LoRATransformerLayerMixin)


def lora_layer_class(base: type, config: LoRAConfig) -> type:
    """The subclass of the layer class `base` (e.g. `TransformerLayer`) that places LoRA
    after building. Idempotent for an already-LoRA class with the same config."""
    if is_lora_layer_class(base):
        if base.lora_config != config:
            raise ValueError(f"{base.__name__} already carries LoRA with another config")
        return base
    return _lora_layer_class(base, config)


@functools.lru_cache(maxsize=None)
def _lora_layer_class(base: type, config: LoRAConfig) -> type:
    return type(f"LoRA{base.__name__}", (LoRATransformerLayerMixin, base),
                {"lora_config": config, "__module__": __name__})
