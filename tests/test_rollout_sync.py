"""`--lora-sync`: the flag, the refusals of a run that cannot work (before any work), what a
`/generate` request adds, and the config SGLang is sent (no model needed here; the sync itself
runs on slime's own code in test_slime_actor.py)."""

from __future__ import annotations

import argparse
import logging
import math

import pytest

from lora_common import add_lora_arguments
from megatron_lora import check_lora_sync_args, lora_request_fields
from megatron_lora.interop import sglang

GOOD_SGLANG = dict(sglang_enable_lora=True, sglang_max_lora_rank=16,
                   sglang_lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"],
                   sglang_dp_size=1, sglang_max_loaded_loras=None, debug_train_only=False,
                   update_weight_transport="nccl", update_weight_mode="full",
                   offload_rollout=False, sglang_enable_weights_cpu_backup=False)


def slime_args(*argv, **sglang_args):
    args = add_lora_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    for key, value in {**GOOD_SGLANG, **sglang_args}.items():
        setattr(args, key, value)
    return args


def test_the_default_is_merged_and_adapter_mode_is_opt_in():
    assert slime_args().lora_sync == "merged"
    assert slime_args("--lora-sync", "adapter").lora_sync == "adapter"
    with pytest.raises(SystemExit):
        slime_args("--lora-sync", "both")
    assert lora_request_fields(slime_args("--use-lora")) == {}
    assert lora_request_fields(slime_args("--lora-sync", "adapter")) == {}  # no LoRA: no adapter
    assert lora_request_fields(slime_args("--use-lora", "--lora-sync", "adapter")) == {
        "lora_path": "policy"}


def test_a_good_adapter_run_passes_and_merged_mode_needs_nothing():
    check_lora_sync_args(slime_args("--use-lora", "--lora-sync", "adapter", "--lora-r", "16"))
    check_lora_sync_args(slime_args("--use-lora", **{k: None for k in GOOD_SGLANG}))
    # SGLang's fused names and "all" serve the same modules
    check_lora_sync_args(slime_args("--use-lora", "--lora-sync", "adapter",
                                    sglang_lora_target_modules=["qkv_proj", "o_proj",
                                                                "gate_up_proj", "down_proj"]))
    check_lora_sync_args(slime_args("--use-lora", "--lora-sync", "adapter",
                                    sglang_lora_target_modules=["all"]))
    # --debug-train-only starts no SGLang: its flags are not asked for
    check_lora_sync_args(slime_args("--use-lora", "--lora-sync", "adapter",
                                    debug_train_only=True, sglang_enable_lora=None))


@pytest.mark.parametrize("argv, sglang_args, culprit", [
    ((), {}, "--use-lora is off"),
    (("--use-lora",), {"sglang_enable_lora": None}, "--sglang-enable-lora is off"),
    (("--use-lora", "--lora-r", "32"), {},
     "--sglang-max-lora-rank is 16, the adapter's rank is 32"),
    (("--use-lora",), {"sglang_max_lora_rank": None}, "--sglang-max-lora-rank is None"),
    (("--use-lora",), {"sglang_lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
     "--sglang-lora-target-modules .* lacks \\['down_proj', 'gate_up_proj'\\]"),
    (("--use-lora",), {"sglang_dp_size": 2}, "--sglang-dp-size is 2"),
    (("--use-lora",), {"sglang_max_loaded_loras": 4}, "--sglang-max-loaded-loras is 4"),
    (("--use-lora",), {"update_weight_transport": "disk"}, "--update-weight-transport disk"),
    (("--use-lora",), {"update_weight_mode": "delta"}, "--update-weight-mode delta"),
    (("--use-lora", "--lora-target-modules", "linear_qkv", "linear_fc3"), {},
     "\\['linear_fc3'\\] have no HF PEFT names"),
])
def test_a_run_that_cannot_work_is_refused_naming_the_flag(argv, sglang_args, culprit):
    args = slime_args("--lora-sync", "adapter", *argv, **sglang_args)
    with pytest.raises(ValueError, match=culprit) as raised:
        check_lora_sync_args(args)
    # the message also says how to start SGLang
    assert "Start SGLang with --sglang-enable-lora --sglang-max-lora-rank" in str(raised.value)


@pytest.mark.parametrize("sglang_args, culprit", [
    ({"sglang_max_lora_rank": "16"}, r"--sglang-max-lora-rank must be an int, got '16' \(str\)"),
    ({"sglang_dp_size": "1"}, r"--sglang-dp-size must be an int, got '1'"),
    ({"sglang_lora_target_modules": "q_proj k_proj"},
     r"--sglang-lora-target-modules must be a list of module names, got 'q_proj k_proj'"),
])
def test_flags_of_the_wrong_type_are_named_not_compared(sglang_args, culprit):
    """As a YAML config passes them: a string where SGLang's flag is an int or a list."""
    args = slime_args("--use-lora", "--lora-sync", "adapter", **sglang_args)
    before = dict(vars(args))
    with pytest.raises(ValueError, match=culprit):
        check_lora_sync_args(args)
    assert vars(args) == before


def test_a_lora_flag_the_config_refuses_is_named():
    args = slime_args("--use-lora", "--lora-sync", "adapter")
    args.lora_r = "16"  # lora_r: "16" in a YAML file
    with pytest.raises(ValueError, match=r"--lora-r: LoRAConfig.r must be a positive int, "
                                         r"got '16'"):
        check_lora_sync_args(args)


def test_canonical_projection_targets_sync_under_their_own_peft_names():
    """gather_peft_adapter writes linear_q / linear_v of a canonical model as q_proj / v_proj
    (test_canonical.py): SGLang serving those two is all the run needs."""
    argv = ("--use-lora", "--lora-sync", "adapter", "--lora-canonical",
            "--lora-target-modules", "linear_q", "linear_v")
    check_lora_sync_args(slime_args(*argv, sglang_lora_target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"--sglang-lora-target-modules \['o_proj'\] lacks "
                                         r"\['qkv_proj'\].* --sglang-lora-target-modules q_proj "
                                         r"v_proj$"):
        check_lora_sync_args(slime_args(*argv, sglang_lora_target_modules=["o_proj"]))


def test_offload_rollout_without_a_cpu_backup_warns_that_the_base_is_resent(caplog):
    with caplog.at_level(logging.WARNING):
        check_lora_sync_args(slime_args("--use-lora", "--lora-sync", "adapter",
                                        offload_rollout=True))
    assert "--sglang-enable-weights-cpu-backup" in caplog.text


def test_rslora_is_folded_into_lora_alpha_for_sglang():
    """SGLang computes lora_alpha / r and ignores use_rslora: the config sent carries
    alpha * sqrt(r), so SGLang's scaling is the model's alpha / sqrt(r)."""
    peft = {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ("q_proj",),
            "peft_type": "LORA"}
    sent = sglang.serving_config(peft)
    assert sent["use_rslora"] is False and sent["target_modules"] == ["q_proj"]
    assert sglang.scaling(sent) == pytest.approx(8 / math.sqrt(16))
    assert sent["lora_alpha"] == 32  # integral values stay ints, as PEFT writes them
    plain = {**peft, "use_rslora": False}
    assert sglang.serving_config(plain) == {**plain, "target_modules": ["q_proj"]}
    assert peft["use_rslora"] is True  # the caller's dict is not changed


def test_the_base_goes_once_to_each_engine_and_after_offloads_that_drop_it():
    from megatron_lora import AdapterSync

    adapter = slime_args("--use-lora", "--lora-sync", "adapter")
    sync = AdapterSync(adapter, model=None)
    a, b = object(), object()
    sync.connect([a])
    assert sync.sends_base()          # the first sync
    sync.base_sent = True             # what push_adapter records
    assert not sync.sends_base()      # later syncs: the adapter only
    sync.connect([a])
    assert not sync.sends_base()      # the same engines again
    sync.connect([a, b])
    assert sync.sends_base()          # a new engine (slime's fault recovery) needs the base
    # --offload-rollout without SGLang's CPU copy of its weights: the base every sync
    offload = slime_args("--use-lora", "--lora-sync", "adapter", offload_rollout=True)
    dropping = AdapterSync(offload, model=None)
    dropping.connect([a])
    dropping.base_sent = True
    assert dropping.sends_base()
    kept = AdapterSync(slime_args("--use-lora", "--lora-sync", "adapter", offload_rollout=True,
                                  sglang_enable_weights_cpu_backup=True), model=None)
    kept.connect([a])
    kept.base_sent = True
    assert not kept.sends_base()
    # merged mode: the whole model every sync, no adapter
    merged = AdapterSync(slime_args("--use-lora"), model=None)
    merged.connect([a])
    merged.base_sent = True
    assert merged.sends_base() and not merged.enabled
    merged.push_adapter({}, 1)  # inert
