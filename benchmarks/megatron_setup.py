"""Megatron's parallel state in this very process, for single-rank (TP=1) benchmarks: no
spawned ranks, so the run gets every core (TP=2 runs use `megatron_lora.launch.run_on_ranks`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile

import torch



@contextlib.contextmanager
def single_rank(device: str = "cpu"):
    """A one-rank gloo process group with Megatron's state at TP=1. No collective runs at TP=1,
    so gloo serves on a GPU too, and needs no NCCL setup there."""
    from megatron.core import parallel_state

    from megatron_lora.runtime.launch import initialize_model_parallel

    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    store = tempfile.mkdtemp(prefix="single_rank.")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}/store",
                                         rank=0, world_size=1)
    try:
        initialize_model_parallel(tp=1)  # on CPU this also turns on megatron_lora.cpu
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)
