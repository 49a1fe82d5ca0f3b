"""Tensor-parallel collectives with their autograd duals, as TE's linears use them.

In TE these are inlined in the autograd functions of `module/linear.py` and
`module/layernorm_linear.py`: column-parallel gathers its input along the sequence dim under
sequence parallelism (backward: reduce-scatter of dgrad) or all-reduces dgrad without it;
row-parallel reduce-scatters (SP) or all-reduces its output (backward: all-gather of the output
grad under SP). Dim 0 is the sequence dim in megatron's [s, b, h] layout.
"""

from __future__ import annotations

import torch

from ..distributed import allreduce, gather_along_first_dim, reduce_scatter_along_first_dim


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, group):
        ctx.group = group
        return gather_along_first_dim(inp, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along_first_dim(grad, ctx.group)[0], None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, group):
        ctx.group = group
        return reduce_scatter_along_first_dim(inp, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return gather_along_first_dim(grad, ctx.group)[0], None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, group):
        return allreduce(inp.clone(), group)[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, group):
        ctx.group = group
        return inp.view_as(inp)

    @staticmethod
    def backward(ctx, grad):
        return allreduce(grad.clone(), ctx.group)[0], None


class _DiscardGrad(torch.autograd.Function):
    """Identity whose gradient is dropped: TE ignores the gradient of a layernorm output it
    returned gathered (`_LayerNormLinear.backward`, `return_layernorm_output_gathered`)."""

    @staticmethod
    def forward(ctx, inp):
        return inp.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def column_parallel_input(inp: torch.Tensor, group, tp_size: int, sequence_parallel: bool):
    """The GEMM input of a column-parallel linear: gathered (SP) or with all-reduced dgrad."""
    if tp_size == 1:
        return inp
    if sequence_parallel:
        return _GatherSequence.apply(inp, group)
    return _AllReduceGrad.apply(inp, group)


def row_parallel_output(out: torch.Tensor, group, tp_size: int, sequence_parallel: bool):
    """The output of a row-parallel linear: reduce-scattered (SP) or all-reduced."""
    if tp_size == 1:
        return out
    if sequence_parallel:
        return _ReduceScatterSequence.apply(out, group)
    return _AllReduce.apply(out, group)


def discard_grad(inp: torch.Tensor) -> torch.Tensor:
    return _DiscardGrad.apply(inp)
