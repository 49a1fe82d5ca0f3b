"""The LoRA linear: a subclass of a Megatron tensor-parallel linear with an adapter.

    LoRAColumn = lora_linear_class(ColumnParallelLinear, config)   # registry.py; any subclass

A LoRA linear *is* its base class (same constructor, same `weight`/`bias` names, same
`(output, bias)` return) with two more parameters, PEFT-shaped:

    lora_A.weight  [r, in]     lora_B.weight  [out, r]     y = W x + scaling * B A x

`LoRAParallelLinear` holds what every family shares: the adapter parameters with Megatron's TP
attributes, their init, merge and unmerge, the dist-checkpoint description (`sharded_state.py`)
and the adapter's forward. Which matrix is split where is the family's (`sharding.py`); the one collective on the
`[tokens, r]` hidden activation is in `comm.py`. The mixins at the bottom wire the adapter into
the forward of megatron-core's local linears; `te_linear.py` does the same for its Transformer
Engine wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from megatron_lora.layers.factor import LoRAFactor
from megatron_lora.layers.functional import accumulate_lora_output, is_te_quantized, merged_shard
from megatron_lora.layers.sharded_state import adapter_sharded_state
from megatron_lora.layers.sharding import COLUMN, ROW, Family, group_size_rank


class LoRAParallelLinear(LoRAState):
    """What every LoRA linear adds to its base class. Subclasses set the family and wire the
    forward; `registry.lora_linear_class` sets the config and the base class."""

    lora_config: LoRAConfig  # set on each generated class by `lora_linear_class`
    lora_base_class: type
    lora_family: Family
    lora_A: LoRAFactor
    lora_B: LoRAFactor

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_lora(stride=kwargs.get("stride"))

    # ----- parameters -------------------------------------------------------------------

    def add_lora(self, stride: int | None = None) -> None:
        """Create the adapter of this (already built) base linear: `lora_A` / `lora_B`, or the
        per-projection adapters of a canonical one (`canonical.py`).

        `stride` is the base weight's partition stride (2 for SwiGLU fc1); when not given it
        is read from the weight's Megatron attributes."""
        tp, _ = group_size_rank(self.lora_tp_group)
        if getattr(self, "explicit_expert_comm", False) and tp > 1:
            raise NotImplementedError(
                f"LoRA on expert linears with expert tensor parallelism ({type(self).__name__}, "
                f"tp={tp}) is not supported; use expert_tensor_parallel_size=1")
        self.lora_scaling = self.lora_config.scaling
        self.lora_merged = False
        self.lora_disabled = 0
        if stride is None:
            stride = getattr(self.weight, "partition_stride", 1)
        self.create_lora_parameters(stride)
        self.reset_lora_parameters(type(self).__name__)

    def create_lora_parameters(self, stride: int) -> None:
        """`lora_A [r, in/tp or in]` and `lora_B [out/tp or out, r]`, this rank's shards, with
        the attributes the family's sharding rule gives them."""
        out_local, in_local = self.weight.shape
        self.lora_A = self.new_lora_factor(sharding.A, (self.lora_config.r, in_local), stride)
        self.lora_B = self.new_lora_factor(sharding.B, (out_local, self.lora_config.r), stride)

    def new_lora_factor(self, matrix: str, shape: tuple[int, int], stride: int = 1) -> LoRAFactor:
        """A zero adapter matrix (`sharding.A` or `sharding.B`) of this rank's `shape`, marked
        with Megatron's attributes: split like the base weight if the family splits it, else
        whole, and `sequence_parallel` where its grad is a partial sum over sequence shards."""
        factor = LoRAFactor(torch.zeros(shape, dtype=self.config.params_dtype,
                                        device=self.weight.device))
        param, family = factor.weight, self.lora_family
        if matrix == family.split:
            set_tensor_model_parallel_attributes(param, True, family.split_dim, stride)
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

    def remove_lora(self) -> None:
        """Turn this module back into a plain instance of its base class."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before removing LoRA")
        adapters = [name for name, _ in self.named_children() if name.startswith("lora_")]
        for attr in (*adapters, "lora_scaling", "lora_merged", "lora_disabled"):
            delattr(self, attr)
        self.__class__ = self.lora_base_class

    @property
    def lora_in_features(self) -> int:
        """The full (unsharded) input size of A."""
        return sharding.full_shape(self.lora_A.weight, self.lora_tp_group)[1]

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
        ranks hold all of B and A's columns of their input slice."""
        return lora_delta(*self.lora_weights(), self.lora_scaling)

    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of `W + scaling * B @ A` (a new tensor in W's dtype; W untouched)."""
        return merged_shard(self.weight, *self.lora_weights(), self.lora_scaling)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """W += scaling * B @ A in place (fp32 arithmetic, one cast); the branch is then skipped."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: LoRA is already merged")
        if is_te_quantized(self.weight):
            raise RuntimeError(
                f"{type(self).__name__}: the base weight is FP8 (TE primary weights); writing a "
                f"merge into it re-quantizes it, losing small deltas for good. Stream merged "
                f"weights with iter_merged_weights (bf16) instead")
        self.weight.copy_(self.merged_weight())
        self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """W -= scaling * B @ A in place: the base weight back, up to the rounding of W's dtype."""
        if not self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: LoRA is not merged")
        self.weight.copy_(merged_value(self.weight, *self.lora_weights(), self.lora_scaling,
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
        state.update(adapter_sharded_state(self, prefix, sharded_offsets, metadata))
        return state

    # ----- forward ----------------------------------------------------------------------

    def lora_output(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`output + scaling * B reduce(A x)`: the adapter added to this rank's base output.

        x is the adapter's input as this rank holds it: `[s, b, in]` for a column target
        (`[s/tp, b, in]` under SP), `[s, b, in/tp]` for a row target; output is this rank's
        base output, `[s, b, out/tp]` (column) or `[s, b, out]` (row; `[s/tp, b, out]` under
        SP). `reduce` is the family's `[tokens, r]` collective (`comm.py`)."""
        A, B = self.lora_weights()
        sharded = self.lora_family.input_split or self.lora_sequence_parallel
        h = self.lora_hidden(x, A, sharded)                                 # [..., r]
        h = reduce_hidden(self.lora_family, h, self.lora_tp_group, self.lora_sequence_parallel)
        return accumulate_lora_output(output, h, B, self.lora_scaling)

    def lora_hidden(self, x: torch.Tensor, A: torch.Tensor, sharded: bool) -> torch.Tensor:
        """`A dropout(x)`, this rank's `[..., r]` before the family's collective; `sharded`:
        whether x differs between TP ranks (which dropout stream to draw from)."""
        return F.linear(self._lora_dropout(x, sharded), A)

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

    lora_family = COLUMN

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

    lora_family = ROW

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_active:
            return output, bias
        x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(
            input_, group=self.tp_group)
        return self.lora_output(output, x), bias
