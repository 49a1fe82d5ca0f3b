"""The adapter as a rollout engine receives it (`megatron_lora.sync.peft_tensors`): read from a
trainer's CPU copy of its parameters under slime's global names, gathered over TP, assembled
over PP; tensor for tensor what `export_peft_adapter` writes (live and offline) at TP=1,
TP=2 + SP and PP=2, and at TP=2 what the TP=1 model yields."""

from __future__ import annotations

import re

import pytest
import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, peft_reference, tiny_gpt
from support.compare import assert_same
from support.outcomes import assert_raised, outcome

CONFIG = LoRAConfig(r=4, alpha=8)
LAYOUTS = ["tp2_sp", "tp1", "pp2"]
PREFIX = "module.module."  # slime's DDP prefix of its global names


def _slime_backup(model, layer_offset: int = 0) -> dict[str, torch.Tensor]:
    """What slime's CPU backup holds: every parameter, copied (no TP attributes), under its
    global name (`module.module.decoder.layers.<local + stage offset>...`)."""
    def global_name(name):
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match is None:
            return PREFIX + name
        return f"{PREFIX}decoder.layers.{int(match.group(1)) + layer_offset}.{match.group(2)}"

    return {global_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _evidence(model, backup, out_dir):
    """This rank's yield, rank 0's gathered adapter, and (rank 0) the live and offline exports."""
    import torch.distributed as dist

    from megatron_lora import (
        export_peft_adapter,
        gather_peft_adapter,
        iter_peft_tensors,
        save_lora_checkpoint,
    )

    r = {"yielded": dict(iter_peft_tensors(backup, model))}
    gathered = gather_peft_adapter(backup, model, base_model_name_or_path="tiny")
    export_peft_adapter(model, f"{out_dir}/live", base_model_name_or_path="tiny")
    save_lora_checkpoint(model, f"{out_dir}/adapter.safetensors")
    if dist.get_rank() == 0:
        export_peft_adapter(f"{out_dir}/adapter.safetensors", f"{out_dir}/offline",
                            base_model_name_or_path="tiny")
        r["gathered"] = (gathered.config, gathered.tensors())
        r["live"] = peft_reference.read_peft_folder(f"{out_dir}/live")
        r["offline"] = peft_reference.read_peft_folder(f"{out_dir}/offline")
    else:
        r["gathered"] = gathered
    dist.barrier()
    return r


def _errors(model, backup):
    from megatron_lora import gather_peft_adapter

    def error_of(tensors):
        return outcome(ValueError, gather_peft_adapter, tensors, model)

    qkv_B = next(n for n in backup
                 if n.endswith("layers.0.self_attention.linear_qkv.lora_B.weight"))
    fc2_A = next(n for n in backup if n.endswith("layers.1.mlp.linear_fc2.lora_A.weight"))
    local_names = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "missing": error_of({n: t for n, t in backup.items() if n != qkv_B}),
        "stray": error_of({**backup, f"{PREFIX}decoder.layers.7.mlp.linear_fc2.lora_A.weight":
                           backup[fc2_A]}),
        "twice": error_of({**backup, "other." + qkv_B[len(PREFIX):]: backup[qkv_B]}),
        "shape": error_of({**backup, fc2_A: torch.zeros(4, 3)}),
        "no_prefix_ok": outcome(ValueError, gather_peft_adapter, local_names, model),
        # only rank 1 is handed a bad tensor: both ranks refuse (none waits in a gather)
        "one_rank": error_of({**backup, fc2_A: backup[fc2_A].to(torch.int32)}
                             if torch.distributed.get_rank() == 1 else backup),
    }


def producer_cases(out_dir: str):
    from megatron.core import parallel_state

    from megatron_lora import lora_spec

    out = {}
    for layout in LAYOUTS:
        tp, pp, sp = {"tp2_sp": (2, 1, True), "tp1": (1, 1, False), "pp2": (1, 2, False)}[layout]
        initialize_model_parallel(tp=tp, pp=pp)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        config = tiny_gpt.transformer_config(num_layers=4 if pp > 1 else 2, sequence_parallel=sp,
                                             pipeline_dtype=torch.float32)
        from megatron.core.models.gpt import GPTModel

        torch.manual_seed(0)
        model = GPTModel(config, lora_spec(tiny_gpt.local_spec(), CONFIG),
                         vocab_size=tiny_gpt.VOCAB, max_sequence_length=tiny_gpt.SEQ,
                         position_embedding_type="rope", pre_process=stage == 0,
                         post_process=stage == pp - 1)
        lora_helpers.set_nonzero_B(model, seed=7 + stage)
        backup = _slime_backup(model, layer_offset=stage * (4 // pp) if pp > 1 else 0)
        before = {n: t.clone() for n, t in backup.items()}
        out[layout] = _evidence(model, backup, f"{out_dir}/{layout}")
        # the backup before and after the reads: the test says which tensor a read changed
        out[layout]["backup"] = (before, {n: t.clone() for n, t in backup.items()})
        if layout == "tp1":
            out[layout]["errors"] = _errors(model, backup)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return run_on_ranks(producer_cases, world_size=2,
                        args=(str(tmp_path_factory.mktemp("adapter-sync")),))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_yielded_tensors_are_the_peft_export_tensor_for_tensor(cases, layout):
    rank0, rank1 = (rank[layout] for rank in cases)
    config, tensors = rank0["gathered"]
    live_config, live = rank0["live"]
    offline_config, offline = rank0["offline"]
    assert_same(tensors, live, f"{layout}: gathered vs live export")
    assert_same(offline, live, f"{layout}: offline export vs live export")
    assert config == live_config == offline_config
    # The contributions: one rank per stage yields its own layers (global indices), every
    # other rank nothing; together they are the whole adapter, each tensor once.
    yielded = {**rank0["yielded"], **rank1["yielded"]}
    assert len(rank0["yielded"]) + len(rank1["yielded"]) == len(yielded)
    assert_same(yielded, live, f"{layout}: yielded vs live export")
    layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in live}
    if layout == "pp2":
        assert {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in rank0["yielded"]} == {0, 1}
        assert {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in rank1["yielded"]} == {2, 3}
        assert layers == {0, 1, 2, 3}
    else:
        assert rank1["yielded"] == {} and rank1["gathered"] is None
        assert layers == {0, 1}
    assert len(live) == len(layers) * 7 * 2  # q, k, v, o, gate, up, down; A and B
    assert all(t.any() for k, t in live.items() if "lora_B" in k), "every B is non-zero"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["exclude_modules"] is None
    for rank, r in enumerate((rank0, rank1)):
        before, after = r["backup"]
        assert_same(after, before, f"{layout} rank {rank}: slime's backup after the reads")


def test_tp2_sp_yields_what_tp1_yields(cases):
    """The same seeds give the same adapters at every TP size: the gathered, split tensors of
    the TP=2 + SP model are the TP=1 model's, bit for bit."""
    assert_same(cases[0]["tp2_sp"]["gathered"][1], cases[0]["tp1"]["gathered"][1], "TP=2 vs TP=1")


def test_bad_mappings_are_named(cases):
    errors = cases[0]["tp1"]["errors"]
    assert_raised(errors["missing"], r"no tensor for 1 adapter\(s\) of the model, e\.g\. "
                                     r"'decoder\.layers\.0\.self_attention\.linear_qkv\.lora_B")
    assert_raised(errors["stray"], re.escape("module.module.decoder.layers.7.mlp.linear_fc2"))
    assert_raised(errors["stray"], "another pipeline stage")
    assert_raised(errors["twice"], "matches several tensors")
    assert_raised(errors["shape"], re.escape("decoder.layers.1.mlp.linear_fc2.lora_A.weight"))
    assert_raised(errors["shape"], re.escape("(4, 3)"))
    # a live model's own names (no prefix) are names like any other
    assert errors["no_prefix_ok"].kind == "returned"
    fc2_A = re.escape("decoder.layers.1.mlp.linear_fc2.lora_A.weight")
    assert_raised(cases[1]["tp1"]["errors"]["one_rank"],
                  rf"^full_adapter_tensors: '.*{fc2_A}' has dtype torch.int32")
    assert_raised(errors["one_rank"], rf"^rank 1 refused: ValueError: full_adapter_tensors: "
                                      rf"'.*{fc2_A}' has dtype torch.int32")
