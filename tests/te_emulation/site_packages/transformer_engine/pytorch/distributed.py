"""Distributed helpers megatron-core imports from TE (TE v2.11 `pytorch/distributed.py`).

The collectives keep TE's names and calling convention (`(output, handle)`, no autograd); the
emulated modules use the autograd-aware versions in `module/_tp_comm.py`. RNG states are CPU
generator states, since the emulation runs where there is no CUDA.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ContextDecorator, contextmanager

import torch

from .quantization import FP8GlobalStateManager

_FP8_ACTIVATION_RECOMPUTE_ENABLED = False
_FP8_ACTIVATION_RECOMPUTE_PHASE = False
_ALL_ACTIVE_RNG_STATES: dict[str, torch.Tensor] = {}

_MODEL_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def get_all_rng_states() -> dict[str, torch.Tensor]:
    return _ALL_ACTIVE_RNG_STATES


def set_all_rng_states(states: dict[str, torch.Tensor]) -> None:
    global _ALL_ACTIVE_RNG_STATES
    _ALL_ACTIVE_RNG_STATES = states


def graph_safe_rng_available() -> bool:
    return False


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int,
                                         stride: int) -> None:
    """The attributes megatron's grad clipping, checkpointing and converters read."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTES:
        assert not hasattr(tensor, attribute)
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def get_distributed_world_size(group=None) -> int:
    if not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group=group)


def get_distributed_rank(group=None) -> int:
    return torch.distributed.get_rank(group=group)


class activation_recompute_forward(AbstractContextManager, ContextDecorator):
    """Marks the first forward / the recompute forward of TE-checkpointed FP8 code."""

    def __init__(self, activation_recompute: bool = False, recompute_phase: bool = False):
        super().__init__()
        self.activation_recompute = activation_recompute
        self.recompute_phase = recompute_phase

    def __enter__(self):
        global _FP8_ACTIVATION_RECOMPUTE_ENABLED, _FP8_ACTIVATION_RECOMPUTE_PHASE
        _FP8_ACTIVATION_RECOMPUTE_ENABLED = (
            self.activation_recompute and FP8GlobalStateManager.is_fp8_enabled())
        _FP8_ACTIVATION_RECOMPUTE_PHASE = self.recompute_phase

    def __exit__(self, *exc_details):
        global _FP8_ACTIVATION_RECOMPUTE_ENABLED, _FP8_ACTIVATION_RECOMPUTE_PHASE
        _FP8_ACTIVATION_RECOMPUTE_ENABLED = False
        _FP8_ACTIVATION_RECOMPUTE_PHASE = False


def is_fp8_activation_recompute_enabled() -> bool:
    return _FP8_ACTIVATION_RECOMPUTE_ENABLED


def in_fp8_activation_recompute_phase() -> bool:
    return _FP8_ACTIVATION_RECOMPUTE_PHASE


def checkpoint(function, *args, **kwargs):
    """TE's activation checkpointing (megatron uses it only for FP8 recompute): not emulated."""
    raise NotImplementedError("transformer_engine.pytorch.checkpoint is not emulated")


class CudaRNGStatesTracker:
    """Named RNG states; `fork(name)` runs a block on that state and keeps where it ended.

    Same contract as TE's tracker, with CPU generator states (`torch.get_rng_state`)."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise RuntimeError(f"cuda rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()
        set_all_rng_states(self.states_)

    @contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"cuda rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def gather_along_first_dim(inp: torch.Tensor, process_group, async_op: bool = False,
                           quantizer=None):
    """All-gather and concatenate along dim 0 (no autograd). Returns (output, None)."""
    world = get_distributed_world_size(process_group)
    if world == 1:
        return inp, None
    parts = [torch.empty_like(inp) for _ in range(world)]
    torch.distributed.all_gather(parts, inp.contiguous(), group=process_group)
    return torch.cat(parts, dim=0), None


def reduce_scatter_along_first_dim(inp: torch.Tensor, tp_group, async_op: bool = False):
    """Sum over the group, keep this rank's dim-0 chunk (no autograd). Returns (output, None)."""
    world = get_distributed_world_size(tp_group)
    if world == 1:
        return inp, None
    assert inp.shape[0] % world == 0, "first dimension must be divisible by the group size"
    total = inp.contiguous().clone()
    torch.distributed.all_reduce(total, group=tp_group)
    rank = torch.distributed.get_rank(group=tp_group)
    return total.chunk(world, dim=0)[rank].contiguous(), None


def allreduce(inp: torch.Tensor, tp_group=None, async_op: bool = False):
    """In-place sum over the group (no autograd). Returns (inp, None)."""
    if get_distributed_world_size(tp_group) == 1:
        return inp, None
    torch.distributed.all_reduce(inp, group=tp_group)
    return inp, None
