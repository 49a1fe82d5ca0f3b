"""The adapter's communication: the one `[tokens, r]` collective each split kind needs.

Megatron's `tensor_parallel/mappings.py` regions, applied to the adapter's hidden activation
`h = A x` instead of to a hidden-sized tensor (shapes in Megatron's `[s, b, r]`; `s/tp` is this
rank's sequence shard under sequence parallelism):

    column, no SP   h [s, b, r] is the same on every rank: identity forward, all-reduce of the
                    (partial) dh in backward, so A's grad and the LoRA part of dx are complete
    column, SP      h [s/tp, b, r] -> all-gather on the sequence -> [s, b, r];
                    backward reduce-scatters dh
    row, no SP      A_i x_i [s, b, r] is a partial sum over the input shards: all-reduce
    row, SP         A_i x_i [s, b, r] -> reduce-scatter on the sequence -> [s/tp, b, r]
    duplicated      none: the weight is whole on every rank, and so is its adapter (under SP
                    h is this rank's [s/tp, b, r], as its base output is)
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_lora.layers.sharding import COLUMN, DUPLICATED, ROW, SplitKind, group_size_rank


def column_hidden(h: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """`A x` of a column target -> the full-sequence `[s, b, r]`, the same on every rank."""
    if group_size_rank(group)[0] == 1:
        return h
    if sequence_parallel:
        return gather_from_sequence_parallel_region(h, group=group)
    return copy_to_tensor_model_parallel_region(h, group=group)


def row_hidden(h: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """`A_i x_i` of a row target -> the sum over input shards (its sequence shard under SP)."""
    if group_size_rank(group)[0] == 1:
        return h
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(h, group=group)
    return reduce_from_tensor_model_parallel_region(h, group=group)


def duplicated_hidden(h: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """`A x` of a duplicated target is already what B needs: no communication."""
    return h


HIDDEN_COLLECTIVE = {COLUMN: column_hidden, ROW: row_hidden, DUPLICATED: duplicated_hidden}


def reduce_hidden(split: SplitKind, h: torch.Tensor, group,
                  sequence_parallel: bool) -> torch.Tensor:
    """The collective `split`'s adapter applies to `h = A x` before B."""
    return HIDDEN_COLLECTIVE[split](h, group, sequence_parallel)
