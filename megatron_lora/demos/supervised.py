"""`megatron-lora demo`: a real LoRA fine-tune on CPU, the way a Megatron user would run one.

Two gloo ranks with tensor parallelism 2 and sequence parallelism train a small GPT:

1. the base model is trained in full on task A (each token is followed by `(t + 1) mod V`)
   and saved as a Megatron dist checkpoint;
2. the LoRA model is built from `--spec megatron_lora get_gpt_lora_spec` (the slime entry
   point, called as slime calls it), loads that base-only checkpoint, and adapts to task B
   (each token is followed by `(3t + 1) mod V`) with only the adapters trainable;
3. checks and artifacts: merged logits equal unmerged, `disable_lora` gives back the base (still
   solving task A), the adapter checkpoint, the PEFT export and a loss-curve PNG.

Both stages train as Megatron's loop does: Adam, linear warmup, cosine decay and gradient-norm
clipping (`megatron_cpu.ddp_training`). `--seed` draws the base init, the adapter init and
the data.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch

from lora_common import LoRAConfig, add_lora_arguments
from megatron_lora.demos.tasks import next_token


def task_batch(task: str, vocab: int, batch: int, seq: int, step: int, seed: int = 0):
    """Token sequences following task A (t -> t + 1) or B (t -> 3t + 1), modulo the vocab.
    The first tokens are drawn from (seed, task, step): a distinct stream for each triple
    (steps stay below 50,000)."""
    generator = torch.Generator().manual_seed(100_000 * seed + 2 * step + (task == "B"))
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for i in range(seq):
        tokens[:, i + 1] = next_token(task, tokens[:, i], vocab)
    return tokens[:, :-1], tokens[:, 1:]


def model_config(args, tp: int):
    """The demos' GPT (a Llama): RMSNorm, SwiGLU, no biases, GQA with two heads per group."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=_query_groups(args.heads), ffn_hidden_size=2 * args.hidden,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1)


def _gpt(spec, config, args):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq,
                    position_embedding_type="rope")


def _loss_and_accuracy(model, tokens, labels):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return loss, accuracy


def _schedule(args, steps: int):
    from megatron_cpu.ddp_training import Schedule

    return Schedule(warmup_steps=int(args.lr_warmup_fraction * steps),
                    decay_style=args.lr_decay_style, min_lr=args.min_lr,
                    clip_grad=args.clip_grad)


def _train(model, config, task, steps, lr, args, label):
    from megatron_cpu.ddp_training import train_with_megatron_ddp

    def loss(ddp, step):
        tokens, labels = task_batch(task, args.vocab, args.batch, args.seq, step, args.seed)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return ddp(tokens, positions, None, labels=labels).float().mean()

    return train_with_megatron_ddp(model, config, loss, steps, lr, label=label,
                                   schedule=_schedule(args, steps))


def _eval(model, task, args):
    tokens, labels = task_batch(task, args.vocab, args.batch, args.seq, 10_000, args.seed)
    with torch.no_grad():
        loss, accuracy = _loss_and_accuracy(model, tokens, labels)
    return loss.item(), accuracy


def run_demo(args):
    """One rank of the demo; rank 0 reports."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import megatron_lora

    warnings.filterwarnings("ignore")
    rank0 = torch.distributed.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    out = Path(args.out).resolve()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = model_config(args, tp)
    started = time.time()

    # 1. The base: full training on task A, saved as a Megatron dist checkpoint.
    base = _gpt(get_gpt_layer_local_spec(normalization="RMSNorm"), config, args)
    base_losses = _train(base, config, "A", args.base_steps, args.base_lr, args,
                         "base, task A (full)")
    megatron_lora.save_dist_checkpoint(base, out / "base_checkpoint")
    base_b = _eval(base, "B", args)

    # 2. LoRA: the spec slime builds from `--spec megatron_lora get_gpt_lora_spec`, the base
    #    checkpoint loaded into it (a base-only checkpoint: the adapters keep their init).
    args.transformer_impl = "local"
    spec = megatron_lora.get_gpt_lora_spec(args, config, None)
    model = _gpt(spec, config, args)
    missing = megatron_lora.load_dist_checkpoint(model, out / "base_checkpoint")
    megatron_lora.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"LoRA r={args.lora_r}: {trainable:,} of {total:,} parameters on this rank trainable "
        f"({100 * trainable / total:.2f}%); {len(missing)} adapter tensors kept their init")
    lora_losses = _train(model, config, "B", args.steps, args.lr, args, "LoRA, task B")

    # 3. Checks and artifacts.
    tokens, labels = task_batch("B", args.vocab, args.batch, args.seq, 10_000, args.seed)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        unmerged = model(tokens, positions, None)
        megatron_lora.merge_lora_weights(model)
        merged_error = (model(tokens, positions, None) - unmerged).abs().max().item()
        # Relative to the logits' scale, so the same bound means the same at every size.
        merged_relative = merged_error / unmerged.abs().max().item()
        megatron_lora.unmerge_lora_weights(model)
    lora_b = _eval(model, "B", args)
    with megatron_lora.disable_lora(model):
        disabled_a = _eval(model, "A", args)
    megatron_lora.save_lora_checkpoint(model, out / "adapter.safetensors")
    megatron_lora.export_peft_adapter(model, out / "peft",
                                      base_model_name_or_path="megatron-lora-demo")
    if rank0:
        _plot(base_losses, lora_losses, out / "loss.png")
        summary = {
            "tp": tp, "sequence_parallel": tp > 1, "seconds": round(time.time() - started, 1),
            "seed": args.seed,
            "schedule": {"optimizer": "Adam", "lora_lr": args.lr, "lora_steps": args.steps,
                         "base_lr": args.base_lr, "base_steps": args.base_steps,
                         "warmup_fraction": args.lr_warmup_fraction,
                         "decay_style": args.lr_decay_style, "min_lr": args.min_lr,
                         "clip_grad": args.clip_grad},
            "trainable_fraction": trainable / total,
            "task_B_before_lora": {"loss": base_b[0], "accuracy": base_b[1]},
            "task_B_after_lora": {"loss": lora_b[0], "accuracy": lora_b[1]},
            "task_A_with_lora_disabled": {"loss": disabled_a[0], "accuracy": disabled_a[1]},
            "merged_vs_unmerged_max_abs_logit_diff": merged_error,
            "merged_vs_unmerged_max_rel_logit_diff": merged_relative,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"seed {args.seed}; Adam at peak lr {args.base_lr:g} (base) and {args.lr:g} (LoRA), "
            f"{args.lr_warmup_fraction:.0%} warmup, {args.lr_decay_style} decay to "
            f"{args.min_lr:g}, clip-grad {args.clip_grad:g}")
        say(f"task B before LoRA: loss {base_b[0]:.3f}, accuracy {base_b[1]:.1%}")
        say(f"task B after LoRA:  loss {lora_b[0]:.3f}, accuracy {lora_b[1]:.1%}")
        say(f"inside disable_lora, the base on task A: accuracy {disabled_a[1]:.1%}")
        say(f"merged vs unmerged logits: max |diff| {merged_error:.2e} "
            f"({merged_relative:.1e} of max |logit|)")
        say(f"wrote {out}/: adapter.safetensors (adapter checkpoint), peft/ (PEFT adapter), "
            f"loss.png, summary.json, base_checkpoint/")
    return {"merged_error": merged_error, "merged_relative": merged_relative,
            "lora_losses": lora_losses, "task_B_after": lora_b}


def _plot(base_losses, lora_losses, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(range(len(base_losses)), base_losses, label="base, full training on task A")
    axis.plot(range(len(base_losses), len(base_losses) + len(lora_losses)), lora_losses,
              label="LoRA on the frozen base, task B")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("megatron-lora demo (CPU, TP=2 + sequence parallel)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=180, help="LoRA steps on task B")
    parser.add_argument("--base-steps", type=int, default=60, help="full-training steps on task A")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (ranks)")
    parser.add_argument("--out", default="demo-out", help="output folder")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0,
                        help="Megatron's --seed: base init, LoRA init (unless --lora-seed), data")
    # At 1e-2 Adam is at the edge of stability on task B: even with warmup, cosine decay and
    # clipping, seed 4 stalled at 80% after 200 steps. At 3e-3 seeds 0-4 pass loss 0.05 by
    # step 66-94 of 180 (README).
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA peak learning rate")
    parser.add_argument("--base-lr", type=float, default=3e-3,
                        help="peak learning rate of the base's full training")
    # Megatron's schedule flags, applied to both stages.
    parser.add_argument("--lr-warmup-fraction", type=float, default=0.1,
                        help="warmup steps as a fraction of each stage's steps")
    parser.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"),
                        default="cosine")
    parser.add_argument("--min-lr", type=float, default=0.0)
    parser.add_argument("--clip-grad", type=float, default=1.0,
                        help="gradient-norm clipping (0: off)")
    add_lora_arguments(parser)
    parser.set_defaults(lora_r=8, lora_alpha=16.0)
    return parser


# Megatron-LM seeds numpy with --seed, which takes 0 <= seed < 2**32.
SEED_RANGE = range(2**32)
# The held-out batch of each task is step 10,000 of its stream (`_eval`): training stays below.
MAX_STEPS = 10_000


def check_demo_arguments(args: argparse.Namespace) -> None:
    """Every argument checked in the parent, before any rank starts or any file is written,
    each error naming its flag (the CLI prints it as one line): what the ranks would refuse
    midway (Megatron's schedule, sequence parallelism, RoPE, canonical LoRA's query groups,
    targets and exclusions, the base spec) is refused here."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("steps", "base_steps", "tp", "hidden", "layers", "heads", "vocab", "seq", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("steps", "base_steps"):
        if getattr(args, name) >= MAX_STEPS:
            raise ValueError(f"{flag(name)} must be below {MAX_STEPS:,} (step {MAX_STEPS:,} of "
                             f"each task's stream is the held-out batch), "
                             f"got {getattr(args, name)}")
    for name in ("lr", "base_lr", "min_lr", "clip_grad", "lr_warmup_fraction"):
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"{flag(name)} must be a finite number, got {getattr(args, name)}")
    for name in ("lr", "base_lr"):
        if getattr(args, name) <= 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    if not 0 <= args.min_lr <= min(args.lr, args.base_lr):  # Megatron's scheduler asserts it
        raise ValueError(f"--min-lr must be in [0, min(--lr, --base-lr)] = "
                         f"[0, {min(args.lr, args.base_lr):g}], got {args.min_lr:g}")
    if args.clip_grad < 0:
        raise ValueError(f"--clip-grad must be >= 0 (0: off), got {args.clip_grad}")
    if not 0 <= args.lr_warmup_fraction < 1:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    for name in ("seed", "lora_seed"):
        value = getattr(args, name, None)
        if value is not None and value not in SEED_RANGE:
            raise ValueError(f"{flag(name)} must be in [0, 2**32) as Megatron's --seed, "
                             f"got {value}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    if (args.hidden // args.heads) % 2:
        raise ValueError(f"--hidden / --heads = {args.hidden // args.heads} is each head's width, "
                         f"which RoPE needs even")
    if args.heads % args.tp or args.vocab % args.tp:
        raise ValueError(f"--heads {args.heads} and --vocab {args.vocab} must split into "
                         f"--tp {args.tp} ranks")
    if args.tp > 1 and args.seq % args.tp:
        raise ValueError(f"--seq {args.seq} must split into --tp {args.tp} ranks (sequence "
                         f"parallelism splits the sequence)")
    lora = LoRAConfig.from_args(args)  # its errors name the flag
    groups = _query_groups(args.heads)
    if lora.canonical and groups % args.tp:
        raise ValueError(f"--lora-canonical: the demo's {groups} query group(s) (--heads "
                         f"{args.heads} / 2) must split into --tp {args.tp} ranks")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the demo writes a folder")
    _check_lora_spec(args, lora)


def _query_groups(heads: int) -> int:
    return max(1, heads // 2)


def _check_lora_spec(args: argparse.Namespace, lora: LoRAConfig) -> None:
    """Build, in this process, the LoRA spec the ranks will build (`--spec megatron_lora
    get_gpt_lora_spec`): a target that matches no linear, an exclusion that matches no adapted
    module or layer, a `--lora-base-spec` that does not resolve are refused here."""
    import logging

    from lora_common import MEGATRON_TARGET_MODULES

    # megatron-core's import notes are not errors: its warnings (no Apex, ...), and the log line
    # of a CUDA build of torch on a machine without CUDA, which its import of
    # torch.utils.cpp_extension writes to stderr; a refusal stays the one line on stderr
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_lora.adapt.gpt_spec import get_gpt_lora_spec
        from megatron_lora.adapt.placement import check_exclusions

        resolved = lora.resolve_targets(MEGATRON_TARGET_MODULES)
        try:
            check_exclusions(resolved, args.layers)
        except ValueError as error:
            raise ValueError(f"--lora-exclude-modules: {error}") from None
        spec_args = argparse.Namespace(**vars(args))
        spec_args.transformer_impl = "local"
        try:
            get_gpt_lora_spec(spec_args, model_config(args, args.tp), None)
        except ValueError as error:
            if str(error).startswith("--"):  # names its flag already
                raise
            raise ValueError(f"--lora-target-modules: {error}") from None


def main(args: argparse.Namespace) -> int:
    from megatron_cpu.launch import run_on_ranks

    check_demo_arguments(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Megatron refuses to save into a non-empty folder; this one is the demo's own artifact.
    shutil.rmtree(out / "base_checkpoint", ignore_errors=True)
    print(f"megatron-lora demo: {args.tp} gloo ranks, TP={args.tp}"
          f"{' + sequence parallel' if args.tp > 1 else ''}, output in {Path(args.out).resolve()}")
    run_on_ranks(run_demo, world_size=args.tp, tp=args.tp, seed=args.seed, args=(args,),
                 timeout=3600, setup=_quiet)
    return 0


def _quiet() -> None:
    warnings.filterwarnings("ignore")
