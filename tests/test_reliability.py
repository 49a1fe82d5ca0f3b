"""No verb silently corrupts a model or a file; every bad input gets an error that names it.

One test per class of failure. Each case asserts the exception type, that the message names the
culprit, and that the model's parameters (bit for bit) and the files on disk (by hash) are
unchanged. The Megatron cases run in one spawned rank and return what they saw: the raised
exception (or the lack of one), the parameters before and after, the files' hashes before and
after; the tests judge.
"""

from __future__ import annotations

import argparse
import hashlib
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
from support import fsdp_llama, lora_helpers, tiny_gpt
from support.compare import assert_same
from support.outcomes import assert_raised, outcome

CONFIG = LoRAConfig(r=4, alpha=8)


# --- evidence ---------------------------------------------------------------------------------


def files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path (temporaries included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def observe(call, model, folder: Path) -> dict:
    """What `call()` raised (any error: the test says which one it must be), with the model's
    parameters and the folder's files before and after."""
    before, hashes = params(model), files(folder)
    result = outcome(Exception, call)
    return {"outcome": result, "params_before": before, "params_after": params(model),
            "files_before": hashes, "files_after": files(folder)}


def assert_refused(seen: dict, error: str, match: str) -> None:
    """The call raised `error` with a message matching `match` and changed nothing."""
    assert_raised(seen["outcome"], match)
    assert seen["outcome"].error == error, seen["outcome"]
    assert seen["files_after"] == seen["files_before"], "files on disk changed"
    assert_same(seen["params_after"], seen["params_before"], "the model's parameters")


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
                         (["--lora-r", "0"],
                          r"--lora-\* flags: LoRAConfig.r must be a positive int")):
        out = tmp_path / f"demo{flags[1]}"
        assert_one_line_error(cli("demo", "--out", str(out), *flags), match)
        assert not out.exists()


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
