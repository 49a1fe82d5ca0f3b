"""LoRA on multi-latent attention (DeepSeek-V3's): every MLA linear adapts through the same
factory and spec walk, the duplicated TE down projections get the duplicated split kind, and the
model trains the same at TP=1, TP=2+SP and TP=2 (on megatron-core's TE layer spec, emulated);
adapter and dist checkpoints saved at TP=2+SP reload at TP=1 exactly."""

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import mla_cases
from support.compare import assert_same


@pytest.fixture(scope="module")
def te_mla(tmp_path_factory):
    return run_on_ranks(mla_cases.te_spec_cases, world_size=2, setup=te_emulation.enable,
                        args=(str(tmp_path_factory.mktemp("mla")),), timeout=600)


def test_every_mla_linear_gets_its_split_kind(te_mla):
    splits = te_mla[0][(2, True)]["splits"]
    assert splits == {
        "linear_q_down_proj": ("LoRATELinear", "duplicated"),
        "linear_kv_down_proj": ("LoRATELinear", "duplicated"),
        "linear_q_up_proj": ("LoRATELayerNormColumnParallelLinear", "column"),
        "linear_kv_up_proj": ("LoRATELayerNormColumnParallelLinear", "column"),
        "linear_proj": ("LoRATERowParallelLinear", "row"),
    }
    attrs = te_mla[0][(2, True)]["attributes"]
    for name in ("linear_q_down_proj", "linear_kv_down_proj"):  # whole, both grads partial
        for m in "AB":
            key = f"decoder.layers.0.self_attention.{name}.lora_{m}.weight"
            assert attrs[key] == (False, -1, True)
            assert te_mla[0][(2, False)]["attributes"][key] == (False, -1, False)


@pytest.mark.parametrize("layout", mla_cases.TE_LAYOUTS)
def test_b_zero_is_the_base_mla_model_and_both_routes_agree(te_mla, layout):
    for rank in te_mla:
        assert_same(*rank[layout]["b0_logits"], f"{layout}: logits with B = 0 vs the plain model")
        assert_same(*rank[layout]["routes"], f"{layout}: post-hoc route vs spec route")


def test_tp2_and_sp_give_tp1_grads_and_train_like_it(te_mla):
    reference = te_mla[0][(1, False)]
    assert len(set(reference["losses"])) == mla_cases.STEPS
    for rank in te_mla:
        for layout in ((2, True), (2, False)):
            got = rank[layout]
            for name, value in reference["grads"].items():  # fp32 rounding of the grads
                torch.testing.assert_close(got["grads"][name], value, rtol=0,
                                           atol=1e-5 * value.abs().max().item(),
                                           msg=lambda m, name=name, at=layout:
                                           f"{at} grad {name}: {m}")
            assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5), layout
            # Adam turns a rounding-level grad into a step of up to lr = 1e-2; a misplaced
            # reduction or split would move whole matrices by that much.
            for name, value in reference["adapters"].items():
                torch.testing.assert_close(got["adapters"][name], value, rtol=0, atol=1e-4,
                                           msg=lambda m, name=name, at=layout:
                                           f"{at} {name}: {m}")
            torch.testing.assert_close(got["logits"], reference["logits"], rtol=0, atol=1e-5)
    for layout in ((2, True), (2, False)):  # the whole adapters stay equal on every rank
        assert_same(te_mla[1][layout]["duplicated_local"], te_mla[0][layout]["duplicated_local"],
                    f"{layout}: rank 1's duplicated adapters vs rank 0's")


@pytest.mark.parametrize("layout", mla_cases.TE_LAYOUTS)
def test_merged_equals_unmerged(te_mla, layout):
    for rank in te_mla:
        torch.testing.assert_close(rank[layout]["merged_logits"], rank[layout]["logits"],
                                   rtol=0, atol=1e-5)


def test_adapter_and_dist_checkpoints_saved_at_tp2_sp_reload_at_tp1(te_mla):
    saved = te_mla[0][(2, True)]
    for rank in te_mla:
        loaded = rank[(1, False)]["from_tp2_sp"]
        for source in ("adapter", "dist"):
            adapters, logits, *rest = loaded[source]
            assert_same(adapters, saved["adapters"], f"{source} checkpoint: adapters")
            torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
        assert loaded["dist"][2] == []  # nothing missing
