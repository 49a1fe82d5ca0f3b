"""The GRPO objective of the RL demo, on per-token log-probs of the sampled completions.

- advantages: each completion's reward minus its prompt group's mean, over the group's standard
  deviation (a group whose completions all earn the same reward teaches nothing);
- the policy term: PPO's clipped ratio `p_trainer / p_engine` against the log-probs the engine
  sampled with (1 up to the train/engine mismatch on the first, on-policy update);
- the KL penalty to the frozen base (`disable_lora`), Schulman's k3 estimator
  `exp(ref - logp) - (ref - logp) - 1`: unbiased, and never negative.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows] -> [rows]: rows are prompt groups of `group_size` consecutive completions."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    return (centered / (groups.std(dim=1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss(logp: torch.Tensor, engine_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, clip: float, kl_coef: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL) over every sampled token; log-probs are [rows, tokens], advantages
    [rows]."""
    ratio = torch.exp(logp - engine_logp)
    advantage = advantages[:, None]
    policy = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    log_ratio = ref_logp - logp
    kl = torch.exp(log_ratio) - log_ratio - 1
    return -(policy - kl_coef * kl).mean(), kl.detach().mean()
