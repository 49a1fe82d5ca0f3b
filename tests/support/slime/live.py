"""slime's own code against a live SGLang server, on 2 CPU ranks (TP=2 + SP, fp32): the LoRA
actor from a base-only torch_dist checkpoint, `--lora-sync adapter`, its colocated weight
updater (`UpdateWeightFromTensor`, patched) reaching the server through slime's `SGLangEngine`
request code (`engines.LiveEngine`): the first sync sends the unmerged base through
`/update_weights_from_tensor` (SGLang's own bucket class; tensors' bytes inline instead of CUDA
IPC handles) and loads the adapter through `/load_lora_adapter_from_tensors`; each later sync
only reloads the adapter. After every sync rank 0 reads the served prompt log-probs of a
rollout's samples, asking for the adapter as slime's rollout does (`lora_request_fields`), beside
the actor's own log-softmax; the next rollout trains on those served log-probs (slime's
`rollout_log_probs`). Rank 0 returns the evidence.

    run_live(work, hf, url)    # on every rank (runtime.setup(..., live_sglang=True) first)
"""

from __future__ import annotations

import contextlib

import torch

from support import engine_model
from support.slime import actors, engines, rollout, runtime, stages


def _trainer_logprobs(actor, tokens: torch.Tensor) -> torch.Tensor:
    """[samples, len - 1] log p(token i | tokens < i) of the actor's model (adapters on)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = actor.model[0]
    was_training = model.training
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None)).float()
    model.train(was_training)
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _served(args, url: str, tokens: torch.Tensor) -> torch.Tensor:
    from engine_servers.sglang import prompt_logprobs
    from megatron_lora import lora_request_fields

    lora_path = lora_request_fields(args).get("lora_path")  # what slime's rollout adds
    return torch.tensor([prompt_logprobs(url, row, lora_path=lora_path)[1:]
                         for row in tokens.tolist()])


def run_live(work: str, hf: str, url: str) -> dict | None:
    import torch.distributed as dist

    from megatron_lora import disable_lora

    ports = runtime.hand_over_process_group(2)
    runtime.cpu_runtime()
    common = dict(hf=hf, tp=2, pp=1, bf16=False, model=engine_model.__name__)

    # the base-only torch_dist checkpoint slime starts from (--ref-load)
    args = actors.parse(actors.command_line(lora=False, **common, extra=[
        "--load", hf, "--save", f"{work}/base", "--save-interval", "1", "--no-save-optim"]))
    stages._fp32(args)
    actor, _ = actors.build(args, ports[0])
    actor.save_model(0)
    actors.retire(actor)

    args = actors.parse(actors.command_line(lora=True, **common, extra=[
        "--ref-load", f"{work}/base", "--colocate", "--no-offload-train",
        "--rollout-num-gpus-per-engine", "2", "--dist-ckpt-strictness", "log_unexpected",
        "--use-kl-loss", "--kl-loss-coef", "0.01", "--lora-sync", "adapter"]))
    stages._fp32(args)
    # --colocate offloads the rollout engine; a CPU copy of its weights keeps the base there
    args.sglang_enable_weights_cpu_backup = True
    actor, _ = actors.build(args, ports[1], with_ref=True)
    engine = engines.LiveEngine(args, url)
    updater = actor.weight_updater
    updater.connect_rollout_engines([engine], engines.Lock(), engine_gpu_counts=[2],
                                    engine_gpu_offsets=[0])
    syncs = []
    try:
        for rollout_id in range(3):
            sent_base = updater.lora_sync.sends_base()
            updater.update_weights()
            tokens = torch.tensor(rollout.samples(rollout_id, args)[0])
            trainer = _trainer_logprobs(actor, tokens)
            with disable_lora(actor.model[0]):
                trainer_base = _trainer_logprobs(actor, tokens)
            served = [_served(args, url, tokens) if dist.get_rank() == 0 else None]
            if dist.get_rank() == 0:
                syncs.append({"sent_base": sent_base, "trainer": trainer,
                              "trainer_base": trainer_base, "served": served[0],
                              "served_base": _served_base(url, tokens)})
            if rollout_id < 2:  # a rollout of training on the engine's log-probs, as in RL
                dist.broadcast_object_list(served, src=0)
                engine_log_probs = [row[-rollout.RESPONSE:] for row in served[0]]
                actor.train(rollout_id, rollout.rollout_batch(
                    args, rollout_id, stages._dp_size(), rollout_log_probs=engine_log_probs))
    finally:
        if dist.get_rank() == 0:  # leave the shared server without the adapter
            from ray import get

            with contextlib.suppress(Exception):  # (never loaded: the error is raised already)
                get(engine.unload_lora_adapter.remote("policy"))
    out = {"syncs": syncs, "lora_sync_args": (args.use_lora, args.lora_sync)} \
        if dist.get_rank() == 0 else None
    actors.retire(actor)
    return out


def _served_base(url: str, tokens: torch.Tensor) -> torch.Tensor:
    from engine_servers.sglang import prompt_logprobs

    return torch.tensor([prompt_logprobs(url, row)[1:] for row in tokens.tolist()])
