"""Where a fused Megatron linear holds each projection among its output rows, written once: for
full tensors (the HF conversion, `megatron_lora/interop/hf_mapping.py`) and for one TP rank's
rows (canonical adapters, `megatron_lora/layers/projection_layout.py`).

    linear_qkv  per query group g: [q heads of g (heads/groups * kv_channels); k_g; v_g]
    linear_fc1  SwiGLU [gate; up]

A column-parallel split hands every rank whole query groups (qkv) or `[gate_i; up_i]` (fc1,
partition stride 2), so a rank's rows have the same layout as the full ones, with fewer groups
(qkv) or shorter halves (fc1). All functions act along dim 0: a weight `[out, in]`, a bias
`[out]` and a LoRA B `[out, r]` alike. Pure torch, no Megatron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """The projections of a fused linear in the order of its rows, and their rows per group.

    `group_rows` is each projection's rows in one group (qkv: `(heads_per_group * kv_channels,
    kv_channels, kv_channels)` per query group), or None for one group whose rows the
    projections share equally (SwiGLU fc1's `[gate; up]`)."""

    projections: tuple[str, ...]
    group_rows: tuple[int, ...] | None = None

    @classmethod
    def qkv(cls, num_attention_heads: int, num_query_groups: int, kv_channels: int):
        if num_attention_heads % num_query_groups:
            raise ValueError(f"{num_attention_heads} heads do not divide into "
                             f"{num_query_groups} groups")
        per_group = num_attention_heads // num_query_groups
        return cls(("q", "k", "v"), (per_group * kv_channels, kv_channels, kv_channels))

    @classmethod
    def fc1(cls):
        return cls(("gate", "up"))

    def rows(self, total: int) -> dict[str, int]:
        """Each projection's rows among `total` fused rows (a full tensor's, or a rank's)."""
        if self.group_rows is None:
            share, extra = divmod(total, len(self.projections))
            if extra:
                raise ValueError(f"{total} rows do not split into {self.projections}")
            return {p: share for p in self.projections}
        groups, extra = divmod(total, sum(self.group_rows))
        if extra:
            raise ValueError(f"{total} rows are not whole groups of {self.group_rows} "
                             f"{self.projections} rows")
        return {p: groups * n for p, n in zip(self.projections, self.group_rows, strict=True)}

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each projection's rows (in their own order) out of the fused rows."""
        if fused.dim() == 0:
            raise ValueError("a fused tensor needs a row dimension (dim 0)")
        rows = self.rows(fused.shape[0])
        if self.group_rows is None:
            return tuple(fused.split([rows[p] for p in self.projections]))
        groups = fused.shape[0] // sum(self.group_rows)
        rest = fused.shape[1:]
        parts = fused.reshape(groups, sum(self.group_rows), *rest).split(list(self.group_rows),
                                                                         dim=1)
        return tuple(part.reshape(-1, *rest) for part in parts)

    def interleave(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused rows from each projection's rows: the inverse of `split`."""
        if len(parts) != len(self.projections) or any(p.dim() == 0 for p in parts):
            raise ValueError(f"interleave takes one tensor with rows per projection "
                             f"{self.projections}")
        rest = parts[0].shape[1:]
        if any(p.shape[1:] != rest for p in parts):
            raise ValueError(f"the {self.projections} parts differ beyond dim 0: "
                             f"{[tuple(p.shape) for p in parts]}")
        total = sum(p.shape[0] for p in parts)
        expected = self.rows(total)
        for projection, part in zip(self.projections, parts, strict=True):
            if part.shape[0] != expected[projection]:
                raise ValueError(f"{projection} has {part.shape[0]} rows, the layout of "
                                 f"{total} fused rows gives it {expected[projection]}")
        if self.group_rows is None:
            return torch.cat(list(parts))
        groups = total // sum(self.group_rows)
        grouped = [p.reshape(groups, n, *rest)
                   for p, n in zip(parts, self.group_rows, strict=True)]
        return torch.cat(grouped, dim=1).reshape(total, *rest)
