"""A minimal training loop on Megatron's own DDP and grad finalization (the demo's, and the
tests'), which runs on CPU with `megatron_lora.runtime.cpu` as well as on GPU.

Megatron's DDP accumulates grads into `main_grad` buffers and `finalize_model_grads` reduces
them (data-parallel all-reduce, plus the TP sum of `sequence_parallel`-marked grads that LoRA
relies on). Megatron's optimizer allocates on `device='cuda'` literally, so torch's Adam steps
on those buffers instead.
"""

from __future__ import annotations

from typing import Callable

import torch


def train_with_megatron_ddp(model, config, loss_fn: Callable, steps: int, lr: float,
                            progress: str | None = None) -> list[float]:
    """Adam steps on the trainable parameters; `loss_fn(ddp_model, step)` returns the loss.
    `progress` labels a tqdm bar shown on rank 0. Returns the losses."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_iter = range(steps)
    bar = None
    if progress is not None and torch.distributed.get_rank() == 0:
        from tqdm import tqdm

        steps_iter = bar = tqdm(steps_iter, desc=progress, dynamic_ncols=True)
    losses = []
    for step in steps_iter:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = loss_fn(ddp, step)
        loss.backward()
        finalize_model_grads([ddp])
        for param in params:
            param.grad = param.main_grad
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses
