"""The sharding rule: how each kind of parallel linear (by how its weight splits over TP) splits
its adapter over TP ranks, and the tensor layout Megatron uses for a split tensor.

A LoRA linear holds `lora_A.weight [r, in]` and `lora_B.weight [out, r]`. The adapter matrix
that touches the base weight's split dimension is split exactly like the weight; the other is
whole on every rank:

    split kind  base weight W          A [r, in]               B [out, r]
    column      output split (dim 0)   whole                   split on dim 0, W's stride
    row         input split (dim 1)    split on dim 1          whole
    duplicated  whole on every rank    whole                   whole

So every rank holds its shard of `W + s B A` (merge is local), and the adapter's only
communication is of its `[tokens, r]` hidden activation (`comm.py`). Under sequence
parallelism the whole matrix sees only this rank's sequence shard, so its grad is a partial
sum: it is marked `sequence_parallel`, and Megatron's grad finalization sums it over TP.
A duplicated linear (TE's `parallel_mode="duplicated"`: MLA's down projections) needs no
communication; under SP it sees only this rank's sequence shard, so both of its matrices are
marked.

A split tensor is cut along `dim` into `world * stride` equal chunks and rank `i` holds chunks
`i, i + world, i + 2 * world, ...` concatenated (Megatron's `_initialize_affine_weight_cpu`).
With `stride=1` that is the plain contiguous split; SwiGLU `linear_fc1` uses `stride=2`, so
the full `[gate; up]` weight leaves each rank `[gate_i; up_i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

A, B = "lora_A", "lora_B"


@dataclass(frozen=True)
class SplitKind:
    """How a kind of base linear splits over TP, and so where its adapter splits."""

    name: str
    split: str | None      # the adapter matrix split like the base weight (A or B), or None
    split_dim: int | None  # its split dimension: 1 for A's input, 0 for B's output

    @property
    def whole(self) -> tuple[str, ...]:
        """The matrices every rank holds whole: under SP their grads are partial sums."""
        return tuple(m for m in (A, B) if m != self.split)

    @property
    def input_split(self) -> bool:
        """Whether the layer's input is split over TP ranks (its A is split on dim 1)."""
        return self.split == A


COLUMN = SplitKind("column", split=B, split_dim=0)
ROW = SplitKind("row", split=A, split_dim=1)
DUPLICATED = SplitKind("duplicated", split=None, split_dim=None)


def group_size_rank(group) -> tuple[int, int]:
    """(size, rank) of a process group; (1, 0) without one or outside torch.distributed."""
    if group is None or not torch.distributed.is_initialized():
        return 1, 0
    return group.size(), group.rank()


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
    return full_value(param, param, group)


def full_value(value: torch.Tensor, like: torch.Tensor, group) -> torch.Tensor:
    """The unsharded value of `value`, this rank's shard of a tensor laid out like the parameter
    `like` (a trainer's CPU copy of it carries no TP attributes). Only a split tensor moves: an
    all-gather over `group`, on the device the group's backend needs (CUDA for NCCL), the
    result on `value`'s device. Call on every rank of `group`."""
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"full_value: shard of shape {tuple(value.shape)}, the parameter's is "
                         f"{tuple(like.shape)}")
    if not getattr(like, "tensor_model_parallel", False) or group_size_rank(group)[0] == 1:
        return value.detach().clone()
    local = value.detach().to(collective_device(group)).contiguous()
    shards = [torch.empty_like(local) for _ in range(group.size())]
    torch.distributed.all_gather(shards, local, group=group)
    return unshard(shards, like.partition_dim, like.partition_stride).to(value.device)


def collective_device(group) -> torch.device:
    """Where tensors of a collective over `group` must live: the current CUDA device for NCCL,
    the CPU for gloo."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def full_shape(param: torch.Tensor, group) -> list[int]:
    """The unsharded shape of a parameter carrying Megatron's TP attributes."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= group_size_rank(group)[0]
    return shape


def local_shard(full: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of `full` laid out like `param` (inverse of `full_tensor`)."""
    world, rank = group_size_rank(group)
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return full
    return shard(full, param.partition_dim, rank, world, param.partition_stride)
