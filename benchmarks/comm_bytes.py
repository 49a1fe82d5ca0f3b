"""Communication bytes per training step at TP=2: LoRA's extra vs the base layers' own.

One step of each variant of the decoder block (benchmarks/decoder_stack.py) under a counter of
every collective (megatron_cpu/collective_bytes.py), with and without sequence
parallelism. The frozen-base step moves exactly what the base layers move; LoRA's extra is the
difference. The sharding rule (megatron_lora/layers/sharding.py) predicts only rank-sized
traffic: `[tokens, r]` activations, plus under SP the all-reduce of the replicated matrices'
`[r, in]` / `[out, r]` grads (Megatron does that once per optimizer step, after all
micro-batches, so gradient accumulation divides it). Expected extra per layer, fp32: without
SP 4 x T x r x 4 B (one `[T, r]` all-reduce per target); with SP 8 x T x r x 4 B (an
all-gather and a reduce-scatter per target, counted at full size) plus the grad sync.

    python -m benchmarks.comm_bytes [--quick]
"""

from __future__ import annotations

from benchmarks import common
from benchmarks.common import Column
from benchmarks.decoder_stack import Geometry, build_block, sequence_parallel_grads, training_step
from megatron_cpu.collective_bytes import count_collective_bytes

COLUMNS = [
    Column("layout", "layout"), Column("hidden", "hidden"), Column("r", "r"),
    Column("base MB", lambda row: row["base_bytes"] / 1e6, "{:.2f}"),
    Column("full FT MB", lambda row: row["full_bytes"] / 1e6, "{:.2f}"),
    Column("LoRA MB", lambda row: row["lora_bytes"] / 1e6, "{:.2f}"),
    Column("LoRA extra MB", lambda row: (row["lora_bytes"] - row["base_bytes"]) / 1e6, "{:.3f}"),
    Column("of which grad sync", lambda row: row["lora_grad_sync_bytes"] / 1e6, "{:.3f}"),
    Column("extra / base", "extra/base", "{:.2%}", bold=True),
    Column("without grad sync", "activation extra/base", "{:.2%}"),
]
TABLES = {"rows": COLUMNS}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
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
    grad_sync = (sum(p.numel() * p.element_size() for p in sequence_parallel_grads(block))
                 if sp else 0)
    return sum(counts.values()), grad_sync


def measure(tp: int, sp: bool, geometries: list[Geometry], ranks: list[int]) -> list[dict]:
    rows = []
    for geometry in geometries:
        base, _ = step_bytes(geometry, "frozen", 16, tp, sp)
        full, _ = step_bytes(geometry, "full", 16, tp, sp)
        for r in ranks:
            lora, grad_sync = step_bytes(geometry, "lora", r, tp, sp)
            rows.append({"layout": common.layout_label(tp, sp), "hidden": geometry.hidden, "r": r,
                         "base_bytes": base, "full_bytes": full, "lora_bytes": lora,
                         "lora_grad_sync_bytes": grad_sync,
                         "extra/base": (lora - base) / base,
                         "activation extra/base": (lora - grad_sync - base) / base})
    return rows


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine()
    setup = (f"{args.layers} layers, {args.seq * args.batch} tokens, fp32; bytes per rank per "
             f"step (forward + backward + grad sync)")
    print(f"machine: {machine}\n{setup}")
    geometries = [Geometry(hidden=h, layers=args.layers, seq=args.seq, batch=args.batch)
                  for h in args.hidden]
    table, rows = common.TablePrinter(COLUMNS), []
    for sp in (False, True):
        new = common.run_layout(measure, 2, "cpu", sp, geometries, args.r)
        table.print(new)
        rows += new
    common.write_json(args.json, {"machine": machine, "setup": setup,
                                  "tokens": args.seq * args.batch, "rows": rows})


if __name__ == "__main__":
    main()
