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

from benchmarks import machine
from benchmarks.decoder_stack import Geometry, build_block, trainable_parameters, training_step

VARIANTS = ("full", "lora", "frozen")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
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
    from benchmarks.megatron_setup import single_rank

    geometry = Geometry(hidden=args.hidden[0], layers=args.layers, seq=args.seq, batch=args.batch)
    cuda = args.device.startswith("cuda")
    with single_rank(args.device):
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        block = build_block(geometry, args.worker, r=args.r, device=args.device, dtype=dtype)
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
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--worker", variant, "--measure", measure,
           "--hidden", str(hidden), "--r", str(args.r), "--layers", str(args.layers),
           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
           "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    rows = []
    for hidden in args.hidden:
        result = {v: spawn(args, v, hidden) for v in VARIANTS}
        full, lora = result["full"], result["lora"]
        rows.append({
            "hidden": hidden, "r": args.r, **{f"{v}_{k}": result[v][k] for v in VARIANTS
                                              for k in ("peak_rss", "rss_built",
                                                        "allocator_peak", "trainable")},
            "param_bytes": full["param_bytes"],
            "peak_rss lora/full": ratio(lora["peak_rss"], full["peak_rss"]),
            "rss growth lora/full": ratio(lora["peak_rss"] - lora["rss_built"],
                                          full["peak_rss"] - full["rss_built"]),
            "allocator lora/full": ratio(lora["allocator_peak"], full["allocator_peak"]),
        })
        print_rows(rows[-1:], header=len(rows) == 1)
    return {"machine": machine.describe(args.device), "steps": args.steps,
            "tokens": args.seq * args.batch, "allocator": result["full"]["allocator"],
            "rows": rows}


def print_rows(rows, header: bool) -> None:
    mb = 1 / 2**20
    if header:
        print(f"{'hidden':>7}{'params MiB':>11} | {'peak RSS MiB: full':>19}{'LoRA':>8}"
              f"{'frozen':>8}{'LoRA/full':>10} | {'RSS growth: full':>17}{'LoRA':>8}{'LoRA/full':>10}"
              f" | {'torch peak: full':>17}{'LoRA':>8}{'LoRA/full':>10}")
    for row in rows:
        growth = {v: (row[f"{v}_peak_rss"] - row[f"{v}_rss_built"]) * mb for v in ("full", "lora")}
        print(f"{row['hidden']:>7}{row['param_bytes'] * mb:11.1f} | "
              f"{row['full_peak_rss'] * mb:19.0f}{row['lora_peak_rss'] * mb:8.0f}"
              f"{row['frozen_peak_rss'] * mb:8.0f}{row['peak_rss lora/full']:10.3f} | "
              f"{growth['full']:17.1f}{growth['lora']:8.1f}{row['rss growth lora/full']:10.3f} | "
              f"{row['full_allocator_peak'] * mb:17.1f}{row['lora_allocator_peak'] * mb:8.1f}"
              f"{row['allocator lora/full']:10.3f}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"machine: {machine.describe(args.device)}")
    print(f"{args.layers} layers, seq {args.seq} x batch {args.batch}, r {args.r}, {args.dtype}, Adam, "
          f"{args.steps} steps per fresh process")
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
