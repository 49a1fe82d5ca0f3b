"""Run megatron-core's forward and backward on CPU (gloo), for tests, the demo and benchmarks.

megatron-core assumes CUDA in these places that a CPU run meets:

- buffers and collective outputs are allocated with `device=torch.cuda.current_device()`
  (the global memory buffer, the sequence-parallel all-gather / reduce-scatter in
  `tensor_parallel/mappings.py`, the linears' sequence-parallel paths);
- the RNG tracker keeps CUDA generator states (`torch.cuda.get_rng_state`), used by dropout
  inside tensor-parallel regions;
- activation recomputation saves and restores the CUDA RNG state;
- the default causal attention mask is built with `device="cuda"`;
- without apex, the local spec's norm (`WrappedTorchNorm`, plain torch) refuses sequence
  parallelism, because it does not mark its weights `sequence_parallel` as apex's and TE's
  norms do. The CPU runtime builds the same torch norm and marks them;
- megatron-core 0.19's DDP waits on `torch.cuda.current_stream()` before reducing grads, and
  dist checkpointing calls `torch.cuda.synchronize()`; CPU work is synchronous, so a stream
  whose waits do nothing, and a synchronize that does nothing, are exact;
- megatron-core 0.16's MoE router reads `te_general_gemm`, a name it defines only when
  Transformer Engine imports;
- megatron-core 0.16's multi-latent attention imports the TE wrappers, which import without TE
  (`te` is then a MagicMock), so it sets its own `HAVE_TE = True` and its
  `isinstance(linear_proj, TELinear)` fails on a MagicMock class (`TypeError: isinstance() arg
  2 must be a type`); 0.19 reads the extension's `HAVE_TE` and needs nothing;
- the MoE all-to-all token dispatcher copies its split sizes device-to-host on a side CUDA
  stream (`torch.cuda.Stream()` at construction, `torch.cuda.stream(s)` and
  `s.record_event().synchronize()` around the copy), and converts them to numpy only for CUDA
  tensors (`moe_utils.maybe_move_tensor_to_cpu`), so on CPU c10d's `all_to_all_single` gets
  tensors for its split sizes and raises `TypeError`. The CPU runtime gives it the synchronous
  stream and numpy split sizes: the same integers, so the dispatch is unchanged;
- at expert-TP > 1 the dispatcher gathers the tokens of the ETP group's ranks, which hold
  different numbers of them, and reduce-scatters them back (`tensor_parallel/mappings.py`
  with split sizes: `torch.distributed.all_gather` / `reduce_scatter` of unequal pieces, which
  NCCL runs and gloo refuses, "ProcessGroupGloo::allgather: invalid tensor size"). The CPU
  runtime pads each piece to the largest for the gather and reduces the whole tensor for the
  reduce-scatter, keeping this rank's piece: the same values, by equal-sized collectives;
- the pipeline schedules (`get_forward_backward_func`) count tokens in
  `torch.zeros([], device="cuda")`: inside that module, `torch` is a view of torch whose factory
  makes that counter on the CPU.

`enable()` redirects each of them to the CPU. Nothing happens at import, and nothing happens
when CUDA is available, so calling it unconditionally from a script is safe.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.torch_norm import WrappedTorchNorm

_ENABLED = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


class _SynchronousStream:
    """What `torch.cuda.current_stream()` returns on CPU: all work is already ordered."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _DoneEvent:
        return _DONE_EVENT


class _DoneEvent:
    """An event on the synchronous stream: always complete."""

    def synchronize(self) -> None:
        pass


_DONE_EVENT = _DoneEvent()
_SYNCHRONOUS_STREAM = _SynchronousStream()


def _current_stream(*args, **kwargs) -> _SynchronousStream:
    return _SYNCHRONOUS_STREAM


def _synchronize(*args, **kwargs) -> None:
    pass


def _stream_context(stream=None):
    """`torch.cuda.stream(s)`: every stream is the synchronous one, so entering it does nothing."""
    return contextlib.nullcontext()


def _split_sizes_to_numpy(move_to_cpu):
    """`maybe_move_tensor_to_cpu` that also turns CPU split sizes into numpy, as it does for
    CUDA ones (the all-to-all takes sequences of ints, not tensors)."""

    @functools.wraps(move_to_cpu)
    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move


def _alltoall_dispatcher_on_cpu() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _SYNCHRONOUS_STREAM
    torch.cuda.stream = _stream_context
    # Imported by name into the dispatcher module, so it is replaced there.
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_numpy(
        token_dispatcher.maybe_move_tensor_to_cpu)


def _uneven_gather_on_gloo(gather):
    """`mappings._gather_along_first_dim` whose unequal pieces (`output_split_sizes`) travel
    padded to the largest, then are cut back: gloo's all_gather takes equal sizes only."""

    @functools.wraps(gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    return gather_along_first_dim


def _uneven_reduce_scatter_on_gloo(reduce_scatter):
    """`mappings._reduce_scatter_along_first_dim` with unequal pieces (`input_split_sizes`):
    the whole tensor summed over the group, this rank's piece kept (gloo has no list
    reduce-scatter)."""

    @functools.wraps(reduce_scatter)
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(size) for size in input_split_sizes]
        start = sum(sizes[:group.rank()])
        return total[start:start + sizes[group.rank()]].clone()

    return reduce_scatter_along_first_dim


def _uneven_collectives_on_gloo() -> None:
    from megatron.core.tensor_parallel import mappings

    # The autograd functions in mappings look both up by name at each call.
    mappings._gather_along_first_dim = _uneven_gather_on_gloo(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter_on_gloo(
        mappings._reduce_scatter_along_first_dim)


class _TorchWithCPUCounters:
    """torch, as the schedules module sees it: `zeros(..., device="cuda")` is made on the CPU;
    every other name is torch's own."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = _cpu_device()
        return torch.zeros(*args, device=device, **kwargs)


def _get_cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sequence_parallel_torch_norm(original_new):
    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        # Under SP each rank normalizes its own sequence shard, so the weight grads are
        # partial sums: the `sequence_parallel` mark makes Megatron's grad finalization
        # all-reduce them over the TP group.
        view = types.SimpleNamespace(**{**vars(config), "sequence_parallel": False})
        norm = original_new(cls, view, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return __new__


class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """Megatron's RNG tracker with CPU generator states.

    Same contract as the CUDA tracker: named states seeded once (`add`), and `fork(name)`
    runs a block on that state and stores where it ended, so the tensor-parallel state
    ("model-parallel-rng", seeded per TP rank) gives each rank its own dropout mask and
    the default state gives every rank of a TP group the same one.
    """

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_name = self._current_state_name
        outer_state = torch.get_rng_state()
        if outer_name != "default-rng":  # a nested fork: park the outer state's progress
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def enable() -> None:
    """Make megatron-core usable on CPU. Idempotent; a no-op when CUDA is available.

    Call before building a model. Weights should be built with
    `TransformerConfig(use_cpu_initialization=True)`, which also makes the full base weights
    independent of the tensor-parallel size.
    """
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    # Every CUDA allocation in megatron-core names its device through this one call.
    torch.cuda.current_device = _cpu_device
    torch.cuda.current_stream = _current_stream
    torch.cuda.synchronize = _synchronize
    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.initialize_rng_tracker(force_reset=True)
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # imported there by name
    WrappedTorchNorm.__new__ = _sequence_parallel_torch_norm(WrappedTorchNorm.__new__)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # what megatron-core means by "no TE GEMM"
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention

    if not te_extension.HAVE_TE:
        multi_latent_attention.HAVE_TE = False  # TE is absent, whatever its mock import said
    _alltoall_dispatcher_on_cpu()
    _uneven_collectives_on_gloo()
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCPUCounters()
    _ENABLED = True


def is_enabled() -> bool:
    return _ENABLED
