"""Activation recompute (slime's recipes run `--recompute-granularity full`) trains LoRA exactly as
no recompute does: one step through Megatron's schedule and DDP under every recompute setting
gives the same finalized adapter grads and the same adapters after Adam, at TP=1, TP=2 + SP,
PP=2 and PP=2 with virtual stages, dense and MoE, spec and post-hoc routes, with an MTP layer,
and on the TE emulation's grouped experts (`moe_act`) and MLA (`mla_up_proj`).

Without the guard (`megatron_lora/recompute.py`) the frozen embedding leaves the decoder's input
without grad and Megatron's reentrant recompute cuts every adapter inside it off."""

from __future__ import annotations

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import recompute_cases

GRAD_TOL = dict(rtol=1e-5, atol=1e-7)
# Adam's first step is lr * g / (|g| + eps), about lr for every entry: an adapter cut off from its
# grad is off by lr. Where a grad is near eps (an expert that saw few tokens), rounding at the
# grads' 1e-7 level moves the step by up to 1.3e-5 here, 1.3e-3 of lr.
ADAM_TOL = 1e-2 * recompute_cases.LR


@pytest.fixture(scope="module")
def dense():
    return run_on_ranks(recompute_cases.dense_cases, world_size=2,
                        args=(list(recompute_cases.LAYOUTS),))


@pytest.fixture(scope="module")
def moe():
    return run_on_ranks(recompute_cases.moe_cases_, world_size=2,
                        args=(["TP1", "TP2+SP", "PP2"],))


def _judge(ranks, model: str):
    """Every setting of each (layout, model) equals that layout's "none" run on every rank;
    the reference moves every adapter (a cut-off adapter would keep its value)."""
    compared = 0
    for rank in ranks:
        for (layout, kind, setting), got in rank.items():
            if kind != model and not (model == "spec" and kind == "post-hoc"):
                continue
            ref = rank[(layout, model if kind != "post-hoc" else "spec", "none")]
            assert ref["grads"] and all(g.abs().sum() > 0 for g in ref["grads"].values())
            assert got["grads"].keys() == ref["grads"].keys(), (layout, kind, setting)
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, **GRAD_TOL,
                                           msg=f"{layout} {kind} {setting}: grad of {name}")
            for name, value in ref["adapters"].items():
                torch.testing.assert_close(got["adapters"][name], value, rtol=0, atol=ADAM_TOL,
                                           msg=f"{layout} {kind} {setting}: {name}")
            compared += 1
    return compared


def test_every_recompute_setting_trains_the_dense_adapters_as_none_does(dense):
    assert _judge(dense, "spec") == 2 * (4 * len(recompute_cases.DENSE_SETTINGS) - 2 + 4)


def test_tp2_sp_agrees_with_tp1(dense):
    """Under full recompute, TP=2 + SP computes the TP=1 model's loss and holds its adapters
    after the step (pipeline stages draw other base weights, so PP=2 is judged against its own
    run without recompute, above)."""
    ref = dense[0][("TP1", "spec", "none")]
    for rank in dense:
        for layout in ("TP1", "TP2+SP"):
            got = rank[(layout, "spec", "full uniform 1")]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), layout
            assert got["adapters"].keys() == ref["adapters"].keys()
            for name, value in ref["adapters"].items():
                torch.testing.assert_close(got["adapters"][name], value, rtol=0, atol=ADAM_TOL,
                                           msg=f"{layout}: {name}")


def test_every_recompute_setting_trains_the_moe_adapters_as_none_does(moe):
    assert _judge(moe, "moe") == 2 * 3 * len(recompute_cases.MOE_SETTINGS)


def test_mtp_layers_adapters_train_under_full_recompute():
    (rank,) = run_on_ranks(recompute_cases.mtp_case, world_size=1)
    ref, got = rank["none"], rank["full uniform 1"]
    mtp = [n for n in ref["grads"] if ".mtp." in n]
    assert mtp and all(ref["grads"][n].abs().sum() > 0 for n in mtp)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, **GRAD_TOL, msg=name)


def test_grouped_experts_and_mla_train_under_their_selective_recompute():
    ranks = run_on_ranks(recompute_cases.te_cases, world_size=2, timeout=600,
                         setup=te_emulation.enable)
    assert _judge(ranks, "TEGroupedMLP") == 2 * 2 * 4
    assert _judge(ranks, "MLA") == 2 * 2 * 3


def test_the_guard_acts_only_under_recompute_with_grad_and_is_what_makes_it_train():
    (rank,) = run_on_ranks(recompute_cases.guard_cases, world_size=1)
    # train with grad, no_grad, eval: the decoder input requires grad only in the first, and
    # only under recompute (without it the first layer's input grad is not computed)
    assert rank["none"] == {"guarded": True, "decoder_input_requires_grad": [False] * 3}
    assert rank["full uniform 1"] == {"guarded": True,
                                      "decoder_input_requires_grad": [True, False, False]}
    assert rank["unguarded_loss_requires_grad"] is False
