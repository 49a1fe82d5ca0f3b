"""Where a LoRA step spends its time beyond the frozen-base step (hidden 1024, r 16, TP=1).

Two views, both against the frozen base on the same weights:

1. Per linear: one Megatron linear (each of a layer's four targets, its real shape) run
   forward + backward alone, LoRA vs frozen, the minimum of many interleaved repetitions
   (interference from other processes only ever adds time, so the minimum is the cleanest
   estimate of the cost itself). Printed next to the FLOP ratio.
2. Per op: torch.profiler over whole decoder-block steps, self CPU time grouped into base
   GEMMs, LoRA GEMMs (an operand dimension equals r), attention, elementwise, copies, Adam,
   and the count of autograd nodes.

    python -m benchmarks.profile_lora [--hidden 1024 --r 16 --threads 1]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from benchmarks import machine
from benchmarks.decoder_stack import Geometry, build_block, training_step
from benchmarks.megatron_setup import single_rank
from benchmarks.theory import lora_linear_flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args(argv)


def min_times(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def linear_step(module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x)[0].backward(dy)

    return step


def per_linear(geometry: Geometry, r: int, repeats: int) -> list[tuple]:
    """(name, frozen ms, lora ms, measured ratio, FLOP ratio) per target linear of a layer."""
    lora = build_block(geometry, "lora", r=r).layers[0]
    frozen = build_block(geometry, "frozen").layers[0]
    rows = []
    for name in ("self_attention.linear_qkv", "self_attention.linear_proj",
                 "mlp.linear_fc1", "mlp.linear_fc2"):
        lora_linear, base_linear = lora.get_submodule(name), frozen.get_submodule(name)
        out_features, in_features = base_linear.weight.shape
        shape = (geometry.seq, geometry.batch)
        x = torch.randn(*shape, in_features, requires_grad=True)
        dy = torch.randn(*shape, out_features)
        best = min_times({"frozen": linear_step(base_linear, x, dy),
                          "lora": linear_step(lora_linear, x, dy)}, repeats)
        base_flops = 4 * geometry.tokens * in_features * out_features  # forward + input grad
        extra = lora_linear_flops(geometry.tokens, in_features, out_features, r)
        rows.append((name.split(".")[-1], best["frozen"] * 1e3, best["lora"] * 1e3,
                     best["lora"] / best["frozen"], 1 + extra / base_flops))
    return rows


def category(event, r: int) -> str:
    name = event.key
    shapes = [s for s in (event.input_shapes or []) if s]
    if name in ("aten::mm", "aten::addmm", "aten::addmm_"):
        return "LoRA GEMMs" if any(r in s for s in shapes) else "base GEMMs"
    if name in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
                "aten::masked_fill_"):
        return "attention core"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"):
        return "copies"
    if "adam" in name.lower() or name.startswith("aten::_foreach"):
        return "Adam"
    if name.startswith("aten::"):
        return "elementwise and other aten"
    return "python / autograd glue"


def per_op(geometry: Geometry, r: int, steps: int) -> dict[str, dict[str, float]]:
    """Self CPU ms per category for one step of each variant: each step profiled on its own,
    the variants taking turns, the minimum per category kept (other load only adds time)."""
    from torch.profiler import ProfilerActivity, profile

    step = {variant: training_step(build_block(geometry, variant, r=r), geometry)
            for variant in ("frozen", "lora")}
    best: dict[str, dict[str, float]] = {v: {} for v in step}
    for _ in range(steps):
        for variant, run_step in step.items():
            run_step()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                run_step()
            totals: dict[str, float] = collections.defaultdict(float)
            for event in prof.key_averages(group_by_input_shape=True):
                if event.key.startswith("autograd::engine::evaluate_function"):
                    totals["autograd nodes (count)"] += event.count
                else:
                    totals[category(event, r)] += event.self_cpu_time_total / 1e3
            for key, value in totals.items():
                best[variant][key] = min(best[variant].get(key, float("inf")), value)
    return best


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = Geometry(hidden=args.hidden, seq=args.seq, batch=args.batch)
    with single_rank():
        print(f"machine: {machine.describe()}")
        print(f"model: {geometry.describe()}, LoRA r {args.r}, fp32\n")
        print("1. One linear, forward + backward, min of "
              f"{args.repeats} interleaved repeats (ms)")
        print(f"{'linear':14}{'frozen':>10}{'LoRA':>10}{'ratio':>9}{'FLOP ratio':>12}")
        for name, frozen_ms, lora_ms, ratio, theory in per_linear(geometry, args.r, args.repeats):
            print(f"{name:14}{frozen_ms:10.2f}{lora_ms:10.2f}{ratio:9.3f}{theory:12.3f}")
        print(f"\n2. Decoder block step, self CPU ms per category, minimum over "
              f"{args.profile_steps} profiled steps per variant")
        ops = per_op(geometry, args.r, args.profile_steps)
        frozen_total = sum(v for k, v in ops["frozen"].items() if "count" not in k)
        print(f"{'category':28}{'frozen':>10}{'LoRA':>10}{'LoRA-frozen':>13}{'% of frozen':>13}")
        for key in sorted(set(ops["frozen"]) | set(ops["lora"])):
            a, b = ops["frozen"].get(key, 0.0), ops["lora"].get(key, 0.0)
            share = "" if "count" in key else f"{100 * (b - a) / frozen_total:12.1f}%"
            print(f"{key:28}{a:10.1f}{b:10.1f}{b - a:13.1f}{share:>13}")


if __name__ == "__main__":
    main()
