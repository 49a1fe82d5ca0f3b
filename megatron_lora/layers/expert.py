"""Adapters on MoE expert linears: where their partial sums are reduced, and how they are marked.

Expert linears do no communication of their own (`explicit_expert_comm`): the token dispatcher
gathers the tokens over the expert-tensor-parallel (ETP) group before the experts and reduces
after them, so every ETP rank holds the same tokens `X` in the same order. With the sharding
rule applied per expert over ETP (T ranks, rank i; `sharding.py`), each partial sum is reduced
exactly once as follows.

column (fc1)  W_i = rows of W.  A [r, H] whole, B_i = rows of B (W's stride: [gate_i; up_i]).
    forward   h = X A^T is the same on every rank; y_i += s h B_i^T. No communication.
    backward  dB_i = s dy_i^T h is complete. dh_i = s dy_i B_i is rank i's share of dh; the
              LoRA part of dX_i is dh_i A, a partial sum like the base's dy_i W_i, and the
              dispatcher's reduce-scatter (the backward of its all-gather) sums dX over ETP
              once. dA_i = dh_i^T X is partial: A's grad is summed over ETP.
row (fc2)     W_i = columns of W.  A_i = columns of A, B [H, r] whole.
    forward   h_i = Z_i A_i^T is a partial sum; o_i += s h_i B^T is added to the base's partial
              output *before* the dispatcher's combine reduce-scatters it, which sums
              o_i + s h_i B^T over ETP: the delta counted once. (All-reducing h and adding
              s h B^T on every rank counts it T times: Megatron-Bridge issue #5634.)
    backward  dy is the same on every rank (the reduce-scatter's backward is an all-gather),
              so dh = s dy B, dA_i and dZ_i are complete. dB = s dy^T h_i is partial: B's
              grad is summed over ETP.

So an expert adapter has no forward collective at all, and the matrix it holds whole gets its
grad summed over ETP: an `[r, H]`-sized all-reduce in the backward, done in the graph by a node
on the matrix (identity forward, all-reduce backward: `SumGradOver`) so the grad is complete
before DDP sees it. Not by a `sequence_parallel` mark: grad
finalization sums those over the *dense* TP group, which is not the ETP group in general, and
where it is, the ETP sum would be done twice. Expert parallelism (EP) needs nothing: the
all-to-all brings every token routed to an expert to the rank holding it, so per-expert grads are
complete. A matrix the experts of a layer share (`shared_outer`) also gets partial grads from
the other EP ranks' experts: its grad is summed over ETP x EP (`tp_ep`).

Marks: an expert adapter parameter is `allreduce = False` (Megatron DDP reduces it over the
expert-data-parallel group) exactly when `EP > 1 or ETP != TP` (megatron-core 0.19's rule for
expert weights; 0.16 marks them by `EP > 1` only, which at EP = 1, ETP != TP reduces them over
the dense DP group: the wrong group, harmless for a frozen base, wrong for an adapter); never
`sequence_parallel`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lora.layers.sharding import group_size_rank

_LOCAL_EXPERT = re.compile(r"(?:^|\.)local_experts\.\d+(?=\.)")


def target_path(path: str) -> str:
    """`path` with SequentialMLP's `local_experts.<i>` segment left out: the one name of an
    expert linear whatever the expert implementation holds it as (`...mlp.experts.linear_fc1`
    for every local expert of a SequentialMLP and for a grouped linear alike)."""
    return _LOCAL_EXPERT.sub("", path)


@dataclass(frozen=True)
class ExpertPlace:
    """Where an expert linear of megatron-core's `SequentialMLP` sits: its global expert index
    (`ep_rank * num_local_experts + local index`), the expert count and the EP group."""

    index: int
    num_experts: int
    ep_group: Any


def uses_expert_groups(etp_group, ep_group, tp_size: int) -> bool:
    """megatron-core 0.19's rule: expert parameters are reduced over the expert data-parallel
    group (`allreduce = False`) when EP > 1 or ETP != TP, else over the dense one."""
    return group_size_rank(ep_group)[0] > 1 or group_size_rank(etp_group)[0] != tp_size


def mark_expert_adapter(param: torch.Tensor, use_expert_groups: bool) -> None:
    """The DDP marks of an expert adapter matrix (its TP layout attributes are set already)."""
    param.allreduce = not use_expert_groups
    param.sequence_parallel = False


class SumGradOver(torch.autograd.Function):
    """Identity forward; backward all-reduces the grad over `group`. (Megatron's
    `copy_to_tensor_model_parallel_region` is the same on paper, but its all-reduce runs on
    `grad.contiguous()` and returns the original: a transposed grad, as a `B^T`-shaped GEMM
    produces, would come back unreduced.)"""

    @staticmethod
    def forward(ctx, matrix, group):
        ctx.group = group
        return matrix.view_as(matrix)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over(matrix: torch.Tensor, group) -> torch.Tensor:
    """`matrix` for the forward; in the backward its grad summed over `group` (a replicated
    matrix whose ranks see different partial contributions). Nothing for a group of one."""
    if group_size_rank(group)[0] == 1 or not matrix.requires_grad:
        return matrix
    return SumGradOver.apply(matrix, group)


def refuse_dropout(module_name: str, dropout: float, etp_group) -> None:
    """Adapter dropout on experts needs ETP = 1: a column expert's input is the same on every ETP
    rank, so its masks would have to agree, and megatron's expert RNG stream differs per ETP
    rank."""
    etp = group_size_rank(etp_group)[0]
    if dropout and etp > 1:
        raise ValueError(f"{module_name}: LoRA dropout ({dropout}) on expert linears needs "
                         f"expert_tensor_parallel_size 1, got {etp}: every ETP rank holds the "
                         f"same tokens and would need the same dropout masks")
