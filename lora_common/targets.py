"""The Megatron LoRA target names: the modules LoRA adapts, and the projections inside the fused
ones (no Megatron import; `LoRAConfig` validates against it).

A target is the name of a linear submodule of a layer (`linear_proj`, `linear_kv_up_proj`) or,
in canonical mode, of one projection inside a fused linear:

    fused module   its projections, in the order of its rows     target name of each
    linear_qkv     q, k, v  (Megatron's per-group interleave)     linear_q, linear_k, linear_v
    linear_fc1     gate, up (SwiGLU: [gate; up])                  linear_fc1_gate, linear_fc1_up

The names are Megatron-Bridge's `CanonicalLoRA` ones, so a recipe that names them carries over.
In the default (fused) mode `linear_qkv` holds one adapter whose A is shared by q, k and v; in
canonical mode it holds one adapter per projection (`linear_qkv.lora_q.lora_A.weight`, ...),
which is PEFT's `q_proj` / `k_proj` / `v_proj` model. There, naming the module means all of its
projections, and a complete set of projection names is written as the module's name, so the
same adapters are the same config.
"""

from __future__ import annotations

from collections.abc import Iterable

# fused module -> {projection target name: projection}, in the order of the module's rows
PROJECTIONS: dict[str, dict[str, str]] = {
    "linear_qkv": {"linear_q": "q", "linear_k": "k", "linear_v": "v"},
    "linear_fc1": {"linear_fc1_gate": "gate", "linear_fc1_up": "up"},
}
# projection target name -> (its fused module, the projection)
PROJECTION_TARGETS: dict[str, tuple[str, str]] = {
    name: (module, part) for module, parts in PROJECTIONS.items() for name, part in parts.items()}

# The linears of megatron-core's multi-latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-5). MLA
# builds `linear_q_proj` when q_lora_rank is None, `linear_q_down_proj` + `linear_q_up_proj`
# otherwise; its output projection is `linear_proj`, as in standard attention.
MLA_TARGET_MODULES = ("linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
                      "linear_q_down_proj", "linear_q_proj", "linear_q_up_proj")

# Targets LoRA refuses, and why (a LoRA there would be silently wrong, not just unsupported).
REFUSED_TARGETS = {
    "linear_qkv_down_proj": (
        "megatron-core's fused MLA down projection (mla_down_proj_fusion=True) splits its weight "
        "over TP per part with unequal parts ([q_lora_rank/tp; (kv_lora_rank + rope)/tp] per "
        "rank), which no adapter layout follows; build MLA with mla_down_proj_fusion=False and "
        "target linear_q_down_proj and linear_kv_down_proj"),
}


def matches(entry: str, name: str) -> bool:
    """The one target rule, PEFT's list rule, of both backends and of the PEFT files: an entry
    of a target (or exclude) list selects the module named `name` when `name` equals it or ends
    with `.<entry>` (`q_proj` selects every layer's; `model.layers.0.self_attn.q_proj` one)."""
    return name == entry or name.endswith("." + entry)


def check_targets(targets: Iterable[str], canonical: bool, field: str = "target_modules") -> None:
    """Raise `ValueError` naming the field for projection names outside canonical mode, for a
    module named together with one of its projections, and for refused targets."""
    targets = set(targets)
    for name in sorted(targets & set(REFUSED_TARGETS)):
        raise ValueError(f"LoRAConfig.{field}: {name} is not supported: {REFUSED_TARGETS[name]}")
    projections = sorted(targets & set(PROJECTION_TARGETS))
    if projections and not canonical:
        module = PROJECTION_TARGETS[projections[0]][0]
        raise ValueError(f"LoRAConfig.{field}: {', '.join(projections)} name(s) projections "
                         f"inside the fused {module}; per-projection adapters need "
                         f"canonical=True (--lora-canonical)")
    for module, parts in PROJECTIONS.items():
        named = sorted(targets & set(parts))
        if module in targets and named:
            raise ValueError(f"LoRAConfig.{field} names {module} and its projection(s) "
                             f"{', '.join(named)}: name the module (all of its projections) or "
                             f"the projections, not both")


def normalize_targets(targets: tuple[str, ...], canonical: bool) -> tuple[str, ...]:
    """Canonical mode: a complete set of a module's projection names becomes the module's name
    (`linear_q linear_k linear_v` -> `linear_qkv`). Sorted, like every target list."""
    if not canonical:
        return targets
    names = set(targets)
    for module, parts in PROJECTIONS.items():
        if set(parts) <= names:
            names = (names - set(parts)) | {module}
    return tuple(sorted(names))


def module_targets(targets: Iterable[str], canonical: bool) -> dict[str, tuple[str, ...]]:
    """`{module name: projections}` for resolved targets: the modules that get LoRA and, for a
    fused module in canonical mode, the projections that get an adapter each (in the module's
    row order); `()` for a module with one adapter."""
    modules: dict[str, set[str]] = {}
    for name in targets:
        if name in PROJECTION_TARGETS:
            module, part = PROJECTION_TARGETS[name]
            modules.setdefault(module, set()).add(part)
        elif canonical and name in PROJECTIONS:
            modules.setdefault(name, set()).update(PROJECTIONS[name].values())
        else:
            modules.setdefault(name, set())
    return {module: tuple(p for p in PROJECTIONS.get(module, {}).values() if p in parts)
            for module, parts in sorted(modules.items())}


def target_of_module(module: str, targets: Iterable[str]) -> str:
    """The target name the user wrote for `module` (for messages): the module's own name, or
    its projection names."""
    targets = tuple(targets)
    if module in targets:
        return module
    parts = [t for t in targets if PROJECTION_TARGETS.get(t, (None,))[0] == module]
    return " ".join(parts) or module
