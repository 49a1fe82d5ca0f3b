"""LoRA on Megatron's tensor-parallel linears, as subclasses of the base classes.

    LoRAColumn = lora_linear_class(ColumnParallelLinear, config)   # any subclass works too

A LoRA linear *is* its base class (same constructor, same `weight`/`bias` names, same
`(output, bias)` return) with two more parameters, PEFT-shaped:

    lora_A.weight  [r, in]     lora_B.weight  [out, r]     y = W x + scaling * B A x

Sharding, for a linear whose base weight is split over `tp` ranks:

    family                    A                          B
    column (output split)     [r, in]       replicated   [out/tp, r]  split on dim 0, like W
    row    (input split)      [r, in/tp]    split dim 1  [out, r]     replicated

so merging is local, and the only extra communication is of `[tokens, r]` activations:

    column, no SP:  h = A x (same on every rank); its backward all-reduces dh before A.
    column, SP:     h = all-gather_seq(A x_shard); backward reduce-scatters dh; A's grad is
                    partial per sequence shard, so A is marked `sequence_parallel`.
    row, no SP:     h = all-reduce(A_i x_i), then the replicated B.
    row, SP:        h = reduce-scatter_seq(A_i x_i); B's grad is partial per sequence shard,
                    so B is marked `sequence_parallel`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from lora_common import LoRAConfig
from lora_common.init import initial_lora_A
from megatron_lora import sharding

COLUMN = "column"
ROW = "row"


class _NotInCheckpoint:
    """What a dist-checkpoint load returns for a SwiGLU fc1's `lora_B.weight` that the checkpoint
    does not hold (a base-only checkpoint, under a strictness that leaves absent keys out)."""

    def __repr__(self) -> str:
        return "<LoRA adapter not in the checkpoint: kept as initialized>"


NOT_IN_CHECKPOINT = _NotInCheckpoint()


class LoRAMatrix(torch.nn.Module):
    """One adapter matrix, held as `.weight` so the state-dict name is PEFT's `lora_A.weight`.

    Not an `nn.Linear`: constructing one would draw its init from the global RNG.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dist checkpoint without this adapter: leave it as it is, reported as a missing key
        # (as an adapter absent from the state dict is).
        key = f"{prefix}weight"
        if state_dict.get(key) is NOT_IN_CHECKPOINT:
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _group_size_rank(group) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 1, 0
    return group.size(), group.rank()


class LoRAParallelLinear:
    """What every LoRA linear adds to its base class: the adapter parameters, their init,
    and the adapter's forward. Subclasses pick the family and wire the forward."""

    lora_config: LoRAConfig  # set on each generated class by `lora_linear_class`
    lora_base_class: type
    lora_family: str

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_lora(stride=kwargs.get("stride"))

    # ----- parameters -------------------------------------------------------------------

    def add_lora(self, stride: int | None = None) -> None:
        """Create `lora_A` / `lora_B` for this (already built) base linear.

        `stride` is the base weight's partition stride (2 for SwiGLU fc1); when not given it
        is read from the weight's Megatron attributes."""
        config = self.lora_config
        tp, _ = _group_size_rank(self.lora_tp_group)
        if getattr(self, "explicit_expert_comm", False) and tp > 1:
            raise NotImplementedError(
                f"LoRA on expert linears with expert tensor parallelism ({type(self).__name__}, "
                f"tp={tp}) is not supported; use expert_tensor_parallel_size=1")
        out_local, in_local = self.weight.shape
        dtype, device = self.config.params_dtype, self.weight.device
        self.lora_A = LoRAMatrix(torch.empty(config.r, in_local, dtype=dtype, device=device))
        self.lora_B = LoRAMatrix(torch.zeros(out_local, config.r, dtype=dtype, device=device))
        self.lora_scaling = config.scaling
        self.lora_merged = False
        self.lora_disabled = 0  # a depth counter, so `disable_lora` contexts nest

        A, B = self.lora_A.weight, self.lora_B.weight
        if stride is None:
            stride = getattr(self.weight, "partition_stride", 1)
        if self.lora_family == COLUMN:
            _mark(A, split_dim=None)
            _mark(B, split_dim=0, stride=stride)
            sharded_grad = A
        else:
            _mark(A, split_dim=1)
            _mark(B, split_dim=None)
            sharded_grad = B
        if self.sequence_parallel:
            # This replicated matrix only sees this rank's sequence shard: its grad is a
            # partial sum that Megatron's grad finalization all-reduces over the TP group.
            sharded_grad.sequence_parallel = True
        for param in (A, B):
            param.allreduce = getattr(self.weight, "allreduce", True)
        self.reset_lora_parameters(type(self).__name__)

    @property
    def lora_tp_group(self):
        """The group the base weight is split over. Megatron's TE wrappers keep it as
        `_tp_group` (TE's own `tp_group` is None where TE's communication is switched off)."""
        return getattr(self, "_tp_group", None) or self.tp_group

    def remove_lora(self) -> None:
        """Turn this module back into a plain instance of its base class."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before removing LoRA")
        for attr in ("lora_A", "lora_B", "lora_scaling", "lora_merged", "lora_disabled"):
            delattr(self, attr)
        self.__class__ = self.lora_base_class

    @property
    def lora_in_features(self) -> int:
        """The full (unsharded) input size of A."""
        tp, _ = _group_size_rank(self.lora_tp_group)
        in_local = self.lora_A.weight.shape[1]
        return in_local * tp if self.lora_family == ROW else in_local

    @torch.no_grad()
    def reset_lora_parameters(self, *key: object) -> None:
        """B = 0; A drawn over its full shape from `(config.seed, *key)`, this rank's slice kept.

        `key` names the module's place in the model (the LoRA transformer layer passes its
        global layer number and the module's name inside the layer)."""
        full = initial_lora_A(self.lora_config, self.lora_in_features, *key)
        if self.lora_family == ROW:
            tp, rank = _group_size_rank(self.lora_tp_group)
            full = sharding.shard(full, 1, rank, tp)
        self.lora_A.weight.copy_(full)
        self.lora_B.weight.zero_()

    @property
    def lora_active(self) -> bool:
        return not self.lora_merged and not self.lora_disabled

    # ----- merging (litgpt-style: next to the layer it merges) ----------------------------

    def lora_delta(self) -> torch.Tensor:
        """`scaling * B @ A` for this rank's shard of the weight, in fp32. The sharding rule
        makes it local: column ranks hold B's rows of their output slice and all of A; row
        ranks hold all of B and A's columns of their input slice."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.lora_scaling)

    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of `W + scaling * B @ A` (a new tensor in W's dtype; W untouched)."""
        return merged_shard(self.weight, self.lora_A.weight, self.lora_B.weight, self.lora_scaling)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """W += scaling * B @ A in place (fp32 arithmetic, one cast); the branch is then skipped."""
        if self.lora_merged:
            raise RuntimeError(f"{type(self).__name__}: LoRA is already merged")
        if _is_te_quantized(self.weight):
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
        self.weight.copy_((self.weight.float() - self.lora_delta()).to(self.weight.dtype))
        self.lora_merged = False

    # ----- dist checkpointing -------------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base class's sharded state dict, with the adapters described by their own split:
        the base maps only `weight`/`bias` and would save the split matrix as if replicated,
        keeping one rank's shard and silently dropping the others."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = metadata or {}
        dp_cp_group = metadata.get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True)
        adapters = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        split = "lora_B.weight" if self.lora_family == COLUMN else "lora_A.weight"
        split_dim = 0 if self.lora_family == COLUMN else 1
        adapter_state = make_sharded_tensors_for_checkpoint(
            adapters, prefix, {split: split_dim}, sharded_offsets,
            tp_group=self.lora_tp_group, dp_cp_group=dp_cp_group)
        if getattr(self.lora_B.weight, "partition_stride", 1) == 2:
            # SwiGLU fc1: each rank holds [gate_i; up_i]; Megatron's factory saves the two
            # halves as separate global tensors, as MLP does for fc1's weight.
            key = f"{prefix}lora_B.weight"
            adapter_state[key] = _swiglu_factory_tolerating_absence(
                adapter_state[key], sharded_offsets, metadata.get("singleton_local_shards", False))
        state.update(adapter_state)
        return state

    # ----- forward pieces ---------------------------------------------------------------

    def _lora_dropout(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        p = self.lora_config.dropout
        if p == 0.0 or not self.training:
            return x
        if not sharded:
            # Every TP rank holds the same activations: the default stream agrees across them.
            return F.dropout(x, p, training=True)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        # Each rank holds a different shard: Megatron's TP-region stream differs per rank.
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, training=True)

    def _lora_hidden_column(self, x: torch.Tensor) -> torch.Tensor:
        """`A x` for the full sequence, identical on every TP rank: [tokens, r]."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        h = F.linear(self._lora_dropout(x, sharded=self.sequence_parallel), self.lora_A.weight)
        tp, _ = _group_size_rank(self.lora_tp_group)
        if tp == 1 or getattr(self, "explicit_expert_comm", False):
            return h
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(h, group=self.lora_tp_group)
        return copy_to_tensor_model_parallel_region(h, group=self.lora_tp_group)

    def _lora_hidden_row(self, x_parallel: torch.Tensor) -> torch.Tensor:
        """`A x` summed over the input shards: [tokens, r], or its sequence shard under SP."""
        from megatron.core.tensor_parallel import (
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        h = F.linear(self._lora_dropout(x_parallel, sharded=True), self.lora_A.weight)
        tp, _ = _group_size_rank(self.lora_tp_group)
        if tp == 1 or getattr(self, "explicit_expert_comm", False):
            return h
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(h, group=self.lora_tp_group)
        return reduce_from_tensor_model_parallel_region(h, group=self.lora_tp_group)

    def _add_lora_output(self, output: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`output + scaling * h B^T`, accumulated into the base output in place where autograd
        allows it (see `_AccumulateLoRAOutput`); the scaling rides on the GEMM."""
        B = self.lora_B.weight
        if h.dtype != output.dtype:  # e.g. an fp32 base output with bf16 adapters
            h, B = h.to(output.dtype), B.to(output.dtype)
        return _AccumulateLoRAOutput.apply(output, h, B, self.lora_scaling)


def _swiglu_factory_tolerating_absence(sharded_tensor, sharded_offsets, singleton_local_shards):
    """Megatron's SwiGLU factory (same saved tensors, keys and offsets) whose load survives a
    checkpoint without the tensor.

    A dist-checkpoint load under a strictness other than the default (`log_unexpected`, `log_all`,
    `ignore_all`, `return_*`) drops the keys the checkpoint lacks from the request, but not the
    factories built from them; `apply_factory_merges` then finds no entry for the factory and
    raises (`Different dict keys encountered`). So the build also yields a non-persistent marker,
    which is never saved and is merged back into the loaded state before the factories run: the
    merge always finds its entry, and with the two halves gone it returns `NOT_IN_CHECKPOINT`,
    which `LoRAMatrix` leaves out of the load (a missing key, as for lora_A).
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    factory = apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, singleton_local_shards)
    build_halves, merge_halves = factory.build_fn, factory.merge_fn

    def build(key, data, replica_id, flattened_range):
        return {"halves": build_halves(key, data, replica_id, flattened_range),
                "marker": LocalNonpersistentObject(None)}

    def merge(loaded):
        return merge_halves(loaded["halves"]) if "halves" in loaded else NOT_IN_CHECKPOINT

    return dataclasses.replace(factory, build_fn=build, merge_fn=merge)


class _AccumulateLoRAOutput(torch.autograd.Function):
    """`output + scaling * h B^T` as one autograd node, written into `output` itself.

    A base linear's output is a fresh tensor that nothing saved for backward, so the adapter's
    GEMM can accumulate into it (`addmm_`, beta = 1): no second output-sized tensor, no copy
    of the base output. One custom node instead of autograd's reshape/transpose/addmm chain.
    Outputs that are views (a row-parallel linear's all-reduce returns its input as-is, which
    autograd turns into a view) cannot be modified in place; they get an out-of-place addmm.
    Backward: dh = (g B) * scaling as autograd's `addmm` computes it; dB = (h^T g)^T * scaling,
    the same products summed in another order than autograd's `g^T h` (which is 1.5-2x slower
    on CPU BLAS for an [out, tokens] x [tokens, r] GEMM); g passes to the base unchanged.
    """

    @staticmethod
    def forward(ctx, output, h, B, scaling):
        ctx.save_for_backward(h, B)
        ctx.scaling = scaling
        h2d = h.reshape(-1, h.shape[-1])
        if output._is_view() or not output.is_contiguous():
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), h2d, B.t(), alpha=scaling)
            return flat.view(output.shape)
        output.view(-1, output.shape[-1]).addmm_(h2d, B.t(), alpha=scaling)
        ctx.mark_dirty(output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, B = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_h = (g2d.mm(B) * ctx.scaling).view(h.shape)
        if ctx.needs_input_grad[2]:
            grad_B = (h.reshape(-1, h.shape[-1]).t().mm(g2d) * ctx.scaling).t()
        return grad, grad_h, grad_B, None


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`scaling * B @ A` in fp32."""
    return (B.float() @ A.float()) * scaling


def merged_shard(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 device=None) -> torch.Tensor:
    """`W + scaling * B @ A` for one weight shard: fp32 arithmetic, one cast to W's dtype, on
    `device` (default: W's). With FP8 primary weights (TE's `fp8_model_init`, Megatron's
    `--fp8-param-gather`) W is a TE quantized tensor with no high-precision copy; its
    dequantized value is exactly what the base GEMM uses, so the merge starts from that (a
    bf16 result, never re-quantized here)."""
    device = weight.device if device is None else device
    base = weight.dequantize() if _is_te_quantized(weight) else weight.detach()
    # One addmm: W + scaling * (B @ A) without an output-sized temporary for the delta.
    merged = torch.addmm(base.to(device).float(), B.detach().to(device).float(),
                         A.detach().to(device).float(), alpha=scaling)
    return merged.to(weight.dtype)


def _is_te_quantized(tensor: torch.Tensor) -> bool:
    """A Transformer Engine quantized tensor (Float8Tensor, MXFP8Tensor, ...): TE's tensor
    subclasses live in `transformer_engine.pytorch.tensor`; no TE import needed to tell."""
    return type(tensor).__module__.startswith("transformer_engine.")


def _mark(param: torch.nn.Parameter, split_dim: int | None, stride: int = 1) -> None:
    """Megatron's tensor-parallel attributes, read by grad-norm clipping (count replicated
    tensors once), dist checkpointing and converters."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if split_dim is None:
        set_tensor_model_parallel_attributes(param, False, -1, 1)
    else:
        set_tensor_model_parallel_attributes(param, True, split_dim, stride)


class LoRAColumnParallelMixin(LoRAParallelLinear):
    """LoRA for `ColumnParallelLinear` and its subclasses (output split over TP)."""

    lora_family = COLUMN

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.lora_active:
            return super().forward(input_, weight, runtime_gather_output)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        # Add the adapter to this rank's output slice, then gather if the caller asked to.
        output, bias = super().forward(input_, weight, runtime_gather_output=False)
        output = self._add_lora_output(output, self._lora_hidden_column(input_))
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
        from megatron.core.tensor_parallel import scatter_to_tensor_model_parallel_region

        x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(
            input_, group=self.tp_group)
        return self._add_lora_output(output, self._lora_hidden_row(x)), bias


@functools.lru_cache(maxsize=None)
def _family_mixins() -> tuple[tuple[type, type], ...]:
    """(base class, LoRA mixin) pairs: megatron-core's local parallel linears, and its
    Transformer Engine wrappers when megatron-core found TE at import."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    pairs = [(ColumnParallelLinear, LoRAColumnParallelMixin),
             (RowParallelLinear, LoRARowParallelMixin)]
    try:
        from megatron.core.extensions import transformer_engine as te_wrappers
    except ImportError:
        return tuple(pairs)
    if getattr(te_wrappers, "HAVE_TE", False):
        from megatron_lora.lora_te_linear import (
            LoRATEColumnParallelMixin,
            LoRATELayerNormColumnParallelMixin,
            LoRATERowParallelMixin,
        )

        pairs += [(te_wrappers.TELayerNormColumnParallelLinear, LoRATELayerNormColumnParallelMixin),
                  (te_wrappers.TEColumnParallelLinear, LoRATEColumnParallelMixin),
                  (te_wrappers.TERowParallelLinear, LoRATERowParallelMixin)]
    return tuple(pairs)


def is_lora_linear(module_or_class) -> bool:
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return issubclass(cls, LoRAParallelLinear)


def supports_lora(cls: type) -> bool:
    """Whether `lora_linear_class` can lorafy `cls`."""
    return isinstance(cls, type) and any(issubclass(cls, base) for base, _ in _family_mixins())


def lora_linear_class(base: type, config: LoRAConfig) -> type:
    """The LoRA subclass of the parallel linear class `base` for `config` (one class per
    pair, so the spec route and the post-hoc route build the same classes). A LoRA class
    passed again is returned as is."""
    if is_lora_linear(base):
        if base.lora_config != config:
            raise ValueError(f"{base.__name__} already carries LoRA with another config")
        return base
    return _lora_linear_class(base, config)


@functools.lru_cache(maxsize=None)
def _lora_linear_class(base: type, config: LoRAConfig) -> type:
    for family_base, mixin in _family_mixins():
        if isinstance(base, type) and issubclass(base, family_base):
            return type(f"LoRA{base.__name__}", (mixin, base),
                        {"lora_config": config, "lora_base_class": base,
                         "__module__": __name__})
    names = ", ".join(b.__name__ for b, _ in _family_mixins())
    raise TypeError(f"LoRA supports subclasses of {names}; got {getattr(base, '__name__', base)!r}")
