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
