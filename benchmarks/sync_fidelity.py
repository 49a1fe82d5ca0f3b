"""How far the rollout policy is from the trained one after a weight sync, merged vs adapter.

A LoRA-trained model's policy is `W x + s B (A x)`. A merged sync sends `W + s B A` rounded to
bf16: where the delta is small against W (RL deltas are), the rounding takes a share of it. An
adapter sync sends the bf16 base and the adapter, and the engine adds `s B (A x)` itself. On a
small Megatron GPT (base pretrained so that its next-token distributions are peaked, then put on
the bf16 grid, as a bf16 trainer holds it; adapters trained a few Adam steps), KL divergences
over every next-token position of held-out sequences:

- `KL merged` / `KL adapter`: of the engine's weights after each sync (`merged_weights` over
  the bf16 weights; the bf16 base and the bf16 adapter that `gather_peft_adapter` yields), run
  in float64 arithmetic, from the trained policy (bf16 base, fp32 adapters, float64
  arithmetic): what the sync itself loses, with the engine's arithmetic out of the picture.
  `KL base only`: the adapter dropped, i.e. how far the adapter moved the policy at all.
- `bf16 engine vs bf16 trainer`: both run in bf16 arithmetic, the reference being the trainer's
  own forward (base GEMM plus the adapter branch, what slime computes its log-probs with in a
  bf16 run); NeMo-RL's "generation KL error". Here the adapter engine runs the trainer's very
  kernels, so its 0 is by construction; on a GPU the gap is SGLang's kernels against Megatron's.
- `bf16 engine vs policy`: bf16 arithmetic against the exact policy; on this small CPU model the
  bf16 rounding of the activations (the same in both modes) is most of it.

    python -m benchmarks.sync_fidelity [--quick]
"""

from __future__ import annotations

import torch

from benchmarks import common
from benchmarks.common import Column

COLUMNS = [
    Column("lr", "lr", "{:g}"), Column("steps", "steps"),
    Column("‖sBA‖ / ‖W‖", "delta_ratio", "{:.1e}"),
    Column("KL base only", "kl_base", "{:.2e}"),
    Column("KL merged", "kl_merged", "{:.2e}"),
    Column("KL adapter", "kl_adapter", "{:.2e}"),
    Column("merged / adapter", "ratio", "{:.0f}", bold=True),
    Column("max KL merged", "max_kl_merged", "{:.2e}"),
    Column("max KL adapter", "max_kl_adapter", "{:.2e}"),
    Column("bf16 engine vs bf16 trainer: merged", "kl_merged_vs_trainer", "{:.2e}"),
    Column("... adapter", "kl_adapter_vs_trainer", "{:.2e}"),
    Column("bf16 engine vs policy: merged", "kl_merged_bf16", "{:.2e}"),
    Column("... adapter", "kl_adapter_bf16", "{:.2e}"),
]
TABLES = {"rows": COLUMNS}

VOCAB, SEQ, BATCH = 512, 64, 8


def build(hidden: int, layers: int, r: int):
    """A Megatron GPT (fp32, LoRA on every linear) whose base weights lie on the bf16 grid, as a
    bf16 trainer holds them."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_lora import LoRAConfig, lora_spec, mark_only_lora_as_trainable

    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 32,
        num_query_groups=hidden // 64, ffn_hidden_size=3 * hidden, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32)
    spec = lora_spec(get_gpt_layer_local_spec(normalization="RMSNorm"),
                     LoRAConfig(r=r, alpha=2 * r))
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="rope")
    mark_only_lora_as_trainable(model)
    return model


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    return tokens, positions


def fit(model, parameters, task, steps: int, lr: float) -> None:
    """Adam on `parameters`: predict `task(t)` after each token t."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    tokens, positions = batch(1)
    labels = task(tokens)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens, positions, None, labels=labels).float().mean().backward()
        optimizer.step()
    model.eval()


def pretrain_base(model, steps: int, lr: float = 3e-3) -> None:
    """The base learns `t + 1 mod V` (so its next-token distributions are peaked, as a
    pretrained model's are), then its weights are put on the bf16 grid, as a bf16 trainer
    holds them; the adapters stay at their init (B = 0)."""
    base = [p for n, p in model.named_parameters() if ".lora_" not in n]
    for param in base:
        param.requires_grad_(True)
    fit(model, base, lambda t: (t + 1) % VOCAB, steps, lr)
    with torch.no_grad():
        for param in base:
            param.copy_(param.to(torch.bfloat16))
            param.requires_grad_(False)


def train(model, steps: int, lr: float) -> None:
    """Adam on the adapters toward `(t + 2) mod V` (the RL step: a small move of a peaked
    policy)."""
    from megatron_lora import get_lora_parameters

    fit(model, get_lora_parameters(model).values(), lambda t: (t + 2) % VOCAB, steps, lr)


def log_probs(model) -> torch.Tensor:
    """Next-token log-probabilities (float64) on held-out sequences."""
    tokens, positions = batch(2)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return torch.log_softmax(logits.double(), dim=-1)


def kl(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean and max over positions of KL(reference || other), from log-probabilities."""
    per_position = (reference.exp() * (reference - other)).sum(-1)
    return per_position.mean().item(), per_position.max().item()


def synced_weights(model) -> dict[str, tuple[dict[str, torch.Tensor], bool]]:
    """What the engine holds after each kind of sync, read from the bf16 copy of every parameter
    a bf16 trainer syncs from (slime-style names): `{variant: (weights by parameter name,
    whether the engine runs without the adapter branch)}`."""
    from megatron_lora import gather_peft_adapter, merged_weights

    prefix = "module.module."
    backup = {f"{prefix}{n}": p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    merged = merged_weights(backup, model)  # what --lora-sync merged sends
    # what --lora-sync adapter sends: PEFT's split factors are the fused ones (A copied to
    # q/k/v and gate/up, B's rows split), so the engine computes with the model's bf16 adapters
    assert gather_peft_adapter(backup, model) is not None
    base = {n[len(prefix):]: t for n, t in backup.items() if ".lora_" not in n}
    adapters = {n[len(prefix):]: t for n, t in backup.items() if ".lora_" in n}
    return {"merged": ({n[len(prefix):]: merged[n] for n in merged}, True),
            "adapter": ({**base, **adapters}, False),
            "base": (base, True)}


def evaluate(model, weights: dict[str, torch.Tensor], dtype, adapter_off: bool) -> torch.Tensor:
    """The model's log-probs in `dtype` with `weights` in place (the rest its own), then the
    model as it was."""
    from contextlib import nullcontext

    from megatron_lora import disable_lora

    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.to(dtype)
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(weights.get(name, kept[name]))
        with disable_lora(model) if adapter_off else nullcontext():
            return log_probs(model)
    finally:
        model.to(torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(kept[name])


def measure(hidden: int, layers: int, r: int, steps: int, lr: float, base_steps: int,
            base_lr: float = 3e-3) -> dict:
    from megatron_lora.modules import lora_modules

    model = build(hidden, layers, r)
    pretrain_base(model, base_steps, base_lr)
    train(model, steps, lr)
    # the trained policy: its own weights (bf16 base, fp32 adapters) in float64 arithmetic,
    # and each synced engine's weights likewise (fp32 would leave KLs of 1e-9 in its noise)
    policy = evaluate(model, {}, torch.float64, False)
    synced = synced_weights(model)
    exact = {v: kl(policy, evaluate(model, w, torch.float64, off))
             for v, (w, off) in synced.items()}
    bf16 = {v: evaluate(model, w, torch.bfloat16, off) for v, (w, off) in synced.items()}
    # the trainer's own bf16 forward (slime's log-probs in a bf16 run): base + branch
    trainer = bf16["adapter"]
    deltas, weights = 0.0, 0.0
    for module in lora_modules(model).values():
        delta = module.lora_scaling * module.lora_B.weight @ module.lora_A.weight
        deltas += delta.square().sum().item()
        weights += module.weight.square().sum().item()
    return {"hidden": hidden, "layers": layers, "r": r, "lr": lr, "steps": steps,
            "delta_ratio": (deltas / weights) ** 0.5, "kl_base": exact["base"][0],
            "kl_merged": exact["merged"][0], "max_kl_merged": exact["merged"][1],
            "kl_adapter": exact["adapter"][0], "max_kl_adapter": exact["adapter"][1],
            "ratio": exact["merged"][0] / exact["adapter"][0],
            "kl_merged_vs_trainer": kl(trainer, bf16["merged"])[0],
            "kl_adapter_vs_trainer": kl(trainer, bf16["adapter"])[0],
            "kl_merged_bf16": kl(policy, bf16["merged"])[0],
            "kl_adapter_bf16": kl(policy, bf16["adapter"])[0]}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.lr, args.base_steps = 128, 2, 5, [1e-3], 30
    return args


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine()
    setup = (f"Megatron GPT, hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}; base "
             f"pretrained {args.base_steps} Adam steps, then put on the bf16 grid; LoRA "
             f"r={args.r} alpha={2 * args.r} on every linear, {args.steps} Adam steps; KL over "
             f"{BATCH}x{SEQ} next-token positions")
    print(f"machine: {machine}\n{setup}")
    table, rows = common.TablePrinter(COLUMNS), []
    with common.single_rank():
        for lr in args.lr:
            rows.append(measure(args.hidden, args.layers, args.r, args.steps, lr,
                                args.base_steps))
            table.print(rows[-1:])
    common.write_json(args.json, {"machine": machine, "setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
