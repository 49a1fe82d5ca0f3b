"""Helpers for LoRA tests on Megatron models: full (unsharded) views of sharded tensors and
grads, non-zero B, and training on the tiny GPT."""

from __future__ import annotations

import torch

from megatron_lora.layers import sharding


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a (possibly TP-split) parameter, on every rank."""
    return sharding.full_tensor(param, tp_group())


def full_tensor_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The unsharded value of `value`, a tensor laid out like the parameter `param`."""
    return sharding.full_tensor(_with_layout(value, param), tp_group())


def full_grad(param: torch.Tensor) -> torch.Tensor:
    """The unsharded, complete grad of a parameter: partial grads of `sequence_parallel`
    matrices summed over TP first, as Megatron's grad finalization does."""
    grad = param.grad.detach().clone()
    if getattr(param, "sequence_parallel", False):
        torch.distributed.all_reduce(grad, group=tp_group())
    return full_tensor_like(grad, param)


def _with_layout(value, param):
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(value, attr, getattr(param, attr))
    return value


def full_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p) for name, p in params.items()}


@torch.no_grad()
def set_nonzero_B(model, seed: int = 7, scale: float = 0.05) -> None:
    """Give every B a value drawn over its full shape from `seed` and its adapter-checkpoint name
    (global layer and expert indices): the same adapters at every TP, PP, EP and ETP size and in
    both expert implementations. (The name enters as the sum of its characters' codes: the
    draws the dense tests were written against.)"""
    from megatron_lora.modules import lora_tensors

    for name, (param, module) in lora_tensors(model).items():
        if ".lora_B." not in name:
            continue
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        full = torch.randn(sharding.full_shape(param, module.lora_tp_group),
                           generator=generator) * scale
        param.copy_(sharding.local_shard(full, param, module.lora_tp_group))


def train_with_megatron_ddp(model, config, steps: int = 3, lr: float = 1e-2, loss_fn=None,
                            schedule=None):
    """`megatron_cpu.ddp_training.train_with_megatron_ddp` on the tiny GPT's batches
    (constant learning rate and no clipping unless `schedule` says otherwise)."""
    from megatron_cpu.ddp_training import Schedule
    from megatron_cpu.ddp_training import train_with_megatron_ddp as train
    from support import tiny_gpt

    return train(model, config, loss_fn or tiny_gpt.loss, steps, lr,
                 schedule=schedule or Schedule())
