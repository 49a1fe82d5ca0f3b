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

import torch

from benchmarks import common
from benchmarks.common import Column
from benchmarks.decoder_stack import Geometry, build_block

COLUMNS = [
    Column("hidden", "hidden"), Column("r", "r"),
    Column("tensors (merged)", lambda row: f"{row['tensors']} ({row['merged']})"),
    Column("MB", "MB", "{:.1f}"),
    Column("stream ms", "stream_ms", "{:.2f}"), Column("copy ms", "copy_ms", "{:.2f}"),
    Column("stream GB/s", "stream_GBps", "{:.2f}"), Column("copy GB/s", "copy_GBps", "{:.2f}"),
    Column("time stream / copy", "stream/copy time", "{:.2f}", bold=True),
    Column("spread", "spread", "{:.0%}"),
]
TABLES = {"rows": COLUMNS}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cpu")
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
    merged_names = [n for n, t in iter_merged_weights(block)
                    if t.data_ptr() != params[n].data_ptr()]

    def stream():
        for name, tensor in iter_merged_weights(block):
            buffers[name].copy_(tensor)

    def plain_copy():
        for name in names:
            buffers[name].copy_(params[name].detach())

    samples = common.time_in_turns({"merged stream": stream, "plain copy": plain_copy},
                                   rounds=rounds, warmup=1, sync=common.synchronizer(device))
    seconds = {name: s.wall for name, s in samples.items()}
    nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
    stream_s = common.median(seconds["merged stream"])
    copy_s = common.median(seconds["plain copy"])
    return {"hidden": hidden, "r": r, "tensors": len(names), "merged": len(merged_names),
            "MB": nbytes / 1e6, "stream_ms": stream_s * 1e3, "copy_ms": copy_s * 1e3,
            "stream_GBps": nbytes / stream_s / 1e9, "copy_GBps": nbytes / copy_s / 1e9,
            "stream/copy time": stream_s / copy_s,
            "spread": max(common.spread(v) for v in seconds.values())}


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine(args.device)
    setup = (f"{args.layers}-layer decoder block, TP=1 (one rank's shards), fp32, median of "
             f"{args.rounds} turns")
    print(f"machine: {machine}\n{setup}")
    table, rows = common.TablePrinter(COLUMNS), []
    with common.single_rank(args.device):
        for hidden in args.hidden:
            rows.append(measure(hidden, args.r, args.layers, args.rounds, args.device))
            table.print(rows[-1:])
    common.write_json(args.json, {"machine": machine, "setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
