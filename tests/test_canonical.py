"""Canonical LoRA (one adapter per projection inside linear_qkv and linear_fc1) is PEFT's
per-projection LoRA: trained 5 Adam steps at TP=1, TP=2 and TP=2+SP it follows real PEFT's and
fsdp_lora's trajectory (losses, final adapters), with all seven projections and with q/v only;
and every downstream verb (merge per shard, disable, the merged stream, adapter and dist
checkpoints, PEFT export and a rank-r import) keeps it exact."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lora_common import LoRAConfig
from megatron_cpu.launch import run_on_ranks
from support import canonical_cases, hf_llama, peft_cases, peft_reference
from support.compare import assert_same
from support.outcomes import assert_raised

R, ALPHA = canonical_cases.CANONICAL.r, canonical_cases.CANONICAL.alpha
SCALING = ALPHA / R
# fp32 on CPU, 5 Adam steps: the two stacks sum in another order; Adam normalizes each step, so
# the differences stay at rounding level (measured: losses 1e-7 relative, adapters 7e-7,
# deltas 3e-7).
LOSS_RTOL, ADAPTER_ATOL = 1e-6, 5e-6


@pytest.fixture(scope="module")
def trained():
    return run_on_ranks(canonical_cases.training_cases, world_size=2, timeout=600)


def reference(case, train=peft_reference.train_peft):
    _, initial, _ = case
    return train(initial, R, ALPHA, canonical_cases.STEPS, canonical_cases.LR)


def assert_same_trajectory(case, expected, what):
    losses, _, final = case
    ref_losses, ref_final = expected
    assert len(set(ref_losses)) == len(ref_losses)  # the loss moves: equality means something
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL), what
    assert final.keys() == ref_final.keys()
    for key, value in ref_final.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=ADAPTER_ATOL,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")
    for module in {k.rsplit(".lora_", 1)[0] for k in final}:  # the deltas s * B @ A
        delta = final[f"{module}.lora_B.weight"] @ final[f"{module}.lora_A.weight"]
        ref = ref_final[f"{module}.lora_B.weight"] @ ref_final[f"{module}.lora_A.weight"]
        torch.testing.assert_close(SCALING * delta, SCALING * ref, rtol=0, atol=ADAPTER_ATOL,
                                   msg=lambda m, module=module: f"{what} delta {module}: {m}")


@pytest.mark.parametrize("layout", canonical_cases.LAYOUTS)
def test_canonical_lora_trains_like_peft_at_every_layout(trained, layout):
    for rank in trained:
        case = rank[("all", *layout)]
        assert_same_trajectory(case, reference(case), f"TP={layout[0]} SP={layout[1]}")


def test_canonical_lora_trains_like_fsdp_lora(trained):
    case = trained[0][("all", 1, False)]
    assert_same_trajectory(case, reference(case, peft_reference.train_fsdp_lora), "fsdp_lora")


def test_q_and_v_only_train_like_peft_q_v(trained):
    case = trained[0][("qv", 2, True)]
    _, initial, _ = case
    assert peft_reference.hf_leaves(initial) == ["q_proj", "v_proj"]
    assert_same_trajectory(case, reference(case), "q/v only at TP=2+SP")


@pytest.fixture(scope="module")
def structure():
    return run_on_ranks(canonical_cases.structure_cases, world_size=2)


def test_parameter_names_attributes_and_count(structure):
    built = structure[0][2]
    layer = "decoder.layers.0."
    names = [n for n in built["names"] if n.startswith(layer)]
    assert names == sorted(
        [f"{layer}self_attention.linear_qkv.lora_{p}.lora_{m}.weight" for p in "qkv" for m in "AB"]
        + [f"{layer}mlp.linear_fc1.lora_{p}.lora_{m}.weight" for p in ("gate", "up") for m in "AB"]
        + [f"{layer}{module}.lora_{m}.weight" for m in "AB"
           for module in ("self_attention.linear_proj", "mlp.linear_fc2")])
    attrs = built["attributes"]
    qkv = f"{layer}self_attention.linear_qkv"
    for p in "qkv":  # A whole (its grad partial over sequence shards), B split on its own rows
        assert attrs[f"{qkv}.lora_{p}.lora_A.weight"] == (False, -1, 1, True)
        assert attrs[f"{qkv}.lora_{p}.lora_B.weight"] == (True, 0, 1, False)
    assert attrs[f"{layer}mlp.linear_fc1.lora_up.lora_B.weight"] == (True, 0, 1, False)
    assert built["classes"] == ["CanonicalLoRAColumnParallelLinear", "LoRARowParallelLinear"]
    # The analytic count: each projection its own [r, hidden] A and [rows, r] B.
    g = _geometry()
    q, kv = g.num_attention_heads * g.kv_channels, g.num_query_groups * g.kv_channels
    per_layer = R * ((g.hidden_size + q) + 2 * (g.hidden_size + kv)      # q, k, v
                     + (q + g.hidden_size)                                 # o (linear_proj)
                     + 2 * (g.hidden_size + g.ffn_hidden_size)             # gate, up
                     + (g.ffn_hidden_size + g.hidden_size))                # down (linear_fc2)
    assert structure[0][1]["local_count"] == g.num_layers * per_layer
    tp2 = structure[0][2]
    split = sum(tp2["spec_route"][n].numel() for n, a in attrs.items() if a[0])
    assert structure[0][2]["local_count"] + structure[1][2]["local_count"] \
        == 2 * g.num_layers * per_layer - split


@pytest.mark.parametrize("tp", [1, 2])
def test_spec_route_equals_posthoc_route(structure, tp):
    for rank in structure:
        assert_same(rank[tp]["posthoc_route"], rank[tp]["spec_route"], f"TP={tp}")


def test_adapter_dropout_agrees_across_ranks_holding_the_same_tokens(structure):
    (tp2, _), (tp1, tp1_eval) = structure[0][2]["dropout"], structure[0][1]["dropout"]
    assert tp2 == pytest.approx(tp1, rel=1e-6) and structure[1][2]["dropout"][0] == tp2
    assert tp1_eval not in tp1  # dropout did change the training loss


def test_the_adapter_only_rules_match_projection_adapters():
    import argparse

    from lora_common.state import is_lora_parameter
    from megatron_lora import custom_megatron_init

    name = "decoder.layers.0.self_attention.linear_qkv.lora_q.lora_A.weight"
    assert is_lora_parameter(name)  # freezing, get_lora_parameters, checkpoints, weight sync
    args = argparse.Namespace(use_lora=True, lora_canonical=True)
    custom_megatron_init(args)  # slime's --only-train-params-name-list
    assert [p for p in args.only_train_params_name_list if re.search(p, name)]
    assert not [p for p in args.only_train_params_name_list
                if re.search(p, "decoder.layers.0.self_attention.linear_qkv.weight")]


def test_a_tp_size_that_cuts_through_query_groups_is_refused(structure):
    assert_raised(structure[0]["mqa_tp2"], re.escape(
        "num_query_groups=1 is not a multiple of the TP size 2"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["linear_q"]), "per-projection adapters need canonical=True"),
    (dict(canonical=True, target_modules=["linear_qkv", "linear_v"]),
     "names linear_qkv and its projection"),
    (dict(target_modules=["linear_qkv_down_proj"]), "mla_down_proj_fusion"),
])
def test_bad_target_sets_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_a_complete_set_of_projections_is_the_module():
    assert LoRAConfig(canonical=True, target_modules=["linear_q", "linear_k", "linear_v"]) \
        == LoRAConfig(canonical=True, target_modules=["linear_qkv"])
    config = LoRAConfig(canonical=True, target_modules=["linear_fc1_up", "linear_q"])
    assert config.module_targets() == {"linear_fc1": ("up",), "linear_qkv": ("q",)}


def test_a_header_written_before_the_mode_existed_reads_as_fused():
    saved = LoRAConfig(r=4).to_dict()
    del saved["canonical"]
    assert LoRAConfig.from_dict(saved, require_all=True) == LoRAConfig(r=4)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    out = tmp_path_factory.mktemp("canonical")
    qv = peft_reference.make_peft_adapter(out / "qv_peft", ["q_proj", "v_proj"], R, ALPHA)
    ranks = run_on_ranks(canonical_cases.downstream_cases, world_size=2,
                         args=(str(out), str(qv)), timeout=600)
    return out, qv, ranks


def test_disable_is_the_base_and_merge_is_local_per_shard(downstream):
    _, _, ranks = downstream
    for rank in ranks:
        assert_same(*rank["disabled"], "disable_lora vs the plain model")
        hf_llama.assert_logits_close(rank["merged_logits"], rank["logits"])
        assert_same(*rank["merged_params"], "merged weights vs the merged stream")
        assert_same(*rank["merged_view"], "merged_weights over a CPU copy vs iter_merged_weights")
    # Every rank merged its own shard: gathered, the stream is W + s B_p A_p on each HF module.
    from megatron_lora.interop import hf_mapping

    rank = ranks[0]
    adapters, base, merged = rank["adapters"], rank["base_full"], rank["stream_full"]
    for name in ("decoder.layers.1.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc1"):
        _, target = hf_mapping.parse_megatron_module(name)
        parts = hf_mapping.split_target(target, base[f"{name}.weight"], _geometry())
        expected = []
        for part, projection in zip(parts, ("q", "k", "v") if "qkv" in name else ("gate", "up"),
                                    strict=True):
            A, B = adapters[f"{name}.lora_{projection}.lora_A.weight"], \
                adapters[f"{name}.lora_{projection}.lora_B.weight"]
            expected.append(part + SCALING * B @ A)
        fused = hf_mapping.fuse_target(target, expected, _geometry())
        torch.testing.assert_close(merged[f"{name}.weight"], fused, rtol=0, atol=1e-6)


def _geometry():
    from megatron_lora.interop.geometry import Geometry

    return Geometry.from_hf(peft_cases.hf_model().config)


def test_checkpoints_carry_the_mode_and_reload_at_another_tp(downstream):
    from megatron_lora.interop.adapter_file import read_lora_checkpoint

    out, _, ranks = downstream
    checkpoint = read_lora_checkpoint(out / "adapter.safetensors")
    assert checkpoint.config.canonical is True
    assert "decoder.layers.0.self_attention.linear_qkv.lora_k.lora_B.weight" in checkpoint.tensors
    for rank in ranks:
        for source in ("tp1_from_adapter", "tp1_from_dist"):
            adapters, logits, *rest = rank[source]
            assert_same(adapters, ranks[0]["adapters"], f"{source}: adapters")
            hf_llama.assert_logits_close(logits, ranks[0]["logits"])
        assert rank["tp1_from_dist"][2] == []  # nothing missing


def test_peft_export_is_each_projection_at_rank_r_and_peft_computes_our_logits(downstream):
    out, _, ranks = downstream
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_file(out / "peft" / "adapter_model.safetensors")
    adapters = ranks[0]["adapters"]
    for key, value in adapters.items():  # no split, no padding: our tensors as they are
        module, factor = peft_reference.hf_module(key)
        assert_same(tensors[f"base_model.model.{module}.lora_{factor}.weight"], value, key)
    assert len(tensors) == len(adapters)
    from peft import PeftModel

    model = PeftModel.from_pretrained(peft_cases.hf_model(), str(out / "peft")).eval()
    hf_llama.assert_logits_close(ranks[0]["logits"], hf_llama.hf_logits(model, hf_llama.tokens()))


def test_a_q_v_peft_adapter_imports_at_rank_r_and_exports_unchanged(downstream):
    out, qv, ranks = downstream
    config, logits, names = ranks[0]["qv_import"]
    assert config.r == R and config.canonical and config.target_modules == ("linear_q", "linear_v")
    assert "decoder.layers.0.self_attention.linear_qkv.lora_v.lora_B.weight" in names
    assert not [n for n in names if ".lora_k." in n or "linear_proj" in n]
    from peft import PeftModel

    model = PeftModel.from_pretrained(peft_cases.hf_model(), str(qv)).eval()
    hf_llama.assert_logits_close(logits, hf_llama.hf_logits(model, hf_llama.tokens()))
    assert_same(load_file(out / "qv_again" / "adapter_model.safetensors"),
                load_file(qv / "adapter_model.safetensors"), "import -> export round trip")
    again = json.loads((out / "qv_again" / "adapter_config.json").read_text())
    assert again["r"] == R and sorted(again["target_modules"]) == ["q_proj", "v_proj"]
