"""Model-level verbs around the adapters: merge, unmerge, disable, and the merged-weight stream.

All of them act per local shard with no communication: the sharding rule makes each rank's
shard of `W + scaling * B @ A` computable from what that rank holds.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron_lora.lora_layer import model_chunks
from megatron_lora.lora_linear import LoRAMatrix, is_lora_linear


def lora_modules(model) -> list:
    """Every LoRA linear in the model (or list of virtual-pipeline chunks)."""
    return [m for chunk in model_chunks(model) for m in chunk.modules() if is_lora_linear(m)]


def merge_lora_weights(model) -> None:
    """Fold every adapter into its base weight, in place; the forward is unchanged, the LoRA
    branch is skipped while merged. Merging a merged model raises `RuntimeError`."""
    modules = lora_modules(model)
    merged = [m for m in modules if m.lora_merged]
    if merged:
        raise RuntimeError(f"merge_lora_weights: {len(merged)} LoRA module(s) are already merged")
    disabled = [m for m in modules if m.lora_disabled]
    if disabled:
        raise RuntimeError("merge_lora_weights: called inside disable_lora; the merged model "
                           "would not be the base model the context promises")
    for module in modules:
        module.merge_lora()


def unmerge_lora_weights(model) -> None:
    """Undo `merge_lora_weights`. Unmerging an unmerged model raises `RuntimeError`."""
    modules = lora_modules(model)
    unmerged = [m for m in modules if not m.lora_merged]
    if unmerged:
        raise RuntimeError(f"unmerge_lora_weights: {len(unmerged)} LoRA module(s) are not merged")
    for module in modules:
        module.unmerge_lora()


@contextlib.contextmanager
def disable_lora(model):
    """A context in which the model computes its base model (e.g. RL reference log-probs with
    no second copy of the weights). Nests; restores on exceptions. Refused on a merged model,
    whose weights are no longer the base's."""
    modules = lora_modules(model)
    merged = [m for m in modules if m.lora_merged]
    if merged:
        raise RuntimeError(f"disable_lora: {len(merged)} LoRA module(s) are merged; their "
                           f"weights hold the adapter, so unmerge first")
    for module in modules:
        module.lora_disabled += 1
    try:
        yield model
    finally:
        for module in modules:
            module.lora_disabled -= 1


def iter_merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every base parameter of this rank, with the adapter folded in
    where one is active: the weights a rollout engine should serve, per local shard, before any
    TP gather (after the gather, fc1's rows are interleaved across ranks).

    Does not change the model. Peak extra memory is one merged tensor; parameters without an
    adapter are yielded as detached views of the live parameter (copy before mutating).
    LoRA parameters are never yielded. For a list of chunks, names get a `<chunk index>.` prefix.
    """
    chunks = model_chunks(model)
    for index, chunk in enumerate(chunks):
        prefix = f"{index}." if isinstance(model, (list, tuple)) else ""
        owners = {id(m.weight): m for m in chunk.modules() if is_lora_linear(m)}
        adapter = {id(p) for m in chunk.modules() if isinstance(m, LoRAMatrix) for p in m.parameters()}
        for name, param in chunk.named_parameters():
            if id(param) in adapter:
                continue
            owner = owners.get(id(param))
            if owner is not None and owner.lora_active:
                with torch.no_grad():  # not around the yield: grad mode must not leak out
                    merged = owner.merged_weight()
                yield prefix + name, merged
            else:
                yield prefix + name, param.detach()
