"""Full adapter tensors, read from a trainer's own `{name: tensor}` mapping.

RL trainers hold their weights as a mapping of names to tensors: slime keeps a CPU backup of
every parameter (adapters included) under its global names (`module.module.decoder.layers.<global
index>...`), and syncs from it while the GPU weights are released. The adapter a rollout engine
loads, and the adapter a checkpoint or a PEFT export holds, is the same set of full tensors, so
all of them start here:

    full = full_adapter_tensors(backup, model)   # every rank calls (TP collectives)
    # {"decoder.layers.3.mlp.linear_fc1.lora_B.weight": full tensor, ...} on one rank per stage

The values come from `tensors`; the model supplies only what a name cannot tell: each
adapter's TP layout (which matrix is split, on which dim, with which stride) and its TP group.
A key of `tensors` belongs to an adapter when it ends with the adapter's name in the unsplit
model (`lora_tensors`), so any wrapper prefix works, and pipeline stages, whose layers carry
global indices in both, pair up without renumbering.

Traffic is rank-sized only: the matrix every TP rank holds whole (A of a column target, B of a
row target) is not moved at all; the split one is all-gathered over TP. Each pipeline stage's
first TP and data-parallel rank keeps the result (its "contribution"); the other ranks get an
empty dict, so a caller gathers contributions without duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core import parallel_state

from lora_common.state import is_lora_parameter
from megatron_lora.layers import sharding
from megatron_lora.modules import lora_tensors
from megatron_lora.sync.gather import raise_on_every_rank


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The model's own adapter parameters under their names in the unsplit model: the mapping
    to read a live model through (its `named_parameters()` names layers per stage locally)."""
    return {name: param for name, (param, _) in lora_tensors(model).items()}


def pair_adapter_keys(tensors: Mapping[str, torch.Tensor], model) -> dict[str, str]:
    """`{adapter name in the unsplit model: key of tensors}` for every adapter of this rank.
    Every adapter must have exactly one key, and every adapter key of `tensors` must belong to
    one of this rank's adapters; every problem is named at once."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"full_adapter_tensors: tensors must be a mapping of names to tensors "
                        f"(a state dict, named parameters, slime's CPU backup), got "
                        f"{type(tensors).__name__}")
    names = lora_tensors(model)
    by_suffix: dict[str, list[str]] = {}
    stray, unfit = [], []
    for key, value in tensors.items():
        if not isinstance(key, str) or not is_lora_parameter(key):
            continue
        problem = _value_problem(value)
        if problem:
            unfit.append(f"{key!r} {problem}")
        name = _adapter_name_of(key, names)
        if name is None:
            stray.append(key)
        else:
            by_suffix.setdefault(name, []).append(key)
    problems = unfit[:3] + ([f"and {len(unfit) - 3} more"] if len(unfit) > 3 else [])
    missing = [n for n in names if n not in by_suffix]
    if missing:
        problems.append(f"no tensor for {len(missing)} adapter(s) of the model, "
                        f"e.g. {missing[0]!r}")
    twice = {n: keys for n, keys in by_suffix.items() if len(keys) > 1}
    if twice:
        name, keys = next(iter(twice.items()))
        problems.append(f"{name!r} matches several tensors: {keys}")
    misshapen = [f"{keys[0]!r} has shape {tuple(tensors[keys[0]].shape)}, this rank's shard "
                 f"of {name} {tuple(names[name][0].shape)}" for name, keys in by_suffix.items()
                 if isinstance(tensors[keys[0]], torch.Tensor)
                 and tuple(tensors[keys[0]].shape) != tuple(names[name][0].shape)]
    problems += misshapen[:3]
    if stray:
        problems.append(f"{len(stray)} adapter tensor(s) belong to no LoRA module of this rank, "
                        f"e.g. {stray[0]!r} (its layer on another pipeline stage, or local layer "
                        f"indices where global ones are expected)")
    if problems:
        raise ValueError("full_adapter_tensors: " + "; ".join(problems))
    return {name: keys[0] for name, keys in by_suffix.items()}


def _value_problem(value) -> str | None:
    """What keeps `value` from being an adapter matrix: it must be a floating-point tensor with
    values (an integer matrix would be sent and served as is)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a torch.Tensor"
    if value.is_meta:
        return "is a meta tensor, which has no values (materialize the model first)"
    if not value.is_floating_point():
        return f"has dtype {value.dtype}; an adapter matrix is floating point"
    return None


def _adapter_name_of(key: str, names: Mapping[str, object]) -> str | None:
    # A key is `<any prefix>.<name>` or `<name>`; names start at `decoder.` (or the module's
    # path for an adapter outside the decoder), so try each dot-separated suffix.
    parts = key.split(".")
    for start in range(len(parts)):
        suffix = ".".join(parts[start:])
        if suffix in names:
            return suffix
    return None


def _keeps_result(module, param, beside_experts: bool) -> bool:
    """Whether this rank keeps the gathered value of `param`: rank 0 of every group it is
    replicated over (TP and data-parallel; for an expert's, expert-TP and expert-data-parallel,
    and expert-parallel too for a matrix the experts share). One rank per pipeline stage (and
    per expert-parallel rank, for experts' own matrices) keeps each tensor. `beside_experts`:
    a matrix the experts share is also kept on every expert-parallel rank that keeps experts
    (their PEFT modules are made with it)."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    skip = getattr(module, "lora_ep_group", None) if beside_experts else None
    return all(sharding.group_size_rank(group)[1] == 0
               for group in module.lora_replica_groups(param) if group is not skip)


@torch.no_grad()
def full_adapter_tensors(tensors: Mapping[str, torch.Tensor], model, *,
                         beside_experts: bool = False) -> dict[str, torch.Tensor]:
    """This rank's contribution of the full adapter: `{name in the unsplit model: full CPU
    tensor}` on the first TP / data-parallel rank of each pipeline stage, `{}` elsewhere.
    `tensors` holds this rank's shards (live parameters, or a copy; adapters under any prefix).
    Call on every rank: each split matrix is all-gathered over its TP group, in the model's
    module order."""
    try:  # what one rank refuses, every rank refuses before the gathers below
        keys, error = pair_adapter_keys(tensors, model), None
    except (TypeError, ValueError) as refusal:
        error = refusal
    raise_on_every_rank(error)
    out = {}
    for name, (param, module) in lora_tensors(model).items():
        value = tensors[keys[name]]
        try:
            full = sharding.full_value(value, param, module.lora_tp_group)
        except ValueError as error:
            raise ValueError(f"full_adapter_tensors: {keys[name]}: {error}") from None
        if _keeps_result(module, param, beside_experts):
            out[name] = full.cpu()
    return out
