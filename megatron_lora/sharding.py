"""Megatron's tensor-parallel layout of one tensor, as pure functions on full tensors.

A split tensor is cut along `dim` into `world * stride` equal chunks and rank `i` holds chunks
`i, i + world, i + 2 * world, ...` concatenated (Megatron's `_initialize_affine_weight_cpu`).
With `stride=1` that is the plain contiguous split; SwiGLU `linear_fc1` uses `stride=2`, so
the full `[gate; up]` weight leaves each rank `[gate_i; up_i]`.
"""

from __future__ import annotations

from typing import Sequence

import torch


def shard(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """This rank's slice of `full` (a view when `stride == 1`)."""
    if full.shape[dim] % (world * stride):
        raise ValueError(f"dim {dim} of size {full.shape[dim]} does not split into "
                         f"{world} ranks x stride {stride}")
    chunks = full.chunk(world * stride, dim=dim)
    mine = chunks[rank::world]
    return mine[0] if stride == 1 else torch.cat(mine, dim=dim)


def unshard(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's slice, in rank order."""
    world = len(shards)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    # Chunk j of the full tensor is piece j // world of rank j % world.
    return torch.cat([pieces[j % world][j // world] for j in range(world * stride)], dim=dim)


def full_tensor(param: torch.Tensor, group) -> torch.Tensor:
    """The unsharded value of a parameter carrying Megatron's TP attributes
    (`tensor_model_parallel`, `partition_dim`, `partition_stride`): an all-gather over `group`
    for a split one, a copy for a replicated one. Call on every rank of `group`."""
    if not getattr(param, "tensor_model_parallel", False) or group is None or group.size() == 1:
        return param.detach().clone()
    shards = [torch.empty_like(param) for _ in range(group.size())]
    torch.distributed.all_gather(shards, param.detach().contiguous(), group=group)
    return unshard(shards, param.partition_dim, param.partition_stride)


def local_shard(full: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of `full` laid out like `param` (inverse of `full_tensor`)."""
    if not getattr(param, "tensor_model_parallel", False) or group is None or group.size() == 1:
        return full
    return shard(full, param.partition_dim, group.rank(), group.size(), param.partition_stride)
