"""Rank-side case of `engine_tests/test_round_trip.py`: LoRA trained at TP=2 + SP on the engine
model converted to Megatron, synced to a live engine server after every optimizer step, then the
engine's prompt log-probs read back beside the trainer's own. Rank 0 returns the evidence (None
elsewhere); the test judges.

Each record holds, for every prompt, the log-prob of each token after the first: the trainer's
(`log_softmax` of its TP-gathered logits, adapters on), the trainer's inside `disable_lora` (the
base), and what the engine served for the synced adapter (or merged model) and, in adapter mode,
for the base (no adapter named). Requests go one at a time: vLLM's CPU build returns wrong
results for base and LoRA requests batched together, and crashes on prompt log-probs of several
LoRA requests in one batch.
"""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import engine_model, engine_sync, hf_llama

STEPS = 3
LR = 2e-2
SEQ = 16
PROMPTS = 3


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, engine_model.VOCAB, (PROMPTS, SEQ), generator=generator).tolist()


def lora_config(canonical: bool) -> LoRAConfig:
    return LoRAConfig(r=8, alpha=16, canonical=canonical)


@torch.no_grad()
def trainer_logprobs(model) -> torch.Tensor:
    """[prompts, SEQ - 1]: log p(token i | tokens < i) for i >= 1, fp32, every rank."""
    ids = torch.tensor(prompts())
    logits = hf_llama.gpt_logits(model, ids).float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _loss(model, step):
    ids = hf_llama.tokens(seed=100 + step)  # [2, 16] token ids of the 128-word vocabulary
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    labels = torch.roll(ids, -1, dims=1)
    return model(ids, positions, None, labels=labels).float().mean()


def build(model_dir: str, canonical: bool):
    from megatron_lora import lora_spec, mark_only_lora_as_trainable

    hf = engine_model.load(model_dir)
    spec = lora_spec(hf_llama.local_spec(hf.config), lora_config(canonical))
    model = hf_llama.gpt_from_hf(hf, spec, sequence_parallel=True)
    mark_only_lora_as_trainable(model)
    return model


def round_trip(model_dir: str, engine: str, url: str, mode: str, canonical: bool, work: str):
    from megatron_cpu.ddp_training import train_with_megatron_ddp
    from megatron_lora import disable_lora

    model = build(model_dir, canonical)
    sync = engine_sync.make(engine, mode, url, model, work, model_dir)
    rank0 = torch.distributed.get_rank() == 0
    records = []

    def record(version, base_only: bool = False):
        entry = {"version": version, "trainer_base": trainer_logprobs_off(model)}
        if not base_only:
            entry["trainer"] = trainer_logprobs(model)
        if rank0:
            served = [engine_sync.served(sync, p, sync.adapter, model_dir) for p in prompts()]
            entry["served"] = torch.tensor(served)
            if sync.adapter is not None:
                entry["served_base"] = torch.tensor(
                    [engine_sync.served(sync, p, None, model_dir) for p in prompts()])
        records.append(entry)

    def trainer_logprobs_off(model):
        with disable_lora(model):
            return trainer_logprobs(model)

    def after_step(step):
        sync.push(step + 1)
        record(step + 1)

    try:
        sync.push(0)  # B = 0: the synced adapter (or merged model) is the base
        record(0)
        losses = train_with_megatron_ddp(model, model.config, _loss, steps=STEPS, lr=LR,
                                         after_step=after_step)
        restored = None
        if mode != "adapter":
            sync.restore_base()
            record("base", base_only=True)
            restored = records.pop()
    finally:
        sync.close()
    if not rank0:
        return None
    return {"records": records, "losses": losses, "restored": restored,
            "sent_bytes": sync.sent_bytes}
