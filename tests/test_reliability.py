"""No verb silently corrupts a model or a file; every bad input gets an error that names it.

One test per class of failure. Each case asserts the exception type, that the message names the
culprit, and that the model's parameters (bit for bit) and the files on disk (by hash) are
unchanged. The Megatron cases run in one spawned rank and return what they saw: the raised
exception (or the lack of one), the parameters before and after, the files' hashes before and
after; the tests judge.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_common import LoRAConfig
from lora_common.atomic import atomic_write_bytes, remove_stale_temporaries
from lora_common.peft_files import ADAPTER_CONFIG_FILE, read_peft_adapter
from megatron_cpu.launch import run_on_ranks
from support import fsdp_llama, lora_helpers, reliability_cases, tiny_gpt
from support.compare import assert_same
from support.outcomes import assert_raised, outcome
from support.reliability_cases import observe

CONFIG = LoRAConfig(r=4, alpha=8)


# --- evidence (gathered on the ranks by support.reliability_cases) ------------------------------


def assert_refused(seen: dict, error: str, match: str) -> None:
    """The call raised `error` with a message matching `match` and changed nothing: the files
    by hash, the parameters bit for bit, and (where recorded) every `requires_grad` and module
    class."""
    assert_raised(seen["outcome"], match)
    assert seen["outcome"].error == error, seen["outcome"]
    assert seen["files_after"] == seen["files_before"], "files on disk changed"
    assert_same(seen["params_after"], seen["params_before"], "the model's parameters")
    assert seen.get("state_after") == seen.get("state_before"), "requires_grad or classes changed"


# --- the Megatron cases, in one rank ----------------------------------------------------------


def lora_model(config=CONFIG, **overrides):
    from megatron_lora import lora_spec

    model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), config), **overrides)
    lora_helpers.set_nonzero_B(model)
    return model


def megatron_cases(tmp: str) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    import megatron_lora as ml
    from megatron_lora.interop.adapter_file import read_lora_checkpoint
    from megatron_lora.interop.peft_export import export_checkpoint

    folder = Path(tmp)
    seen = {}
    source = lora_model()
    ml.save_lora_checkpoint(source, folder / "adapter.safetensors")
    export_checkpoint(read_lora_checkpoint(folder / "adapter.safetensors"), folder / "peft")
    ml.save_dist_checkpoint(source, folder / "dist")

    # 1. The merged state: nothing loads into it or saves it beside its adapters.
    merged = lora_model()
    ml.merge_lora_weights(merged)
    seen["load_adapter_merged"] = observe(
        lambda: ml.load_lora_checkpoint(merged, folder / "adapter.safetensors"), merged, folder)
    seen["import_peft_merged"] = observe(
        lambda: ml.import_peft_adapter(merged, folder / "peft"), merged, folder)
    seen["save_dist_merged"] = observe(
        lambda: ml.save_dist_checkpoint(merged, folder / "merged_dist"), merged, folder)
    seen["load_dist_merged"] = observe(
        lambda: ml.load_dist_checkpoint(merged, folder / "dist"), merged, folder)
    model = lora_model()
    wrong_rank = dict(lora_model(LoRAConfig(r=2, alpha=8)).named_parameters())
    seen["merged_weights_rank"] = observe(
        lambda: ml.merged_weights(wrong_rank, model), model, folder)

    # 2. A failed load leaves the model untouched: a checkpoint of another geometry.
    other = lora_model(ffn_hidden_size=128)
    seen["load_dist_geometry"] = observe(
        lambda: ml.load_dist_checkpoint(other, folder / "dist"), other, folder)

    # 4. Inputs that used to be reinterpreted.
    plain = tiny_gpt.build_gpt()
    seen["config_mapping"] = outcome(Exception, lambda: ml.apply_lora_to_megatron_model(
        tiny_gpt.build_gpt(), {"r": 8, "alpha": 16}))
    built = ml.apply_lora_to_megatron_model(tiny_gpt.build_gpt(), {"r": 8, "alpha": 16})
    seen["config_mapping_r"] = ml.get_lora_parameters(built)[
        "decoder.layers.0.self_attention.linear_qkv.lora_A.weight"].shape[0]
    seen["config_object"] = observe(
        lambda: ml.apply_lora_to_megatron_model(plain, object()), plain, folder)
    excluded = LoRAConfig(r=4, alpha=8, exclude_modules=["linear_fc3"])
    seen["exclude_posthoc"] = observe(
        lambda: ml.apply_lora_to_megatron_model(plain, excluded), plain, folder)
    seen["exclude_spec"] = outcome(Exception, ml.lora_spec, tiny_gpt.local_spec(), excluded)
    out_of_range = LoRAConfig(r=4, alpha=8, exclude_modules=["decoder.layers.7.mlp.linear_fc1"])
    seen["exclude_layer"] = outcome(Exception, lambda: tiny_gpt.build_gpt(
        ml.lora_spec(tiny_gpt.local_spec(), out_of_range)))
    wrapped = DistributedDataParallel(plain.config, DistributedDataParallelConfig(), plain)
    seen["apply_ddp"] = observe(
        lambda: ml.apply_lora_to_megatron_model(wrapped, CONFIG), plain, folder)
    seen["apply_ddp_inner"] = observe(
        lambda: ml.apply_lora_to_megatron_model(wrapped.module, CONFIG), plain, folder)
    args = ml.add_lora_arguments(argparse.ArgumentParser()).parse_args(
        ["--lora-base-spec", "support.tiny_gpt", "no_such_fn"])
    seen["base_spec"] = outcome(Exception, ml.get_gpt_lora_spec, args, plain.config)
    # The same targets in another order are the same config, so the checkpoint loads.
    reordered = lora_model(LoRAConfig(r=4, alpha=8, target_modules=[
        "linear_qkv", "linear_fc2", "linear_proj", "linear_fc1", "linear_qkv"]))
    seen["reordered_targets"] = outcome(
        Exception, ml.load_lora_checkpoint, reordered, folder / "adapter.safetensors")
    return seen


@pytest.fixture(scope="module")
def megatron_seen(tmp_path_factory):
    (seen,) = run_on_ranks(megatron_cases, world_size=1, args=(str(tmp_path_factory.mktemp("m")),))
    return seen


def test_the_merged_state_is_refused_by_every_load_and_save(megatron_seen):
    s = megatron_seen
    assert_refused(s["load_adapter_merged"], "RuntimeError",
                   r"loading the adapter from .*adapter.safetensors: 8 LoRA module\(s\) are merged")
    assert_refused(s["import_peft_merged"], "RuntimeError",
                   r"import_peft_adapter: 8 LoRA module\(s\) are merged")
    assert_refused(s["save_dist_merged"], "RuntimeError",
                   r"decoder.layers.0.self_attention.linear_(qkv|proj): "
                   r"LoRA is merged .* applied twice")
    assert_refused(s["load_dist_merged"], "RuntimeError",
                   r"decoder.layers.0.self_attention.linear_(qkv|proj): "
                   r"LoRA is merged into the weight")
    assert_refused(s["merged_weights_rank"], "ValueError",
                   r"linear_qkv.lora_A.weight \(2, 64\) has rank 2; "
                   r"the model's LoRA modules have r=4")


def test_fsdp_load_into_a_merged_model_is_refused(tmp_path):
    from fsdp_lora import (
        apply_lora_to_fsdp_model,
        load_peft_adapter,
        merge_lora_weights,
        save_peft_adapter,
    )

    config = LoRAConfig(r=4, alpha=8)
    model = apply_lora_to_fsdp_model(fsdp_llama.build_llama(), config)
    fsdp_llama.randomize_lora(model)
    save_peft_adapter(model, tmp_path / "peft")
    merge_lora_weights(model)
    seen = observe(lambda: load_peft_adapter(model, tmp_path / "peft"), model, tmp_path)
    assert_refused(seen, "RuntimeError", r"load_peft_adapter: 14 LoRA module\(s\) are merged")


def test_a_checkpoint_of_another_geometry_is_refused_before_anything_loads(megatron_seen):
    assert_refused(megatron_seen["load_dist_geometry"], "ValueError",
                   r"tensor decoder.layers.mlp.linear_fc1.weight has global shape \[2, 192, 64\] "
                   r"in the checkpoint, \[2, 256, 64\] in the model")


def test_inputs_are_never_silently_reinterpreted(megatron_seen):
    s = megatron_seen
    assert s["config_mapping"].kind == "returned" and s["config_mapping_r"] == 8
    assert_refused(s["config_object"], "TypeError",
                   r"apply_lora_to_megatron_model: expected a LoRAConfig, .* got object")
    targets = "linear_fc1, linear_fc2, linear_proj, linear_qkv"
    assert_refused(s["exclude_posthoc"], "ValueError",
                   rf"exclude_modules entry 'linear_fc3' matches no LoRA module: the adapted "
                   rf"modules are {targets}, named decoder.layers.<0..1>")
    assert_raised(s["exclude_spec"], "exclude_modules entry 'linear_fc3' matches no LoRA module")
    assert_raised(s["exclude_layer"], r"'decoder.layers.7.mlp.linear_fc1' matches no LoRA module.*"
                                      r"decoder.layers.<0..1>")
    assert s["exclude_spec"].error == s["exclude_layer"].error == "ValueError"
    assert_refused(s["apply_ddp"], "ValueError", r"already wrapped in Megatron DDP")
    assert_refused(s["apply_ddp_inner"], "ValueError",
                   r"already wrapped in Megatron DDP \(parameter '.*' has a DDP main_grad\)")
    assert s["base_spec"] == ("raised", "ValueError", "--lora-base-spec support.tiny_gpt "
                              "no_such_fn: module 'support.tiny_gpt' has no 'no_such_fn'")
    assert s["reordered_targets"].kind == "returned", s["reordered_targets"]


def test_target_lists_are_type_checked_deduplicated_and_order_free():
    with pytest.raises(ValueError, match=r"LoRAConfig\.target_modules must be a module name or a "
                                         r"list of names, got 5 \(int\)"):
        LoRAConfig(target_modules=5)
    assert LoRAConfig(target_modules=["linear_qkv", "linear_fc1", "linear_qkv"]) == \
        LoRAConfig(target_modules="linear_fc1 linear_qkv")
    with pytest.raises(TypeError, match="apply_lora_to_fsdp_model: expected a LoRAConfig"):
        from fsdp_lora import apply_lora_to_fsdp_model

        apply_lora_to_fsdp_model(fsdp_llama.build_llama(), object())
    with pytest.raises(ValueError, match=r"LoRAConfig: unknown field\(s\) \['rank'\]"):
        LoRAConfig.coerce({"rank": 8})


def test_peft_weights_for_modules_the_config_does_not_target_are_refused(tmp_path):
    from fsdp_lora import apply_lora_to_fsdp_model, save_peft_adapter

    model = apply_lora_to_fsdp_model(fsdp_llama.build_llama(), LoRAConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_peft_adapter(model, tmp_path)
    config_path = tmp_path / ADAPTER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["q_proj"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"base_model.model.model.layers.0.self_attn.v_proj."
                                         r"lora_A.weight is for a module that adapter_config.json "
                                         r"does not target \(target_modules=\['q_proj'\]"):
        read_peft_adapter(tmp_path)
    config["target_modules"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        read_peft_adapter(tmp_path)


# --- the adapter checkpoint's header, and the CLI ---------------------------------------------


def rewrite_header(source: Path, target: Path, edit) -> None:
    """Copy an adapter checkpoint with its header text edited and its digest left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata["megatron_lora"] = edit(metadata["megatron_lora"])
    save_file(tensors, str(target), metadata=metadata)


def saved_adapter(tmp: str) -> None:
    import megatron_lora as ml

    ml.save_lora_checkpoint(lora_model(), Path(tmp) / "adapter.safetensors")


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    run_on_ranks(saved_adapter, world_size=1, args=(str(folder),))
    return folder / "adapter.safetensors"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lora.cli", *argv],
                          capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(match, lines[0]), lines[0]


def test_the_checkpoint_header_is_protected_and_every_field_named(adapter_file, tmp_path):
    from megatron_lora import read_lora_checkpoint
    from megatron_lora.interop.adapter_file import header_metadata

    flipped = tmp_path / "flipped.safetensors"
    rewrite_header(adapter_file, flipped, lambda text: text.replace('"alpha": 8.0', '"alpha": 9.0'))
    with pytest.raises(ValueError, match=r"flipped.safetensors: the header is corrupted"):
        read_lora_checkpoint(flipped)
    out = tmp_path / "peft"
    assert_one_line_error(cli("export-peft", str(flipped), str(out)), "the header is corrupted")
    assert not out.exists()
    assert_one_line_error(cli("inspect", str(flipped)), "the header is corrupted")

    # A header without its geometry, correctly signed: named, not a KeyError.
    def drop_geometry(text):
        header = json.loads(text)
        del header["geometry"], header["lora_config"]["seed"]
        return header_metadata(header)["megatron_lora"]

    unsigned = tmp_path / "no_geometry.safetensors"
    rewrite_header(adapter_file, unsigned, drop_geometry)
    # the old digest no longer fits
    with pytest.raises(ValueError, match="the header is corrupted"):
        read_lora_checkpoint(unsigned)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(unsigned), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = f.metadata()["megatron_lora"]
    save_file(tensors, str(unsigned), metadata=header_metadata(json.loads(text)))
    with pytest.raises(ValueError, match=r"header field\(s\): geometry is missing"):
        read_lora_checkpoint(unsigned)
    header = json.loads(text)
    header["geometry"] = {"num_layers": 2}
    save_file(tensors, str(unsigned), metadata=header_metadata(header))
    with pytest.raises(ValueError, match=r"header: .*missing field\(s\)"):
        read_lora_checkpoint(unsigned)


def test_the_cli_names_every_mistake_in_one_line_and_writes_nothing(adapter_file, tmp_path):
    # export-peft onto an existing file or a non-empty folder
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    assert_one_line_error(cli("export-peft", str(adapter_file), str(existing)),
                          "existing.txt exists and is not an empty folder")
    assert existing.read_text() == "keep me"
    full = tmp_path / "full"
    full.mkdir()
    (full / "note").write_text("mine")
    assert_one_line_error(cli("export-peft", str(adapter_file), str(full)), "full exists")
    assert [p.name for p in full.iterdir()] == ["note"]
    # inspect on a PEFT folder whose config has no target_modules
    peft = tmp_path / "peft"
    assert cli("export-peft", str(adapter_file), str(peft)).returncode == 0
    config = json.loads((peft / ADAPTER_CONFIG_FILE).read_text())
    config.pop("target_modules")
    (peft / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    assert_one_line_error(cli("inspect", str(peft)), "target_modules must be a non-empty list")
    # demo flags checked before any work
    for flags, match in ((["--tp", "0"], "--tp must be at least 1, got 0"),
                         (["--lora-r", "0"], r"--lora-r: LoRAConfig.r must be a positive int")):
        out = tmp_path / f"demo{flags[1]}"
        assert_one_line_error(cli("demo", "--out", str(out), *flags), match)
        assert not out.exists()


# --- 1. a dist checkpoint must hold the model's adapter set, or none ---------------------------


@pytest.fixture(scope="module")
def dist_seen(tmp_path_factory):
    (seen,) = run_on_ranks(reliability_cases.dist_checkpoint_cases, world_size=1,
                           args=(str(tmp_path_factory.mktemp("dist")),))
    return seen


QKV, FC1 = "decoder.layers.self_attention.linear_qkv", "decoder.layers.mlp.linear_fc1"
RULE = r"\. A checkpoint with adapters must hold exactly the model's"


def test_a_dist_checkpoint_of_another_adapter_set_is_refused_before_anything_loads(dist_seen):
    s = dist_seen
    assert_refused(s["canonical_into_fused"], "ValueError",
                   rf"canonical holds another LoRA adapter set than the model: no adapter for "
                   rf"{FC1}, {QKV}, which the model adapts; adapters for {FC1}.lora_gate, "
                   rf"{FC1}.lora_up, {QKV}.lora_k, .* which the model does not adapt; the "
                   rf"checkpoint's adapters are canonical \(one per projection\); the model's "
                   rf"adapters are fused{RULE}")
    assert_refused(s["fused_into_canonical"], "ValueError",
                   rf"fused holds another LoRA adapter set .* no adapter for {FC1}.lora_gate.*"
                   rf"adapters for {FC1}, .*{QKV}, which the model does not adapt; the "
                   rf"checkpoint's adapters are fused; the model's adapters are canonical")
    assert_refused(s["qkv_into_four"], "ValueError",
                   rf"qkv holds another LoRA adapter set than the model: no adapter for {FC1}, "
                   rf"decoder.layers.mlp.linear_fc2, decoder.layers.self_attention.linear_proj, "
                   rf"which the model adapts{RULE}")
    assert_refused(s["four_into_qkv"], "ValueError",
                   rf"fused holds another LoRA adapter set than the model: adapters for {FC1}, "
                   rf".* which the model does not adapt{RULE}")


@pytest.mark.parametrize("strict", ["log_unexpected", "raise_unexpected"])
def test_megatrons_own_load_inside_allow_missing_adapters_keeps_the_rule(dist_seen, strict):
    assert_refused(dist_seen["hook_qkv_into_four", strict], "ValueError",
                   rf"qkv holds another LoRA adapter set than the model: no adapter for {FC1}")
    assert_refused(dist_seen["hook_four_into_qkv"], "ValueError",
                   rf"fused holds another LoRA adapter set .* adapters for {FC1}")
    # a base-only checkpoint and the same adapter set still load
    assert dist_seen["base_only"].kind == dist_seen["same_set"].kind == "returned"


# --- 2. a refused PEFT import leaves the model as it was ----------------------------------------


@pytest.fixture(scope="module")
def import_seen(tmp_path_factory):
    (seen,) = run_on_ranks(reliability_cases.peft_import_cases, world_size=1,
                           args=(str(tmp_path_factory.mktemp("import")),), timeout=900)
    return seen


def test_a_refused_peft_import_leaves_every_parameter_and_flag_as_it_was(import_seen):
    s = import_seen
    assert_refused(s["ddp"], "ValueError", r"import_peft_adapter\(.*dense\): "
                                           r"apply_lora_to_megatron_model: the model is already "
                                           r"wrapped in Megatron DDP")
    kv_up = "decoder.layers.1.self_attention.linear_kv_up_proj.lora_B.weight"
    rows = s["mla_rows"]
    for canonical in (False, True):
        # the culprit is layer 1's tensor, with its own shape (not layer 0's, which fits)
        assert_refused(s["mla_b", canonical], "ValueError",
                       rf"cannot load adapter from .*mla_bad_layer1: .*tensor {kv_up} has shape "
                       rf"\[{rows + 4}, \d+\], the model needs \[{rows}, \d+\]")
        assert_refused(s["mla_q_proj", canonical], "ValueError",
                       r"import_peft_adapter\(.*mla_q_proj\): LoRA target module\(s\) "
                       r"\['linear_q_proj'\] match no module of the model")


def test_restored_on_error_puts_back_classes_attributes_hooks_flags_and_adapters():
    from lora_common.rollback import restored_on_error

    class Swapped(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].lora_A = torch.nn.Linear(4, 2, bias=False)
    adapter, weight = model[0].lora_A.weight.detach().clone(), model[0].weight
    with pytest.raises(RuntimeError, match="midway"), restored_on_error(model):
        model[0].__class__ = Swapped
        model[0].lora_B = torch.nn.Linear(2, 4, bias=False)
        model[0].weight.requires_grad_(False)
        with torch.no_grad():
            model[0].lora_A.weight.zero_()
        model.register_forward_pre_hook(lambda module, args: None)
        raise RuntimeError("midway")
    assert type(model[0]) is torch.nn.Linear and not hasattr(model[0], "lora_B")
    assert model[0].weight is weight and weight.requires_grad and not model._forward_pre_hooks
    assert_same(model[0].lora_A.weight.detach(), adapter, "the adapter's values")


def test_mla_o_proj_of_another_width_than_hidden_imports_exactly(import_seen):
    """MLA's linear_proj reads heads x v_head_dim (96 here), not the hidden size (64): both
    imports take PEFT's shapes and give back the exported adapter."""
    s = import_seen
    for canonical in (False, True):
        assert s["v24", canonical].kind == "returned", s["v24", canonical]
    assert_same(s["v24_adapters", True], s["v24_source"], "canonical import of the export")
    fused = s["v24_adapters", False]
    proj = "decoder.layers.0.self_attention.linear_proj.lora_A.weight"
    assert fused[proj].shape == s["v24_source"][proj].shape == (4, 96)
    assert_same(fused, s["v24_source"], "fused import of the export")


# --- 3. an export checks what it writes --------------------------------------------------------


@pytest.fixture(scope="module")
def export_seen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    (seen,) = run_on_ranks(reliability_cases.export_cases, world_size=1, args=(str(folder),))
    return folder, seen


def test_an_export_under_an_architecture_without_the_adapters_modules_is_refused(export_seen):
    from megatron_lora import export_peft_adapter

    folder, seen = export_seen
    mla_refused = (r"the adapter targets linear_kv_down_proj, linear_kv_up_proj, "
                   r"linear_q_down_proj, linear_q_up_proj, linear.* multi-latent attention, "
                   r"which LlamaForCausalLM does not have; name the architecture of the base "
                   r"model \(DeepseekV3ForCausalLM\)")
    assert_refused(seen["mla_as_llama"], "ValueError", mla_refused)
    assert_refused(seen["dense_as_deepseek"], "ValueError",
                   r"the adapter targets linear_qkv, linears of standard \(fused q/k/v\) "
                   r"attention, which DeepseekV3ForCausalLM does not have")
    for path, architecture, match in (
            (folder / "mla.safetensors", "LlamaForCausalLM", mla_refused),
            (folder / "dense.safetensors", "DeepseekV3ForCausalLM", "targets linear_qkv")):
        with pytest.raises(ValueError, match=match):
            export_peft_adapter(path, folder / "offline", architecture=architecture)
        assert_one_line_error(cli("export-peft", str(path), str(folder / "offline"),
                                  "--architecture", architecture), match)
        assert not (folder / "offline").exists()


def _moe_checkpoint(path: Path, experts_held: int, experts_in_header: int, dense_mlp=False):
    """An adapter checkpoint of a 1-layer MoE model, written as `save_lora_checkpoint` writes
    one (signed header), holding the experts 0..experts_held-1."""
    from megatron_lora.interop.adapter_file import AdapterCheckpoint, write_adapter_checkpoint
    from megatron_lora.interop.geometry import Geometry

    geometry = Geometry(num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=2,
                        kv_channels=8, ffn_hidden_size=32, num_moe_experts=experts_in_header,
                        moe_ffn_hidden_size=8)
    config = LoRAConfig(r=2, alpha=4, target_modules=["linear_fc1", "linear_fc2"])
    stem = "decoder.layers.0.mlp" if dense_mlp else "decoder.layers.0.mlp.experts"
    ffn = 32 if dense_mlp else 8
    tensors = {}
    for e in ([""] if dense_mlp else range(experts_held)):
        tensors[f"{stem}.linear_fc1.lora_A.weight{e}"] = torch.ones(2, 16)
        tensors[f"{stem}.linear_fc1.lora_B.weight{e}"] = torch.ones(2 * ffn, 2)
        tensors[f"{stem}.linear_fc2.lora_A.weight{e}"] = torch.ones(2, ffn)
        tensors[f"{stem}.linear_fc2.lora_B.weight{e}"] = torch.ones(16, 2)
    write_adapter_checkpoint(AdapterCheckpoint(tensors, config, geometry), path)


def test_a_checkpoint_whose_tensors_do_not_fit_its_header_is_refused_by_every_reader(tmp_path):
    from megatron_lora import export_peft_adapter, read_lora_checkpoint

    fits, short = tmp_path / "fits.safetensors", tmp_path / "short.safetensors"
    _moe_checkpoint(fits, experts_held=8, experts_in_header=8)
    _moe_checkpoint(short, experts_held=4, experts_in_header=8)
    assert len(read_lora_checkpoint(fits).tensors) == 32  # the control reads
    hashes = reliability_cases.files(tmp_path)
    match = (r"short.safetensors: the tensors do not fit the header: decoder.layers.0.mlp."
             r"experts.linear_fc1's lora_A is held for experts 0..3; the header's geometry has "
             r"num_moe_experts=8")
    with pytest.raises(ValueError, match=match):
        read_lora_checkpoint(short)
    with pytest.raises(ValueError, match=match):
        export_peft_adapter(short, tmp_path / "peft", architecture="Qwen3MoeForCausalLM")
    assert_one_line_error(cli("inspect", str(short)), match)
    assert_one_line_error(cli("export-peft", str(short), str(tmp_path / "peft"),
                              "--architecture", "Qwen3MoeForCausalLM"), match)
    assert reliability_cases.files(tmp_path) == hashes  # nothing written
    # a dense MLP adapter in an architecture whose every MLP is MoE
    dense = tmp_path / "dense_mlp.safetensors"
    _moe_checkpoint(dense, 0, 8, dense_mlp=True)
    with pytest.raises(ValueError, match=r"MixtralForCausalLM has no dense MLP .* the adapter "
                                         r"of decoder.layers.0.mlp.linear_fc1 has no HF"):
        export_peft_adapter(dense, tmp_path / "peft", architecture="MixtralForCausalLM")
    assert not (tmp_path / "peft").exists()


# --- 4. demo flags, checked before any rank starts ---------------------------------------------


@pytest.mark.parametrize("flags, match", [
    (["--min-lr", "1"], r"--min-lr must be in \[0, min\(--lr, --base-lr\)\] = \[0, 0.003\], "
                        r"got 1"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
    (["--lr", "nan"], r"--lr must be a finite number, got nan"),
    (["--seq", "3"], r"--seq 3 must split into --tp 2 ranks"),
    (["--hidden", "36", "--heads", "4"], r"--hidden / --heads = 9 .* RoPE needs even"),
    (["--heads", "2", "--hidden", "32", "--lora-canonical"],
     r"--lora-canonical: the demo's 1 query group\(s\) .* must split into --tp 2 ranks"),
    (["--lora-canonical", "--lora-target-modules", "linear_q", "linear_foo"],
     r"--lora-target-modules: LoRA target module\(s\) \['linear_foo'\] match no submodule"),
    (["--lora-exclude-modules", "decoder.layers.9.mlp.linear_fc1"],
     r"--lora-exclude-modules: .*'decoder.layers.9.mlp.linear_fc1' matches no LoRA module"),
])
def test_demo_flags_are_refused_in_one_line_before_any_rank_starts(tmp_path, flags, match):
    out = tmp_path / "demo"
    assert_one_line_error(cli("demo", "--out", str(out), *flags), match)
    assert not out.exists()


@pytest.mark.parametrize("flags, match", [
    (["--samples", "1"], r"--samples must be at least 2 \(GRPO compares"),
    (["--task-b-fraction", "0"], r"--task-b-fraction must be in \(0, 1\)"),
    (["--kl-coef", "-1"], r"--kl-coef must be a finite positive number, got -1"),
    (["--completion", "7"], r"--completion 7 \+ the 4 prompt tokens must split into --tp 2"),
    (["--lora-r", "0"], r"--lora-r"),
])
def test_demo_rl_flags_are_refused_in_one_line_before_anything_starts(tmp_path, flags, match):
    out = tmp_path / "demo-rl"  # no base trained, no server started, no folder made
    assert_one_line_error(cli("demo-rl", "--out", str(out), *flags), match)
    assert not out.exists()


# --- 5. helpers check their input --------------------------------------------------------------


def test_the_sglang_helpers_name_the_key_or_tensor_they_refuse():
    import numpy

    from megatron_lora.interop import sglang

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_rslora": True}
    as_given = json.dumps(config)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for tensor, error, match in (
            (torch.ones(4, 8, dtype=torch.int64), ValueError, rf"{key} has dtype torch.int64"),
            (numpy.ones((4, 8), dtype=numpy.float32), TypeError, rf"{key} is a ndarray"),
            (torch.empty(4, 8, device="meta"), ValueError, rf"{key} is a meta tensor")):
        with pytest.raises(error, match=f"encode_tensors: {match}"):
            sglang.encode_tensors({key: tensor})
    with pytest.raises(TypeError, match="encode_tensors: tensors must be a mapping"):
        sglang.encode_tensors([(key, torch.ones(4, 8))])
    for broken, match in (
            ({k: v for k, v in config.items() if k != "target_modules"},
             "the adapter config lacks target_modules"),
            ({**config, "r": 0}, r"r must be a positive int, got 0"),
            ({**config, "r": "16"}, r"r must be a positive int, got '16'"),
            ({**config, "lora_alpha": float("nan")}, r"lora_alpha must be a finite number"),
            ({**config, "target_modules": "q_proj"}, r"target_modules must be a list of module "
                                                     r"names, got 'q_proj'"),
            ({**config, "use_rslora": "yes"}, r"use_rslora must be a bool")):
        with pytest.raises(ValueError, match=f"serving_config: the adapter config.*{match}|"
                                             f"serving_config: {match}"):
            sglang.serving_config(broken)
        with pytest.raises(ValueError, match=match):
            sglang.lora_load_request(broken, "payload")
    with pytest.raises(TypeError, match="scaling: the adapter config must be a mapping"):
        sglang.scaling([("r", 4)])
    with pytest.raises(ValueError, match="lora_load_request: serialized_tensors must be"):
        sglang.lora_load_request(config, b"bytes")
    with pytest.raises(ValueError, match="the adapter name must be a non-empty string"):
        sglang.lora_unload_request("")
    with pytest.raises(ValueError, match="modules must be a list of module names, got 'q_proj'"):
        sglang.normalized_targets("q_proj")
    assert json.dumps(config) == as_given  # nothing was changed in the caller's config
    # and a good config still serves: rsLoRA folded, r=4 -> alpha 8 * 2
    assert sglang.serving_config(config)["lora_alpha"] == 16


@pytest.fixture(scope="module")
def producer_seen():
    (seen,) = run_on_ranks(reliability_cases.producer_cases, world_size=1)
    return seen


def test_the_adapter_producer_names_the_tensor_it_refuses(producer_seen):
    s = producer_seen
    key = "'module.decoder.layers.1.mlp.linear_fc2.lora_B.weight'"
    for case, match in (("integer", rf"{key} has dtype torch.int32; an adapter matrix is "
                                     rf"floating point"),
                        ("numpy", rf"{key} is a ndarray, not a torch.Tensor"),
                        ("meta", rf"{key} is a meta tensor")):
        assert s[case].error == "ValueError", s[case]
        assert_raised(s[case], rf"full_adapter_tensors: {match}")
    assert_raised(s["merged_integer"], rf"merged_weights: {key[1:-1]} is a Tensor of dtype "
                                       rf"torch.int32; adapter matrices are floating-point")
    assert s["pairs"].error == "TypeError"
    assert_raised(s["pairs"], "tensors must be a mapping of names to tensors")
    assert_same(s["good_after"], s["good_before"], "the trainer's tensors")


# --- 7. messages name the culprit ---------------------------------------------------------------


def test_reapplying_lora_of_another_mode_names_the_module_and_the_field(tmp_path):
    (seen,) = run_on_ranks(reliability_cases.reapply_cases, world_size=1, args=(str(tmp_path),))
    assert_refused(seen["canonical_over_fused"], "ValueError",
                   r"LoRA target 'decoder.layers.0.self_attention.linear_\w+': .* already carries "
                   r"LoRA of another config \(canonical: False -> True")


def test_inspect_names_the_module_whose_input_it_reports(tmp_path):
    from lora_common.peft_files import adapter_config_dict, write_peft_adapter
    from megatron_lora.cli import describe

    down = {"model.layers.0.mlp.down_proj": (torch.ones(2, 96), torch.ones(64, 2))}
    write_peft_adapter(tmp_path / "down", adapter_config_dict(LoRAConfig(r=2), ["down_proj"]),
                       down)
    lines = dict(describe(tmp_path / "down"))
    assert lines["A's input of model.layers.0.mlp.down_proj"] == "96"
    assert not [field for field in lines if field.startswith("hidden")]
    both = {**down, "model.layers.0.mlp.gate_proj": (torch.ones(2, 64), torch.ones(96, 2))}
    write_peft_adapter(tmp_path / "both", adapter_config_dict(
        LoRAConfig(r=2), ["down_proj", "gate_proj"]), both)
    assert dict(describe(tmp_path / "both"))["hidden (A's input of gate_proj)"] == "64"


# --- leftovers ------------------------------------------------------------------------------


def test_a_killed_writers_temporary_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "adapter.safetensors"
    atomic_write_bytes(path, b"old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    import os
    import socket

    host = socket.gethostname()
    stale = tmp_path / f".adapter.safetensors.{host}.{dead.stdout.strip()}.x1.tmp"
    live = tmp_path / f".adapter.safetensors.{host}.{os.getpid()}.x2.tmp"  # a writer still at work
    other = tmp_path / ".other.safetensors.host.1.x3.tmp"                  # not this file's
    for temporary in (stale, live, other):
        temporary.write_bytes(b"half")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, live.name, other.name])
    assert remove_stale_temporaries(path) == []  # the live writer's is never taken
