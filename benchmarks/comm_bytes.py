"""Communication bytes per training step at TP=2: LoRA's extra vs the base layers' own.

One step of each variant of the decoder block (benchmarks/decoder_stack.py) under a counter of
every collective (lora_common/collective_bytes.py), with and without sequence parallelism. The
frozen-base step moves exactly what the base layers move; LoRA's extra is the difference. The
design (the sharding rule in megatron_lora/lora_linear.py) predicts only rank-sized traffic: `[tokens, r]` activations, plus
under SP the all-reduce of the replicated matrices' `[r, in]` / `[out, r]` grads (Megatron does
that once per optimizer step, after all micro-batches, so gradient accumulation divides it).
Expected extra per layer, fp32: without SP 4 x T x r x 4 B (one `[T, r]` all-reduce per target);
with SP 8 x T x r x 4 B (an all-gather and a reduce-scatter per target, counted at full size)
plus the grad sync.

    python -m benchmarks.comm_bytes [--quick]
"""

from __future__ import annotations

import argparse
import json

from benchmarks import layouts, machine
from megatron_lora.runtime.collective_bytes import count_collective_bytes
from benchmarks.decoder_stack import Geometry, build_block, sequence_parallel_grads, training_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.r, args.seq = [256], [16], 64
    return args


def step_bytes(geometry: Geometry, variant: str, r: int, tp: int, sp: bool) -> tuple[int, int]:
    """(all bytes of one step, the part that is the sequence-parallel grad all-reduce)."""
    block = build_block(geometry, variant, r=r, tp=tp, sp=sp)
    step = training_step(block, geometry, tp=tp, sp=sp)
    step()  # the first step builds optimizer state; count a steady one
    with count_collective_bytes() as counts:
        step()
    grad_sync = sum(p.numel() * p.element_size() for p in sequence_parallel_grads(block)) if sp else 0
    return sum(counts.values()), grad_sync


def measure(tp: int, sp: bool, geometries: list[Geometry], ranks: list[int]) -> list[dict]:
    rows = []
    for geometry in geometries:
        base, _ = step_bytes(geometry, "frozen", 16, tp, sp)
        full, _ = step_bytes(geometry, "full", 16, tp, sp)
        for r in ranks:
            lora, grad_sync = step_bytes(geometry, "lora", r, tp, sp)
            rows.append({"layout": layouts.label(tp, sp), "hidden": geometry.hidden, "r": r,
                         "base_bytes": base, "full_bytes": full, "lora_bytes": lora,
                         "lora_grad_sync_bytes": grad_sync,
                         "extra/base": (lora - base) / base,
                         "activation extra/base": (lora - grad_sync - base) / base})
    return rows


def run(args) -> dict:
    geometries = [Geometry(hidden=h, layers=args.layers, seq=args.seq, batch=args.batch)
                  for h in args.hidden]
    rows = []
    for sp in (False, True):
        rows += layouts.run_layout(measure, 2, "cpu", sp, geometries, args.r)
    return {"machine": machine.describe(), "tokens": args.seq * args.batch, "rows": rows}


def print_rows(rows: list[dict]) -> None:
    print(f"{'layout':>8}{'hidden':>7}{'r':>4}{'base MB':>10}{'full FT MB':>12}"
          f"{'LoRA MB':>10}{'LoRA extra':>12}{'of which grad sync':>20}{'extra/base':>12}"
          f"{'without grad sync':>19}")
    for row in rows:
        extra = row["lora_bytes"] - row["base_bytes"]
        print(f"{row['layout']:>8}{row['hidden']:>7}{row['r']:>4}{row['base_bytes'] / 1e6:10.2f}"
              f"{row['full_bytes'] / 1e6:12.2f}{row['lora_bytes'] / 1e6:10.2f}"
              f"{extra / 1e6:12.3f}{row['lora_grad_sync_bytes'] / 1e6:20.3f}"
              f"{row['extra/base']:12.2%}{row['activation extra/base']:19.2%}")


def main(argv=None):
    args = parse_args(argv)
    print(f"machine: {machine.describe()}")
    print(f"bytes per rank per step (forward + backward + grad sync), {args.layers} layers, "
          f"{args.seq * args.batch} tokens, fp32")
    result = run(args)
    print_rows(result["rows"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
