"""`megatron-lora demo-rl`: LoRA RL on a live SGLang server, on a laptop, and the reward rises.

1. The base: a small GPT trained in full with Megatron (2 gloo ranks, TP=2 + SP) on a mix of
   task A and, less often, task B (`tasks.py`), saved as a dist checkpoint and as the HF folder
   the engine serves; reused by the next run with the same base flags.
2. An SGLang 0.5.15.post1 server on 127.0.0.1 (its own virtualenv, built on first use), started
   from that folder and stopped by its pid on every exit path, Ctrl-C included.
3. GRPO with LoRA (`rl_ranks.py`): the engine samples completions of random prompts with the
   synced adapter, the reward counts the tokens that follow task B's rule, and after each Adam
   step the weights go back to the engine with `--lora-sync adapter` (the adapter alone, as slime's
   patch sends it) or `merged` (the merged model).

It writes `demo-rl-out/`: `<mode>/` (the run's `summary.json`, the final adapter as an adapter
checkpoint and a PEFT folder), `reward.png` and `summary.json` over every mode run so far with
the same flags, `base/`, and the server's log.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from pathlib import Path

from lora_common import LoRAConfig, add_lora_arguments
from megatron_lora.demos.tasks import PROMPT_TOKENS

# The flags that make the base: a run with other values trains its own.
BASE_FLAGS = ("hidden", "layers", "heads", "vocab", "completion", "batch", "base_steps",
              "base_lr", "task_b_fraction", "seed", "tp")
SERVER_LOG = "sglang.log"


def add_demo_rl_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=60, help="RL steps (one Adam step each)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8,
                        help="completions the engine samples per prompt (a GRPO group)")
    parser.add_argument("--completion", type=int, default=8, help="tokens per completion")
    parser.add_argument("--eval-prompts", type=int, default=32,
                        help="held-out prompts of the reward before and after RL")
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (Adam)")
    parser.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    parser.add_argument("--kl-coef", type=float, default=0.01,
                        help="weight of the KL penalty to the base")
    parser.add_argument("--base-steps", type=int, default=150,
                        help="full-training steps of the base")
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=32, help="the base's batch")
    parser.add_argument("--task-b-fraction", type=float, default=0.25,
                        help="share of task B (the rewarded rule) in the base's data")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (ranks)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0,
                        help="base init and data, LoRA init (unless --lora-seed), prompts")
    parser.add_argument("--out", default="demo-rl-out", help="output folder")
    add_lora_arguments(parser)
    parser.set_defaults(lora_r=8, lora_alpha=16.0, lora_sync="adapter")
    return parser


def check_demo_rl_arguments(args: argparse.Namespace) -> None:
    """Every flag checked before the base trains, the server starts or `--out` is made, each
    error naming its flag."""
    from megatron_lora.demos.supervised import SEED_RANGE
    from megatron_lora.sync import engines

    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("steps", "prompts", "completion", "eval_prompts", "base_steps", "batch", "tp",
                 "hidden", "layers", "heads", "vocab"):
        if getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2 (GRPO compares a prompt's completions), "
                         f"got {args.samples}")
    for name in ("lr", "base_lr", "clip", "kl_coef", "task_b_fraction"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name in ("lr", "base_lr")):
            raise ValueError(f"{flag(name)} must be a finite positive number, got {value}")
    if not 0 < args.task_b_fraction < 1:
        raise ValueError(f"--task-b-fraction must be in (0, 1): the base must sample the rewarded "
                         f"rule sometimes and not always, got {args.task_b_fraction}")
    for name in ("seed", "lora_seed"):
        value = getattr(args, name, None)
        if value is not None and value not in SEED_RANGE:
            raise ValueError(f"{flag(name)} must be in [0, 2**32) as Megatron's --seed, "
                             f"got {value}")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise ValueError(f"--hidden {args.hidden} must be --heads {args.heads} heads of an even "
                         f"width (RoPE)")
    if args.heads % args.tp or args.vocab % args.tp or max(1, args.heads // 2) % args.tp:
        raise ValueError(f"--heads {args.heads}, their {max(1, args.heads // 2)} query groups "
                         f"and --vocab {args.vocab} must split into --tp {args.tp} ranks")
    if args.tp > 1 and (PROMPT_TOKENS + args.completion) % args.tp:
        raise ValueError(f"--completion {args.completion} + the {PROMPT_TOKENS} prompt tokens "
                         f"must split into --tp {args.tp} ranks (sequence parallelism splits the "
                         f"sequence)")
    lora = LoRAConfig.from_args(args)  # its errors name the flag
    if args.lora_sync == "adapter":  # what the server is started with must serve the adapter
        from engine_servers.sglang import LORA_TARGETS

        engines.check_flags("sglang_http", lora, enable_lora=True, max_lora_rank=args.lora_r,
                            lora_target_modules=list(LORA_TARGETS))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the demo writes a folder")


def _base_settings(args) -> dict:
    return {name: getattr(args, name) for name in BASE_FLAGS}


def _prepare_base(args, out: Path) -> Path:
    """The base's folder: reused when it was trained with the same flags, else trained now."""
    from megatron_cpu.launch import run_on_ranks
    from megatron_lora.demos import rl_ranks

    folder = out / "base"
    stamp = folder / "base.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == _base_settings(args):
        print(f"reusing the base in {folder} (trained with the same flags)")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    run_on_ranks(rl_ranks.train_base, world_size=args.tp, tp=args.tp, seed=args.seed,
                 args=(args, str(folder)), timeout=3600, setup=_quiet)
    stamp.write_text(json.dumps(_base_settings(args), indent=2) + "\n")  # written last: complete
    print(f"base trained in {time.time() - started:.0f} s")
    return folder


def main(args: argparse.Namespace) -> int:
    from engine_servers import sglang, venvs
    from megatron_cpu.launch import run_on_ranks
    from megatron_lora.demos import rl_ranks

    warnings.filterwarnings("ignore")  # megatron-core's import notes (no Apex, no TE, ...)
    check_demo_rl_arguments(args)
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"megatron-lora demo-rl: {args.tp} gloo ranks, TP={args.tp}"
          f"{' + sequence parallel' if args.tp > 1 else ''}, SGLang {sglang.VERSION} on "
          f"127.0.0.1, --lora-sync {args.lora_sync}, output in {out}")
    if not venvs.built("sglang"):
        print("building .venv-sglang (first use; a few GB)")
    venvs.build("sglang")
    base = _prepare_base(args, out)
    run_dir = out / args.lora_sync
    shutil.rmtree(run_dir, ignore_errors=True)  # this mode's previous run: the demo's own files
    server = sglang.server(base / "hf", log_path=out / SERVER_LOG, max_lora_rank=args.lora_r)
    try:
        print(f"SGLang server pid {server.pid} starting (log: {out / SERVER_LOG})")
        seconds = server.wait_ready(sglang.READY_PATH, sglang.STARTUP_TIMEOUT)
        print(f"SGLang answered after {seconds:.0f} s")
        record = run_on_ranks(rl_ranks.run_rl, world_size=args.tp, tp=args.tp, seed=args.seed,
                              args=(args, server.url, str(base), str(run_dir)), timeout=3600,
                              setup=_quiet)[0]
    finally:
        server.stop()
    record.update(seed=args.seed, settings=_settings(args),
                  seconds=round(time.time() - started, 1))
    (run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    runs = _runs_like(record, out)
    _plot(runs, out / "reward.png")
    (out / "summary.json").write_text(json.dumps(
        {run["lora_sync"]: _brief(run) for run in runs}, indent=2) + "\n")
    mismatch = max(step["mismatch"] for step in record["steps"])
    print(f"reward {record['start_reward']:.3f} -> {record['end_reward']:.3f} (held-out "
          f"prompts); largest train/engine mismatch {mismatch:.1e}; {record['seconds']:.0f} s")
    print(f"wrote {out}/: reward.png, summary.json, {args.lora_sync}/ (adapter.safetensors, "
          f"peft/, summary.json), base/, {SERVER_LOG}")
    return 0


def _settings(args) -> dict:
    skip = {"out", "lora_sync", "run", "command", "transformer_impl"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _runs_like(record: dict, out: Path) -> list[dict]:
    """This run and the other mode's last run in `out`, if it had the same flags."""
    from megatron_lora.demos.rl_engine import SYNC_MODES

    runs = []
    for mode in SYNC_MODES:
        path = out / mode / "summary.json"
        if mode == record["lora_sync"]:
            runs.append(record)
        elif path.is_file():
            other = json.loads(path.read_text())
            if other.get("settings") == record["settings"]:
                runs.append(other)
    return runs


def _brief(run: dict) -> dict:
    mismatches = [step["mismatch"] for step in run["steps"]]
    return {"start_reward": run["start_reward"], "end_reward": run["end_reward"],
            "mean_mismatch": sum(mismatches) / len(mismatches), "max_mismatch": max(mismatches),
            "mean_sync_seconds": sum(s["sync_seconds"] for s in run["steps"]) / len(mismatches),
            "seconds": run["seconds"], "seed": run["seed"]}


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, kl_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run in runs:
        steps = [s["step"] for s in run["steps"]]
        label = f"--lora-sync {run['lora_sync']}"
        reward_axis.plot(steps, [s["reward"] for s in run["steps"]], label=label)
        kl_axis.plot(steps, [s["kl"] for s in run["steps"]], label=label)
    reward_axis.set_xlabel("RL step")
    reward_axis.set_ylabel("mean reward of the step's rollouts")
    reward_axis.set_ylim(0, 1.02)
    kl_axis.set_xlabel("RL step")
    kl_axis.set_ylabel("KL to the base (k3)")
    for axis in (reward_axis, kl_axis):
        axis.legend()
    figure.suptitle("megatron-lora demo-rl (CPU, TP=2 + SP, live SGLang)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
