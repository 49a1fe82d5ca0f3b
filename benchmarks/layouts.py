"""Tensor-parallel layouts a benchmark runs under, by name: "1" (TP=1), "2" (TP=2), "2sp"
(TP=2 with sequence parallelism). TP=1 runs in this process; TP=2 in two spawned gloo ranks."""

from __future__ import annotations

from typing import Any, Callable


def parse(name: str) -> tuple[int, bool]:
    sp = name.endswith("sp")
    tp = int(name[:-2] if sp else name)
    return tp, sp


def label(tp: int, sp: bool) -> str:
    return f"TP={tp}" + (" SP" if sp else "")


def run_layout(fn: Callable[..., Any], tp: int, device: str, *args: Any) -> Any:
    """`fn(tp, *args)` under Megatron's parallel state; rank 0's result."""
    if tp == 1:
        from benchmarks.megatron_setup import single_rank

        with single_rank(device):
            return fn(tp, *args)
    if device != "cpu":
        raise ValueError("TP > 1 benchmarks run on CPU ranks (gloo) only")
    from megatron_lora.runtime.launch import run_on_ranks

    return run_on_ranks(fn, world_size=tp, tp=tp, args=(tp, *args), timeout=3600)[0]
