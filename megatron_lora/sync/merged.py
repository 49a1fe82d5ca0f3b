"""Merged weights for a rollout engine, read from a trainer's own `{name: tensor}` view.

RL trainers sync weights to their rollout engine from a mapping of parameter names to tensors,
not from the modules: slime reads a CPU backup of every parameter (its GPU copy is released
while the engine generates) or the live parameters, both under its own global names (layer
indices offset per pipeline stage). `merged_weights` wraps such a mapping so that it reads as
the merged model:

    weights = merged_weights(state, model)     # state: {name: tensor}, adapters included
    list(weights)                              # base names only, never lora_A / lora_B
    weights["...linear_qkv.weight"]            # this rank's shard of W + scaling * B @ A

Tensors are paired by name (`<m>.weight` with `<m>.lora_A.weight` and `<m>.lora_B.weight`;
a grouped MoE linear's `<m>.weight<k>` with `<m>.lora_A.weight<k>`, or with `<m>.lora_A.weight`
where the experts share it; canonical LoRA's `<m>.weight` with every
`<m>.lora_<projection>.lora_A.weight` / `.lora_B.weight`), so any prefix, layer renumbering or
expert renumbering works (slime names grouped experts by global index, `weight<k>` and
`lora_B.weight<k>` alike), and the merge is done on access (peak extra memory: one merged
tensor) with the arithmetic of `iter_merged_weights`: fp32, one cast. Each merge is of one TP
shard, which the sharding rule makes exact; gather after merging, never before (after the
gather, SwiGLU fc1's rows are interleaved across ranks).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from lora_common.state import adapter_prefix, is_lora_parameter, parse_adapter_name, require_state
from lora_common.targets import PROJECTIONS
from megatron_lora.layers.functional import merged_shard
from megatron_lora.modules import lora_modules

# What weight-sync code reads off a tensor to gather and convert it (Megatron's TP layout,
# TE's parallel mode, SP and DDP marks): a merged shard carries its base weight's.
LAYOUT_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride",
                     "parallel_mode", "sequence_parallel", "allreduce", "shared")


class MergedWeights(Mapping):
    """A read-only view of `tensors` in which each base weight with an adapter reads as
    `W + scaling * B @ A` (computed on access, on `device` or else W's own) and the adapter
    matrices are hidden. Every other tensor is returned as it is. `r` is the adapters' rank:
    a pair of another rank is refused, as the scaling would not be its own. `layouts` maps a
    fused module's name (`linear_qkv`) to its per-projection layout on this rank, for
    canonical adapters."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], scaling: float, r: int, device=None,
                 layouts: Mapping[str, object] | None = None):
        self._tensors = tensors
        self._scaling = scaling
        self._device = device
        self.adapters = _adapter_pairs(tensors, r)  # {base weight name: (A name, B name)}
        # {base weight name: {projection: (A name, B name)}}: canonical adapters
        self.projections = _projection_adapters(tensors, r, layouts or {})
        self._layouts = layouts or {}
        self._names = [name for name in tensors if not is_lora_parameter(name)]
        self._name_set = set(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:  # Mapping's default would compute a merge
        return name in self._name_set

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._name_set:
            if is_lora_parameter(name):
                raise KeyError(f"{name}: adapter matrices are folded into their base weight, "
                               f"not synced on their own")
            raise KeyError(name)
        weight = self._tensors[name]
        if name in self.projections:
            return self._merge(weight, *self._fused_projections(name, weight))
        pair = self.adapters.get(name)
        if pair is None:
            return weight
        return self._merge(weight, self._tensors[pair[0]], self._tensors[pair[1]])

    def _fused_projections(self, name: str, weight: torch.Tensor):
        """(A, B) of one rank's shard that its per-projection adapters amount to."""
        adapters = self.projections[name]
        layout = self._layouts[_module_leaf(name)]
        return layout.fuse({p: self._tensors[a] for p, (a, _) in adapters.items()},
                           {p: self._tensors[b] for p, (_, b) in adapters.items()},
                           weight.shape[0])

    @torch.no_grad()
    def _merge(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # The LoRA linears' own arithmetic; blocking copies to `device` (a non-blocking
        # device-to-host copy could be read before it lands).
        merged = merged_shard(weight, A, B, self._scaling, self._device)
        for attr in LAYOUT_ATTRIBUTES:
            if hasattr(weight, attr):
                setattr(merged, attr, getattr(weight, attr))
        return merged


def _adapter_pairs(tensors: Mapping[str, torch.Tensor], r: int) -> dict[str, tuple[str, str]]:
    """`{base weight: (A, B)}` for every adapter in `tensors`, each of rank `r`; every problem
    named at once. A module's adapter matrices are `lora_A.weight` / `lora_B.weight`, or per
    expert of a grouped linear `lora_A.weight<k>` (for base `weight<k>`), a matrix without a
    number being shared by all of the module's experts."""
    found: dict[str, dict[str, set[str]]] = {}  # module prefix -> matrix -> expert numbers
    for name in tensors:
        parsed = parse_adapter_name(name)
        if parsed is not None and projection_of(parsed[0]) is None:  # canonical: apart
            prefix, matrix, number = parsed
            found.setdefault(prefix, {"A": set(), "B": set()})[matrix].add(number)
    pairs, problems = {}, []
    for prefix, numbers in found.items():
        experts = sorted((numbers["A"] | numbers["B"]) - {""}, key=int) or [""]
        for number in experts:
            names = [f"{prefix}lora_{m}.weight{number if number in numbers[m] else ''}"
                     for m in ("A", "B")]
            a_name, b_name, base = *names, f"{prefix}weight{number}"
            missing = [n for n in (a_name, b_name, base) if n not in tensors]
            if missing:
                present = next(n for n in (a_name, b_name) if n in tensors)
                problems.append(f"{present} has no {', '.join(missing)}")
                continue
            A, B, W = tensors[a_name], tensors[b_name], tensors[base]
            unfit = [n for n, t in ((a_name, A), (b_name, B))
                     if not isinstance(t, torch.Tensor) or not t.is_floating_point()]
            if unfit:  # an integer (or numpy) matrix would be merged as if it were an adapter
                problems.append(f"{unfit[0]} is a {type(tensors[unfit[0]]).__name__} of dtype "
                                f"{getattr(tensors[unfit[0]], 'dtype', None)}; adapter matrices "
                                f"are floating-point tensors")
                continue
            if B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != tuple(W.shape):
                problems.append(f"{base} {tuple(W.shape)} cannot take {b_name.rsplit('.', 2)[-2]}"
                                f" {tuple(B.shape)} @ {a_name.rsplit('.', 2)[-2]} {tuple(A.shape)}")
                continue
            if A.shape[0] != r:
                problems.append(f"{a_name} {tuple(A.shape)} has rank {A.shape[0]}; the model's "
                                f"LoRA modules have r={r}")
                continue
            pairs[base] = (a_name, b_name)
    if problems:
        raise ValueError("merged_weights: " + "; ".join(problems))
    return pairs


_PROJECTION_PREFIX = re.compile(
    r"^(?P<module>(?:.*\.)?(?:" + "|".join(PROJECTIONS) + r")\.)lora_(?P<projection>"
    + "|".join(p for parts in PROJECTIONS.values() for p in parts.values()) + r")\.$")


def projection_of(prefix: str) -> tuple[str, str] | None:
    """`a.linear_qkv.lora_q.` -> (`a.linear_qkv.`, `q`): the fused module and projection of a
    canonical adapter's prefix; None for any other prefix."""
    match = _PROJECTION_PREFIX.match(prefix)
    return None if match is None else (match["module"], match["projection"])


def _module_leaf(weight_name: str) -> str:
    """`a.b.linear_qkv.weight` -> `linear_qkv`."""
    return weight_name.rsplit(".", 2)[-2]


def _projection_adapters(tensors: Mapping[str, torch.Tensor], r: int,
                         layouts: Mapping[str, object]) -> dict[str, dict[str, tuple[str, str]]]:
    """`{base weight: {projection: (A, B)}}` for every canonical adapter in `tensors`, each of
    rank `r` and fitting its weight's layout; every problem named at once."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for name in tensors:
        prefix = adapter_prefix(name)
        projection = projection_of(prefix) if prefix is not None else None
        if projection is not None:
            module, part = projection
            found.setdefault(f"{module}weight", {})[part] = (
                f"{prefix}lora_A.weight", f"{prefix}lora_B.weight")
    problems = []
    for base, adapters in found.items():
        missing = [n for n in (base, *(n for pair in adapters.values() for n in pair))
                   if n not in tensors]
        if missing:
            problems.append(f"{base}'s projection adapters lack {', '.join(missing)}")
            continue
        ranks = {tensors[a].shape[0] for a, _ in adapters.values()}
        if ranks != {r}:
            problems.append(f"{base}'s projection adapters have rank(s) {sorted(ranks)}; the "
                            f"model's LoRA modules have r={r}")
            continue
        layout = layouts.get(_module_leaf(base))
        if layout is None:
            problems.append(f"{base} has projection adapters but the model has no canonical "
                            f"{_module_leaf(base)}")
            continue
        try:
            layout.fuse({p: tensors[a] for p, (a, _) in adapters.items()},
                        {p: tensors[b] for p, (_, b) in adapters.items()},
                        tensors[base].shape[0])
        except ValueError as error:
            problems.append(f"{base} {tuple(tensors[base].shape)}: {error}")
    if problems:
        raise ValueError("merged_weights: " + "; ".join(problems))
    return found


def merged_weights(tensors: Mapping[str, torch.Tensor], model, device=None) -> Mapping:
    """`tensors` (names to this rank's tensors: live parameters or a copy, adapters included)
    as the merged model would hold them: a `MergedWeights` view, merging on access on `device`
    (default: each weight's own). The scaling is read from `model`'s LoRA modules, which also
    vouch that the tensors hold unmerged base weights. A model without LoRA gets `tensors`
    back untouched, so a caller can wrap unconditionally."""
    modules = lora_modules(model)
    if not modules:
        stray = [name for name in tensors if is_lora_parameter(name)]
        if stray:
            raise ValueError(f"merged_weights: the tensors hold adapter matrices ({stray[0]!r}, "
                             f"{len(stray)} in all) but the model has no LoRA module")
        return tensors
    # Merged in place, the weights already hold the adapter; inside disable_lora, the merged
    # model is not the base model that context promises.
    require_state(modules, "merged_weights", merged=False, disabled=False, model=model)
    shapes = sorted({(m.lora_config.r, m.lora_scaling) for m in modules.values()})
    if len(shapes) != 1:
        raise ValueError(f"merged_weights: the model's LoRA modules disagree on (r, scaling): "
                         f"{shapes}")
    (r, scaling), = shapes
    layouts = {name.rsplit(".", 1)[-1]: module.lora_layout for name, module in modules.items()
               if hasattr(module, "lora_layout")}
    view = MergedWeights(tensors, scaling, r, device, layouts)
    paired = len(view.adapters) + len(view.projections)
    adapted = sum(len(module.lora_pairs()) for module in modules.values())
    if paired != adapted:
        raise ValueError(f"merged_weights: the tensors pair {paired} adapter(s) "
                         f"with base weights, the model has {len(modules)} LoRA module(s) "
                         f"adapting {adapted} weight(s)")
    return view


def iter_merged_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], model,
                        device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream form of `merged_weights`: `(name, tensor)` pairs in, the same order out, with
    each adapter folded into its base weight and dropped. A base weight comes before its
    adapters in `named_parameters()` order, so the pairs are collected first (references, no
    copies). Without LoRA in the model the pairs pass through untouched, one at a time."""
    if not lora_modules(model):
        for name, tensor in named_tensors:
            if is_lora_parameter(name):
                raise ValueError(f"iter_merged_tensors: {name!r} is an adapter matrix but the "
                                 f"model has no LoRA module")
            yield name, tensor
        return
    yield from merged_weights(dict(named_tensors), model, device).items()
