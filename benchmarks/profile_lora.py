"""Where a LoRA step spends its time beyond the frozen-base step (hidden 1024, r 16, TP=1).

Two views, both against the frozen base on the same weights:

1. Per linear: one Megatron linear (each of a layer's four targets, its real shape) run
   forward + backward alone, LoRA vs frozen, the minimum of many interleaved repetitions
   (interference from other processes only ever adds time, so the minimum is the cleanest
   estimate of the cost itself). Printed next to the FLOP ratio.
2. Per op: torch.profiler over whole decoder-block steps, self CPU time grouped into base
   GEMMs, LoRA GEMMs (an operand dimension equals r), attention, elementwise, copies, Adam,
   and the count of autograd nodes.

    python -m benchmarks.profile_lora [--quick] [--hidden 1024 --r 16 --threads 1]
"""

from __future__ import annotations

import collections

import torch

from benchmarks import common
from benchmarks.common import Column
from benchmarks.decoder_stack import Geometry, build_block, training_step
from benchmarks.theory import lora_linear_flops

PER_LINEAR = [
    Column("linear", "linear"), Column("frozen ms", "frozen_ms", "{:.2f}"),
    Column("LoRA ms", "lora_ms", "{:.2f}"),
    Column("LoRA/frozen", "lora/frozen", "{:.3f}", bold=True),
    Column("FLOP ratio", "flop lora/frozen", "{:.3f}"),
]
PER_OP = [
    Column("category", "category"), Column("frozen", "frozen", "{:.1f}"),
    Column("LoRA", "lora", "{:.1f}"), Column("LoRA-frozen", "lora-frozen", "{:.1f}"),
    Column("% of frozen", "share of frozen", "{:.1%}"),  # None for the node count
]
TABLES = {"per_linear": PER_LINEAR, "per_op": PER_OP}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=5)
    # One thread, so that per-op times are not split across cores.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.repeats, args.profile_steps = 256, 5, 2
    return args


def linear_step(module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x)[0].backward(dy)

    return step


def per_linear(geometry: Geometry, r: int, repeats: int) -> list[dict]:
    """Frozen and LoRA ms, their ratio and the FLOP ratio, per target linear of a layer."""
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
        samples = common.time_in_turns({"frozen": linear_step(base_linear, x, dy),
                                        "lora": linear_step(lora_linear, x, dy)},
                                       rounds=repeats, rotate=False)
        best = {variant: min(t.wall) for variant, t in samples.items()}
        base_flops = 4 * geometry.tokens * in_features * out_features  # forward + input grad
        extra = lora_linear_flops(geometry.tokens, in_features, out_features, r)
        rows.append({"linear": name.split(".")[-1], "frozen_ms": best["frozen"] * 1e3,
                     "lora_ms": best["lora"] * 1e3, "lora/frozen": best["lora"] / best["frozen"],
                     "flop lora/frozen": 1 + extra / base_flops})
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


def per_op_rows(best: dict[str, dict[str, float]]) -> list[dict]:
    """One row per category: frozen and LoRA ms, the difference, its share of the frozen step."""
    frozen_total = sum(v for k, v in best["frozen"].items() if "count" not in k)
    rows = []
    for key in sorted(set(best["frozen"]) | set(best["lora"])):
        a, b = best["frozen"].get(key, 0.0), best["lora"].get(key, 0.0)
        rows.append({"category": key, "frozen": a, "lora": b, "lora-frozen": b - a,
                     "share of frozen": None if "count" in key else (b - a) / frozen_total})
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = Geometry(hidden=args.hidden, seq=args.seq, batch=args.batch)
    with common.single_rank():
        machine = common.describe_machine()
        setup = f"{geometry.describe()}, LoRA r {args.r}, fp32"
        print(f"machine: {machine}\nmodel: {setup}\n")
        print(f"1. One linear, forward + backward, min of {args.repeats} interleaved repeats (ms)")
        linears = per_linear(geometry, args.r, args.repeats)
        common.print_table(PER_LINEAR, linears)
        print(f"\n2. Decoder block step, self CPU ms per category, minimum over "
              f"{args.profile_steps} profiled steps per variant")
        ops = per_op_rows(per_op(geometry, args.r, args.profile_steps))
        common.print_table(PER_OP, ops)
    common.write_json(args.json, {"machine": machine, "setup": setup, "repeats": args.repeats,
                                  "profile_steps": args.profile_steps, "per_linear": linears,
                                  "per_op": ops})


if __name__ == "__main__":
    main()
