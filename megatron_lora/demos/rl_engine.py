"""The RL demo's side of the rollout engine, an SGLang server reached by its URL: the base it is
started from, the rollouts it samples, and the two ways the trainer's weights reach it.

    write_hf_base(model, folder)              # every rank: the base as an HF Llama folder
    sync = EngineSync("adapter", url, model)   # or "merged"
    sync.push(version)                         # every rank, after each optimizer step
    rows, logps = sample(url, prompts, 8, 8, sync.lora_path)   # rank 0

- `adapter`: the library's `AdapterSync` with the `sglang_http` client (the producer slime's
  patch uses: the adapter gathered to rank 0 in PEFT form, `/load_lora_adapter_from_tensors`);
  requests name the adapter, and the engine's base stays the frozen base.
- `merged`: the merged model under HF names (`hf_state_dict`, merged on each TP shard, then
  gathered) through `/update_weights_from_tensor`, as slime's non-LoRA sync does; requests name
  no adapter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_lora.interop import sglang

ADAPTER_NAME = "policy"
SYNC_MODES = ("adapter", "merged")


def hf_config(config, vocab: int, max_positions: int) -> dict:
    """The HF `config.json` of the demo's Megatron GPT (a Llama: RMSNorm, SwiGLU, RoPE, GQA,
    no biases, untied head)."""
    heads = config.num_attention_heads
    rope_theta = 10000.0  # Megatron's and HF's default RoPE base
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": vocab, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": config.num_query_groups or heads,
        "head_dim": config.kv_channels or config.hidden_size // heads, "hidden_act": "silu",
        "rms_norm_eps": config.layernorm_epsilon, "max_position_embeddings": max_positions,
        "rope_theta": rope_theta, "rope_parameters": {"rope_type": "default",
                                                      "rope_theta": rope_theta},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 0,
    }


def write_hf_base(model, folder: Path, vocab: int, max_positions: int) -> None:
    """Every rank (the TP gather is collective); rank 0 writes `config.json` and
    `model.safetensors` of the model's base (adapters, if any, left out)."""
    from safetensors.torch import save_file

    from megatron_lora.sync.hf_state import hf_state_dict

    state = hf_state_dict(model, merged=False)
    if torch.distributed.get_rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(hf_config(model.config, vocab, max_positions), indent=2) + "\n")
    save_file({name: t.contiguous() for name, t in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def sample(url: str, prompts: torch.Tensor, samples_per_prompt: int, tokens: int,
           lora_path: str | None, timeout: float = 600.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of rollouts: `samples_per_prompt` completions of `tokens` tokens for each prompt
    (temperature 1, no top-k / top-p, EOS ignored), sampled by the engine with the adapter
    `lora_path` (None: the model it serves). Returns the sequences [prompts x samples, prompt +
    tokens] (each prompt's completions consecutive) and the engine's log-prob of each sampled
    token [prompts x samples, tokens]."""
    from engine_servers.http import post

    rows = prompts.repeat_interleave(samples_per_prompt, dim=0)
    body = {"input_ids": rows.tolist(), "return_logprob": True,
            "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                "max_new_tokens": tokens, "ignore_eos": True}}
    if lora_path is not None:
        body["lora_path"] = [lora_path] * len(rows)
    answers = post(url, "generate", body, timeout)
    completions, logps = [], []
    for answer in answers:
        entries = answer["meta_info"]["output_token_logprobs"]  # [[logprob, token id, text]]
        ids = [entry[1] for entry in entries]
        if len(ids) != tokens or ids != list(answer["output_ids"])[-tokens:]:
            raise RuntimeError(f"SGLang at {url} returned {len(ids)} sampled tokens, not "
                               f"{tokens}, or log-probs of other tokens than it sampled")
        completions.append(ids)
        logps.append([entry[0] for entry in entries])
    return (torch.cat([rows, torch.tensor(completions, dtype=torch.long)], dim=1),
            torch.tensor(logps, dtype=torch.float32))


class EngineSync:
    """After each optimizer step, the trainer's weights to the engine at `url`, in `mode`. Call
    `push` on every rank; rank 0 talks to the engine. `seconds`: the last push's wall time."""

    def __init__(self, mode: str, url: str, model):
        if mode not in SYNC_MODES:
            raise ValueError(f"--lora-sync must be one of {', '.join(SYNC_MODES)}, got {mode!r}")
        self.mode, self.url, self.model = mode, url, model
        self.seconds = 0.0
        self.lora_path = ADAPTER_NAME if mode == "adapter" else None
        if mode == "adapter":
            from megatron_lora.sync import engines
            from megatron_lora.sync.adapter_sync import AdapterSync

            self.adapter_sync = AdapterSync(SimpleNamespace(use_lora=True, lora_sync="adapter"),
                                            model, name=ADAPTER_NAME,
                                            client=engines.client("sglang_http"))
            self.adapter_sync.connect([url], paused=[])  # the sync pauses the server itself

    def push(self, version) -> None:
        start = time.perf_counter()
        if self.mode == "adapter":
            self.adapter_sync.push_adapter(dict(self.model.named_parameters()), version)
        else:
            from engine_servers.http import post
            from megatron_lora.sync.hf_state import hf_state_dict

            state = hf_state_dict(self.model, merged=True)
            if torch.distributed.get_rank() == 0:
                answer = post(self.url, sglang.WEIGHTS_FROM_TENSOR_ENDPOINT,
                              sglang.weights_from_tensor_request(state.items(), version))
                if answer.get("success") is False:
                    raise RuntimeError(f"SGLang at {self.url} refused the merged weights: "
                                       f"{answer.get('message') or answer}")
        self.seconds = time.perf_counter() - start
