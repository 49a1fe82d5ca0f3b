"""LoRA on megatron-core's MoE experts: every expert implementation, both adapter layouts, and
expert parallelism (EP), expert tensor parallelism (ETP), TP and SP, proven equal.

The rank functions (`support/moe_cases.py`) return losses, logits and full adapter tensors by
checkpoint name (global expert index); the tests judge them here.
"""

import re

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import moe_cases, tiny_moe

# Losses agree to float rounding; adapters after 3 Adam steps to the rounding that Adam's
# normalization amplifies (grads summed in another order: ETP, SP shards, EP all-to-all).
LOSS_RTOL = 1e-5
ADAPTER_TOL = dict(rtol=1e-4, atol=1e-5)


# ----- expert implementations (one rank, TE emulated) --------------------------------------

@pytest.fixture(scope="module")
def implementations():
    rank, = run_on_ranks(moe_cases.implementation_cases, world_size=1, setup=te_emulation.enable)
    return rank


EXPECTED_CLASSES = {"SequentialMLP": "SequentialMLP", "SequentialMLP (TE linears)": "SequentialMLP",
                    "TEGroupedMLP": "TEGroupedMLP", "TEGroupedMLP shared_outer": "TEGroupedMLP",
                    "SequentialMLP + shared experts": "SequentialMLP"}


@pytest.mark.parametrize("name", list(moe_cases.IMPLEMENTATIONS))
def test_b0_is_the_base_moe_model_bit_for_bit(implementations, name):
    r = implementations[name]
    assert r["experts_class"] == EXPECTED_CLASSES[name]
    assert torch.equal(r["b0"], r["base"]), f"{name}: LoRA with B = 0 changed the logits"
    assert not torch.equal(r["lora"], r["base"])  # with B != 0 the adapters do act
    assert torch.equal(r["disabled"], r["base"]), f"{name}: disable_lora is not the base"


def trainable(layout: str, shared_ffn: int | None) -> int:
    """Analytic adapter size of the tiny MoE GPT (targets qkv, proj, fc1, fc2)."""
    from support.tiny_gpt import Geometry

    g, r, E, F = Geometry(), moe_cases.CONFIG.r, tiny_moe.EXPERTS, tiny_moe.MOE_FFN
    attention = r * (g.hidden + g.qkv_out) + r * (g.heads * g.kv_channels + g.hidden)
    if layout == "per_expert":  # per expert: fc1 A [r, H], B [2F, r]; fc2 A [r, F], B [H, r]
        experts = E * r * (g.hidden + 2 * F + F + g.hidden)
    else:  # fc1's A and fc2's B once per layer, the rest per expert
        experts = r * g.hidden + E * r * 2 * F + E * r * F + r * g.hidden
    S = shared_ffn or 0  # shared experts: one dense SwiGLU MLP of ffn S
    shared = r * (g.hidden + 2 * S) + r * (S + g.hidden) if S else 0
    return g.layers * (attention + experts + shared)


@pytest.mark.parametrize("name", list(moe_cases.IMPLEMENTATIONS))
def test_trainable_count_is_analytic(implementations, name):
    _, _, layout, shared_ffn = moe_cases.IMPLEMENTATIONS[name]
    assert implementations[name]["trainable"] == trainable(layout, shared_ffn)


@pytest.mark.parametrize("name", list(moe_cases.IMPLEMENTATIONS))
def test_merged_equals_unmerged_and_the_stream_equals_the_merge(implementations, name):
    r = implementations[name]
    torch.testing.assert_close(r["merged"], r["lora"], rtol=0, atol=1e-5,
                               msg=f"{name}: merged logits differ from unmerged")
    for weight, (streamed, merged) in r["stream_equals_merge"].items():
        assert torch.equal(streamed, merged), f"{name}: {weight} streamed != merged"


def test_sequential_experts_equal_grouped_experts_for_the_same_weights(implementations):
    sequential, grouped = implementations["SequentialMLP"], implementations["TEGroupedMLP"]
    torch.testing.assert_close(grouped["lora"], sequential["lora"], rtol=0, atol=1e-6)
    assert sorted(grouped["grads"]) == sorted(sequential["grads"])  # same checkpoint names
    for name, grad in sequential["grads"].items():
        torch.testing.assert_close(grouped["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ----- targets and refusals (one rank) -------------------------------------------------------

def test_targets_select_dense_shared_and_routed_experts_separately():
    selected, = run_on_ranks(moe_cases.target_cases, world_size=1)
    routed = [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1" for e in range(4)]
    assert selected[("linear_fc1",)] == sorted(["decoder.layers.0.mlp.linear_fc1", *routed,
                                                "decoder.layers.1.mlp.shared_experts.linear_fc1"])
    assert selected[("experts.linear_fc1",)] == routed
    assert selected[("shared_experts.linear_fc2",)] == [
        "decoder.layers.1.mlp.shared_experts.linear_fc2"]
    assert selected[("mlp.linear_fc1",)] == ["decoder.layers.0.mlp.linear_fc1"]
    assert selected[("linear_proj", "experts.linear_fc2")] == sorted(
        [f"decoder.layers.{i}.self_attention.linear_proj" for i in range(2)]
        + [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2" for e in range(4)])


@pytest.fixture(scope="module")
def refusals():
    rank, = run_on_ranks(moe_cases.bad_input_cases, world_size=1)
    return rank


REFUSALS = {
    "shared_outer_spec": r"'shared_outer' cannot be held by mlp.experts \(SequentialMLP\)",
    "shared_outer_posthoc": r"'shared_outer' cannot be held by decoder.layers.0.mlp.experts",
    "router": r"'decoder.layers.0.mlp.router' is a TopKRouter, not a Megatron parallel linear",
    "single_expert_exclude": r"names one expert of a layer.*exclude "
                             r"'decoder.layers.0.mlp.experts.linear_fc1'",
    "experts_on_dense_spec": r"\['experts.linear_fc1'\] match no submodule.*no MoE experts",
    "experts_on_dense_posthoc": r"\['experts.linear_fc1'\] match no module.*no MoE experts",
    "shared_expert_overlap": r"does not support moe_shared_expert_overlap=True",
    "use_transformer_engine_op_fuser": r"does not support use_transformer_engine_op_fuser=True",
    "moe_mlp_glu_interleave_size": r"does not support moe_mlp_glu_interleave_size=32",
    "moe_single_grouped_weight": r"does not support moe_single_grouped_weight=True",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_moe_input_is_named_before_anything_changes(refusals, case):
    message = refusals[case]
    assert message is not None and message.startswith("ValueError"), f"{case}: {message}"
    assert re.search(REFUSALS[case], message), f"{case}: {message}"


def test_refusals_leave_the_model_untouched(refusals):
    no_lora, before, after = refusals["posthoc_untouched"]
    assert no_lora and refusals["dense_untouched"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert refusals["overlap_without_shared_targets"] is None  # refused only where it applies


def test_legacy_grouped_mlp_is_refused_by_name(refusals):
    if refusals["legacy_grouped"] == "absent":
        pytest.skip("this megatron-core has no legacy GroupedMLP")
    assert "legacy GroupedMLP" in refusals["legacy_grouped"]
    assert "CUDA-only grouped_gemm" in refusals["legacy_grouped"]


# ----- the grouped adapter's arithmetic (in process) ----------------------------------------

@pytest.mark.parametrize("shared", [None, "A", "B"])
def test_grouped_adapter_equals_per_expert_autograd_for_both_gemm_paths(shared):
    """`grouped_lora_output` (loop and torch._grouped_mm, which runs on CPU in fp32) against
    plain autograd expert by expert, with an expert that gets no tokens."""
    from megatron_lora.layers.grouped_matmul import GROUPED_MM, LOOP, grouped_lora_output

    generator = torch.Generator().manual_seed(0)
    splits, r, d_in, d_out, scaling = [5, 0, 7, 4], 4, 8, 12, 0.5

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    x, base = draw(sum(splits), d_in), draw(sum(splits), d_out)
    A = draw(r, d_in) if shared == "A" else draw(len(splits), r, d_in)
    B = draw(d_out, r) if shared == "B" else draw(len(splits), d_out, r)
    grad = draw(sum(splits), d_out)
    results = {}
    for impl in (LOOP, GROUPED_MM, "reference"):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        if impl == "reference":
            out = base.clone() + torch.cat([
                scaling * (xe @ (As if shared == "A" else As[e]).t())
                @ (Bs if shared == "B" else Bs[e]).t() for e, xe in enumerate(xs.split(splits))])
        else:
            out = grouped_lora_output(base.clone(), xs, As, Bs, splits, scaling, impl)
        out.backward(grad)
        results[impl] = (out.detach(), xs.grad, As.grad, Bs.grad)
    for impl in (LOOP, GROUPED_MM):
        for what, got, want in zip(("out", "dx", "dA", "dB"), results[impl], results["reference"],
                                   strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{impl} {what}")


# ----- training parity over parallel layouts (two ranks per launch) -------------------------

SEQUENTIAL_RUNS = [(layout, "per_expert") for layout in moe_cases.LAYOUTS]
GROUPED_RUNS = ([("EP1", "per_expert"), ("EP2", "per_expert"), ("ETP2", "per_expert")]
                + [(layout, "shared_outer") for layout in moe_cases.LAYOUTS])


@pytest.fixture(scope="module")
def sequential_training():
    return run_on_ranks(moe_cases.train_runs, world_size=2, args=(SEQUENTIAL_RUNS, False),
                        timeout=900)


@pytest.fixture(scope="module")
def grouped_training():
    """Grouped experts next to shared experts (the dense rule, over the dense TP group)."""
    return run_on_ranks(moe_cases.train_runs, world_size=2,
                        args=(GROUPED_RUNS, True, moe_cases.SHARED_FFN),
                        setup=te_emulation.enable, timeout=900)


# EP=2 and ETP=2 at once: 4 ranks, with EP=1 on the same 4 ranks as the reference
FOUR_RANK_SEQUENTIAL_RUNS = [("EP1", "per_expert")] + [
    (layout, "per_expert") for layout in moe_cases.LAYOUTS_4]
FOUR_RANK_GROUPED_RUNS = [(layout, expert_layout) for expert_layout in ("per_expert",
                                                                        "shared_outer")
                          for layout in ("EP1", "EP2 ETP2")]


@pytest.fixture(scope="module")
def four_rank_training():
    ranks = run_on_ranks(moe_cases.four_rank_runs, world_size=4,
                         args=(FOUR_RANK_SEQUENTIAL_RUNS, FOUR_RANK_GROUPED_RUNS,
                               moe_cases.SHARED_FFN), setup=te_emulation.enable, timeout=900)
    return {which: [rank[which] for rank in ranks] for which in ("sequential", "grouped")}


def assert_trains_like_ep1(ranks, run, adapter_tol=ADAPTER_TOL):
    layout, expert_layout = run
    reference = ranks[0][("EP1", expert_layout)]
    # Routing reached every expert of every layer, and the loss moved.
    assert sorted(reference["routed"]) == [(layer, e) for layer in (1, 2)
                                           for e in range(tiny_moe.EXPERTS)]
    assert min(reference["routed"].values()) > 0
    assert len(set(reference["losses"])) == moe_cases.STEPS
    for rank, results in enumerate(ranks):
        got = results[run]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]),
                                   rtol=LOSS_RTOL, atol=0, msg=f"rank {rank} {run}: losses")
        assert sorted(got["adapters"]) == sorted(reference["adapters"]), f"{run}: adapter names"
        for name, value in reference["adapters"].items():
            torch.testing.assert_close(got["adapters"][name], value, **adapter_tol,
                                       msg=f"rank {rank} {run}: {name}")


@pytest.mark.parametrize("run", SEQUENTIAL_RUNS[1:], ids=lambda run: run[0])
def test_sequential_experts_train_like_ep1(sequential_training, run):
    assert_trains_like_ep1(sequential_training, run)


@pytest.mark.parametrize("run", [run for run in GROUPED_RUNS if run[0] != "EP1"],
                         ids=lambda run: f"{run[0]} {run[1]}")
def test_grouped_experts_train_like_ep1(grouped_training, run):
    assert_trains_like_ep1(grouped_training, run)


FOUR_RANK_CASES = ([("sequential", run) for run in FOUR_RANK_SEQUENTIAL_RUNS[1:]]
                   + [("grouped", run) for run in FOUR_RANK_GROUPED_RUNS if run[0] != "EP1"])


@pytest.mark.parametrize("which, run", FOUR_RANK_CASES,
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]} {v[1]}")
def test_ep2_with_etp2_on_four_ranks_trains_like_ep1(four_rank_training, which, run):
    """EP=2 and ETP=2 together (each ETP group's ranks hold different tokens, so the
    dispatcher's gathers have unequal pieces): the same losses and adapters as EP=1. Adam
    normalizes each grad's size away, so an element whose grad is at fp32 rounding level moves
    by about the learning rate either way: measured, one fc1 B element of the grouped run 1.5e-5
    apart (1.5e-3 of lr 1e-2) while the losses agree to 2e-8; hence atol 3e-5 here."""
    assert_trains_like_ep1(four_rank_training[which], run, dict(rtol=1e-4, atol=3e-5))


def test_grouped_runs_carry_shared_expert_adapters(grouped_training):
    names = grouped_training[0][("EP1", "shared_outer")]["adapters"]
    assert {n for n in names if ".shared_experts." in n} == {
        f"decoder.layers.{layer}.mlp.shared_experts.{fc}.lora_{m}.weight"
        for layer in (0, 1) for fc in ("linear_fc1", "linear_fc2") for m in "AB"}


@pytest.mark.parametrize("which", ["sequential", "grouped"])
def test_adapter_dropout_on_experts_needs_etp1(request, which):
    ranks = request.getfixturevalue(f"{which}_training")
    for rank in ranks:
        assert "LoRA dropout (0.1) on expert linears needs expert_tensor_parallel_size 1, got 2" \
            in rank["dropout_at_etp2"]


# ----- configuration (in process) ------------------------------------------------------------

def test_expert_layout_is_a_config_field_a_flag_and_absent_from_old_headers():
    import argparse

    from lora_common import LoRAConfig, add_lora_arguments
    from megatron_lora.interop.geometry import Geometry

    parser = add_lora_arguments(argparse.ArgumentParser())
    assert LoRAConfig.from_args(parser.parse_args([])).expert_layout == "per_expert"
    args = parser.parse_args(["--lora-expert-layout", "shared_outer"])
    assert LoRAConfig.from_args(args).expert_layout == "shared_outer"
    with pytest.raises(ValueError, match="LoRAConfig.expert_layout must be one of"):
        LoRAConfig(expert_layout="per_layer")
    config = LoRAConfig(expert_layout="shared_outer", target_modules=["experts.linear_fc1"])
    assert LoRAConfig.from_dict(config.to_dict(), require_all=True) == config
    old_header = {k: v for k, v in LoRAConfig().to_dict().items() if k != "expert_layout"}
    assert LoRAConfig.from_dict(old_header, require_all=True).expert_layout == "per_expert"
    old_geometry = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        kv_channels=16, ffn_hidden_size=96, gated_linear_unit=True)
    assert Geometry.from_dict(old_geometry).num_moe_experts is None
    with pytest.raises(ValueError,
                       match="num_moe_experts .* and moe_ffn_hidden_size .* go together"):
        Geometry(**old_geometry, num_moe_experts=4)
