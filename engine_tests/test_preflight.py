"""The pre-flight checks (`megatron_lora.sync.engines.check_flags`, per engine) refuse, naming the
flag, exactly what the live engines then refuse: an adapter above `--max-lora-rank` (both
engines refuse the load), and for vLLM a `--max-lora-rank` outside the ranks it accepts (the
server does not start). What both accept passes the check and loads."""

from __future__ import annotations

import pytest
import torch
from conftest import MEASURED

from lora_common import LoRAConfig
from lora_common.peft_files import adapter_config_dict
from megatron_lora.sync import engines
from megatron_lora.sync.peft_tensors import PeftTensors
from support import engine_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVED_RANK = 8  # conftest.MAX_LORA_RANK: both servers run with --max-lora-rank 8


def adapter(r: int) -> PeftTensors:
    """A random PEFT adapter of rank r on every linear of the engine model."""
    head = engine_model.HIDDEN // engine_model.HEADS
    shapes = {"q_proj": (engine_model.HIDDEN, engine_model.HIDDEN),
              "k_proj": (engine_model.HIDDEN, engine_model.KV_HEADS * head),
              "v_proj": (engine_model.HIDDEN, engine_model.KV_HEADS * head),
              "o_proj": (engine_model.HIDDEN, engine_model.HIDDEN),
              "gate_proj": (engine_model.HIDDEN, engine_model.FFN),
              "up_proj": (engine_model.HIDDEN, engine_model.FFN),
              "down_proj": (engine_model.FFN, engine_model.HIDDEN)}
    generator = torch.Generator().manual_seed(r)
    modules = {}
    for layer in range(engine_model.LAYERS):
        for leaf, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if leaf in TARGETS[:4] else "mlp"
            modules[f"model.layers.{layer}.{part}.{leaf}"] = (
                0.01 * torch.randn(r, fan_in, generator=generator),
                0.01 * torch.randn(fan_out, r, generator=generator))
    config = adapter_config_dict(LoRAConfig(r=r, alpha=2 * r), list(TARGETS))
    return PeftTensors(config, modules)


REFUSAL = {"sglang": "too-wide with rank 16 is incompatible",  # SGLang's own messages
           "vllm": "LoRA rank 16 is greater than max_lora_rank 8"}
SGLANG_FLAGS = dict(enable_lora=True, max_lora_rank=SERVED_RANK, lora_target_modules=TARGETS)
VLLM_FLAGS = dict(enable_lora=True, max_lora_rank=SERVED_RANK, max_loras=2)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_an_adapter_above_max_lora_rank_is_refused_by_the_check_and_by_the_engine(
        engine, request, tmp_path):
    server = request.getfixturevalue(f"{engine}_server")
    kind, flags = (("sglang_http", SGLANG_FLAGS) if engine == "sglang" else ("vllm", VLLM_FLAGS))
    client = engines.client(kind) if engine == "sglang" else engines.client(kind, root=tmp_path)
    with pytest.raises(ValueError, match="--max-lora-rank is 8, the adapter's rank is 16"):
        engines.check_flags(kind, LoRAConfig(r=16, alpha=32), **flags)
    with pytest.raises(RuntimeError, match=REFUSAL[engine]) as refused:
        client.load([server.url], "too-wide", adapter(16), "1")
    MEASURED[f"{engine} refuses rank 16"] = str(refused.value)[-300:]
    # what passes the check loads
    engines.check_flags(kind, LoRAConfig(r=SERVED_RANK, alpha=16), **flags)
    client.load([server.url], "fits", adapter(SERVED_RANK), "1")
    client.unload([server.url], "fits")


def test_vllm_refuses_to_start_with_a_max_lora_rank_it_does_not_accept(model_dir, tmp_path):
    from conftest import require_venv

    from engine_servers import vllm

    require_venv("vllm")
    with pytest.raises(ValueError, match="--max-lora-rank 12 is not one vLLM accepts"):
        engines.check_flags("vllm", LoRAConfig(r=8, alpha=16), enable_lora=True,
                            max_lora_rank=12, max_loras=1)
    server = vllm.server(model_dir, log_path=tmp_path / "vllm.log", max_lora_rank=12)
    try:
        status = server.proc.wait(timeout=300)  # it must exit on its own, not serve
    finally:
        server.stop()
    assert status != 0
    assert "max_lora_rank" in server.log_tail(200) or "max-lora-rank" in server.log_tail(200)
