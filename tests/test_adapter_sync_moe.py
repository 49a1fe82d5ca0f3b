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


def test_sglangs_loader_places_every_expert_tensor(moe_cases_run):
    """The gathered expert adapter as `--lora-sync adapter` sends it (SGLang's payload), read by
    SGLang 0.5.15.post1's own deserializer and `LoRAAdapter` (the pinned wheel): every tensor
    lands in its layer, every normalized weight names a module the adapter targets, each expert's
    gate and up stack into its `gate_up_proj` slot (A then A, B rows gate then up); in the
    shared-outer form the layer's one `[1, 2r, H]` gate/up A and `[1, H, r]` down B stay shared."""
    import types

    from megatron_lora.interop import sglang
    from support import sglang_wheel

    if sglang_wheel.missing_reason():
        pytest.skip(sglang_wheel.missing_reason())
    config, tensors = moe_cases_run[0]["EP2"]["gathered"]
    received = sglang_wheel.serializer().deserialize(sglang.encode_tensors(tensors))
    with sglang_wheel.lora_modules() as sg:
        lora_config = sg.LoRAConfig.from_dict(sglang.serving_config(config), None,
                                              base_vocab_size=tiny_moe.tiny_gpt.VOCAB)
        adapter = sg.LoRAAdapter("policy", lora_config,
                                 types.SimpleNamespace(num_hidden_layers=2), None, None, None)
        assert all(sg.get_layer_id(name) is not None for name in received)
        adapter.initialize_weights_from_tensors(received)
        targets = sg.get_normalized_target_modules(lora_config.target_modules)
        weights = {name: w for layer in adapter.layers for name, w in layer.weights.items()}
        for name in weights:
            sg.get_target_module_name(name, targets)  # raises for a weight it cannot place
    prefix = "base_model.model.model.layers"
    shared = any(".mlp.experts.gate_proj." in key for key in tensors)
    for layer in range(2):
        experts = f"{prefix}.{layer}.mlp.experts"
        for e in range(NUM_EXPERTS):
            gate, up, down = (f"{experts}.{e}.{leaf}" for leaf in ("gate_proj", "up_proj",
                                                                   "down_proj"))
            B = weights[f"{experts}.{e}.gate_up_proj.lora_B.weight"]
            assert_same(B, torch.cat([tensors[f"{gate}.lora_B.weight"],
                                      tensors[f"{up}.lora_B.weight"]]), f"{layer}/{e} gate_up B")
            assert_same(weights[f"{experts}.{e}.down_proj.lora_A.weight"],
                        tensors[f"{down}.lora_A.weight"], f"{layer}/{e} down A")
            if not shared:
                assert_same(weights[f"{experts}.{e}.gate_up_proj.lora_A.weight"],
                            torch.cat([tensors[f"{gate}.lora_A.weight"],
                                       tensors[f"{up}.lora_A.weight"]]), f"{layer}/{e} gate_up A")
                assert_same(weights[f"{experts}.{e}.down_proj.lora_B.weight"],
                            tensors[f"{down}.lora_B.weight"], f"{layer}/{e} down B")
        if shared:
            A = tensors[f"{experts}.gate_proj.lora_A.weight"]
            assert_same(weights[f"{experts}.gate_up_proj.lora_A.weight"], torch.cat([A, A], 1),
                        f"{layer} shared gate_up A")
            assert_same(weights[f"{experts}.down_proj.lora_B.weight"],
                        tensors[f"{experts}.down_proj.lora_B.weight"], f"{layer} shared down B")
    # and nothing else: per layer q/k/v -> qkv and o (A, B), and per expert gate_up and down (A,
    # B; shared-outer: each expert's gate_up B and down A, the layer's gate_up A and down B)
    per_layer = 4 + (4 * NUM_EXPERTS if not shared else 2 * NUM_EXPERTS + 2)
    assert len(weights) == 2 * per_layer
