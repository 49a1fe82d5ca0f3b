"""A minimal training loop on Megatron's own DDP and grad finalization (the demo's, and the
tests'), which runs on CPU with `megatron_cpu.device` as well as on GPU.

Megatron's DDP accumulates grads into `main_grad` buffers and `finalize_model_grads` reduces
them (data-parallel all-reduce, plus the TP sum of `sequence_parallel`-marked grads that LoRA
relies on). Megatron's optimizer and its grad clipping allocate on `device='cuda'` literally, so
torch's Adam steps on those buffers instead, `grad_norm` computes the norm Megatron's optimizer
clips by, and Megatron's own `OptimizerParamScheduler` (plain Python) sets the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Megatron's `--lr-warmup-iters`, `--lr-decay-style`, `--min-lr` and `--clip-grad`, in
    optimizer steps; the learning rate decays over all the steps (`--lr-decay-iters` unset).
    The default is a constant learning rate with no clipping (`--clip-grad 0`)."""

    warmup_steps: int = 0
    decay_style: str = "constant"  # or "linear", "cosine"
    min_lr: float = 0.0
    clip_grad: float = 0.0


def grad_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of the whole model's gradient, as Megatron's optimizer computes it for
    `--clip-grad` (`get_main_grads_for_grad_norm`, then a sum over the model-parallel group).

    Call it after `finalize_model_grads`, so `sequence_parallel` grads are complete. A
    parameter that is whole on every TP rank (no `tensor_model_parallel`: LoRA's replicated A
    or B, norms) counts on TP rank 0 only, and a shared one (tied embeddings) on one stage only.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    if any(not getattr(param, "allreduce", True) for param in params):
        # Megatron gives expert weights an optimizer of their own, whose norm is reduced over
        # the expert groups (expert-TP duplicates, expert-parallel shards): not done here.
        raise ValueError("grad_norm covers dense parameters only; expert parameters "
                         "(allreduce=False) need Megatron's expert-parallel reduction")
    squares = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for param in params:
        if (param.grad is not None and param_is_not_shared(param)
                and param_is_not_tensor_parallel_duplicate(param)):
            squares += param.grad.float().square().sum()
    torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return squares.sqrt().item()


def train_with_megatron_ddp(model, config, loss_fn: Callable, steps: int, lr: float,
                            label: str | None = None,
                            schedule: Schedule = Schedule(),
                            after_step: Callable[[int], None] | None = None) -> list[float]:
    """Adam steps on the trainable parameters; `loss_fn(ddp_model, step)` returns the loss.
    `lr` is the peak learning rate of `schedule`. `label` names the progress rank 0 shows
    (`progress.py`). `after_step(step)` runs once each optimizer step is done (a weight sync to
    a rollout engine). Returns the losses."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    # As Megatron's training loop: the scheduler counts finished steps, so with warmup the
    # first step runs at the initial learning rate (0).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=max(steps, 1),
        lr_decay_style=schedule.decay_style, start_wd=0.0, end_wd=0.0, wd_incr_steps=steps,
        wd_incr_style="constant")
    progress = None
    if label is not None and torch.distributed.get_rank() == 0:
        from megatron_cpu.progress import Progress

        progress = Progress(label, steps)
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = loss_fn(ddp, step)
        loss.backward()
        finalize_model_grads([ddp])
        for param in params:
            param.grad = param.main_grad
        if schedule.clip_grad > 0:
            norm = grad_norm(params)
            # Megatron's clip_grad_by_total_norm_fp32: scale only when the norm is too large.
            clip_coeff = schedule.clip_grad / (norm + 1.0e-6)
            if clip_coeff < 1.0:
                for param in params:
                    param.grad.mul_(clip_coeff)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step(increment=1)
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
        if progress is not None:
            progress.update(step, loss=f"{loss.item():.3f}", lr=f"{step_lr:.1e}")
    if progress is not None:
        progress.close()
    return losses
