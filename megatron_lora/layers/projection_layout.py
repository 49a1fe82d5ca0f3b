"""The one adapter that a set of per-projection adapters amounts to in one TP rank's output rows
of a fused linear.

Megatron fuses projections into one column-parallel weight (`lora_common/fused_rows.py`):

    linear_qkv  rows per query group g: [q heads of g (heads/groups * kv_channels); k_g; v_g]
                (kv_channels each); a rank holds groups/tp whole groups
    linear_fc1  SwiGLU [gate; up]; with partition stride 2 a rank holds [gate_i; up_i]

A per-projection B split contiguously on its own rows (`B_q [heads * kv_channels, r]` cut into
tp pieces) hands rank i exactly the rows of its own groups (of its gate_i, up_i). So every
projection's B is a plain dim-0 split, and per rank the adapters of the projections P add up to
one adapter of rank `|P| r`:

    A = [A_p; ...]   [|P| r, in]
    B               [rows, |P| r]: projection p's rows, in the rank's layout, in the columns of
                    its own A (`[p r, (p + 1) r)`); a projection without an adapter, zero rows

so `B A = sum_p B_p A_p` on each projection's rows: one A GEMM, one `[tokens, |P| r]`
collective and one output GEMM, and merge, unmerge and the merged stream are the fused
adapter's arithmetic. Pure torch: no module, no Megatron.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lora_common.fused_rows import RowLayout


class ProjectionLayout(RowLayout):
    """A fused linear's row layout (`lora_common.fused_rows.RowLayout`) with the one adapter
    that per-projection adapters amount to on a rank."""

    def fuse(self, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], rows: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A `[|P| r, in]`, B `[rows, |P| r]`): the one adapter the per-projection adapters
        `A[p] [r, in]`, `B[p] [rows of p, r]` (this rank's, projections P) amount to on a rank
        whose fused output has `rows` rows. Differentiable: the grads reach each `A[p]`, `B[p]`."""
        present = [p for p in self.projections if p in B]
        if set(present) != set(A) or set(B) - set(self.projections):
            raise ValueError(f"fuse: A holds {sorted(A)}, B holds {sorted(B)}; projections are "
                             f"{self.projections}")
        r = B[present[0]].shape[1]
        width = len(present) * r
        expected = self.rows(rows)
        blocks = []
        for p in self.projections:
            if p not in B:
                blocks.append(B[present[0]].new_zeros(expected[p], width))
                continue
            if tuple(B[p].shape) != (expected[p], r):
                raise ValueError(f"fuse: B of {p} has shape {tuple(B[p].shape)}, the layout "
                                 f"needs {(expected[p], r)}")
            column = present.index(p) * r
            blocks.append(F.pad(B[p], (column, width - column - r)))
        return torch.cat([A[p] for p in present]), self.interleave(blocks)
