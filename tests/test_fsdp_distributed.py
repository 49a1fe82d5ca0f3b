"""fsdp_lora under real torch FSDP on 2 gloo ranks equals single-process training.

One launch runs every multi-rank check (spawning ranks costs more than the checks):
- FSDP2 on a model built on the meta device: LoRA drawn at `to_empty`, 5 AdamW steps, the
  merged-weight stream, merge/unmerge, disable_lora, save and load of a PEFT adapter;
- FSDP1 (`use_orig_params=True`): 5 steps, the merged-weight stream, save and load.
The test process trains the same model without FSDP and compares.
"""

from __future__ import annotations

import pytest
import torch

from fsdp_lora import (
    LoRAConfig,
    apply_lora_to_fsdp_model,
    disable_lora,
    get_lora_parameters,
    iter_merged_weights,
    load_peft_adapter,
    merge_lora_weights,
    save_peft_adapter,
    unmerge_lora_weights,
)
from fsdp_lora.full_params import full_value, hf_module_name
from megatron_cpu.processes import run_on_ranks
from support.compare import assert_same
from support.fsdp_llama import BATCH, build_llama, token_batches
from support.outcomes import assert_raised, outcome

CONFIG = LoRAConfig(r=4, alpha=8, seed=11)
STEPS = 5
LR = 1e-2


def lora_state(model) -> dict[str, torch.Tensor]:
    """Full LoRA factors by HF name (FSDP2 DTensors gathered)."""
    return {hf_module_name(n): full_value(p).clone()
            for n, p in model.named_parameters() if "lora_" in n}


def train(model, rows: slice) -> list[float]:
    """STEPS AdamW steps on the LoRA parameters, fitting one batch (so the loss must fall);
    the loss is averaged over all ranks."""
    optimizer = torch.optim.AdamW(get_lora_parameters(model).values(), lr=LR)
    tokens = token_batches(1)[0][rows]
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens).logits


def _fsdp2_checks(rank: int, rows: slice, tmp: str, probe: torch.Tensor) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out: dict = {}
    mesh = init_device_mesh("cpu", (2,))
    model = apply_lora_to_fsdp_model(build_llama(device="meta"), CONFIG)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")          # LoRA factors are drawn here
    out["initial_lora"] = lora_state(model)
    # The base weights come from a checkpoint, as in any meta-device start.
    base = build_llama()
    set_model_state_dict(model, base.state_dict(),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    with torch.no_grad():
        for name, buffer in model.named_buffers():   # RoPE's inv_freq is not in state_dict
            buffer.copy_(base.get_buffer(name))
    out["apply_after_wrap"] = outcome(ValueError, apply_lora_to_fsdp_model, model, CONFIG)

    out["losses"] = train(model, rows)
    out["final_lora"] = lora_state(model)
    merged = dict(iter_merged_weights(model))
    out["merged"] = merged if rank == 0 else None

    model.eval()
    out["logits"] = logits(model, probe)
    with disable_lora(model):
        out["disabled_logits"] = logits(model, probe)
    weight = model.model.layers[0].self_attn.q_proj.weight
    out["q_weight_before"] = full_value(weight).clone()
    merge_lora_weights(model)
    out["merged_q_weight"] = full_value(weight).clone()
    out["merged_logits"] = logits(model, probe)
    unmerge_lora_weights(model)
    out["q_weight_after"] = full_value(weight).clone()

    save_peft_adapter(model, f"{tmp}/fsdp2")
    fresh = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    for layer in fresh.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    load_peft_adapter(fresh, f"{tmp}/fsdp2")
    out["loaded_lora"] = lora_state(fresh)
    return out


def _fsdp1_checks(rank: int, rows: slice, tmp: str) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    out: dict = {}
    model = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                 use_orig_params=True, device_id=torch.device("cpu"))
    out["losses"] = train(model, rows)
    with FSDP.summon_full_params(model):
        out["final_lora"] = lora_state(model)
    merged = dict(iter_merged_weights(model))
    out["merged"] = merged if rank == 0 else None
    save_peft_adapter(model, f"{tmp}/fsdp1")
    fresh = FSDP(apply_lora_to_fsdp_model(build_llama(), CONFIG),
                 auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                 use_orig_params=True, device_id=torch.device("cpu"))
    load_peft_adapter(fresh, f"{tmp}/fsdp1")
    with FSDP.summon_full_params(fresh):
        out["loaded_lora"] = lora_state(fresh)
    return out


def fsdp_runs(tmp: str, probe: torch.Tensor) -> dict:
    rank = torch.distributed.get_rank()
    rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    return {"fsdp2": _fsdp2_checks(rank, rows, tmp, probe), "fsdp1": _fsdp1_checks(rank, rows, tmp)}


# ---------------------------------------------------------------- the test process


@pytest.fixture(scope="module")
def probe():
    return token_batches(1, seed=7)[0][:2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, probe):
    tmp = tmp_path_factory.mktemp("fsdp")
    return run_on_ranks(fsdp_runs, world_size=2, args=(str(tmp), probe), timeout=240), tmp


@pytest.fixture(scope="module")
def reference():
    """The same model and data, one process, no FSDP."""
    model = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    initial = lora_state(model)
    losses = train(model, slice(None))
    return {"model": model.eval(), "initial_lora": initial, "losses": losses,
            "final_lora": lora_state(model), "merged": dict(iter_merged_weights(model))}


def assert_same_tensors(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def test_fsdp2_meta_init_draws_the_same_lora_as_an_eager_model(ranks, reference):
    (rank0, rank1), _ = ranks
    for rank in (rank0, rank1):
        initial = rank["fsdp2"]["initial_lora"]
        assert initial.keys() == reference["initial_lora"].keys()
        for name, value in reference["initial_lora"].items():
            assert_same(initial[name], value, name)
    initial = rank0["fsdp2"]["initial_lora"]
    assert [n for n, v in initial.items() if "lora_B" in n and v.any()] == []  # B = 0


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1"])
def test_training_on_two_ranks_equals_one_process(ranks, reference, backend):
    (rank0, rank1), _ = ranks
    assert rank0[backend]["losses"] == rank1[backend]["losses"]
    assert rank0[backend]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]   # the adapter did learn
    assert_same_tensors(rank0[backend]["final_lora"], reference["final_lora"])
    assert_same_tensors(rank1[backend]["final_lora"], reference["final_lora"])
    assert max(v.abs().max().item() for n, v in reference["final_lora"].items()
               if "lora_B" in n) > 1e-3


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1"])
def test_merged_weight_stream_has_hf_names_and_merged_values(ranks, reference, backend):
    (rank0, _), _ = ranks
    base_names = {n for n, _ in build_llama().named_parameters()}
    assert set(reference["merged"]) == base_names
    assert_same_tensors(rank0[backend]["merged"], reference["merged"])


def test_fsdp2_merge_disable_and_unmerge(ranks, reference, probe):
    (rank0, rank1), _ = ranks
    fsdp2 = rank0["fsdp2"]
    torch.testing.assert_close(fsdp2["logits"], logits(reference["model"], probe),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fsdp2["merged_logits"], fsdp2["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fsdp2["merged_q_weight"],
                               reference["merged"]["model.layers.0.self_attn.q_proj.weight"],
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fsdp2["merged_q_weight"], fsdp2["q_weight_before"])
    torch.testing.assert_close(fsdp2["q_weight_after"], fsdp2["q_weight_before"],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(fsdp2["disabled_logits"], logits(build_llama(), probe),
                               atol=1e-5, rtol=1e-4)
    assert_raised(fsdp2["apply_after_wrap"], "already wrapped by FSDP")


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1"])
def test_adapter_saved_under_fsdp_loads_everywhere(ranks, reference, probe, backend):
    from peft import PeftModel

    (rank0, rank1), tmp = ranks
    # every rank read the adapter back into a fresh sharded model
    assert_same_tensors(rank0[backend]["loaded_lora"], rank0[backend]["final_lora"], atol=0)
    assert_same_tensors(rank1[backend]["loaded_lora"], rank0[backend]["final_lora"], atol=0)
    expected = logits(reference["model"], probe)
    single = load_peft_adapter(apply_lora_to_fsdp_model(build_llama(), CONFIG), tmp / backend)
    torch.testing.assert_close(logits(single.eval(), probe), expected, atol=1e-5, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(build_llama(), str(tmp / backend))
    torch.testing.assert_close(logits(peft_model.eval(), probe), expected, atol=1e-5, rtol=1e-4)
