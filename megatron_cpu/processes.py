"""Run a function on N ranks in fresh processes joined in a gloo process group.

    results = run_on_ranks(fn, world_size=2, args=(cfg,))

`fn` must be importable by name (a module-level function, or a partial of one). Each rank runs
`setup()` first if given, and only then unpickles `fn` and its arguments: importing the module
that defines `fn` may import megatron, and `setup` may need to run before that (megatron-core
detects Transformer Engine when it is imported). `setup` itself must live in a module that does
not import megatron. The rank then joins a gloo process group (rendezvous through a file, so no
port can be taken by another process in between) and calls `fn(*args, **kwargs)`;
`megatron_cpu.launch.run_on_ranks` adds Megatron's parallel state on top. The per-rank
return values come back as a list indexed by rank (they travel
through `torch.save`, so tensors are fine). If any rank raises, every rank is stopped and
`RankError` carries that rank's traceback; if the ranks do not finish within `timeout`
seconds they are killed and `TimeoutError` is raised, so a test run never hangs.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _serialize(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


# What a rank without `setup` imports anyway. A forkserver that has imported it forks each such
# rank ready-made: importing torch and megatron-core costs seconds of CPU per rank, the larger
# part of a small CPU run. Ranks with `setup` are spawned bare, since setup must run first.
_PRELOAD = ("torch", "torch.distributed", "megatron.core.parallel_state",
            "megatron.core.models.gpt", "megatron.core.distributed", "megatron.core.optimizer")


def _context(setup):
    if setup is not None:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))  # only read when the server starts
    return ctx


def _rank_main(rank, world_size, store_file, setup, call, results, timeout, environ):
    # A forkserver's child inherits the server's environment, not the caller's: take the caller's.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        if setup is not None:
            setup()
        fn, args, kwargs = pickle.loads(call)  # after setup: this may import megatron
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        results.put((rank, True, _serialize(fn(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float = 300.0,
    setup: Callable[[], None] | None = None,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` new gloo ranks; return each rank's result."""
    call = pickle.dumps((fn, tuple(args), kwargs or {}))
    ctx = _context(setup)
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="run_on_ranks.")
    store_file = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, store_file, setup, call, results, timeout,
                  dict(os.environ)),
            # Not daemonic: ranks may start processes of their own (Megatron's dist
            # checkpointing does); the `finally` below kills any rank left running.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"{getattr(fn, '__qualname__', fn)}: ranks {missing} "
                                   f"did not finish within {timeout:.0f}s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    code = procs[dead[0]].exitcode
                    raise RankError(f"rank {dead[0]} died with exit code {code} "
                                    f"before reporting a result") from None
                continue
            if not ok:
                raise RankError(f"rank {rank} of {world_size} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10 if len(outputs) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [outputs[rank] for rank in range(world_size)]
