"""The per-engine pre-flight checks (`megatron_lora.sync.engines.check_flags`), engine-free: each
refusal names its flag; what an engine serves passes. (`engine_tests/test_preflight.py` shows the
live engines refusing the same.)"""

from __future__ import annotations

import pytest

from lora_common import LoRAConfig
from megatron_lora.interop import vllm
from megatron_lora.sync import engines

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_vllm_accepts_only_its_ranks_and_at_least_r():
    config = LoRAConfig(r=16, alpha=32)
    for rank in vllm.MAX_LORA_RANKS:
        problems = vllm.server_flag_problems(r=16, target_modules=ALL, enable_lora=True,
                                             max_lora_rank=rank, max_loras=1)
        assert bool(problems) == (rank < 16), (rank, problems)
    with pytest.raises(ValueError, match="--max-lora-rank 12 is not one vLLM accepts"):
        engines.check_flags("vllm", config, enable_lora=True, max_lora_rank=12, max_loras=1)
    with pytest.raises(ValueError, match="--max-lora-rank is 8, the adapter's rank is 16.*use 16"):
        engines.check_flags("vllm", config, enable_lora=True, max_lora_rank=8, max_loras=1)
    # vLLM's default --max-lora-rank is 16
    engines.check_flags("vllm", config, enable_lora=True, max_lora_rank=None, max_loras=1)
    with pytest.raises(ValueError, match="--max-lora-rank is 16, the adapter's rank is 17.*use 32"):
        engines.check_flags("vllm", LoRAConfig(r=17, alpha=32), enable_lora=True,
                            max_lora_rank=None, max_loras=1)
    with pytest.raises(ValueError, match="--enable-lora is off"):
        engines.check_flags("vllm", config, enable_lora=False, max_lora_rank=16, max_loras=1)
    with pytest.raises(ValueError, match="--max-loras is 0"):
        engines.check_flags("vllm", config, enable_lora=True, max_lora_rank=16, max_loras=0)


def test_sglang_http_checks_are_sglangs():
    config = LoRAConfig(r=8, alpha=16)
    engines.check_flags("sglang_http", config, enable_lora=True, max_lora_rank=8,
                        lora_target_modules=ALL)
    with pytest.raises(ValueError, match="--lora-target-modules .* lacks \\['down_proj'\\]"):
        engines.check_flags("sglang_http", config, enable_lora=True, max_lora_rank=8,
                            lora_target_modules=ALL[:-1])
    with pytest.raises(ValueError, match="--max-lora-rank is 4, the adapter's rank is 8"):
        engines.check_flags("sglang_http", config, enable_lora=True, max_lora_rank=4,
                            lora_target_modules=["all"])


def test_canonical_projection_targets_are_served_on_their_own_modules():
    config = LoRAConfig(r=8, alpha=16, canonical=True, target_modules=["linear_q", "linear_v"])
    assert engines.hf_targets(config) == ["q_proj", "v_proj"]
    engines.check_flags("sglang_http", config, enable_lora=True, max_lora_rank=8,
                        lora_target_modules=["q_proj", "v_proj"])
    assert engines.hf_targets(LoRAConfig(r=8, alpha=16)) == list(ALL)


def test_an_unknown_engine_is_named():
    with pytest.raises(ValueError, match="no rollout engine client 'tgi'"):
        engines.check_flags("tgi", LoRAConfig(r=8, alpha=16))
