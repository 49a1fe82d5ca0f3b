"""Canonical LoRA: one adapter per projection inside a fused column-parallel linear.

    linear_qkv.lora_q.lora_A.weight  [r, hidden]                 whole on every rank
    linear_qkv.lora_q.lora_B.weight  [heads * kv_channels / tp, r]   split on dim 0 (stride 1)
    linear_qkv.lora_k / lora_v       B [groups * kv_channels / tp, r]
    linear_fc1.lora_gate / lora_up   B [ffn / tp, r]

`y = W x + scaling * sum_p B_p A_p x` on each projection's rows: PEFT's model with separate
`q_proj`, `k_proj`, `v_proj` (`gate_proj`, `up_proj`) adapters, which the fused adapter (one A
shared by q, k and v) is not once it trains. Each projection's B is split contiguously on its
own rows, which hands every rank exactly its groups' rows (`projection_layout.py`), so the
column rule holds per projection and everything downstream (merge per shard, the merged stream,
checkpoints at any TP size) goes through the one adapter the projections amount to per rank.

The mixin goes in front of a column split kind's mixin (`registry.lora_linear_class` with
`projections`): the split kind wires the forward (local, TE, TE with fused norm), this mixin holds
the projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_common.init import initial_lora_A
from lora_common.targets import PROJECTIONS
from megatron_lora.layers import sharding
from megatron_lora.layers.factor import LoRAFactor
from megatron_lora.layers.parallel_linear import LoRAParallelLinear
from megatron_lora.layers.projection_layout import ProjectionLayout
from megatron_lora.layers.sharding import group_size_rank


def projection_layout(linear, projections: tuple[str, ...]) -> ProjectionLayout:
    """The layout of a fused column-parallel linear's projections on this rank (a base linear
    or a LoRA one: the post-hoc route checks before it converts anything). Refuses geometries
    where a rank's rows are not whole projections, naming the linear's class."""
    what = f"canonical LoRA on {type(linear).__name__}"
    config = linear.config
    tp, _ = group_size_rank(getattr(linear, "_tp_group", None) or linear.tp_group)
    if set(projections) <= set(PROJECTIONS["linear_qkv"].values()):
        groups = config.num_query_groups or config.num_attention_heads
        if groups % tp:
            raise ValueError(f"{what} (linear_qkv): num_query_groups={groups} is not a multiple "
                             f"of the TP size {tp}, so a rank's rows cut through a group; use "
                             f"canonical=False or a TP size that divides the groups")
        if getattr(config, "attention_output_gate", False):
            raise ValueError(f"{what} (linear_qkv): attention_output_gate adds a gate projection "
                             f"to each group, which has no per-projection layout")
        return ProjectionLayout.qkv(config.num_attention_heads, groups, config.kv_channels)
    if not config.gated_linear_unit:
        raise ValueError(f"{what} (linear_fc1): a non-gated MLP's linear_fc1 is one projection; "
                         f"adapt it with canonical=False, or leave linear_fc1 out of the targets")
    return ProjectionLayout.fc1()


class LoRAProjection(torch.nn.Module):
    """One projection's adapter inside a fused linear: `lora_A.weight`, `lora_B.weight` (this
    rank's shards), no forward; the fused linear runs them."""

    def __init__(self, A: LoRAFactor, B: LoRAFactor):
        super().__init__()
        self.lora_A, self.lora_B = A, B


class CanonicalLoRAMixin(LoRAParallelLinear):
    """Per-projection adapters `lora_<p>` for the projections `lora_projections` (a subset of
    q, k, v for linear_qkv; of gate, up for linear_fc1, in row order)."""

    lora_projections: tuple[str, ...]  # set on each generated class by `lora_linear_class`
    lora_layout: ProjectionLayout

    def create_lora_parameters(self, stride: int) -> None:
        self.lora_layout = projection_layout(self, self.lora_projections)
        out_local, in_local = self.weight.shape
        rows = self.lora_layout.rows(out_local)
        r = self.lora_config.r
        for p in self.lora_projections:
            # B_p is split on its own rows, contiguously (stride 1), whatever W's stride.
            setattr(self, f"lora_{p}", LoRAProjection(
                self.new_lora_factor(sharding.A, (r, in_local)),
                self.new_lora_factor(sharding.B, (rows[p], r))))

    def lora_projection(self, p: str) -> LoRAProjection:
        return getattr(self, f"lora_{p}")

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        adapters = {p: self.lora_projection(p) for p in self.lora_projections}
        return self.lora_layout.fuse({p: a.lora_A.weight for p, a in adapters.items()},
                                     {p: a.lora_B.weight for p, a in adapters.items()},
                                     self.weight.shape[0])

    @property
    def lora_in_features(self) -> int:
        return self.lora_projection(self.lora_projections[0]).lora_A.weight.shape[1]

    @torch.no_grad()
    def reset_lora_parameters(self, *key: object) -> None:
        """B = 0; each projection's A from `(config.seed, *key, projection)`: adding or leaving
        out one projection leaves the others' A as they were."""
        for p in self.lora_projections:
            adapter = self.lora_projection(p)
            adapter.lora_A.weight.copy_(initial_lora_A(self.lora_config, self.lora_in_features,
                                                       *key, p))
            adapter.lora_B.weight.zero_()

    def lora_hidden(self, x: torch.Tensor, A: torch.Tensor, sharded: bool) -> torch.Tensor:
        if self.lora_config.dropout == 0.0 or not self.training:
            return super().lora_hidden(x, A, sharded)
        # PEFT gives each projection its own dropout module: one mask per projection.
        return torch.cat([F.linear(self._lora_dropout(x, sharded), A_p)
                          for A_p in A.split(self.lora_config.r)], dim=-1)
