"""SGLang 0.5.15.post1 (slime 624b824a's pin) serving on the CPU, from `.venv-sglang`.

    server = sglang.server(model_dir, log_path=..., max_lora_rank=8)   # started, not yet ready
    server.wait_ready(READY_PATH, STARTUP_TIMEOUT)                      # then serve requests
    prompt_logprobs(server.url, [5, 6, 7], lora_path="policy")          # [None, lp(6), lp(7)]

What the CPU needs: `SGLANG_USE_CPU_ENGINE=1`, `--device cpu`, `--dtype float32` (`auto` gave an
fp16 KV cache for an fp32 model), `--lora-backend torch_native` (no `sgl_kernel` CPU build; without
AMX SGLang falls back to torch-native code by itself), and `sitecustomize/` on the server's path
(pinned memory without CUDA, sglang#31894; PyPI's CUDA-linked torchvision). SGLang opens a gRPC
port at `--port` + 10000, so ports stay below 55535. Each server leaves a
`/dev/shm/sglang_loads_*.shm` file behind, which `stop` removes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from engine_servers import venvs
from engine_servers.http import post
from engine_servers.process import ServerProcess, free_port

VERSION = "0.5.15.post1"
SITECUSTOMIZE = Path(__file__).resolve().parent / "sitecustomize"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
READY_PATH = "/health_generate"  # answers once a generation has run
STARTUP_TIMEOUT = 400.0  # 50-110 s measured on 2 shared cores
_SHM = "/dev/shm/sglang_loads_*.shm"


def command(model: str | os.PathLike, port: int, *, max_lora_rank: int | None = 8,
            lora_target_modules: Sequence[str] = LORA_TARGETS,
            extra: Sequence[str] = ()) -> list[str]:
    """The server's command line (LoRA enabled when `max_lora_rank` is set)."""
    argv = [str(venvs.python("sglang")), "-m", "sglang.launch_server", "--model-path", str(model),
            "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096",
            "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init",
            "--log-level", "warning"]
    if max_lora_rank is not None:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank),
                 "--lora-target-modules", *lora_target_modules, "--lora-backend", "torch_native"]
    return argv + list(extra)


def environment(base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITECUSTOMIZE), env.get("PYTHONPATH"))
                                        if p)
    env.pop("VIRTUAL_ENV", None)
    return env


class SGLangServer(ServerProcess):
    """A `ServerProcess` that removes the shared-memory file its SGLang leaves behind."""

    def start(self) -> SGLangServer:
        self._shm_before = set(glob.glob(_SHM))
        return super().start()

    def stop(self, grace: float = 30.0) -> int | None:
        status = super().stop(grace)
        for path in set(glob.glob(_SHM)) - getattr(self, "_shm_before", set()):
            try:
                os.remove(path)
            except OSError:
                pass
        return status


def server(model: str | os.PathLike, *, log_path: str | os.PathLike, port: int | None = None,
           **flags) -> SGLangServer:
    """An SGLang server for `model` on 127.0.0.1, started (wait for `READY_PATH` before use).
    `flags` go to `command`."""
    port = port or free_port(also=(10000,))
    return SGLangServer("SGLang", command(model, port, **flags), env=environment(), port=port,
                        log_path=log_path).start()


def prompt_logprobs(url: str, input_ids: Sequence[int], lora_path: str | None = None,
                    timeout: float = 120.0) -> list[float | None]:
    """SGLang's log-prob of each prompt token given the ones before it (None for the first),
    from one `/generate` request (one at a time: nothing is batched with it)."""
    body = {"input_ids": list(input_ids), "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    if lora_path is not None:
        body["lora_path"] = lora_path
    out = post(url, "generate", body, timeout)
    return [entry[0] for entry in out["meta_info"]["input_token_logprobs"]]
