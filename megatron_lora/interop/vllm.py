"""vLLM's adapter-serving API (0.32.0; its CPU build is what `make test-engines` runs), as the
adapter sync feeds it: the requests, and the server flags an adapter needs. No vLLM import; where
each fact is in vLLM's source (`vllm/config/lora.py`, `vllm/lora/peft_helper.py`,
`vllm/entrypoints/serve/lora/api_router.py`):

- vLLM loads an adapter from a PEFT folder only (`POST /v1/load_lora_adapter {lora_name,
  lora_path}`; no tensors in the request). A name it holds is refused unless `load_inplace`; the
  sync unloads (`/v1/unload_lora_adapter`) and loads, each version from a folder of its own:
  vLLM's prefix cache keys an adapter's blocks on its name and path, so a folder rewritten at a
  loaded path would be served from the old version's cached blocks.
- `--max-lora-rank` must be one of `MAX_LORA_RANKS` (the server refuses to start otherwise; 16
  when not given) and at least the adapter's rank (`validate_legal` refuses the load).
- It computes `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora` (PEFT's scaling): the
  PEFT config goes as it is.
- `--max-loras` is how many adapters one batch can use (at least 1: the sync holds one).
- Runtime loading needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` in the server's environment;
  `/pause`, `/resume` and `/update_weight_version` need `VLLM_SERVER_DEV_MODE=1`.
"""

from __future__ import annotations

from collections.abc import Iterable

from megatron_lora.interop.peft_export import VLLM_DEFAULT_MAX_LORA_RANK, VLLM_MAX_LORA_RANKS

MAX_LORA_RANKS = VLLM_MAX_LORA_RANKS
DEFAULT_MAX_LORA_RANK = VLLM_DEFAULT_MAX_LORA_RANK
# The HF modules vLLM adapts in a Llama-family model (its packed qkv_proj / gate_up_proj take
# q/k/v and gate/up adapters).
SERVED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVER_FLAGS = ("enable_lora", "max_lora_rank", "max_loras")

LOAD_ENDPOINT = "v1/load_lora_adapter"
UNLOAD_ENDPOINT = "v1/unload_lora_adapter"


def lora_load_request(name: str, path: str) -> dict:
    """The JSON body of `POST /v1/load_lora_adapter`: the PEFT folder at `path` under `name`."""
    return {"lora_name": name, "lora_path": str(path)}


def lora_unload_request(name: str) -> dict:
    return {"lora_name": name}


def server_flag_problems(*, r: int, target_modules: Iterable[str], enable_lora, max_lora_rank,
                         max_loras, prefix: str = "--") -> list[str]:
    """What keeps a vLLM server started with these arguments from serving an adapter of rank
    `r` on the HF modules `target_modules`. Flags are named with `prefix`."""
    def flag(field):
        return prefix + field.replace("_", "-")

    problems = []
    if not enable_lora:
        problems.append(f"{flag('enable_lora')} is off: vLLM refuses adapter loads without it")
    rank = DEFAULT_MAX_LORA_RANK if max_lora_rank is None else max_lora_rank
    if rank not in MAX_LORA_RANKS:
        problems.append(f"{flag('max_lora_rank')} {rank} is not one vLLM accepts "
                        f"({', '.join(map(str, MAX_LORA_RANKS))}): the server refuses to start")
    if rank < r:
        fitting = [m for m in MAX_LORA_RANKS if m >= r]
        problems.append(f"{flag('max_lora_rank')} is {rank}, the adapter's rank is {r}: vLLM "
                        f"refuses the load (use {fitting[0] if fitting else 'none: r > 512'})")
    if max_loras is not None and max_loras < 1:
        problems.append(f"{flag('max_loras')} is {max_loras}: the sync holds one adapter")
    unserved = sorted(set(target_modules) - set(SERVED_TARGETS))
    if unserved:
        problems.append(f"target modules {unserved} are not among the modules vLLM adapts in a "
                        f"Llama-family model ({', '.join(SERVED_TARGETS)})")
    return problems
