"""HF names of MoE routed-expert adapters (no transformers, no Megatron import).

PEFT adapters name experts per expert, as transformers 4 modules did; SGLang and vLLM serve that
form, and PEFT (0.21) converts it on load into transformers 5's fused expert parameters:

    Megatron                                       HF (Qwen3-MoE; Mixtral: w1 / w3 / w2)
    mlp.experts.linear_fc1 of expert e   [gate; up]   mlp.experts.{e}.gate_proj, .up_proj
    mlp.experts.linear_fc2 of expert e                mlp.experts.{e}.down_proj

fc1's A goes to both gate and up, its B's rows split `[gate; up]` (the full, TP-gathered B).
Shared experts (DeepSeek-V3's `mlp.shared_experts`, one gated MLP) split the same way:
`mlp.shared_experts.linear_fc1` -> `mlp.shared_experts.gate_proj`, `.up_proj`.
A factor the experts of a layer share (`shared_outer`) is, in SGLang's form, one `[1, ...]`
tensor under the expert-less module `mlp.experts.gate_proj` (and `up_proj`: the same A), or
`mlp.experts.down_proj` for fc2's B.
"""

from __future__ import annotations

import re

from megatron_lora.interop.architectures import ARCHITECTURES, Architecture, ExpertNames

_HF_PREFIX = r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\."


def leaves(names: ExpertNames, target: str) -> tuple[str, ...]:
    """The HF expert leaves one Megatron expert target becomes."""
    if target == "linear_fc1":
        return (names.gate, names.up)
    if target == "linear_fc2":
        return (names.down,)
    raise ValueError(f"MoE experts have no {target!r}; their targets are linear_fc1, linear_fc2")


def target_of(names: ExpertNames, leaf: str) -> str:
    """The Megatron expert target an HF expert leaf belongs to."""
    for target in ("linear_fc1", "linear_fc2"):
        if leaf in leaves(names, target):
            return target
    raise ValueError(f"unknown HF expert module {leaf!r}; known: {names.gate}, {names.up}, "
                     f"{names.down}")


def module_names(names: ExpertNames, layer: int, target: str,
                 expert: int | None) -> tuple[str, ...]:
    """The HF modules of one expert's target (expert None: the modules the experts share)."""
    where = names.path if expert is None else f"{names.path}.{expert}"
    return tuple(f"model.layers.{layer}.{where}.{leaf}" for leaf in leaves(names, target))


def parse_module(name: str) -> tuple[ExpertNames, int, str, int | None] | None:
    """(expert names, layer, leaf, expert index or None for a shared module) of an HF expert
    module name, for any known MoE architecture; None if it names no expert module."""
    for names in {a.moe for a in ARCHITECTURES.values() if a.moe is not None}:
        pattern = (_HF_PREFIX + re.escape(names.path) + r"(?:\.(?P<expert>\d+))?\."
                   + r"(?P<leaf>" + "|".join(map(re.escape, (names.gate, names.up, names.down)))
                   + r")$")
        match = re.match(pattern, name)
        if match:
            expert = None if match["expert"] is None else int(match["expert"])
            return names, int(match["layer"]), match["leaf"], expert
    return None


def shared_module_names(architecture: Architecture, layer: int, target: str) -> tuple[str, ...]:
    """The HF modules of a shared-experts target of `architecture` (gate/up/down leaves)."""
    if architecture.shared_experts is None:
        raise ValueError(f"{architecture.name} has no shared experts")
    names = require_experts(architecture)
    return tuple(f"model.layers.{layer}.{architecture.shared_experts}.{leaf}"
                 for leaf in leaves(names, target))


def parse_shared_module(name: str) -> tuple[Architecture, int, str] | None:
    """(architecture, layer, leaf) of an HF shared-experts module name, None if it names none."""
    for arch in ARCHITECTURES.values():
        if arch.shared_experts is None:
            continue
        names = arch.moe
        pattern = (_HF_PREFIX + re.escape(arch.shared_experts) + r"\.(?P<leaf>"
                   + "|".join(map(re.escape, (names.gate, names.up, names.down))) + r")$")
        match = re.match(pattern, name)
        if match:
            return arch, int(match["layer"]), match["leaf"]
    return None


def require_experts(architecture: Architecture) -> ExpertNames:
    if architecture.moe is None:
        moe = [a.name for a in ARCHITECTURES.values() if a.moe is not None]
        raise ValueError(f"the adapter has MoE expert tensors but {architecture.name} has no "
                         f"experts; name the MoE architecture ({', '.join(moe)})")
    return architecture.moe
