"""LoRA on megatron-core's Transformer Engine grouped linears (`TEColumnParallelGroupedLinear`,
`TERowParallelGroupedLinear`): the `linear_fc1` / `linear_fc2` of `TEGroupedMLP`, one module
holding the weights `weight0 .. weight<E_l-1>` of this rank's E_l local experts.

The adapter lives inside the same module, numbered like the weights. With `per_expert` layout

    lora_A.weight<i>  [r, in]     lora_B.weight<i>  [out, r]     (expert i's W_i + s B_i A_i)

and with `shared_outer` (SGLang's layout) fc1's A and fc2's B are one matrix for every expert of
the layer, `lora_A.weight` / `lora_B.weight`, the other side per expert. Each expert's matrices
follow the sharding rule over the expert-TP group (fc1's B rows `[gate_i; up_i]`, fc2's A
columns), and the expert rule for their communication and marks (`expert.py`). Expert i of this
rank is global expert `ep_rank * E_l + i`: its A is drawn from that index (so adapters agree at
every EP and ETP size and with a `SequentialMLP` of the same experts), and checkpoints name it
so (`lora_A.weight<global index>`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from lora_common.init import initial_lora_A
from megatron_lora.layers import sharding
from megatron_lora.layers.expert import (
    mark_expert_adapter,
    refuse_dropout,
    sum_grad_over,
    uses_expert_groups,
)
from megatron_lora.layers.factor import AdapterPair, LoRAExpertFactors, LoRAFactor
from megatron_lora.layers.grouped_matmul import grouped_lora_output
from megatron_lora.layers.parallel_linear import LoRAParallelLinear
from megatron_lora.layers.sharded_state import swiglu_factory_tolerating_absence
from megatron_lora.layers.sharding import COLUMN, ROW


class LoRAGroupedLinear(LoRAParallelLinear):
    """What the column and row grouped LoRA linears share."""

    # ----- parameters -------------------------------------------------------------------

    def add_lora(self, stride: int | None = None) -> None:
        config, split = self.lora_config, self.lora_split
        name = type(self).__name__
        if getattr(self, "single_grouped_weight", False):
            raise ValueError(f"{name}: LoRA needs the experts' weights as weight0..weight<E-1>; "
                             f"this grouped linear holds one stacked weight "
                             f"(moe_single_grouped_weight)")
        refuse_dropout(name, config.dropout, self.lora_tp_group)
        experts, weight = self.num_gemms, self.weight0
        out_local, in_local = weight.shape
        dtype, device = self.config.params_dtype, weight.device
        shared = config.expert_layout == "shared_outer"

        def factor(shape, shared_here: bool, fill):
            if shared_here:
                return LoRAFactor(fill(*shape, dtype=dtype, device=device))
            return LoRAExpertFactors([fill(*shape, dtype=dtype, device=device)
                                      for _ in range(experts)])

        self.lora_A = factor((config.r, in_local), shared and split is COLUMN, torch.empty)
        self.lora_B = factor((out_local, config.r), shared and split is ROW, torch.zeros)
        self.lora_scaling = config.scaling
        self.lora_merged = False
        self.lora_disabled = 0

        # fc1 of a gated MLP holds [gate_i; up_i] per expert-TP rank (TEGroupedMLP's sharded
        # state dict saves it through the SwiGLU factory), whatever stride TE marks it with.
        split_stride = 2 if split is COLUMN and self.config.gated_linear_unit else 1
        use_groups = uses_expert_groups(self.lora_tp_group, self.lora_ep_group,
                                        self.config.tensor_model_parallel_size)
        for matrix in (sharding.A, sharding.B):
            for param in getattr(self, matrix).parameters():
                if matrix == split.split:
                    set_tensor_model_parallel_attributes(param, True, split.split_dim,
                                                         split_stride)
                else:
                    set_tensor_model_parallel_attributes(param, False, -1, 1)
                mark_expert_adapter(param, use_groups)
        self.reset_lora_parameters(name)

    @property
    def lora_ep_group(self):
        return self._pg_collection.ep

    @property
    def lora_first_expert(self) -> int:
        """The global index of this rank's first local expert."""
        return self.lora_ep_group.rank() * self.num_gemms

    @property
    def lora_shared(self) -> str | None:
        """The matrix the experts share (`lora_A` / `lora_B`), or None (per-expert layout)."""
        for matrix in (sharding.A, sharding.B):
            if isinstance(getattr(self, matrix), LoRAFactor):
                return matrix
        return None

    @property
    def lora_in_features(self) -> int:
        return sharding.full_shape(next(self.lora_A.parameters()), self.lora_tp_group)[1]

    @property
    def lora_is_expert(self) -> bool:
        return True

    def lora_replica_groups(self, param: torch.Tensor) -> list:
        groups = [self.lora_tp_group, self._pg_collection.expt_dp]
        shared = self.lora_shared
        if shared is not None and getattr(self, shared).weight is param:
            groups.append(self.lora_ep_group)  # one matrix for the experts of every EP rank
        return groups

    def _matrix_names(self, matrix: str, i: int) -> str:
        shared = isinstance(getattr(self, matrix), LoRAFactor)
        return f"{matrix}.weight" if shared else f"{matrix}.weight{i}"

    def lora_pairs(self) -> list[AdapterPair]:
        experts = self.num_gemms
        As, Bs = self.lora_A.matrices(experts), self.lora_B.matrices(experts)
        return [AdapterPair(f"weight{i}", getattr(self, f"weight{i}"), As[i], Bs[i],
                            self._matrix_names(sharding.A, i), self._matrix_names(sharding.B, i))
                for i in range(experts)]

    def lora_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Per-expert matrices as `<name>.lora_A.weight<global index>`, a shared one as
        `<name>.lora_A.weight`."""
        tensors = {}
        for matrix in (sharding.A, sharding.B):
            factor = getattr(self, matrix)
            if isinstance(factor, LoRAFactor):
                tensors[f"{name}.{matrix}.weight"] = factor.weight
            else:
                for i, param in enumerate(factor.matrices(self.num_gemms)):
                    tensors[f"{name}.{matrix}.weight{self.lora_first_expert + i}"] = param
        return tensors

    @torch.no_grad()
    def reset_lora_parameters(self, *key: object) -> None:
        """B = 0; each expert's A drawn over its full shape from `(config.seed, *key, global
        expert index)` (a shared A from `(config.seed, *key)`), this rank's slice kept."""
        in_features, group = self.lora_in_features, self.lora_tp_group
        if isinstance(self.lora_A, LoRAFactor):
            full = initial_lora_A(self.lora_config, in_features, *key)
            self.lora_A.weight.copy_(sharding.local_shard(full, self.lora_A.weight, group))
        else:
            for i, param in enumerate(self.lora_A.matrices(self.num_gemms)):
                full = initial_lora_A(self.lora_config, in_features, *key,
                                      self.lora_first_expert + i)
                param.copy_(sharding.local_shard(full, param, group))
        for param in self.lora_B.parameters():
            param.zero_()

    # ----- dist checkpointing -------------------------------------------------------------

    def lora_sharded_state(self, prefix, sharded_offsets, metadata) -> dict:
        """Each expert's matrices as the base grouped linear describes its `weight<i>`: an
        expert axis at global index `ep_rank * E_l + i`, the TP split, the expert-data-parallel
        replica id; fc1's B through the SwiGLU factory. A shared matrix has no expert axis and
        is replicated over EP too."""
        singleton = metadata.get("singleton_local_shards", False)
        dp_cp_group = metadata.get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True)
        split, pg = self.lora_split, self._pg_collection
        ep, edp = pg.ep, pg.expt_dp
        total, axis = ep.size() * self.num_gemms, len(sharded_offsets)
        swiglu = split is COLUMN and self.config.gated_linear_unit
        state = {}
        for matrix in (sharding.A, sharding.B):
            factor = getattr(self, matrix)
            axis_map = {f"{matrix}.weight": split.split_dim} if matrix == split.split else {}
            if isinstance(factor, LoRAFactor):
                sub = make_sharded_tensors_for_checkpoint(
                    {f"{matrix}.weight": factor.weight}, prefix, axis_map, sharded_offsets,
                    tp_group=self.lora_tp_group, dp_cp_group=dp_cp_group)
                for tensor in sub.values():
                    tensor.replica_id = (*tensor.replica_id[:2],
                                         ep.rank() * edp.size() + edp.rank())
                state.update(sub)
                continue
            for i, param in enumerate(factor.matrices(self.num_gemms)):
                index = self.lora_first_expert + i
                offsets = sharded_offsets if singleton else (
                    *sharded_offsets, (axis, index, total))
                expert_prefix = f"{index}.{prefix}" if singleton else prefix
                sub = make_sharded_tensors_for_checkpoint(
                    {f"{matrix}.weight": param}, "", axis_map, offsets,
                    tp_group=self.lora_tp_group, dp_cp_group=dp_cp_group)
                replace_prefix_for_sharding(sub, "", expert_prefix)
                tensor = sub[f"{matrix}.weight"]
                tensor.replica_id = (*tensor.replica_id[:2], edp.rank())
                if swiglu and matrix == sharding.B:
                    tensor = swiglu_factory_tolerating_absence(tensor, offsets, singleton)
                state[f"{prefix}{matrix}.weight{i}"] = tensor
        return state

    # ----- forward ----------------------------------------------------------------------

    def forward(self, x, m_splits):
        output, bias = super().forward(x, m_splits)
        if not self.lora_active:
            return output, bias
        return self.lora_grouped_output(output, x, m_splits), bias

    def lora_grouped_output(self, output: torch.Tensor, x: torch.Tensor, m_splits) -> torch.Tensor:
        """`output + scaling * adapter(x)` for this rank's experts (`grouped_matmul.py`): x
        `[tokens, in]` (rows by expert, `m_splits` per expert), output `[tokens, out]`.

        The matrix each expert holds whole (fc1's A, fc2's B) gets its grad summed over the
        expert-TP group, a shared one over expert-TP x EP (`expert.py`); one all-reduce for all
        experts' matrices of a kind."""
        experts = self.num_gemms
        whole = sharding.A if self.lora_split is COLUMN else sharding.B
        matrices = {}
        for matrix in (sharding.A, sharding.B):
            factor = getattr(self, matrix)
            value = factor.weight if isinstance(factor, LoRAFactor) else torch.stack(
                factor.matrices(experts))
            if matrix == whole:
                group = (self._pg_collection.tp_ep if isinstance(factor, LoRAFactor)
                         else self.lora_tp_group)
                value = sum_grad_over(value, group)
            matrices[matrix] = value
        p = self.lora_config.dropout
        x = F.dropout(x, p, training=True) if p and self.training else x
        return grouped_lora_output(output, x, matrices[sharding.A], matrices[sharding.B],
                                   m_splits, self.lora_scaling)


class LoRATEColumnParallelGroupedMixin(LoRAGroupedLinear):
    """LoRA for megatron-core's `TEColumnParallelGroupedLinear` (MoE experts' fc1)."""

    lora_split = COLUMN


class LoRATERowParallelGroupedMixin(LoRAGroupedLinear):
    """LoRA for megatron-core's `TERowParallelGroupedLinear` (MoE experts' fc2)."""

    lora_split = ROW
