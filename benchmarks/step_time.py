"""Step time: LoRA vs full fine-tuning vs frozen base on the same Megatron decoder block.

    full    forward + backward with weight grads + Adam on every weight
    lora    forward + backward (base frozen: no weight-grad GEMM) + Adam on the adapters
    frozen  forward + backward to the input only (the floor LoRA adds its GEMMs to)

All variants of one layout live in one process (or one pair of TP ranks) and take turns, the
order rotating every round; the table gives the median per-step time over the rounds and the
ratios next to the FLOP model's (benchmarks/theory.py).

    python -m benchmarks.step_time          # hidden 256/512/1024, r 8/16/64, TP 1, 2, 2+SP
    python -m benchmarks.step_time --quick  # smoke run
    python -m benchmarks.step_time --device cuda --dtype bf16 --hidden 4096 --layouts 1  # GPU
"""

from __future__ import annotations

from benchmarks import common, theory
from benchmarks.common import Column
from benchmarks.decoder_stack import Geometry, build_block, training_step

COLUMNS = [
    Column("layout", "layout"), Column("hidden", "hidden"), Column("r", "r"),
    Column("frozen ms", "frozen_ms", "{:.1f}"), Column("full ms", "full_ms", "{:.1f}"),
    Column("LoRA ms", "lora_ms", "{:.1f}"),
    Column("LoRA/full", "lora/full", "{:.3f}", bold=True),
    Column("theory", "theory lora/full", "{:.3f}"),
    Column("LoRA/frozen", "lora/frozen", "{:.3f}", bold=True),
    Column("theory", "theory lora/frozen", "{:.3f}"),
    Column("spread", "spread", "{:.0%}"),
    Column("min: LoRA/full", "min lora/full", "{:.3f}"),
    Column("min: LoRA/frozen", "min lora/frozen", "{:.3f}"),
]
TABLES = {"rows": COLUMNS}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--layouts", nargs="+", default=["1", "2", "2sp"],
                        help='"1", "2" (TP=2), "2sp" (TP=2 + sequence parallel)')
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11, help="turns each variant takes")
    parser.add_argument("--steps", type=int, default=1, help="steps per turn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.r, args.seq, args.rounds, args.steps = [256], [16], 64, 3, 1
    return args


def measure(tp: int, sp: bool, geometry: Geometry, ranks: list[int], rounds: int, steps: int,
            device: str, dtype_name: str) -> list[dict]:
    """Rows for one geometry and layout (runs on every rank; rank 0's result is kept)."""
    dtype = common.DTYPES[dtype_name]
    variants = {"frozen": ("frozen", 0), "full": ("full", 0)}
    variants.update({f"lora r={r}": ("lora", r) for r in ranks})
    step = {name: training_step(build_block(geometry, kind, r=r or 16, tp=tp, sp=sp,
                                            dtype=dtype, device=device), geometry, tp=tp, sp=sp)
            for name, (kind, r) in variants.items()}
    samples = common.time_in_turns(step, rounds=rounds, steps_per_round=steps, warmup=2,
                                   sync=common.synchronizer(device))
    seconds = {name: s.wall for name, s in samples.items()}
    frozen, full = common.median(seconds["frozen"]), common.median(seconds["full"])
    # Other load only ever adds time: on a busy machine the fastest turn is the steadier
    # estimate of the cost itself.
    fastest = {name: min(values) for name, values in seconds.items()}
    rows = []
    for r in ranks:
        lora = common.median(seconds[f"lora r={r}"])
        expected = theory.ratios(geometry, r, tp, sp)
        rows.append({
            "hidden": geometry.hidden, "ffn": geometry.ffn, "layout": common.layout_label(tp, sp),
            "r": r, "frozen_ms": frozen * 1e3, "full_ms": full * 1e3, "lora_ms": lora * 1e3,
            "lora/full": lora / full, "lora/frozen": lora / frozen,
            "theory lora/full": expected["lora/full"],
            "theory lora/frozen": expected["lora/frozen"],
            "spread": max(common.spread(v) for v in seconds.values()),
            "min lora/full": fastest[f"lora r={r}"] / fastest["full"],
            "min lora/frozen": fastest[f"lora r={r}"] / fastest["frozen"],
        })
    return rows


def setup_line(args) -> str:
    return (f"{args.layers}-layer Megatron decoder block (local spec: RMSNorm, GQA with heads of "
            f"64 and query groups = heads / 2, SwiGLU ffn 4 x hidden, no bias), "
            f"seq {args.seq} x batch {args.batch}, {args.dtype}, Adam; "
            f"median of {args.rounds} turns x {args.steps} steps")


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine(args.device)
    print(f"machine: {machine}\n{setup_line(args)}; spread = (max - min) / median of the "
          f"noisiest variant; min: the ratios of the fastest turns")
    table, rows = common.TablePrinter(COLUMNS), []
    for layout in args.layouts:
        tp, sp = common.parse_layout(layout)
        for hidden in args.hidden:
            geometry = Geometry(hidden=hidden, layers=args.layers, seq=args.seq, batch=args.batch)
            new = common.run_layout(measure, tp, args.device, sp, geometry, args.r, args.rounds,
                                    args.steps, args.device, args.dtype)
            table.print(new)
            rows += new
    common.write_json(args.json, {"machine": machine, "setup": setup_line(args),
                                  "dtype": args.dtype, "rounds": args.rounds,
                                  "steps_per_round": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
