"""Python objects across ranks, for the adapter's contributions (one rank per pipeline stage and
expert-parallel rank holds each tensor): gather to rank 0, or to every rank; and a refusal that
some ranks see, raised on all of them. Without a process group there is one rank, and each call
returns its own object."""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(world size, rank), (1, 0) without a process group."""
    if not torch.distributed.is_initialized():
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def gather_to_rank0(contribution: dict) -> dict | None:
    """Every rank's `contribution` (a dict) merged on rank 0, sorted by name; None elsewhere.
    Call on every rank."""
    size, rank = world()
    if size == 1:
        received = [contribution]
    else:
        received = [None] * size if rank == 0 else None
        torch.distributed.gather_object(contribution, received, dst=0)
    if rank != 0:
        return None
    gathered = {}
    for part in received:
        gathered.update(part)
    return dict(sorted(gathered.items()))


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank. Call on every rank."""
    size, _ = world()
    if size == 1:
        return [obj]
    out = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out


def raise_on_every_rank(error: Exception | None) -> None:
    """Raise `error` here, or, when another rank found one, a `ValueError` naming that rank and
    its error: a refusal that only some ranks can see (their own tensors, their own pipeline
    stage) reaches every rank before any of them enters the next collective and waits there
    for ranks that left. Call on every rank."""
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise ValueError(f"rank {rank} refused: {message}")
