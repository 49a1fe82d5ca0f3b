"""`run_on_ranks` with Megatron's model-parallel state set up on every rank (CPU or GPU).

    results = run_on_ranks(fn, world_size=2, tp=2, args=(cfg,))

On each rank, after the gloo group exists: `megatron_cpu.device.enable()` (a no-op with
CUDA), `initialize_model_parallel(tp, pp, ...)`, Megatron's RNG seeded, then `fn(*args,
**kwargs)`. Pass `setup` for what must happen before megatron is imported (megatron-core detects
Transformer Engine at import): it runs before `fn`'s module is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_cpu import processes
from megatron_cpu.processes import RankError  # noqa: F401 - re-exported for callers


def initialize_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, **sizes: Any) -> None:
    """(Re)initialize Megatron's parallel state on the running process group and seed its RNG
    tracker. Calling it again with other sizes switches layouts inside one launch, e.g. to
    compare TP=2 with TP=1 (where the 2 ranks become data-parallel replicas)."""
    # Imported here: the parent process calls `run_on_ranks` and never needs megatron-core.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cpu import device

    device.enable()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **sizes
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _with_model_parallel(parallel, fn, *args, **kwargs):
    from megatron.core import parallel_state

    initialize_model_parallel(**parallel)
    try:
        return fn(*args, **kwargs)
    finally:
        parallel_state.destroy_model_parallel()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float = 300.0,
    setup: Callable[[], None] | None = None,
    **parallel_sizes: Any,
) -> list[Any]:
    """Run `fn` on `world_size` ranks with Megatron parallel state; return each rank's result.

    `parallel_sizes` go to `initialize_model_parallel` (e.g. `context_parallel_size`,
    `virtual_pipeline_model_parallel_size`).
    """
    parallel = dict(tp=tp, pp=pp, seed=seed, **parallel_sizes)
    wrapped = functools.update_wrapper(functools.partial(_with_model_parallel, parallel, fn), fn)
    return processes.run_on_ranks(wrapped, world_size, args=args, kwargs=kwargs,
                               timeout=timeout, setup=setup)
