"""PEFT interop, proven against real transformers + peft: a Megatron LoRA adapter trained at
TP=2 and exported is what PEFT computes on the HF model; a PEFT adapter imported into Megatron
at TP=1 and TP=2 is what the PEFT model computes."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_cpu.launch import run_on_ranks
from support import hf_llama, peft_cases, peft_reference
from support.compare import assert_same
from support.outcomes import assert_raised

LAYOUTS = [(2, True), (1, False)]


def peft_logits(adapter_dir, model_type="llama"):
    return peft_reference.peft_logits(adapter_dir, peft_cases.hf_model(model_type))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    ranks = run_on_ranks(peft_cases.train_and_export, world_size=2, tp=2, args=(str(out), "llama"))
    return out, ranks


def test_exported_adapter_in_real_peft_computes_our_logits(exported):
    out, ranks = exported
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0]  # trained, so B is far from zero
    logits, caught = peft_logits(out / "peft_live")
    hf_llama.assert_logits_close(ranks[0]["logits"], logits)
    base = hf_llama.hf_logits(peft_cases.hf_model(), hf_llama.tokens())
    assert (logits - base).abs().max() > 1e-3  # the adapter changes the model
    assert not [m for m in caught if "unexpected" in m.lower() or "unknown" in m.lower()], caught


def test_real_peft_given_the_synced_tensors_in_memory_computes_our_logits(exported):
    """What the adapter sync hands a rollout engine (config dict and PEFT-named tensors, read
    from a CPU copy of the parameters, no files), given to real peft, is our model."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    _, ranks = exported
    config, tensors = ranks[0]["in_memory"]
    model = get_peft_model(peft_cases.hf_model(), PeftConfig.from_peft_type(**config))
    loaded = set_peft_model_state_dict(model, tensors)
    assert loaded.unexpected_keys == []
    assert [k for k in loaded.missing_keys if "lora_" in k] == []
    logits = hf_llama.hf_logits(model.eval(), hf_llama.tokens())
    hf_llama.assert_logits_close(ranks[0]["logits"], logits)
    assert ranks[1]["in_memory"] is None  # only rank 0 holds the gathered adapter


def test_adapter_config_is_peft_format(exported):
    out, _ = exported
    config = json.loads((out / "peft_live" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == "tiny-llama" and config["task_type"] == "CAUSAL_LM"
    tensors = load_file(out / "peft_live" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in tensors
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (
        32, 4)


def test_offline_export_equals_live_export(exported, tmp_path):
    from megatron_lora import export_peft_adapter

    out, _ = exported
    export_peft_adapter(out / "adapter.safetensors", tmp_path / "offline",
                        base_model_name_or_path="tiny-llama")
    live = load_file(out / "peft_live" / "adapter_model.safetensors")
    offline = load_file(tmp_path / "offline" / "adapter_model.safetensors")
    assert live.keys() == offline.keys()
    assert_same(offline, live, "offline export vs live export")
    assert (out / "peft_live" / "adapter_config.json").read_text() == \
        (tmp_path / "offline" / "adapter_config.json").read_text()


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    make = peft_reference.make_peft_adapter
    return [str(make(root / "all", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"])),
            str(make(root / "qv_rslora", ["q_proj", "v_proj"], r=8, use_rslora=True))]


def test_peft_adapter_imports_exactly_at_tp1_and_tp2(peft_adapters):
    ranks = run_on_ranks(peft_cases.import_and_compare, world_size=2,
                         args=(peft_adapters, LAYOUTS))
    for adapter_dir in peft_adapters:
        expected, _ = peft_logits(adapter_dir)
        for rank in ranks:
            for tp, sp in LAYOUTS:
                got = rank[(tp, sp, adapter_dir)]
                hf_llama.assert_logits_close(got["logits"], expected)
                hf_llama.assert_logits_close(got["resized_logits"], expected)
    full = ranks[0][(1, False, peft_adapters[0])]
    # q, k, v (rank 4 each) fuse to rank 12; every adapter is brought to that rank.
    assert full["config"].r == 12 and full["config"].alpha == 48.0
    assert full["lora_shapes"]["decoder.layers.0.self_attention.linear_qkv.lora_A.weight"] == (
        12, 64)
    qv = ranks[0][(1, False, peft_adapters[1])]["config"]
    assert qv.r == 16 and qv.use_rslora and qv.target_modules == ("linear_qkv",)


def test_bad_peft_adapters_are_named_and_leave_the_model_untouched(peft_adapters, tmp_path):
    good = Path(peft_adapters[0])
    # then widen one tensor
    wrong_geometry = peft_reference.make_peft_adapter(tmp_path / "wide", ["q_proj"])
    tensors = load_file(wrong_geometry / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(80, 4)
    from safetensors.torch import save_file

    save_file(tensors, wrong_geometry / "adapter_model.safetensors")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(128, 4)
    save_file(tensors, unknown / "adapter_model.safetensors")
    (errors,) = run_on_ranks(peft_cases.bad_imports, world_size=1,
                             args=({"geometry": str(wrong_geometry), "unknown": str(unknown),
                                    "missing": str(tmp_path / "nowhere")},))
    assert_raised(errors["geometry"],
                  re.escape(f"{key} has shape [80, 4], the model needs [64, 4]"))
    assert_raised(errors["unknown"], re.escape("model.embed_tokens.lora_A.weight"))
    assert_raised(errors["missing"], "nowhere is not a directory")
    assert_same(*errors["state"], "model state after the refused imports")  # same keys too
    assert errors["lora_count"] == 16


def test_unknown_architecture_is_refused(exported, tmp_path):
    from megatron_lora import export_peft_adapter

    out, _ = exported
    with pytest.raises(ValueError, match="unknown architecture GPT2LMHeadModel"):
        export_peft_adapter(out / "adapter.safetensors", tmp_path / "x",
                            architecture="GPT2LMHeadModel")


def test_ranks_over_the_serving_limit_warn(exported, tmp_path):
    from megatron_lora.interop.adapter_file import read_lora_checkpoint
    from megatron_lora.interop.peft_export import export_checkpoint, serving_warnings

    out, _ = exported
    assert serving_warnings(16) == [] and serving_warnings(12) == []
    assert ("vLLM's default --max-lora-rank 16: serve with vLLM --max-lora-rank 32"
            in serving_warnings(17)[0])
    assert "vLLM cannot serve" in serving_warnings(1024)[0]
    checkpoint = read_lora_checkpoint(out / "adapter.safetensors")
    import dataclasses

    big = dataclasses.replace(checkpoint, config=dataclasses.replace(checkpoint.config, r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_checkpoint(big, tmp_path / "r4")  # rank 4: no warning
        with pytest.raises(UserWarning, match="max-lora-rank"):
            export_checkpoint(
                dataclasses.replace(big, config=dataclasses.replace(big.config, r=64)),
                tmp_path / "r64")


def test_cli_inspect_and_export(exported, tmp_path):
    out, _ = exported
    cli = Path(sys.executable).parent / "megatron-lora"
    result = subprocess.run([str(cli), "inspect", str(out / "adapter.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "megatron-lora adapter checkpoint" in result.stdout
    assert "num_query_groups" in result.stdout and "parameters" in result.stdout
    from megatron_lora.cli import main

    assert main(["export-peft", str(out / "adapter.safetensors"), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "adapter_config.json").is_file()
    result = subprocess.run([str(cli), "inspect", str(tmp_path / "cli")],
                            capture_output=True, text=True)
    assert "PEFT LoRA adapter" in result.stdout and "q_proj" in result.stdout
    result = subprocess.run([str(cli), "inspect", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no adapter checkpoint at" in result.stderr
