"""The adapter sync's producer on MoE expert adapters: read from a CPU copy of the adapters
(by their adapter-checkpoint names: global layer and expert indices) at EP=2, ETP=2 and
TP=2+SP with EP=2, `gather_peft_adapter` returns tensor for tensor what `export_peft_adapter`
writes for the same model (whose expert tensors real peft runs: test_moe_peft.py), and the
same tensors at every layout: every expert present, under its global index."""

from __future__ import annotations

import pytest
import te_emulation
import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import run_on_ranks
from support import lora_helpers, peft_reference, tiny_moe
from support.compare import assert_same

LAYOUTS = ["EP2", "ETP2", "TP2+SP EP2"]
ARCH = "Qwen3MoeForCausalLM"
NUM_EXPERTS = tiny_moe.EXPERTS


def moe_producer_cases(out_dir: str, expert_layout: str):
    import torch.distributed as dist

    from megatron_lora import export_peft_adapter, gather_peft_adapter
    from megatron_lora.sync.adapter_tensors import adapter_state
    from support import moe_cases

    out = {}
    for layout in LAYOUTS:
        sp = moe_cases.use_layout(layout)
        config = LoRAConfig(r=4, alpha=8, expert_layout=expert_layout)
        model = moe_cases.lora_moe(config, te=True, sp=sp)
        lora_helpers.set_nonzero_B(model, seed=0, scale=0.1)
        backup = {f"module.module.{n}": t.detach().clone()
                  for n, t in adapter_state(model).items()}
        gathered = gather_peft_adapter(backup, model, architecture=ARCH)
        export_peft_adapter(model, f"{out_dir}/{layout}", architecture=ARCH)
        if dist.get_rank() == 0:
            out[layout] = {"gathered": (gathered.config, gathered.tensors()),
                           "export": peft_reference.read_peft_folder(f"{out_dir}/{layout}")}
        else:
            out[layout] = {"gathered": gathered}
        dist.barrier()
    return out


@pytest.fixture(scope="module", params=["per_expert", "shared_outer"])
def moe_cases_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"adapter-sync-moe-{request.param}")
    return run_on_ranks(moe_producer_cases, world_size=2, args=(str(out), request.param),
                        setup=te_emulation.enable)


def test_expert_adapters_gathered_from_a_copy_are_the_peft_export(moe_cases_run):
    rank0, rank1 = moe_cases_run
    first = rank0[LAYOUTS[0]]["gathered"]
    experts = {int(k.split(".mlp.experts.")[1].split(".")[0]) for k in first[1]
               if ".mlp.experts." in k and k.split(".mlp.experts.")[1][0].isdigit()}
    assert experts == set(range(NUM_EXPERTS)), experts  # every expert, by global index
    for layout in LAYOUTS:
        config, tensors = rank0[layout]["gathered"]
        export_config, export_tensors = rank0[layout]["export"]
        assert config == export_config, layout
        assert_same(tensors, export_tensors, f"{layout}: gathered vs export")
        assert_same(tensors, first[1], f"{layout} vs {LAYOUTS[0]}")
        assert rank1[layout]["gathered"] is None
    assert all(isinstance(t, torch.Tensor) for t in first[1].values())
