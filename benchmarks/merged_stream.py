"""Merged-weight stream throughput vs a plain copy of the same bytes.

RL weight sync reads `megatron_lora.merge.iter_merged_weights(model)`: `(name, tensor)` per
local shard, base names, the adapter folded in (`W + scaling * B A`, in fp32, cast once). Here
its consumer copies each tensor into a preallocated buffer of the same name (what a sync does
before broadcasting a bucket); the baseline copies the model's own parameters of the same
names into the same buffers: the least any weight sync must do. Both take turns; median of the
rounds. The merge's extra work per target is one `[out, r] x [r, in]` GEMM plus an fp32 pass.

    python -m benchmarks.merged_stream [--quick] [--hidden 1024 --r 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import machine
from benchmarks.decoder_stack import Geometry, build_block
from benchmarks.megatron_setup import single_rank
from benchmarks.timing import median, spread, time_in_turns


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.rounds = [256], 3
    return args


@torch.no_grad()
def nonzero_adapters(block) -> None:
    """B = 0 would make the merge trivially the base; give every B a value."""
    from megatron_lora import get_lora_parameters

    for name, param in get_lora_parameters(block).items():
        if name.endswith("lora_B.weight"):
            param.normal_(0, 0.02)


def measure(hidden: int, r: int, layers: int, rounds: int, device: str) -> dict:
    from megatron_lora.merge import iter_merged_weights

    block = build_block(Geometry(hidden=hidden, layers=layers), "lora", r=r, device=device)
    nonzero_adapters(block)
    params = dict(block.named_parameters())
    names = [name for name, _ in iter_merged_weights(block)]
    buffers = {name: torch.empty_like(params[name]) for name in names}
    merged_names = [n for n, t in iter_merged_weights(block) if t.data_ptr() != params[n].data_ptr()]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def stream():
        for name, tensor in iter_merged_weights(block):
            buffers[name].copy_(tensor)

    def plain_copy():
        for name in names:
            buffers[name].copy_(params[name].detach())

    seconds = time_in_turns({"merged stream": stream, "plain copy": plain_copy},
                            rounds=rounds, warmup=1, sync=sync)
    nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
    stream_s, copy_s = median(seconds["merged stream"]), median(seconds["plain copy"])
    return {"hidden": hidden, "r": r, "tensors": len(names), "merged": len(merged_names),
            "MB": nbytes / 1e6, "stream_ms": stream_s * 1e3, "copy_ms": copy_s * 1e3,
            "stream_GBps": nbytes / stream_s / 1e9, "copy_GBps": nbytes / copy_s / 1e9,
            "stream/copy time": stream_s / copy_s,
            "spread": max(spread(v) for v in seconds.values())}


def run(args) -> dict:
    rows = []
    with single_rank(args.device):
        for hidden in args.hidden:
            rows.append(measure(hidden, args.r, args.layers, args.rounds, args.device))
            print_rows(rows[-1:], header=len(rows) == 1)
    return {"machine": machine.describe(args.device), "rows": rows}


def print_rows(rows, header: bool) -> None:
    if header:
        print(f"{'hidden':>7}{'r':>4}{'tensors':>9}{'merged':>8}{'MB':>8}{'stream ms':>11}"
              f"{'copy ms':>9}{'stream GB/s':>13}{'copy GB/s':>11}{'time stream/copy':>18}"
              f"{'spread':>8}")
    for row in rows:
        print(f"{row['hidden']:>7}{row['r']:>4}{row['tensors']:>9}{row['merged']:>8}"
              f"{row['MB']:8.1f}{row['stream_ms']:11.2f}{row['copy_ms']:9.2f}"
              f"{row['stream_GBps']:13.2f}{row['copy_GBps']:11.2f}"
              f"{row['stream/copy time']:18.2f}{row['spread']:8.0%}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    print(f"machine: {machine.describe(args.device)}")
    print(f"{args.layers}-layer decoder block, TP=1 (one rank's shards), fp32, median of "
          f"{args.rounds} turns")
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
