"""LoRA as one more declared part of a Megatron layer spec.

`lora_spec(spec, config)` returns a copy of a layer spec (or a block spec) in which every
target submodule's class is swapped for its LoRA subclass, and the layer's own class for the
LoRA layer class that gives each adapter its A once the layer is built. Nothing else changes,
so the model keeps every base name and Megatron's sharded-state-dict maps still match.

A spec is a tree of `ModuleSpec`s and `*Submodules` dataclasses; megatron-core 0.19 also uses
`functools.partial(Cls.as_..._submodule, submodules=...)` for some nodes. The walk looks
inside all three, so specs from other packages (slime's, MoE block specs) work too. A target
selects a submodule by its path in the layer (`targets.py`: `linear_fc1`, `experts.linear_fc1`,
`shared_experts.linear_fc2`); MoE expert classes LoRA cannot adapt are refused here, before
anything is built (`moe.py`).

Inside a module that picks how to build a submodule by testing its class for identity
(`class_testing_modules()`: multi-latent attention), a LoRA subclass would be refused or replaced
by the base class, so the walk leaves those targets as they are; the LoRA layer converts them in
place once it is built (`layers/placement.py`), and the model is the same as if they had been
swapped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.targets import target_of_module
from megatron_lora.adapt import moe
from megatron_lora.adapt.placement import check_exclusions, lora_layer_class, selected_projections
from megatron_lora.adapt.selection import selectable_names, selecting
from megatron_lora.layers.registry import lora_linear_class, supports_lora


def class_testing_modules() -> tuple[type, ...]:
    """Modules whose constructor tests a submodule's class for identity (`cls in [TELinear]`
    in MLA's down projections, `is` in megatron-core 0.19's MLA q/k-norm resolver)."""
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    return (MultiLatentAttention,)


def lora_spec(spec: Any, config: LoRAConfig) -> Any:
    """Transform a `ModuleSpec` (one layer) or a `TransformerBlockSubmodules` (a list of
    layers) so that the model built from it carries LoRA. Idempotent.

    Raises `ValueError` when a target names no submodule (listing the linear submodules
    that do exist) and when a target is a class LoRA does not support.
    """
    config = config.resolve_targets(MEGATRON_TARGET_MODULES)
    check_exclusions(config, num_layers=None)
    walk = _SpecWalk(config)
    if isinstance(spec, TransformerBlockSubmodules):
        result = dataclasses.replace(spec, layer_specs=[walk.layer(s) for s in spec.layer_specs])
    elif isinstance(spec, ModuleSpec):
        result = walk.layer(spec)
    else:
        raise TypeError(f"lora_spec takes a ModuleSpec or TransformerBlockSubmodules, "
                        f"got {type(spec).__name__}")
    missing = [target_of_module(m, config.target_modules) for m in config.module_targets()
               if m not in walk.found]
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} match no submodule of the spec; "
                         f"its linear submodules are {sorted(walk.linears)}"
                         f"{moe.no_experts_hint(missing, walk.linears)}")
    return result


class _SpecWalk:
    """One pass over a spec tree, remembering which targets it found."""

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.modules = config.module_targets()
        self.found: set[str] = set()
        self.linears: set[str] = set()  # every field holding a parallel linear, for errors
        self.deferring = False  # inside a class-testing module: targets are converted later

    def layer(self, spec):
        """A layer spec: its submodules transformed, its own class made a LoRA layer."""
        spec = self.node(spec, path="")
        if isinstance(spec.module, type):
            spec = dataclasses.replace(spec, module=lora_layer_class(spec.module, self.config))
        return spec

    def node(self, node, path: str):
        if isinstance(node, ModuleSpec):
            tests_classes = isinstance(node.module, type) and issubclass(
                node.module, class_testing_modules())
            outer, self.deferring = self.deferring, self.deferring or tests_classes
            try:
                return dataclasses.replace(node, submodules=self.node(node.submodules, path))
            finally:
                self.deferring = outer
        if isinstance(node, functools.partial):
            keywords = {k: self.node(v, path) for k, v in node.keywords.items()}
            return functools.partial(node.func, *node.args, **keywords)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return self.submodules(node, path)
        if isinstance(node, (list, tuple)):
            return type(node)(self.node(item, path) for item in node)
        return node

    def submodules(self, node, path: str):
        changes = {}
        for field in dataclasses.fields(node):
            if not field.init:
                continue
            value = getattr(node, field.name)
            where = f"{path}.{field.name}" if path else field.name
            cls = _module_class(value)
            moe.check_experts_class(where, cls, self.config)
            if supports_lora(cls):
                self.linears |= selectable_names(where)
            selected = selecting(self.modules, where)
            if selected:
                changes[field.name] = self.target(value, where)
                self.found |= selected
            else:
                changes[field.name] = self.node(value, where)
        return dataclasses.replace(node, **changes)

    def target(self, value, where: str):
        """The LoRA version of a target submodule: a class, a ModuleSpec of a class, or a
        partial of a class (left as it is inside a class-testing module)."""
        cls = _module_class(value)
        if cls is None or not supports_lora(cls):
            raise ValueError(f"LoRA target {where!r} is {getattr(cls, '__name__', cls)!r}, "
                             f"not a Megatron parallel linear LoRA supports")
        if self.deferring:
            return value
        lora_cls = lora_linear_class(cls, self.config,
                                     selected_projections(self.config, where) or ())
        if isinstance(value, ModuleSpec):
            return dataclasses.replace(value, module=lora_cls)
        if isinstance(value, functools.partial):
            return functools.partial(lora_cls, *value.args, **value.keywords)
        return lora_cls


def _module_class(value):
    """The class a spec entry builds, if it is a class, a ModuleSpec of one, or a partial."""
    if isinstance(value, ModuleSpec):
        value = value.module
    if isinstance(value, functools.partial):
        value = value.func
    return value if isinstance(value, type) else None
