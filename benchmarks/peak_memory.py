"""Peak memory of a training step: LoRA with Adam vs full fine-tuning with Adam (and the frozen
base for reference), each in a fresh process so one variant's high-water mark cannot hide in
another's.

Per variant (two fresh processes, TP=1, the decoder block of benchmarks/decoder_stack.py: the
profiler's own bookkeeping would inflate RSS, so RSS and allocator are measured apart):
- peak RSS (`VmHWM`) of the whole process, and its growth over the RSS once the model is built
  (that growth is what training adds: grads, Adam state, activations, temporaries);
- torch's allocator: on CPU the profiler's memory reporter, whose running total of bytes
  allocated by torch gives the peak of live tensor bytes allocated during three training steps
  (torch's CPU allocator keeps no peak counter of its own); on CUDA `max_memory_allocated`.

    python -m benchmarks.peak_memory [--quick] [--hidden 1024 --r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks import common
from benchmarks.common import Column
from benchmarks.decoder_stack import Geometry, build_block, trainable_parameters, training_step

VARIANTS = ("full", "lora", "frozen")
MIB = 1 / 2**20


def growth_mib(row: dict, variant: str) -> float:
    """What training adds to the process: peak RSS over the RSS once the model is built."""
    return (row[f"{variant}_peak_rss"] - row[f"{variant}_rss_built"]) * MIB


COLUMNS = [
    Column("hidden", "hidden"), Column("r", "r"),
    Column("params MiB", lambda row: row["param_bytes"] * MIB, "{:.1f}"),
    Column("peak RSS full", lambda row: row["full_peak_rss"] * MIB, "{:.0f}"),
    Column("LoRA", lambda row: row["lora_peak_rss"] * MIB, "{:.0f}"),
    Column("frozen", lambda row: row["frozen_peak_rss"] * MIB, "{:.0f}"),
    Column("LoRA/full", "peak_rss lora/full", "{:.3f}"),
    Column("RSS growth full", lambda row: growth_mib(row, "full"), "{:.1f}"),
    Column("LoRA", lambda row: growth_mib(row, "lora"), "{:.1f}"),
    Column("LoRA/full", "rss growth lora/full", "{:.3f}"),
    Column("torch peak full", lambda row: row["full_allocator_peak"] * MIB, "{:.1f}"),
    Column("LoRA", lambda row: row["lora_allocator_peak"] * MIB, "{:.1f}"),
    Column("LoRA/full", "allocator lora/full", "{:.3f}", bold=True),
]
TABLES = {"rows": COLUMNS}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("rss", "allocator"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.seq = [256], 64
    return args


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def profiled_peak_bytes(run_steps) -> int:
    """Peak of torch's running total of allocated CPU bytes while `run_steps` runs, counted
    from the profiler's start (tensors alive before it are not in the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0)


def worker(args) -> dict:
    """One variant, in this (fresh) process."""
    geometry = Geometry(hidden=args.hidden[0], layers=args.layers, seq=args.seq, batch=args.batch)
    cuda = args.device.startswith("cuda")
    with common.single_rank(args.device):
        block = build_block(geometry, args.worker, r=args.r, device=args.device,
                            dtype=common.DTYPES[args.dtype])
        step = training_step(block, geometry)
        rss_built = proc_status_kib("VmRSS") * 1024

        def run_steps():
            for _ in range(args.steps):
                step()

        allocator_peak = None
        if args.measure == "rss":
            run_steps()
        elif cuda:
            torch.cuda.reset_peak_memory_stats()
            run_steps()
            allocator_peak = torch.cuda.max_memory_allocated()
        else:
            allocator_peak = profiled_peak_bytes(run_steps)
        return {
            "variant": args.worker, "hidden": geometry.hidden, "r": args.r,
            "param_bytes": sum(p.numel() * p.element_size() for p in block.parameters()),
            "trainable": trainable_parameters(block),
            "rss_built": rss_built, "peak_rss": proc_status_kib("VmHWM") * 1024,
            "allocator_peak": allocator_peak,
            "allocator": "cuda max_memory_allocated" if cuda else "profiler, since step 1",
        }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # e.g. no VmHWM in this kernel's /proc


def spawn(args, variant: str, hidden: int) -> dict:
    rss = spawn_one(args, variant, hidden, "rss")
    allocator = spawn_one(args, variant, hidden, "allocator")
    return {**rss, "allocator_peak": allocator["allocator_peak"]}


def spawn_one(args, variant: str, hidden: int, measure: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--worker", variant,
           "--measure", measure,
           "--hidden", str(hidden), "--r", str(args.r), "--layers", str(args.layers),
           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
           "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args, hidden: int) -> tuple[dict, str]:
    """The row of one hidden size, and how the allocator peak was read."""
    result = {v: spawn(args, v, hidden) for v in VARIANTS}
    full, lora = result["full"], result["lora"]
    row = {
        "hidden": hidden, "r": args.r, **{f"{v}_{k}": result[v][k] for v in VARIANTS
                                          for k in ("peak_rss", "rss_built",
                                                    "allocator_peak", "trainable")},
        "param_bytes": full["param_bytes"],
        "peak_rss lora/full": ratio(lora["peak_rss"], full["peak_rss"]),
        "rss growth lora/full": ratio(lora["peak_rss"] - lora["rss_built"],
                                      full["peak_rss"] - full["rss_built"]),
        "allocator lora/full": ratio(lora["allocator_peak"], full["allocator_peak"]),
    }
    return row, full["allocator"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    machine = common.describe_machine(args.device)
    setup = (f"{args.layers} layers, seq {args.seq} x batch {args.batch}, r {args.r}, "
             f"{args.dtype}, Adam, {args.steps} steps per fresh process")
    print(f"machine: {machine}\n{setup}; memory in MiB")
    table, rows = common.TablePrinter(COLUMNS), []
    for hidden in args.hidden:
        row, allocator = measure(args, hidden)
        table.print([row])
        rows.append(row)
    common.write_json(args.json, {"machine": machine, "setup": setup, "steps": args.steps,
                                  "tokens": args.seq * args.batch, "allocator": allocator,
                                  "rows": rows})


if __name__ == "__main__":
    main()
