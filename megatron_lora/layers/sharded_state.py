"""How a LoRA linear describes its adapter to Megatron's dist checkpointing.

The base class maps only `weight`/`bias`, and would save a split adapter matrix as if it were
replicated: one rank's shard kept, the others silently dropped. Each adapter tensor is
described with its own split instead (the split kind's, `sharding.py`), so every shard is saved
and a checkpoint reloads at any TP size. SwiGLU fc1's B goes through Megatron's SwiGLU factory,
as MLP's fc1 weight does, so the gate and up halves reshard like the weight's.
"""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class _NotInCheckpoint:
    """What a dist-checkpoint load returns for a SwiGLU fc1's `lora_B.weight` that the checkpoint
    does not hold (a base-only checkpoint, under a strictness that leaves absent keys out)."""

    def __repr__(self) -> str:
        return "<LoRA adapter not in the checkpoint: kept as initialized>"


NOT_IN_CHECKPOINT = _NotInCheckpoint()


def adapter_sharded_state(module, prefix: str, sharded_offsets=(), metadata=None) -> dict:
    """Every adapter matrix of a LoRA linear (`{prefix}lora_A.weight`, `{prefix}lora_B.weight`,
    or a canonical one's `{prefix}lora_q.lora_A.weight`, ...) as a sharded tensor split as its
    own TP attributes say (the split kind's rule), or, for SwiGLU fc1's B, a factory."""
    metadata = metadata or {}
    dp_cp_group = metadata.get("dp_cp_group") or parallel_state.get_data_parallel_group(
        with_context_parallel=True)
    adapters = module.lora_parameters()
    split_dims = {name: param.partition_dim for name, param in adapters.items()
                  if getattr(param, "tensor_model_parallel", False)}
    state = make_sharded_tensors_for_checkpoint(
        adapters, prefix, split_dims, sharded_offsets,
        tp_group=module.lora_tp_group, dp_cp_group=dp_cp_group)
    for name, param in adapters.items():
        if getattr(param, "partition_stride", 1) == 2:
            state[prefix + name] = swiglu_factory_tolerating_absence(
                state[prefix + name], sharded_offsets,
                metadata.get("singleton_local_shards", False))
    return state


def swiglu_factory_tolerating_absence(sharded_tensor, sharded_offsets, singleton_local_shards):
    """Megatron's SwiGLU factory (same saved tensors, keys and offsets) whose load survives a
    checkpoint without the tensor.

    A dist-checkpoint load under a strictness other than the default (`log_unexpected`,
    `log_all`, `ignore_all`, `return_*`) drops the keys the checkpoint lacks from the request,
    but not the factories built from them; `apply_factory_merges` then finds no entry for the
    factory and raises (`Different dict keys encountered`). So the build also yields a
    non-persistent marker, which is never saved and is merged back into the loaded state before
    the factories run: the merge always finds its entry, and with the two halves gone it returns
    `NOT_IN_CHECKPOINT`, which `LoRAFactor` leaves out of the load (a missing key, as for A).
    (Two plain sharded tensors would not do: Megatron's optimizer finds a parameter's state
    through its factory's data.)
    """
    factory = apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, singleton_local_shards)
    build_halves, merge_halves = factory.build_fn, factory.merge_fn

    def build(key, data, replica_id, flattened_range):
        return {"halves": build_halves(key, data, replica_id, flattened_range),
                "marker": LocalNonpersistentObject(None)}

    def merge(loaded):
        return merge_halves(loaded["halves"]) if "halves" in loaded else NOT_IN_CHECKPOINT

    return dataclasses.replace(factory, build_fn=build, merge_fn=merge)
