"""The demos' tasks, on token ids (no tokenizer): task A follows each token t by `(t + 1) mod V`,
task B by `(3t + 1) mod V`. The supervised demo's base learns A and its LoRA learns B; the RL
demo rewards B, with the prompts, base data and reward below.

A prompt is `PROMPT_TOKENS` random tokens; a completion continues from its last token. The RL
base is trained on a mix, mostly A: from a random prompt it samples B's rule now and then, so the
first rollouts earn some reward, and RL has something to amplify (RL sharpens what a policy can
already sample; it does not teach a rule from nothing). The reward of a completion is the
fraction of its tokens that follow B's rule from the token before.
"""

from __future__ import annotations

import torch

PROMPT_TOKENS = 4


def next_token(task: str, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The token that follows each of `tokens` in `task` ("A" or "B")."""
    return (tokens + 1) % vocab if task == "A" else (3 * tokens + 1) % vocab


def prompts(count: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[count, PROMPT_TOKENS] random token ids."""
    return torch.randint(0, vocab, (count, PROMPT_TOKENS), generator=generator)


def base_batch(batch: int, completion: int, vocab: int, task_b_fraction: float,
               generator: torch.Generator) -> torch.Tensor:
    """[batch, PROMPT_TOKENS + completion]: a random prompt, then a completion following task B
    in about `task_b_fraction` of the rows and task A in the rest."""
    rows = torch.cat([prompts(batch, vocab, generator),
                      torch.empty(batch, completion, dtype=torch.long)], dim=1)
    is_b = torch.rand(batch, generator=generator) < task_b_fraction
    for i in range(PROMPT_TOKENS, rows.shape[1]):
        previous = rows[:, i - 1]
        rows[:, i] = torch.where(is_b, next_token("B", previous, vocab),
                                 next_token("A", previous, vocab))
    return rows


def rewards(sequences: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows] in [0, 1]: the fraction of each row's completion tokens (after the prompt) that
    follow task B's rule from the token before."""
    previous, current = sequences[:, PROMPT_TOKENS - 1:-1], sequences[:, PROMPT_TOKENS:]
    return (current == next_token("B", previous, vocab)).float().mean(dim=1)
