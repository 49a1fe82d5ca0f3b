"""What each of the RL demo's gloo ranks runs (TP=2 + sequence parallel): the base's training,
and the RL loop against the engine. Rank 0 talks to the engine and reports; the rollouts it
receives are broadcast, so every rank trains on the same batch.

Each RL step, as slime's loop runs it: the engine samples completions with the weights synced
after the previous step; the trainer scores them, computes its own log-probs of the sampled tokens
(with the adapters) and the reference's (the same model inside `disable_lora`, the frozen
base), takes one Adam step on the GRPO loss (`rl_loss.py`), and syncs the new weights
(`rl_engine.EngineSync`). The train/engine mismatch is read before the update, when trainer and
engine hold the same weights: the number RL users watch for off-policy drift.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from megatron_lora.demos import rl_engine, rl_loss, tasks
from megatron_lora.demos.supervised import model_config

# Positions of the per-token losses (`labels` = the next token) that predict completion tokens.
COMPLETION_START = tasks.PROMPT_TOKENS - 1
# The held-out prompts of the before/after evaluation: a stream apart from every step's.
EVAL_STREAM = 1_000_000


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _gpt(spec, config, args):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=max_positions(args),
                    position_embedding_type="rope")


def max_positions(args) -> int:
    """The model's (and the engine's) context: a rollout, with room (SGLang's context length)."""
    return max(64, 2 * (tasks.PROMPT_TOKENS + args.completion))


def completion_logps(model, sequences: torch.Tensor, tokens: int) -> torch.Tensor:
    """[rows, tokens]: the model's log-prob of each completion token given those before it
    (Megatron's vocab-parallel cross entropy, so the TP-split logits are never gathered)."""
    positions = torch.arange(sequences.shape[1]).unsqueeze(0).expand_as(sequences)
    labels = torch.roll(sequences, -1, dims=1)  # the last label predicts nothing: sliced off
    losses = model(sequences, positions, None, labels=labels).float()
    return -losses[:, COMPLETION_START:COMPLETION_START + tokens]


def train_base(args, folder: str) -> list[float]:
    """Full training of the base on the task mix; saves it as a Megatron dist checkpoint
    (`folder/megatron`) and as the HF folder the engine serves (`folder/hf`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import megatron_lora
    from megatron_cpu.ddp_training import Schedule, train_with_megatron_ddp

    warnings.filterwarnings("ignore")
    config = model_config(args, torch.distributed.get_world_size())
    base = _gpt(get_gpt_layer_local_spec(normalization="RMSNorm"), config, args)

    def loss(ddp, step):
        generator = torch.Generator().manual_seed(args.seed * 100_003 + step)
        sequences = tasks.base_batch(args.batch, args.completion, args.vocab,
                                       args.task_b_fraction, generator)
        return -completion_logps(ddp, sequences, args.completion).mean()

    losses = train_with_megatron_ddp(
        base, config, loss, args.base_steps, args.base_lr, label="base, task mix (full)",
        schedule=Schedule(warmup_steps=args.base_steps // 10, decay_style="cosine",
                          clip_grad=1.0))
    megatron_lora.save_dist_checkpoint(base, Path(folder) / "megatron")
    rl_engine.write_hf_base(base, Path(folder) / "hf", args.vocab, max_positions(args))
    return losses


def _rollouts(url: str, prompts: torch.Tensor, args, lora_path: str | None):
    """Every rank: rank 0's rollouts from the engine (or its error, raised on every rank)."""
    payload = [None]
    if _rank0():
        try:
            payload[0] = rl_engine.sample(url, prompts, args.samples, args.completion, lora_path)
        except Exception as error:  # every rank must leave, not wait for a broadcast
            payload[0] = error
    torch.distributed.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0]


def _evaluate(url, args, sync) -> float:
    """The mean reward of the engine's samples for held-out prompts, with what it serves now."""
    generator = torch.Generator().manual_seed(EVAL_STREAM + args.seed)
    prompts = tasks.prompts(args.eval_prompts, args.vocab, generator)
    sequences, _ = _rollouts(url, prompts, args, sync.lora_path)
    return tasks.rewards(sequences, args.vocab).mean().item()


def run_rl(args, url: str, base_folder: str, out: str) -> dict | None:
    """GRPO with LoRA on the base, syncing to the engine at `url` after every step in
    `args.lora_sync` mode; saves the final adapter in `out`. Rank 0 returns the record."""
    import megatron_lora
    from megatron_cpu.ddp_training import Schedule, train_with_megatron_ddp

    warnings.filterwarnings("ignore")
    say = print if _rank0() else (lambda *a, **k: None)
    config = model_config(args, torch.distributed.get_world_size())
    args.transformer_impl = "local"
    model = _gpt(megatron_lora.get_gpt_lora_spec(args, config, None), config, args)
    megatron_lora.load_dist_checkpoint(model, Path(base_folder) / "megatron")
    megatron_lora.mark_only_lora_as_trainable(model)
    sync = rl_engine.EngineSync(args.lora_sync, url, model)
    sync.push(0)  # B = 0: the engine serves the base
    start_reward = _evaluate(url, args, sync)
    say(f"before RL: mean reward {start_reward:.3f} on {args.eval_prompts} held-out prompts "
        f"x {args.samples} samples")
    steps = []

    def loss(ddp, step):
        generator = torch.Generator().manual_seed(args.seed * 100_003 + step)
        prompts = tasks.prompts(args.prompts, args.vocab, generator)
        started = time.perf_counter()
        sequences, engine_logp = _rollouts(url, prompts, args, sync.lora_path)
        rollout_seconds = time.perf_counter() - started
        rewards = tasks.rewards(sequences, args.vocab)
        logp = completion_logps(ddp, sequences, args.completion)
        with torch.no_grad(), megatron_lora.disable_lora(model):
            ref_logp = completion_logps(model, sequences, args.completion)
        loss, kl = rl_loss.grpo_loss(logp, engine_logp, ref_logp,
                                     rl_loss.group_advantages(rewards, args.samples),
                                     args.clip, args.kl_coef)
        steps.append({"step": step + 1, "reward": rewards.mean().item(), "kl": kl.item(),
                      "mismatch": (logp.detach() - engine_logp).abs().mean().item(),
                      "rollout_seconds": rollout_seconds})
        return loss

    def after_step(step):
        sync.push(step + 1)
        record = steps[-1]
        record["sync_seconds"] = sync.seconds
        say(f"step {step + 1:3d}/{args.steps}  reward {record['reward']:.3f}  "
            f"KL {record['kl']:.4f}  train/engine mismatch {record['mismatch']:.1e}  "
            f"rollout {record['rollout_seconds']:.1f} s  {args.lora_sync} sync "
            f"{record['sync_seconds']:.2f} s", flush=True)

    started = time.time()
    train_with_megatron_ddp(model, config, loss, args.steps, args.lr, after_step=after_step,
                            schedule=Schedule(clip_grad=1.0))
    rl_seconds = time.time() - started
    end_reward = _evaluate(url, args, sync)
    say(f"after RL: mean reward {end_reward:.3f} on the same held-out prompts")
    out = Path(out)
    megatron_lora.save_lora_checkpoint(model, out / "adapter.safetensors")
    megatron_lora.export_peft_adapter(model, out / "peft",
                                      base_model_name_or_path=str(Path(base_folder) / "hf"))
    if not _rank0():
        return None
    return {"lora_sync": args.lora_sync, "start_reward": start_reward, "end_reward": end_reward,
            "rl_seconds": round(rl_seconds, 1), "steps": steps}
