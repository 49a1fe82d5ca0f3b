"""Model-level verbs on the adapters' state: merge, unmerge, disable, and the merged-weight
stream (the LoRA state protocol is `lora_common.state`).

All of them act per local shard with no communication: the sharding rule makes each rank's
shard of `W + scaling * B @ A` computable from what that rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lora_common.state import is_lora_parameter, lora_disabled, require_state
from megatron_lora.layers.registry import is_lora_linear
from megatron_lora.modules import lora_modules, model_chunks


def merge_lora_weights(model) -> None:
    """Fold every adapter into its base weight, in place; the forward is unchanged, the LoRA
    branch is skipped while merged. Refused on a merged model and inside `disable_lora`."""
    modules = lora_modules(model)
    require_state(modules, "merge_lora_weights", merged=False, disabled=False, model=model)
    for module in modules.values():
        module.merge_lora()


def unmerge_lora_weights(model) -> None:
    """Undo `merge_lora_weights`; refused unless every module is merged."""
    modules = lora_modules(model)
    require_state(modules, "unmerge_lora_weights", merged=True, model=model)
    for module in modules.values():
        module.unmerge_lora()


@contextlib.contextmanager
def disable_lora(model):
    """A context in which the model computes its base model (e.g. RL reference log-probs with
    no second copy of the weights). Nests; restores on exceptions. Refused on a merged model,
    whose weights are no longer the base's."""
    with lora_disabled(lora_modules(model), model):
        yield model


def iter_merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every base parameter of this rank, with the adapter folded in
    where one is active: the weights a rollout engine should serve, per local shard, before any
    TP gather (after the gather, fc1's rows are interleaved across ranks).

    Does not change the model. Peak extra memory is one merged tensor; parameters without an
    adapter are yielded as detached views of the live parameter (copy before mutating).
    LoRA parameters are never yielded. For a list of chunks, names get a `<chunk index>.` prefix.
    """
    for index, chunk in enumerate(model_chunks(model)):
        prefix = f"{index}." if isinstance(model, (list, tuple)) else ""
        # Each adapted base weight (a grouped expert linear has one per expert) -> its owner.
        owners = {id(pair.weight): (module, pair) for module in chunk.modules()
                  if is_lora_linear(module) for pair in module.lora_pairs()}
        for name, param in chunk.named_parameters():
            if is_lora_parameter(name):
                continue
            owner, pair = owners.get(id(param), (None, None))
            if owner is not None and owner.lora_active:
                with torch.no_grad():  # not around the yield: grad mode must not leak out
                    merged = owner.merged_weight(pair)
                yield prefix + name, merged
            else:
                yield prefix + name, param.detach()
