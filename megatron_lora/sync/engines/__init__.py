"""One file per kind of rollout engine, each defining `Client` (the `EngineClient` protocol of
`sync/engine.py`) and `flag_problems(config, **server_flags)` (what keeps a server started with
those flags from serving the adapters of a `LoRAConfig`: the pre-flight check):

- `sglang`: slime's SGLang engine actors (Ray handles);
- `sglang_http`: SGLang servers by URL;
- `vllm`: vLLM servers by URL (adapters loaded from a PEFT folder per version).

    client = engines.client("vllm", root="/tmp/adapters")
    engines.check_flags("vllm", config, enable_lora=True, max_lora_rank=16)   # before training
"""

from __future__ import annotations

import importlib


def _module(kind: str):
    try:
        return importlib.import_module(f"{__name__}.{kind}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{kind}":
            raise
        raise ValueError(f"no rollout engine client {kind!r}: add "
                         f"megatron_lora/sync/engines/{kind}.py defining Client") from None


def client(kind: str, **options):
    """The engine client of `kind` (a module of this package), made with `options`."""
    return _module(kind).Client(**options)


def check_flags(kind: str, config, **server_flags) -> None:
    """Refuse, naming every flag, a server of `kind` started with `server_flags` (its own
    argument names: `max_lora_rank`, ...) that would drop or refuse the adapters of `config` (a
    `LoRAConfig`): call it before training starts."""
    problems = _module(kind).flag_problems(config, **server_flags)
    if problems:
        raise ValueError(f"{kind} cannot serve this LoRA: " + "; ".join(problems))


def hf_targets(config) -> list[str]:
    """The HF modules (`q_proj`, ...) a `LoRAConfig`'s adapters are served on."""
    from lora_common import MEGATRON_TARGET_MODULES
    from lora_common.targets import PROJECTION_TARGETS
    from megatron_lora.interop import hf_mapping

    targets = config.target_modules or MEGATRON_TARGET_MODULES
    return hf_mapping.hf_target_modules(
        [t for t in targets if t in hf_mapping.TARGETS or t in PROJECTION_TARGETS])
