"""Step time: LoRA vs full fine-tuning vs frozen base on the same Megatron decoder block.

    full    forward + backward with weight grads + Adam on every weight
    lora    forward + backward (base frozen: no weight-grad GEMM) + Adam on the adapters
    frozen  forward + backward to the input only (the floor LoRA adds its GEMMs to)

All variants of one layout live in one process (or one pair of TP ranks) and take turns, the
order rotating every round; the table gives the median per-step time over the rounds and the
ratios next to the FLOP model's (benchmarks/theory.py).

    python -m benchmarks.step_time                       # hidden 256/512/1024, r 8/16/64, TP 1, 2, 2+SP
    python -m benchmarks.step_time --quick               # smoke run
    python -m benchmarks.step_time --device cuda --dtype bf16 --hidden 4096 --layouts 1   # GPU
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import layouts, machine, theory
from benchmarks.decoder_stack import Geometry, build_block, training_step
from benchmarks.timing import median, spread, time_in_turns

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.r, args.seq, args.rounds, args.steps = [256], [16], 64, 3, 1
    return args


def measure(tp: int, sp: bool, geometry: Geometry, ranks: list[int], rounds: int, steps: int,
            device: str, dtype_name: str) -> list[dict]:
    """Rows for one geometry and layout (runs on every rank; rank 0's result is kept)."""
    dtype = DTYPES[dtype_name]
    variants = {"frozen": ("frozen", 0), "full": ("full", 0)}
    variants.update({f"lora r={r}": ("lora", r) for r in ranks})
    step = {name: training_step(build_block(geometry, kind, r=r or 16, tp=tp, sp=sp,
                                            dtype=dtype, device=device), geometry, tp=tp, sp=sp)
            for name, (kind, r) in variants.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seconds = time_in_turns(step, rounds=rounds, steps_per_round=steps, warmup=2, sync=sync)
    frozen, full = median(seconds["frozen"]), median(seconds["full"])
    rows = []
    fastest = {name: min(values) for name, values in seconds.items()}
    for r in ranks:
        lora = median(seconds[f"lora r={r}"])
        expected = theory.ratios(geometry, r, tp, sp)
        rows.append({
            "hidden": geometry.hidden, "ffn": geometry.ffn, "layout": layouts.label(tp, sp),
            "r": r, "frozen_ms": frozen * 1e3, "full_ms": full * 1e3, "lora_ms": lora * 1e3,
            "lora/full": lora / full, "lora/frozen": lora / frozen,
            "theory lora/full": expected["lora/full"],
            "theory lora/frozen": expected["lora/frozen"],
            "spread": max(spread(v) for v in seconds.values()),
            # Other load only ever adds time: on a busy machine the fastest turn is the
            # steadier estimate of the cost itself.
            "min lora/full": fastest[f"lora r={r}"] / fastest["full"],
            "min lora/frozen": fastest[f"lora r={r}"] / fastest["frozen"],
        })
    return rows


def run(args) -> dict:
    rows = []
    for layout in args.layouts:
        tp, sp = layouts.parse(layout)
        for hidden in args.hidden:
            geometry = Geometry(hidden=hidden, layers=args.layers, seq=args.seq, batch=args.batch)
            new = layouts.run_layout(measure, tp, args.device, sp, geometry, args.r, args.rounds,
                                     args.steps, args.device, args.dtype)
            print_rows(new, header=not rows)
            rows += new
    return {"machine": machine.describe(args.device), "dtype": args.dtype,
            "model": model_line(args), "rounds": args.rounds, "steps_per_round": args.steps,
            "rows": rows}


def model_line(args) -> str:
    return (f"{args.layers}-layer Megatron decoder block (local spec: RMSNorm, GQA with heads of "
            f"64 and query groups = heads / 2, SwiGLU ffn 4 x hidden, no bias), "
            f"seq {args.seq} x batch {args.batch}, {args.dtype}, Adam")


COLUMNS = [  # (key, header, format): ratios next to their theory
    ("layout", "layout", "{:>8}"), ("hidden", "hidden", "{:>7}"), ("r", "r", "{:>4}"),
    ("frozen_ms", "frozen ms", "{:>10.1f}"), ("full_ms", "full ms", "{:>9.1f}"),
    ("lora_ms", "LoRA ms", "{:>9.1f}"), ("lora/full", "LoRA/full", "{:>10.3f}"),
    ("theory lora/full", "theory", "{:>7.3f}"), ("lora/frozen", "LoRA/frozen", "{:>12.3f}"),
    ("theory lora/frozen", "theory", "{:>7.3f}"), ("spread", "spread", "{:>7.0%}"),
    ("min lora/full", "min: LoRA/full", "{:>15.3f}"), ("min lora/frozen", "LoRA/frozen", "{:>12.3f}"),
]


def print_rows(rows: list[dict], header: bool) -> None:
    if header:
        print("".join(title.rjust(len(fmt.format(rows[0][key])))
                      for key, title, fmt in COLUMNS))
    for row in rows:
        print("".join(fmt.format(row[key]) for key, _, fmt in COLUMNS), flush=True)


def main(argv=None):
    args = parse_args(argv)
    print(f"machine: {machine.describe(args.device)}")
    print(f"model: {model_line(args)}; median of {args.rounds} turns x {args.steps} steps; "
          f"spread = (max - min) / median of the noisiest variant; min: the ratios of the "
          f"fastest turns")
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
