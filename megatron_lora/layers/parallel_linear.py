"""The LoRA linear: a subclass of a Megatron tensor-parallel linear with an adapter.

    LoRAColumn = lora_linear_class(ColumnParallelLinear, config)   # registry.py; any subclass

A LoRA linear *is* its base class (same constructor, same `weight`/`bias` names, same
`(output, bias)` return) with two more parameters, PEFT-shaped:

    lora_A.weight  [r, in]     lora_B.weight  [out, r]     y = W x + scaling * B A x

`LoRAParallelLinear` holds what every split kind shares: the adapter parameters with Megatron's TP
attributes, their init, merge and unmerge, the dist-checkpoint description (`sharded_state.py`)
and the adapter's forward. Which matrix is split where is the split kind's (`sharding.py`); the one
collective on the `[tokens, r]` hidden activation is in `comm.py`. The mixins at the bottom wire
the adapter into the forward of megatron-core's local linears; `te_linear.py` does the same for
its Transformer Engine wrappers, `grouped_linear.py` for its grouped (MoE) linears.

An expert linear of megatron-core's `SequentialMLP` is one of these too; the layer's placement
tells it so (`configure_expert`), and from then on it follows the expert rule (`expert.py`): no
collective of its own, the whole matrix's grad summed over the expert-TP group, DDP's expert
marks, a name with the global expert index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from lora_common import LoRAConfig
from lora_common.delta import lora_delta, merged_value
from lora_common.init import initial_lora_A
from lora_common.state import LoRAState, is_lora_parameter
from megatron_lora.layers import sharding
from megatron_lora.layers.comm import reduce_hidden
from megatron_lora.layers.expert import (
    ExpertPlace,
    mark_expert_adapter,
    refuse_dropout,
    sum_grad_over,
    target_path,
    uses_expert_groups,
)
from megatron_lora.layers.factor import AdapterPair, LoRAFactor
from megatron_lora.layers.functional import accumulate_lora_output, is_te_quantized, merged_shard
from megatron_lora.layers.sharded_state import adapter_sharded_state
from megatron_lora.layers.sharding import COLUMN, ROW, SplitKind


class LoRAParallelLinear(LoRAState):
    """What every LoRA linear adds to its base class. Subclasses set the split kind and wire the
    forward; `registry.lora_linear_class` sets the config and the base class."""

    lora_config: LoRAConfig  # set on each generated class by `lora_linear_class`
    lora_base_class: type
    lora_split: SplitKind
    lora_A: LoRAFactor
    lora_B: LoRAFactor
    lora_expert: ExpertPlace | None = None  # set by `configure_expert` on SequentialMLP experts

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_lora(stride=kwargs.get("stride"))

    # ----- parameters -------------------------------------------------------------------

    def add_lora(self, stride: int | None = None) -> None:
        """Create the adapter of this (already built) base linear: `lora_A` / `lora_B`, or the
        per-projection adapters of a canonical one (`canonical.py`).

        `stride` is the base weight's partition stride (2 for SwiGLU fc1); when not given it
        is read from the weight's Megatron attributes."""
        self.lora_scaling = self.lora_config.scaling
        self.lora_merged = False
        self.lora_disabled = 0
        if stride is None:
            stride = getattr(self.weight, "partition_stride", 1)
        self.create_lora_parameters(stride)
        self.reset_lora_parameters(type(self).__name__)

    def create_lora_parameters(self, stride: int) -> None:
        """`lora_A [r, in/tp or in]` and `lora_B [out/tp or out, r]`, this rank's shards, with
        the attributes the split kind's sharding rule gives them."""
        out_local, in_local = self.weight.shape
        self.lora_A = self.new_lora_factor(sharding.A, (self.lora_config.r, in_local), stride)
        self.lora_B = self.new_lora_factor(sharding.B, (out_local, self.lora_config.r), stride)

    def new_lora_factor(self, matrix: str, shape: tuple[int, int], stride: int = 1) -> LoRAFactor:
        """A zero adapter matrix (`sharding.A` or `sharding.B`) of this rank's `shape`, marked
        with Megatron's attributes: split like the base weight if the split kind splits it, else
        whole, and `sequence_parallel` where its grad is a partial sum over sequence shards."""
        factor = LoRAFactor(torch.zeros(shape, dtype=self.config.params_dtype,
                                        device=self.weight.device))
        param, split = factor.weight, self.lora_split
        if matrix == split.split:
            set_tensor_model_parallel_attributes(param, True, split.split_dim, stride)
        else:
            set_tensor_model_parallel_attributes(param, False, -1, 1)
            if self.lora_sequence_parallel:
                # Whole on every rank but fed this rank's sequence shard: its grad is a
                # partial sum that Megatron's grad finalization sums over the TP group.
                param.sequence_parallel = True
        param.allreduce = getattr(self.weight, "allreduce", True)
        return factor

    @property
    def lora_sequence_parallel(self) -> bool:
        """Whether this linear's input (column, duplicated) or output (row) is this rank's
        sequence shard."""
        return self.sequence_parallel

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This module's adapter matrices by name relative to it (`lora_A.weight`, or
        `lora_q.lora_A.weight` for a canonical one), each with its Megatron TP attributes."""
        return {name: param for name, param in self.named_parameters()
                if is_lora_parameter(name)}

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of this rank's shard as one adapter: `W + scaling * B @ A` is its merged
        weight and `scaling * B A x` its output."""
        return self.lora_A.weight, self.lora_B.weight

    @property
    def lora_tp_group(self):
        """The group the base weight is split over. Megatron's TE wrappers keep it as
        `_tp_group` (TE's own `tp_group` is None where TE's communication is switched off)."""
        return getattr(self, "_tp_group", None) or self.tp_group

    def configure_expert(self, place: ExpertPlace) -> None:
        """Make this adapter an expert's (the linear is an expert of a `SequentialMLP`): the
        expert rule's marks, and its place for names and init. Called by the layer's placement."""
        refuse_dropout(type(self).__name__, self.lora_config.dropout, self.lora_tp_group)
        use_groups = uses_expert_groups(self.lora_tp_group, place.ep_group,
                                        self.config.tensor_model_parallel_size)
        for matrix in (self.lora_A, self.lora_B):
            mark_expert_adapter(matrix.weight, use_groups)
        self.lora_expert = place

    def remove_lora(self) -> None:
        """Turn this module back into a plain instance of its base class."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before removing LoRA")
        adapters = [name for name, _ in self.named_children() if name.startswith("lora_")]
        for attr in (*adapters, "lora_scaling", "lora_merged", "lora_disabled"):
            delattr(self, attr)
        self.__dict__.pop("lora_expert", None)
        self.__class__ = self.lora_base_class

    def lora_pairs(self) -> list[AdapterPair]:
        """Each base weight of this module with the adapter matrices that update it."""
        return [AdapterPair("weight", self.weight, *self.lora_weights(),
                            "lora_A.weight", "lora_B.weight")]

    def lora_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This module's adapter matrices by their names in an adapter checkpoint, given the
        module's `name` in the unsplit model (`model.lora_modules`). An expert of a
        `SequentialMLP` is named like the same expert of a grouped linear, so checkpoints
        interchange: `...mlp.experts.linear_fc1.lora_A.weight<global index>`."""
        if self.lora_expert is None:  # a canonical linear: `{name}.lora_q.lora_A.weight`, ...
            return {f"{name}.{key}": param for key, param in self.lora_parameters().items()}
        stem, index = target_path(name), self.lora_expert.index
        return {f"{stem}.lora_A.weight{index}": self.lora_A.weight,
                f"{stem}.lora_B.weight{index}": self.lora_B.weight}

    @property
    def lora_in_features(self) -> int:
        """The full (unsharded) input size of A."""
        return sharding.full_shape(self.lora_A.weight, self.lora_tp_group)[1]

    @property
    def lora_is_expert(self) -> bool:
        """Whether this adapter follows the expert rule (`expert.py`)."""
        return self.lora_expert is not None

    def lora_replica_groups(self, param: torch.Tensor) -> list:
        """The groups over which the full (TP-gathered) value of the adapter matrix `param` is
        the same on every rank: one rank of them all writes it to a checkpoint."""
        if not self.lora_is_expert:
            return [self.lora_tp_group, parallel_state.get_data_parallel_group()]
        return [self.lora_tp_group, parallel_state.get_expert_data_parallel_group()]

    @torch.no_grad()
    def reset_lora_parameters(self, *key: object) -> None:
        """B = 0; A drawn over its full shape from `(config.seed, *key)`, this rank's slice kept.

        `key` names the module's place in the model (the LoRA transformer layer passes its
        global layer number and the module's name inside the layer)."""
        A = self.lora_A.weight
        full = initial_lora_A(self.lora_config, self.lora_in_features, *key)
        A.copy_(sharding.local_shard(full, A, self.lora_tp_group))
        self.lora_B.weight.zero_()

    # ----- merging (litgpt-style: next to the layer it merges) ----------------------------

    def lora_delta(self) -> torch.Tensor:
        """`scaling * B @ A` for this rank's shard of the weight, in fp32. The sharding rule
        makes it local: column ranks hold B's rows of their output slice and all of A; row
        ranks hold all of B and A's columns of their input slice. (A grouped linear: its first
        expert's.)"""
        pair = self.lora_pairs()[0]
        return lora_delta(pair.A, pair.B, self.lora_scaling)

    def merged_weight(self, pair: AdapterPair | None = None) -> torch.Tensor:
        """This rank's shard of `W + scaling * B @ A` for one of `lora_pairs()` (default: the
        first), a new tensor in W's dtype; W untouched."""
        pair = pair or self.lora_pairs()[0]
        return merged_shard(pair.weight, pair.A, pair.B, self.lora_scaling)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """W += scaling * B @ A in place (fp32 arithmetic, one cast); the branch is then skipped."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: LoRA is already merged")
        pairs = self.lora_pairs()
        if any(is_te_quantized(pair.weight) for pair in pairs):
            raise RuntimeError(
                f"{type(self).__name__}: the base weight is FP8 (TE primary weights); writing a "
                f"merge into it re-quantizes it, losing small deltas for good. Stream merged "
                f"weights with iter_merged_weights (bf16) instead")
        for pair in pairs:
            pair.weight.copy_(self.merged_weight(pair))
        self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """W -= scaling * B @ A in place: the base weight back, up to the rounding of W's dtype."""
        if not self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: LoRA is not merged")
        for pair in self.lora_pairs():
            pair.weight.copy_(merged_value(pair.weight, pair.A, pair.B, self.lora_scaling,
                                           sign=-1.0))
        self.lora_merged = False

    # ----- dist checkpointing -------------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base class's sharded state dict plus the adapters, each described with its own
        split (`sharded_state.py`). Refused while merged: W then holds the delta, and a
        checkpoint of W beside the adapters would reload as the delta applied twice (and
        loading into it would keep the old one)."""
        if self.lora_merged:
            raise RuntimeError(f"{prefix.rstrip('.') or type(self).__name__}: LoRA is merged into "
                               f"the weight; a checkpoint would reload with the delta applied "
                               f"twice: unmerge_lora_weights first")
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state.update(self.lora_sharded_state(prefix, sharded_offsets, metadata or {}))
        return state

    def lora_sharded_state(self, prefix, sharded_offsets, metadata) -> dict:
        """The adapter's sharded tensors (A and B split by the split kind, `sharded_state.py`).
        Inside a `SequentialMLP` expert the container adds the expert axis and the
        expert-data-parallel replica id, as it does for the base weight; a grouped linear
        overrides this with one entry per expert."""
        return adapter_sharded_state(self, prefix, sharded_offsets, metadata)

    # ----- forward ----------------------------------------------------------------------

    def lora_output(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`output + scaling * B reduce(A x)`: the adapter added to this rank's base output.

        x is the adapter's input as this rank holds it: `[s, b, in]` for a column target
        (`[s/tp, b, in]` under SP), `[s, b, in/tp]` for a row target; output is this rank's
        base output, `[s, b, out/tp]` (column) or `[s, b, out]` (row; `[s/tp, b, out]` under
        SP). `reduce` is the split kind's `[tokens, r]` collective (`comm.py`). An expert's
        adapter has none (`expert.py`)."""
        if self.lora_expert is not None:
            return self._expert_lora_output(output, x)
        A, B = self.lora_weights()
        sharded = self.lora_split.input_split or self.lora_sequence_parallel
        h = self.lora_hidden(x, A, sharded)                                 # [..., r]
        h = reduce_hidden(self.lora_split, h, self.lora_tp_group, self.lora_sequence_parallel)
        return accumulate_lora_output(output, h, B, self.lora_scaling)

    def lora_hidden(self, x: torch.Tensor, A: torch.Tensor, sharded: bool) -> torch.Tensor:
        """`A dropout(x)`, this rank's `[..., r]` before the split kind's collective; `sharded`:
        whether x differs between TP ranks (which dropout stream to draw from)."""
        return F.linear(self._lora_dropout(x, sharded), A)

    def _expert_lora_output(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The expert rule: x is this expert's tokens as the dispatcher hands them (the same on
        every ETP rank); the whole matrix's grad is summed over the expert-TP group."""
        A, B, group = self.lora_A.weight, self.lora_B.weight, self.lora_tp_group
        if self.lora_split is COLUMN:
            A = sum_grad_over(A, group)
        else:
            B = sum_grad_over(B, group)
        h = F.linear(self._lora_dropout(x, sharded=False), A)              # [tokens, r]
        return accumulate_lora_output(output, h, B, self.lora_scaling)

    def _lora_dropout(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        p = self.lora_config.dropout
        if p == 0.0 or not self.training:
            return x
        if not sharded:
            # Every TP rank holds the same activations: the default stream agrees across them.
            return F.dropout(x, p, training=True)
        # Each rank holds a different shard: Megatron's TP-region stream differs per rank.
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, training=True)


class LoRAColumnParallelMixin(LoRAParallelLinear):
    """LoRA for `ColumnParallelLinear` and its subclasses (output split over TP)."""

    lora_split = COLUMN

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.lora_active:
            return super().forward(input_, weight, runtime_gather_output)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        # Add the adapter to this rank's output slice, then gather if the caller asked to.
        output, bias = super().forward(input_, weight, runtime_gather_output=False)
        output = self.lora_output(output, input_)
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, bias


class LoRARowParallelMixin(LoRAParallelLinear):
    """LoRA for `RowParallelLinear` and its subclasses (input split over TP)."""

    lora_split = ROW

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_active:
            return output, bias
        x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(
            input_, group=self.tp_group)
        return self.lora_output(output, x), bias
