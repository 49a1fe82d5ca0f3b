"""megatron-core's MoE layer as LoRA sees it: which expert a `SequentialMLP` linear is, and the
MoE variants LoRA refuses, by name, before anything is built or changed.

Expert implementations (`MoELayer.experts`):
- `SequentialMLP`: each local expert its own `MLP` (`local_experts.<i>.linear_fc1/fc2`, local or
  TE column/row linears). LoRA adapts each as an expert linear (`layers/expert.py`); per-expert
  layout only (there is no module a matrix shared by the experts could live in).
- `TEGroupedMLP`: `linear_fc1` / `linear_fc2` are TE grouped linears holding every local
  expert's `weight<i>`; LoRA holds the experts' adapters inside (`layers/grouped_linear.py`),
  per expert or shared-outer.
- Refused: the legacy `GroupedMLP` (megatron-core 0.16; raw `weight1`/`weight2` for all
  experts, no linear modules, CUDA-only `grouped_gemm`), `InferenceGroupedMLP`, TE's op-fuser
  path (`use_transformer_engine_op_fuser`: fused TE ops that never call the linears' forward),
  `moe_mlp_glu_interleave_size` (fc1 rows block-interleaved: the gate/up split of the export
  would change), single grouped weights (`moe_single_grouped_weight`). Shared experts
  (`SharedExpertMLP`) are dense MLPs over the dense TP group and get the dense rule; refused are
  `FusedSharedExpertMLP` (`use_grouped_gemm_for_shared_expert`, fused TE ops) and
  `moe_shared_expert_overlap` (its linears switch to explicit communication on a side CUDA
  stream that cannot be built on CPU, so that path is untested).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from megatron_lora.adapt.selection import selecting
from megatron_lora.layers.expert import ExpertPlace

_SEQUENTIAL_EXPERT = re.compile(r"^(?P<experts>(?:.*\.)?experts)\.local_experts\.(?P<local>\d+)\.")
ROUTED_LINEARS = ("mlp.experts.linear_fc1", "mlp.experts.linear_fc2")
SHARED_LINEARS = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")


def sequential_expert(name: str) -> tuple[str, int] | None:
    """(path of the SequentialMLP, local expert index) of a module inside a local expert."""
    match = _SEQUENTIAL_EXPERT.match(name)
    return None if match is None else (match.group("experts"), int(match.group("local")))


def expert_place(experts, local_index: int) -> ExpertPlace:
    """The place of local expert `local_index` of a `SequentialMLP` (or TEGroupedMLP)."""
    ep_group = experts.ep_group
    return ExpertPlace(index=ep_group.rank() * experts.num_local_experts + local_index,
                       num_experts=ep_group.size() * experts.num_local_experts,
                       ep_group=ep_group)


def selects_routed(targets: Iterable[str]) -> bool:
    return any(selecting(targets, path) for path in ROUTED_LINEARS)


def selects_shared(targets: Iterable[str]) -> bool:
    return any(selecting(targets, path) for path in SHARED_LINEARS)


@functools.cache
def _classes(*names_in_modules: tuple[str, str]) -> tuple[type, ...]:
    """The megatron-core classes of this version among `(module, class name)`."""
    import importlib

    found = []
    for module, name in names_in_modules:
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def check_experts_class(where: str, cls: type | None, lora) -> None:
    """Refuse an experts or shared-experts class LoRA cannot adapt, when the config targets it.
    `where` is its path (`mlp.experts`, `decoder.layers.0.mlp.shared_experts`)."""
    if not isinstance(cls, type):
        return
    targets, name = lora.target_modules, cls.__name__
    experts = "megatron.core.transformer.moe.experts"
    if where.rsplit(".", 1)[-1] == "experts" and selects_routed(targets):
        if issubclass(cls, _classes((experts, "InferenceGroupedMLP"))):
            raise ValueError(f"LoRA: {where} is {name}, megatron-core's inference-only experts; "
                             f"train LoRA on TEGroupedMLP or SequentialMLP experts")
        if issubclass(cls, _classes((experts, "GroupedMLP"))):
            raise ValueError(
                f"LoRA: {where} is the legacy GroupedMLP (--moe-grouped-gemm without Transformer "
                f"Engine, or --moe-use-legacy-grouped-gemm), which "
                f"holds every expert in two raw weights (weight1, weight2) run by the CUDA-only "
                f"grouped_gemm package, with no linear to adapt; use TEGroupedMLP "
                f"(--moe-grouped-gemm with Transformer Engine) or SequentialMLP")
        if lora.expert_layout == "shared_outer" and issubclass(
                cls, _classes((experts, "SequentialMLP"))):
            raise ValueError(
                f"LoRA: expert_layout 'shared_outer' cannot be held by {where} ({name}): each "
                f"of its experts is its own MLP, so there is no module for a matrix the experts "
                f"share; use TEGroupedMLP experts (--moe-grouped-gemm) or expert_layout "
                f"'per_expert'")
    if where.rsplit(".", 1)[-1] == "shared_experts" and selects_shared(targets):
        if issubclass(cls, _classes(("megatron.core.transformer.moe.shared_experts",
                                     "FusedSharedExpertMLP"))):
            raise ValueError(f"LoRA: {where} is FusedSharedExpertMLP "
                             f"(use_grouped_gemm_for_shared_expert), fused TE ops that never "
                             f"call its linears; turn it off to adapt the shared experts")


def check_moe_config(config, lora) -> None:
    """Refuse the MoE options of a `TransformerConfig` under which LoRA's targets would not run
    as adapted (see the module docstring)."""
    if not getattr(config, "num_moe_experts", None):
        return
    targets = lora.target_modules or ()
    routed, shared = selects_routed(targets), selects_shared(targets)
    refusals = {
        "use_transformer_engine_op_fuser": (routed, "TE's op fuser runs the experts as fused "
                                            "ops that never call linear_fc1/fc2"),
        "moe_mlp_glu_interleave_size": (routed, "fc1's gate and up rows are block-interleaved, "
                                        "which the adapter's gate/up export does not read"),
        "moe_single_grouped_weight": (routed, "the experts' weights are one stacked parameter, "
                                      "not weight0..weight<E-1>"),
        "moe_shared_expert_overlap": (shared, "the shared experts' linears switch to explicit "
                                      "communication on a side CUDA stream; that path is not "
                                      "tested (it cannot be built on CPU)"),
        "use_grouped_gemm_for_shared_expert": (shared, "the shared experts run as fused TE "
                                               "ops (FusedSharedExpertMLP)"),
    }
    for option, (applies, why) in refusals.items():
        if applies and getattr(config, option, None) not in (None, False):
            raise ValueError(f"LoRA on MoE layers does not support {option}="
                             f"{getattr(config, option)!r}: {why}. Turn it off, or leave those "
                             f"linears out of target_modules")


def no_experts_hint(missing: Iterable[str], linears: Iterable[str]) -> str:
    """A note for target entries that name MoE linears in a model without them."""
    kinds = [kind for kind in ("shared_experts", "experts")
             if any(kind in entry.split(".") for entry in missing)
             and not any(name.startswith(f"{kind}.") for name in linears)]
    if not kinds:
        return ""
    return (f" (the model has no MoE {' or '.join(k.replace('_', ' ') for k in kinds)}: "
            f"{', '.join(sorted(missing))} select(s) nothing in a dense model)")
