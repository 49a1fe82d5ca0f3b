"""Checkpoints of LoRA MoE models: adapter checkpoints (global expert index) and Megatron dist
checkpoints reload at another EP / ETP size and into the other expert implementation; a
checkpoint of another expert count or expert layout is refused, naming why, before any
parameter changes."""

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import moe_checkpoint_cases

RESHARDS = {  # (TE grouped experts, expert layout, saved at, loaded at)
    "sequential per_expert": (False, "per_expert", "EP2", ["ETP2", "EP1"]),
    "grouped shared_outer": (True, "shared_outer", "ETP2", ["EP2", "EP1"]),
}


@pytest.fixture(scope="module", params=list(RESHARDS))
def reshard(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_ckpt")
    te, layout, saved_at, load_at = RESHARDS[request.param]
    ranks = run_on_ranks(moe_checkpoint_cases.reshard_cases, world_size=2,
                         args=(str(out), te, layout, saved_at, load_at),
                         setup=te_emulation.enable, timeout=900)
    return request.param, ranks


@pytest.mark.parametrize("kind", ["adapter", "dist"])
def test_checkpoints_reload_at_another_expert_layout(reshard, kind):
    name, ranks = reshard
    saved = ranks[0]["saved"]
    for rank in ranks:
        for layout in RESHARDS[name][3]:
            got = rank[layout][kind]
            assert sorted(got["adapters"]) == sorted(saved["adapters"]), f"{name} {layout}"
            for tensor, value in saved["adapters"].items():
                assert torch.equal(got["adapters"][tensor], value), f"{name} {layout} {tensor}"
            torch.testing.assert_close(got["logits"], saved["logits"], rtol=0, atol=2e-6,
                                       msg=f"{name} {kind} checkpoint loaded at {layout}")
            assert rank[layout]["dist_missing"] == []


@pytest.fixture(scope="module")
def interchange(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_interchange")
    rank, = run_on_ranks(moe_checkpoint_cases.interchange_cases, world_size=1,
                         args=(str(out),), setup=te_emulation.enable, timeout=900)
    return rank


def test_sequential_adapter_checkpoint_loads_into_grouped_experts(interchange):
    sequential, grouped = interchange["sequential"], interchange["grouped"]
    assert sorted(grouped["adapters"]) == sorted(sequential["adapters"])
    for name, value in sequential["adapters"].items():
        assert torch.equal(grouped["adapters"][name], value), name
    torch.testing.assert_close(grouped["logits"], sequential["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("expert_count", r"geometry mismatch: num_moe_experts: 4 vs 8 in the model; .* lacks tensor "
                     r"decoder.layers.0.mlp.experts.linear_fc1.lora_A.weight4, .* and \d+ more"),
    ("layout", r"LoRAConfig.expert_layout is 'shared_outer' in the model, 'per_expert' in"),
    ("dist_expert_count", r"tensor decoder.layers.mlp.router.weight has global shape "
                          r"\[2, 4, 64\] in the checkpoint, \[2, 8, 64\] in the model"),
    # per-expert fc1 A (an expert axis of 4) against shared-outer's one A per layer
    ("dist_layout", r"tensor decoder.layers.mlp.experts.experts.linear_fc1.lora_A.weight has "
                    r"global shape \[2, 4, 4, 64\] in the checkpoint, \[2, 4, 64\] in the model "
                    r"\(an adapter of another rank, expert count or expert layout\)"),
])
def test_checkpoint_that_does_not_fit_is_refused_untouched(interchange, case, message):
    import re

    error, untouched = interchange[case]
    assert error is not None and re.search(message, error), error
    assert untouched


STRICT = ["log_unexpected", "raise_unexpected"]


@pytest.fixture(scope="module")
def base_only(tmp_path_factory):
    rank, = run_on_ranks(moe_checkpoint_cases.base_only_cases, world_size=1,
                         args=(str(tmp_path_factory.mktemp("base_only")), STRICT),
                         setup=te_emulation.enable, timeout=600)
    return rank


@pytest.mark.parametrize("strict", STRICT)
def test_base_only_dist_checkpoint_loads_into_grouped_expert_adapters(base_only, strict):
    # A grouped linear's per-expert fc1 B goes through the SwiGLU factory as the dense fc1's B
    # does: with the checkpoint lacking it, the load must neither raise nor touch the adapters.
    rank = base_only
    for layout in ("per_expert", "shared_outer"):
        got = rank[strict, layout]
        assert not got["unexpected"], f"{strict} {layout}: {got['unexpected']}"
        assert got["missing"] == got["adapter_names"], f"{layout}: missing {got['missing']}"
        assert any(".experts.linear_fc1.lora_B.weight" in n for n in got["adapter_names"])
        for name, value in got["adapters_before"].items():
            assert torch.equal(got["adapters_after"][name], value), f"{layout}: {name} changed"
        assert sorted(got["base_after"]) == sorted(rank["base"])
        for name, value in rank["base"].items():
            assert torch.equal(got["base_after"][name], value), f"{layout}: base {name}"
