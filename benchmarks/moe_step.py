"""MoE step time: LoRA on the experts vs the frozen MoE base vs full fine-tuning, on one Megatron
MoE decoder block (8 experts, top-2, hidden 512), per-expert and shared-outer adapters.

    frozen       forward + backward to the input only (the floor a LoRA step adds its GEMMs to)
    full         every weight trainable (attention, router, experts), Adam on all of them
    lora         LoRA on linear_qkv, linear_proj and every expert's fc1 / fc2, base frozen,
                 Adam on the adapters; `per_expert` or `shared_outer` (fc1's A and fc2's B one
                 matrix for all experts of a layer)

Two expert implementations: megatron-core's SequentialMLP (local linears, one MLP per expert;
per-expert adapters only) and TEGroupedMLP (TE grouped linears; real Transformer Engine when it
imports, else the repository's CPU emulation of TE's GroupedLinear, whose GEMM is a loop over
experts like SequentialMLP's). All variants of one implementation take turns in one process,
the order rotating every round; the table gives median step times and their ratios, the FLOP
model's next to them, and the adapter's share of the block's parameters.

    python -m benchmarks.moe_step             # hidden 512, moe ffn 1024, 8 experts, top-2, r 16
    python -m benchmarks.moe_step --quick     # smoke run (hidden 128, moe ffn 256, seq 64)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import DTYPES, Column

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("per_expert", "shared_outer")


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="turns each variant takes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.moe_ffn, args.seq, args.rounds = 128, 256, 64, 3
    return args


# ----- the block --------------------------------------------------------------------------

def transformer_config(args):
    from megatron.core.transformer import TransformerConfig

    heads = max(2, args.hidden // 64)
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
        num_query_groups=max(1, heads // 2), ffn_hidden_size=args.moe_ffn,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn,
        moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=args.grouped, use_cpu_initialization=args.device == "cpu",
        params_dtype=DTYPES[args.dtype], bf16=args.dtype == "bf16")


def build_block(args, variant: str, layout: str = "per_expert"):
    """The MoE decoder block of `variant` ("frozen", "full", "lora"), `requires_grad` set as it
    trains; the same base weights for every variant (one seed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lora_common import LoRAConfig
    from megatron_lora import lora_spec, mark_only_lora_as_trainable

    config = transformer_config(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=args.grouped)
    if variant == "lora":
        spec = lora_spec(spec, LoRAConfig(r=args.r, alpha=2 * args.r, expert_layout=layout))
    torch.manual_seed(0)
    block = TransformerBlock(config, spec).to(device=args.device, dtype=DTYPES[args.dtype])
    if variant == "lora":
        mark_only_lora_as_trainable(block)
    else:
        block.requires_grad_(variant == "full")
    return block


def training_step(block, args):
    """One step: forward, backward from a fixed output grad, Adam where something trains."""
    generator = torch.Generator().manual_seed(1)
    shape = (args.seq, args.batch, args.hidden)
    dtype = DTYPES[args.dtype]
    x = torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(args.device, dtype) * 0.01
    params = [p for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5) if params else None

    def step() -> None:
        x.grad = None
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        block(x, attention_mask=None).backward(dy)
        if optimizer is not None:
            optimizer.step()

    return step


# ----- the FLOP model ---------------------------------------------------------------------

def flops(args) -> dict[str, float]:
    """GEMM flops per step (2 per multiply-add). Linears: forward, input grad and weight grad
    each `2 T in out` (experts: T k routed tokens); attention core `4 T s heads kv` forward,
    twice that backward; LoRA per target `2 T r (in + out)` forward, twice that backward. The
    router's GEMM counts as a linear; elementwise work, routing and Adam are free here."""
    T, H, F, k, r = args.seq * args.batch, args.hidden, args.moe_ffn, args.topk, args.r
    heads = max(2, H // 64)
    kv, groups = H // heads, max(1, heads // 2)
    linears = [(T, H, (heads + 2 * groups) * kv), (T, heads * kv, H)]  # qkv, proj
    experts = [(T * k, H, 2 * F), (T * k, F, H)]                          # fc1, fc2 per token
    router = 2 * T * H * args.experts
    base = sum(2 * t * i * o for t, i, o in linears + experts) + router
    lora = sum(6 * t * r * (i + o) for t, i, o in linears + experts)
    attention = 4 * T * args.seq * heads * kv
    frozen = args.layers * (2 * base + 3 * attention)
    return {"frozen": frozen, "full": frozen + args.layers * base,
            "lora": frozen + args.layers * lora}


# ----- the measurement (in one spawned rank) ----------------------------------------------

def measure(args) -> dict:
    variants = {"frozen": ("frozen", None), "full": ("full", None)}
    for layout in (LAYOUTS if args.grouped else LAYOUTS[:1]):
        variants[f"lora {layout}"] = ("lora", layout)
    blocks = {name: build_block(args, kind, layout or "per_expert")
              for name, (kind, layout) in variants.items()}
    steps = {name: training_step(block, args) for name, block in blocks.items()}
    samples = common.time_in_turns(steps, rounds=args.rounds, warmup=2,
                                   sync=common.synchronizer(args.device))
    seconds = {name: s.wall for name, s in samples.items()}
    median, spread = common.median, common.spread
    total = sum(p.numel() for p in blocks["frozen"].parameters())
    experts = sum(p.numel() for n, p in blocks["frozen"].named_parameters() if ".experts." in n)
    theory = flops(args)
    frozen, full = median(seconds["frozen"]), median(seconds["full"])
    rows = []
    for name in variants:
        if not name.startswith("lora"):
            continue
        lora = median(seconds[name])
        adapters = sum(p.numel() for p in blocks[name].parameters() if p.requires_grad)
        rows.append({
            "experts": type(blocks[name].layers[0].mlp.experts).__name__,
            "layout": name.split()[1], "r": args.r,
            "frozen_ms": frozen * 1e3, "full_ms": full * 1e3, "lora_ms": lora * 1e3,
            "lora/full": lora / full, "theory lora/full": theory["lora"] / theory["full"],
            "lora/frozen": lora / frozen, "theory lora/frozen": theory["lora"] / theory["frozen"],
            "adapter share": adapters / total, "adapter/expert params": adapters / experts,
            "spread": max(spread(v) for v in seconds.values()),
            "min lora/full": min(seconds[name]) / min(seconds["full"]),
            "min lora/frozen": min(seconds[name]) / min(seconds["frozen"]),
        })
    return {"rows": rows, "parameters": total, "expert_parameters": experts}


def _measure_on_a_rank(args):
    from megatron_cpu.launch import run_on_ranks

    setup = None
    if args.grouped and not _real_te():
        sys.path.insert(0, str(ROOT / "tests"))
        import te_emulation

        setup = te_emulation.enable
    return run_on_ranks(measure, world_size=1, args=(args,), setup=setup, timeout=7200)[0]


def _real_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


COLUMNS = [
    Column("experts", "experts"), Column("layout", "layout"), Column("r", "r"),
    Column("frozen ms", "frozen_ms", "{:.1f}"), Column("full ms", "full_ms", "{:.1f}"),
    Column("LoRA ms", "lora_ms", "{:.1f}"),
    Column("LoRA/full", "lora/full", "{:.3f}", bold=True),
    Column("theory", "theory lora/full", "{:.3f}"),
    Column("LoRA/frozen", "lora/frozen", "{:.3f}", bold=True),
    Column("theory", "theory lora/frozen", "{:.3f}"),
    Column("adapter share", "adapter share", "{:.2%}"),
    Column("adapter/expert params", "adapter/expert params", "{:.2%}"),
    Column("spread", "spread", "{:.0%}"),
    Column("min: LoRA/full", "min lora/full", "{:.3f}"),
    Column("min: LoRA/frozen", "min lora/frozen", "{:.3f}"),
]
TABLES = {"rows": COLUMNS}


def model_line(args) -> str:
    return (f"{args.layers}-layer Megatron MoE decoder block: hidden {args.hidden}, "
            f"{args.experts} experts top-{args.topk}, moe ffn {args.moe_ffn} (SwiGLU), "
            f"all-to-all dispatcher, GQA attention, seq {args.seq} x batch {args.batch}, "
            f"{args.dtype}, Adam; TP=1")


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine(args.device)
    command = " ".join(["python -m benchmarks.moe_step", *(argv or sys.argv[1:])])
    print(f"machine: {machine}\nmodel: {model_line(args)}; median of {args.rounds} turns; "
          f"spread = (max - min) / median of the noisiest variant; min: the ratios of the "
          f"fastest turns; adapter share = LoRA parameters / all parameters of the block",
          flush=True)
    rows, counts = [], {}
    for grouped in (False, True):
        args.grouped = grouped
        result = _measure_on_a_rank(args)
        rows += result["rows"]
        counts = {k: result[k] for k in ("parameters", "expert_parameters")}
    te = "Transformer Engine" if _real_te() else "the CPU emulation of TE's GroupedLinear"
    setup = (f"{model_line(args)}; median of {args.rounds} turns; TEGroupedMLP on {te}; "
             f"the block has {counts['parameters']:,} parameters, "
             f"{counts['expert_parameters']:,} of them in experts")
    common.print_table(COLUMNS, rows)
    print(setup)
    common.write_json(args.json, {"machine": machine, "setup": setup, "command": command,
                                  "quick": args.quick, "grouped_linear": te,
                                  "rounds": args.rounds, **counts, "rows": rows})


if __name__ == "__main__":
    main()
