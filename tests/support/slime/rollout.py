"""The rollout side of a slime step without SGLang: what `RolloutManager.generate` hands each
training rank (`slime/ray/rollout.py`: `_convert_samples_to_train_data`, then
`_split_train_data_by_dp`), built from fixed token sequences instead of generations.

    refs = rollout_batch(args, rollout_id, dp_size)   # one Box per data-parallel rank

The per-rank packing uses slime's own `build_dp_schedule` and
`tensorize_rollout_data_for_training`; rewards are GRPO-normalized per prompt group as
`_post_process_rewards` does.
"""

from __future__ import annotations

import torch

PROMPT = 6
RESPONSE = 10


def samples(rollout_id: int, args):
    """Token sequences `[prompt; response]` and raw rewards, deterministic per rollout id."""
    from support.slime import hf_checkpoints

    generator = torch.Generator().manual_seed(100 + rollout_id)
    count = args.rollout_batch_size * args.n_samples_per_prompt
    tokens = torch.randint(3, hf_checkpoints.VOCAB, (count, PROMPT + RESPONSE), generator=generator)
    for group in range(args.rollout_batch_size):  # the samples of a prompt share the prompt
        rows = slice(group * args.n_samples_per_prompt, (group + 1) * args.n_samples_per_prompt)
        tokens[rows, :PROMPT] = tokens[group * args.n_samples_per_prompt, :PROMPT]
    rewards = torch.rand(count, generator=generator).tolist()
    return tokens.tolist(), rewards


def rollout_batch(args, rollout_id: int, dp_size: int, rollout_log_probs=None):
    """`rollout_log_probs`: the engine's log-probs of each response (SGLang returns them with
    every generation), one tensor per sample in sample order."""
    import ray
    from slime.observability.rollout_data_utils import tensorize_rollout_data_for_training
    from slime.utils.dp_schedule import build_dp_schedule
    from slime.utils.misc import Box

    tokens, raw_rewards = samples(rollout_id, args)
    grouped = torch.tensor(raw_rewards).view(-1, args.n_samples_per_prompt)
    rewards = grouped - grouped.mean(dim=-1, keepdim=True)
    if args.grpo_std_normalization:
        rewards = rewards / (rewards.std(dim=-1, keepdim=True) + 1e-6)
    count = len(tokens)
    data = {
        "tokens": tokens, "response_lengths": [RESPONSE] * count,
        "rewards": rewards.flatten().tolist(), "raw_reward": raw_rewards,
        "truncated": [0] * count, "sample_indices": list(range(count)),
        "rollout_ids": list(range(count)), "loss_masks": [[1] * RESPONSE] * count,
        "rollout_mask_sums": [RESPONSE] * count,
    }
    if rollout_log_probs is not None:
        data["rollout_log_probs"] = [torch.as_tensor(lp).tolist() for lp in rollout_log_probs]
    data["total_lengths"] = [len(t) for t in tokens]
    from megatron.core import mpu

    parallel = {"dp_size": dp_size, "cp_size": mpu.get_context_parallel_world_size(),
                "vpp_size": 1,
                "microbatch_group_size_per_vp_stage": 1}
    partitions, micro_batch_indices, num_microbatches, global_batch_sizes = build_dp_schedule(
        args, parallel, data["total_lengths"], global_batch_size=args.global_batch_size,
        rollout_indices=data["rollout_ids"])
    refs = []
    for rank in range(dp_size):
        partition = partitions[rank]
        rank_data = {"partition": partition}
        for key in ("tokens", "response_lengths", "rewards", "truncated", "loss_masks",
                    "sample_indices", "rollout_ids", "rollout_mask_sums", "rollout_log_probs"):
            if key not in data:
                continue
            rank_data[key] = [data[key][j] for j in partition]
        for key in ("raw_reward", "total_lengths"):
            rank_data[key] = data[key]
        rank_data["global_batch_sizes"] = global_batch_sizes
        rank_data["num_microbatches"] = num_microbatches
        rank_data["micro_batch_indices"] = micro_batch_indices[rank]
        tensorize_rollout_data_for_training(rank_data)
        refs.append(Box(ray.put(rank_data)))
    return refs
