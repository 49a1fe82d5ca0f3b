"""Helpers for LoRA tests on Megatron models: full (unsharded) views of sharded tensors,
non-zero B, a Megatron DDP training loop, and a collective-byte counter."""

from __future__ import annotations

import contextlib
import sys

import torch

from megatron_lora import sharding


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a (possibly TP-split) parameter, on every rank."""
    return sharding.full_tensor(param, tp_group())


def full_tensor_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The unsharded value of `value`, a tensor laid out like the parameter `param`."""
    return sharding.full_tensor(_with_layout(value, param), tp_group())


def _with_layout(value, param):
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(value, attr, getattr(param, attr))
    return value


def full_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p) for name, p in params.items()}


@torch.no_grad()
def set_nonzero_B(model, seed: int = 7) -> None:
    """Give every B a value drawn over its full shape (so it agrees at every TP size)."""
    from megatron_lora import get_lora_parameters

    group = tp_group()
    for name, param in sorted(get_lora_parameters(model).items()):
        if not name.endswith("lora_B.weight"):
            continue
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        if getattr(param, "tensor_model_parallel", False):
            shape = list(param.shape)
            shape[param.partition_dim] *= group.size()
            full = torch.randn(shape, generator=generator) * 0.05
            param.copy_(sharding.shard(full, param.partition_dim, group.rank(), group.size(),
                                       param.partition_stride))
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def train_with_megatron_ddp(model, config, steps: int = 3, lr: float = 1e-2, loss_fn=None):
    """Train the trainable parameters for `steps` Adam steps, with grads reduced by Megatron's
    own DDP and `finalize_model_grads` (which sums `sequence_parallel` grads over TP).
    Megatron's optimizer allocates on `device='cuda'` literally, so torch's Adam steps on
    the `main_grad` buffers DDP fills. Returns the losses and the DDP-wrapped model."""
    import tiny_gpt
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = (loss_fn or tiny_gpt.loss)(ddp, step)
        loss.backward()
        finalize_model_grads([ddp])
        for param in params:
            param.grad = param.main_grad
        optimizer.step()
        losses.append(loss.item())
    return losses, ddp


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
                "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast")


@contextlib.contextmanager
def count_collective_bytes():
    """Count the bytes each rank hands to collectives: the larger of a collective's input
    and output (an all-gather's gathered tensor, a reduce-scatter's full input).

    megatron-core keeps module-level references to some collectives (`dist_all_gather_func`),
    so every such reference in a loaded megatron module is wrapped too."""
    import torch.distributed as dist

    counts = {"bytes": 0, "calls": []}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, list)]
            sizes = [t.numel() * t.element_size() for t in tensors]
            sizes += [sum(t.numel() * t.element_size() for t in lst) for lst in lists]
            counts["bytes"] += max(sizes, default=0)
            counts["calls"].append((name, max(sizes, default=0)))
            return fn(*args, **kwargs)
        return counted

    wrapped = [(fn, wrap(name, fn)) for name, fn in originals.items()]
    patched = []
    for module in [dist] + [m for n, m in list(sys.modules.items()) if n.startswith("megatron.")]:
        for attr, value in list(vars(module).items()):
            for fn, counted in wrapped:
                if value is fn:
                    patched.append((module, attr, value))
                    setattr(module, attr, counted)
    try:
        yield counts
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
