"""Which modules a `target_modules` entry selects: Megatron's own names, dense and MoE alike.

A module's *target path* is its path in the model (or in a layer spec) with SequentialMLP's
`local_experts.<i>.` left out, so one path names an expert linear whatever the expert
implementation holds it as:

    decoder.layers.0.mlp.linear_fc1                          dense MLP
    decoder.layers.0.mlp.shared_experts.linear_fc1           MoE shared experts
    decoder.layers.0.mlp.experts.linear_fc1                  routed experts (TEGroupedMLP)
    decoder.layers.0.mlp.experts.local_experts.3.linear_fc1  routed expert 3 (SequentialMLP)
                                 -> decoder.layers.0.mlp.experts.linear_fc1

An entry selects the modules whose target path equals it or ends with `.<entry>`: `linear_fc1`
selects all four above, `experts.linear_fc1` the routed experts only, `shared_experts.linear_fc1`
the shared experts, `mlp.linear_fc1` the dense MLP. The router is not a linear and never a target.
"""

from __future__ import annotations

from collections.abc import Iterable

from lora_common.targets import matches
from megatron_lora.layers.expert import target_path

# The attribute under which megatron-core's MoE layer holds its routed experts.
ROUTED_EXPERTS = "experts"


def selects(entry: str, path: str) -> bool:
    """Whether the `target_modules` (or `exclude_modules`) entry selects the module at `path`."""
    return matches(entry, target_path(path))


def selecting(entries: Iterable[str], path: str) -> set[str]:
    """The entries that select the module at `path`."""
    return {entry for entry in entries if selects(entry, path)}


def is_routed_expert_path(path: str) -> bool:
    """Whether `path` is inside an MoE layer's routed experts (`....experts.<linear>`)."""
    parts = target_path(path).split(".")
    return len(parts) >= 2 and parts[-2] == ROUTED_EXPERTS


def leaf(entry: str) -> str:
    """The module name an entry ends with (`experts.linear_fc1` -> `linear_fc1`)."""
    return entry.rsplit(".", 1)[-1]


def selectable_names(path: str) -> set[str]:
    """The short entries that select the module at `path`, for error messages: its name, and
    for MoE linears the name under `experts.` / `shared_experts.` too."""
    parts = target_path(path).split(".")
    names = {parts[-1]}
    if len(parts) >= 2 and parts[-2] in (ROUTED_EXPERTS, "shared_experts"):
        names.add(".".join(parts[-2:]))
    return names
