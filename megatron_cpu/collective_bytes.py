"""Count the bytes each rank hands to torch.distributed collectives while a block runs: how the
tests and benchmarks check that LoRA adds only the rank-sized traffic the sharding rule implies.

    with count_collective_bytes() as counts:
        loss.backward()
    sum(counts.values())      # bytes; counts["all_reduce"] etc. per collective

A collective's size is the larger of its input and output (an all-gather's gathered tensor, a
reduce-scatter's full input): the volume a ring implementation moves is proportional to it.
megatron-core keeps module-level references to some collectives (`dist_all_gather_func`,
`dist_reduce_scatter_func`), so those references are wrapped too.
"""

from __future__ import annotations

import collections
import contextlib
import sys

import torch

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@contextlib.contextmanager
def count_collective_bytes():
    """Yields a Counter: collective name -> bytes, filled while the block runs."""
    import torch.distributed as dist

    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += max((_nbytes(a) for a in args), default=0)
            return fn(*args, **kwargs)
        return wrapper

    replacements = {id(fn): counted(name, fn) for name, fn in originals.items()}
    patched = []
    modules = [dist] + [m for n, m in list(sys.modules.items())
                        if n.startswith("megatron.") and m is not None]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in replacements:
                patched.append((module, attr, value))
                setattr(module, attr, replacements[id(value)])
    try:
        yield counts
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
