"""Placing LoRA in a transformer layer: each adapter gets its A from its place in the model.

A LoRA linear does not know at construction which layer it belongs to; the transformer layer
does (`layer_number`, global across pipeline stages). `place_lora(layer, config)` runs once the
layer is built: it seeds each adapter's A from `(config.seed, layer_number, name inside the
layer)`, removes LoRA from modules the config excludes, and freezes the layer's base
parameters when `config.only_trainable`. The spec route runs it from the LoRA subclass of the
layer class (`lora_layer_class`); the post-hoc route calls it on each built layer. Both routes
therefore give the same adapters.

Some modules choose how to build a submodule by testing its class for identity (MLA:
`linear_q_down_proj in [TELinear]`, megatron-core 0.19's `module_cls is fused_norm_linear`), and
a LoRA subclass fails such a test, loudly or by being replaced with the base class. The spec
walk leaves the targets inside them as they are (`spec.py`); the LoRA layer then converts every
target module still without LoRA in place, as the post-hoc route does (`add_lora_in_place`), so
every target module of a built layer carries LoRA (or is refused by name) before the adapters
are placed, whatever the modules inside did with the spec's classes.

An expert linear of a `SequentialMLP` learns here that it is one (`configure_expert`), with its
global expert index; every expert's A is seeded by `(config.seed, layer_number, target path,
global expert index)`, the key a grouped linear uses for the same expert, so adapters agree at
every EP and ETP size and across the two expert implementations.
"""

from __future__ import annotations

import functools
import re

import torch

from lora_common import LoRAConfig
from lora_common.state import freeze_all_but_adapters
from lora_common.targets import PROJECTIONS
from megatron_lora.adapt import moe
from megatron_lora.adapt.recompute import watch_for_stacks
from megatron_lora.adapt.selection import is_routed_expert_path, leaf, selecting
from megatron_lora.layers.expert import target_path
from megatron_lora.layers.registry import is_lora_linear, lora_linear_class, supports_lora
from megatron_lora.modules import qualified_name


def is_excluded(qualified: str, exclude_modules: tuple[str, ...]) -> bool:
    """An exclude entry matches a module whose target path (`targets.py`) equals it or ends
    with `.<entry>` (so `linear_fc2`, `mlp.linear_fc2`, `experts.linear_fc2` and
    `layers.3.mlp.linear_fc2` all work)."""
    return bool(selecting(exclude_modules, qualified))


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_exclusions(config: LoRAConfig, num_layers: int | None) -> None:
    """Refuse an exclude entry that can match no adapted module: its last name must be one of
    the targets, and a layer it names must exist. Checkable on every rank and at spec time,
    without the other pipeline stages' modules (an entry is a path in the unsplit model)."""
    modules = config.module_targets()
    target_leaves = {leaf(target) for target in modules}
    for entry in config.exclude_modules:
        if target_path(entry) != entry:
            raise ValueError(f"LoRA exclude_modules entry {entry!r} names one expert of a "
                             f"layer; every expert of a layer carries an adapter or none: "
                             f"exclude {target_path(entry)!r} (all of that layer's experts)")
        index = _LAYER_INDEX.search(entry)
        if leaf(entry) in target_leaves and (
                index is None or num_layers is None or int(index.group(1)) < num_layers):
            continue
        layers = f"decoder.layers.<0..{num_layers - 1}>" if num_layers else "decoder.layers.<i>"
        raise ValueError(f"LoRA exclude_modules entry {entry!r} matches no LoRA module: the "
                         f"adapted modules are {', '.join(modules)}, named "
                         f"{layers}.<path in layer> (an entry may be any dotted suffix of that)")


def selected_projections(config: LoRAConfig, path: str) -> tuple[str, ...] | None:
    """None if no target selects the module at `path` (`targets.py`); else the projections
    that get an adapter each (canonical LoRA on a fused linear, in its row order), or `()` for
    one adapter. MoE experts' linears always get one adapter (an expert's fc1 has its own
    layout), as in Megatron-Bridge's CanonicalLoRA."""
    modules = config.module_targets()
    selected = selecting(modules, path)
    if not selected:
        return None
    if is_routed_expert_path(path) or ".shared_experts." in f".{target_path(path)}":
        return ()
    parts = {p for entry in selected for p in modules[entry]}
    return tuple(p for p in PROJECTIONS.get(leaf(path), {}).values() if p in parts)


def add_lora_in_place(module: torch.nn.Module, config: LoRAConfig, name: str) -> None:
    """Turn a built parallel linear at path `name` (a target selects it) into its LoRA class,
    keeping its base weights: the post-hoc route and the deferred targets of the spec route."""
    module.__class__ = lora_linear_class(type(module), config,
                                         selected_projections(config, name) or ())
    module.add_lora()


def add_missing_lora(layer: torch.nn.Module, config: LoRAConfig) -> None:
    """Give LoRA to every target module of a built layer that lacks it: the targets the spec
    walk left as they were, and any a module replaced by its base class. Afterwards every
    target module of the layer carries LoRA; one LoRA cannot adapt is refused by name."""
    for name, module in list(layer.named_modules()):
        if selected_projections(config, name) is None or is_lora_linear(module):
            continue
        if not supports_lora(type(module)):
            raise ValueError(f"LoRA target {name!r} of {type(layer).__name__} is a "
                             f"{type(module).__name__}, not a Megatron parallel linear LoRA "
                             f"supports")
        add_lora_in_place(module, config, name)


def place_lora(layer: torch.nn.Module, config: LoRAConfig) -> None:
    """Initialize, exclude and freeze the adapters inside one built transformer layer."""
    check_exclusions(config, layer.config.num_layers)
    moe.check_moe_config(layer.config, config)
    layer_number = getattr(layer, "layer_number", None)
    for name, module in list(layer.named_modules()):
        if is_lora_linear(module):
            place_adapter(module, config, layer_number, name, layer)
    if config.only_trainable:
        freeze_all_but_adapters(layer)


def place_adapter(module, config: LoRAConfig, layer_number: int | None, name: str,
                  root: torch.nn.Module | None = None) -> None:
    """Seed one adapter's A from its place, or remove the adapter if the config excludes it.
    `name` is the module's path in `root` (its transformer layer, or the model chunk)."""
    if is_excluded(qualified_name(layer_number, name), config.exclude_modules):
        module.remove_lora()
        return
    expert = moe.sequential_expert(name)
    if expert is None:
        module.reset_lora_parameters(layer_number, name)
        return
    experts_path, local_index = expert
    experts = root.get_submodule(experts_path)
    moe.check_experts_class(experts_path, type(experts), config)
    place = moe.expert_place(experts, local_index)
    module.configure_expert(place)
    module.reset_lora_parameters(layer_number, target_path(name), place.index)


class LoRATransformerLayerMixin:
    """Runs `place_lora` as the last step of building the layer."""

    lora_config: LoRAConfig

    def __init__(self, *args, **kwargs):
        watch_for_stacks()  # before the stack building this layer is handed it
        super().__init__(*args, **kwargs)
        add_missing_lora(self, self.lora_config)
        place_lora(self, self.lora_config)


def is_lora_layer_class(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, LoRATransformerLayerMixin)


def lora_layer_class(base: type, config: LoRAConfig) -> type:
    """The subclass of the layer class `base` (e.g. `TransformerLayer`) that places LoRA
    after building. Idempotent for an already-LoRA class with the same config."""
    if is_lora_layer_class(base):
        if base.lora_config != config:
            raise ValueError(f"{base.__name__} already carries LoRA of another config "
                             f"({'; '.join(base.lora_config.differences(config))})")
        return base
    return _lora_layer_class(base, config)


@functools.cache
def _lora_layer_class(base: type, config: LoRAConfig) -> type:
    return type(f"LoRA{base.__name__}", (LoRATransformerLayerMixin, base),
                {"lora_config": config, "__module__": __name__})
