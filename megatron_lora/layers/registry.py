"""Which LoRA class each Megatron linear class gets.

    lora_linear_class(ColumnParallelLinear, config)  ->  LoRAColumnParallelLinear

A base class is matched to the mixin of the first base it subclasses: megatron-core's
local parallel linears, and its Transformer Engine wrappers (grouped MoE linears included) when
megatron-core found TE at import. With `projections` (canonical LoRA on a fused linear:
`lora_common.targets`) the per-projection mixin (`canonical.py`) goes in front of the split kind's.
One class is made per (base, config, projections), so the spec route and the post-hoc route
build the same classes.
"""

from __future__ import annotations

import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from lora_common import LoRAConfig
from megatron_lora.layers.parallel_linear import (
    LoRAColumnParallelMixin,
    LoRAParallelLinear,
    LoRARowParallelMixin,
)
from megatron_lora.layers.sharding import COLUMN


@functools.cache
def split_mixins() -> tuple[tuple[type, type], ...]:
    """(base class, LoRA mixin) pairs; the first base a class subclasses decides. Resolved on
    first use: whether megatron-core found TE is settled when its TE extension is imported."""
    pairs = [(ColumnParallelLinear, LoRAColumnParallelMixin),
             (RowParallelLinear, LoRARowParallelMixin)]
    try:
        from megatron.core.extensions import transformer_engine as te_wrappers
    except ImportError:
        return tuple(pairs)
    if getattr(te_wrappers, "HAVE_TE", False):
        from megatron_lora.layers.te_linear import (
            LoRATEColumnParallelMixin,
            LoRATELayerNormColumnParallelMixin,
            LoRATERowParallelMixin,
        )

        pairs += [(te_wrappers.TELayerNormColumnParallelLinear, LoRATELayerNormColumnParallelMixin),
                  (te_wrappers.TEColumnParallelLinear, LoRATEColumnParallelMixin),
                  (te_wrappers.TERowParallelLinear, LoRATERowParallelMixin)]
        if getattr(te_wrappers, "TEColumnParallelGroupedLinear", None) is not None:
            from megatron_lora.layers.grouped_linear import (
                LoRATEColumnParallelGroupedMixin,
                LoRATERowParallelGroupedMixin,
            )

            pairs += [(te_wrappers.TEColumnParallelGroupedLinear, LoRATEColumnParallelGroupedMixin),
                      (te_wrappers.TERowParallelGroupedLinear, LoRATERowParallelGroupedMixin)]
        # Last: TEColumn/TERowParallelLinear subclass TELinear. A plain TELinear is MLA's
        # duplicated down projection.
        from megatron_lora.layers.te_linear import LoRATEDuplicatedMixin

        pairs.append((te_wrappers.TELinear, LoRATEDuplicatedMixin))
    return tuple(pairs)


def is_lora_linear(module_or_class) -> bool:
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return issubclass(cls, LoRAParallelLinear)


def supports_lora(cls: type) -> bool:
    """Whether `lora_linear_class` can lorafy `cls`."""
    return isinstance(cls, type) and any(issubclass(cls, base) for base, _ in split_mixins())


def lora_linear_class(base: type, config: LoRAConfig, projections: tuple[str, ...] = ()) -> type:
    """The LoRA subclass of the parallel linear class `base` for `config`; with `projections`
    (canonical LoRA, e.g. `("q", "v")` on linear_qkv) one adapter per projection. A LoRA class
    passed again is returned as is."""
    if is_lora_linear(base):
        carried = tuple(getattr(base, "lora_projections", ()))
        differences = base.lora_config.differences(config)
        if tuple(projections) != carried:
            differences.append(f"adapters per projection: {carried or 'none (one adapter)'} -> "
                               f"{tuple(projections) or 'none (one adapter)'}")
        if differences:
            raise ValueError(f"{base.__name__} already carries LoRA of another config "
                             f"({'; '.join(differences)}); build the model without LoRA, or "
                             f"import a PEFT adapter, which rebuilds the adapters")
        return base
    return _lora_linear_class(base, config, tuple(projections))


@functools.cache
def _lora_linear_class(base: type, config: LoRAConfig, projections: tuple[str, ...]) -> type:
    for split_base, mixin in split_mixins():
        if isinstance(base, type) and issubclass(base, split_base):
            attributes = {"lora_config": config, "lora_base_class": base, "__module__": __name__}
            if not projections:
                return type(f"LoRA{base.__name__}", (mixin, base), attributes)
            from megatron_lora.layers.canonical import CanonicalLoRAMixin

            if mixin.lora_split is not COLUMN:
                raise TypeError(f"canonical LoRA ({', '.join(projections)}) needs a "
                                f"column-parallel linear; got {base.__name__}")
            return type(f"CanonicalLoRA{base.__name__}", (CanonicalLoRAMixin, mixin, base),
                        {**attributes, "lora_projections": projections})
    names = ", ".join(b.__name__ for b, _ in split_mixins())
    raise TypeError(f"LoRA supports subclasses of {names}; got {getattr(base, '__name__', base)!r}")
