"""Checkpoints that never lose a shard: Megatron dist checkpoints across TP sizes, and
adapter-only checkpoints (atomic, verified, every mismatch named before anything changes)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, tiny_gpt
from support.compare import assert_same
from support.outcomes import assert_raised, outcome

CONFIG = LoRAConfig(r=4, alpha=8)


def lora_model(sp=False, seed=0, lora_seed=0, config=CONFIG, **overrides):
    import dataclasses

    from megatron_lora import lora_spec

    config = dataclasses.replace(config, seed=lora_seed)
    return tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), config), seed=seed,
                              sequence_parallel=sp, **overrides)


def lora_state(model):
    from megatron_lora import get_lora_parameters

    return lora_helpers.full_state(get_lora_parameters(model))


def dist_checkpoint_round_trips(tmp):
    from megatron_lora import load_dist_checkpoint, save_dist_checkpoint

    out = {}
    # TP=2 with SP -> TP=1. The loading model starts from other base and adapter weights.
    initialize_model_parallel(tp=2)
    model = lora_model(sp=True)
    lora_helpers.set_nonzero_B(model)
    out["tp2_loss"] = tiny_gpt.loss(model).item()
    out["tp2_lora"] = lora_state(model)
    save_dist_checkpoint(model, f"{tmp}/tp2")
    initialize_model_parallel(tp=1)
    model = lora_model(seed=1, lora_seed=1)
    out["tp2_to_tp1_missing"] = load_dist_checkpoint(model, f"{tmp}/tp2")
    out["tp2_to_tp1_loss"] = tiny_gpt.loss(model).item()
    out["tp2_to_tp1_lora"] = lora_state(model)

    # TP=1 -> TP=2 with SP.
    lora_helpers.set_nonzero_B(model, seed=11)
    out["tp1_loss"] = tiny_gpt.loss(model).item()
    save_dist_checkpoint(model, f"{tmp}/tp1")
    initialize_model_parallel(tp=2)
    model = lora_model(sp=True, seed=2, lora_seed=2)
    load_dist_checkpoint(model, f"{tmp}/tp1")
    out["tp1_to_tp2_loss"] = tiny_gpt.loss(model).item()

    # A base-only checkpoint (plain model, TP=2) into a LoRA model at TP=1.
    plain = tiny_gpt.build_gpt(sequence_parallel=True)
    out["plain_loss"] = tiny_gpt.loss(plain).item()
    save_dist_checkpoint(plain, f"{tmp}/base")
    initialize_model_parallel(tp=1)
    model = lora_model(seed=3)
    init = lora_state(model)
    out["base_missing"] = load_dist_checkpoint(model, f"{tmp}/base")
    out["base_into_lora_loss"] = tiny_gpt.loss(model).item()
    out["base_lora"] = (lora_state(model), init)
    # A checkpoint missing a base tensor is named, not half-loaded: a LoRA model with biases
    # needs tensors the bias-free base checkpoint lacks.
    out["missing_base"] = outcome(ValueError, load_dist_checkpoint,
                                  lora_model(add_bias_linear=True), f"{tmp}/base")
    return out


def test_dist_checkpoint_reshards_every_adapter_shard(tmp_path):
    rank0, rank1 = run_on_ranks(dist_checkpoint_round_trips, world_size=2, args=(str(tmp_path),))
    for out in (rank0, rank1):
        assert out["tp2_to_tp1_missing"] == []
        assert out["tp2_to_tp1_loss"] == pytest.approx(out["tp2_loss"], rel=1e-6)
        assert_same(out["tp2_to_tp1_lora"], out["tp2_lora"], "adapters after TP=2 -> TP=1")
        assert out["tp1_to_tp2_loss"] == pytest.approx(out["tp1_loss"], rel=1e-6)
        assert out["tp1_loss"] != pytest.approx(out["tp2_loss"], rel=1e-6)
        # dist-checkpoint keys stack the layers: one key per (target, matrix)
        assert len(out["base_missing"]) == 4 * 2
        assert [k for k in out["base_missing"] if ".lora_" not in k] == []
        assert out["base_into_lora_loss"] == pytest.approx(out["plain_loss"], rel=1e-6)
        assert_same(*out["base_lora"], "adapters after loading a base-only checkpoint")
        assert_raised(out["missing_base"], re.escape("checkpoint lacks tensor(s) ['decoder.")
                      + ".*bias")


def adapter_round_trip(path):
    from megatron_lora import load_lora_checkpoint, save_lora_checkpoint

    initialize_model_parallel(tp=2)
    model = lora_model(sp=True)
    lora_helpers.set_nonzero_B(model)
    saved, saved_loss = lora_state(model), tiny_gpt.loss(model).item()
    save_lora_checkpoint(model, path)
    initialize_model_parallel(tp=1)
    model = lora_model(lora_seed=5)
    load_lora_checkpoint(model, path)
    return {"lora": (lora_state(model), saved), "loss": (saved_loss, tiny_gpt.loss(model).item())}


def test_adapter_checkpoint_round_trip_tp2_to_tp1(tmp_path):
    path = tmp_path / "adapter.safetensors"
    for out in run_on_ranks(adapter_round_trip, world_size=2, args=(str(path),)):
        assert_same(*out["lora"], "adapters after TP=2 -> TP=1")  # same keys, same values
        assert out["loss"][1] == pytest.approx(out["loss"][0], rel=1e-6)
    from megatron_lora import read_lora_checkpoint

    checkpoint = read_lora_checkpoint(path)
    assert checkpoint.config.r == 4 and checkpoint.geometry.hidden_size == 64
    assert checkpoint.tensors["decoder.layers.1.mlp.linear_fc1.lora_B.weight"].shape == (2 * 96, 4)


def write_variant(source, target, mutate):
    """Copy an adapter checkpoint with its tensors or header changed, re-signed so that only
    the intended mismatch remains."""
    from safetensors import safe_open

    from lora_common.atomic import atomic_save_safetensors
    from megatron_lora.interop import adapter_file

    with safe_open(str(source), framework="pt") as f:
        header = json.loads(f.metadata()[adapter_file.HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors, header)
    header["sha256"] = {k: adapter_file.tensor_digest(t) for k, t in tensors.items()}
    atomic_save_safetensors(tensors, target, adapter_file.header_metadata(header))


def adapter_mismatches(tmp):
    from megatron_lora import load_lora_checkpoint, save_lora_checkpoint

    good = f"{tmp}/good.safetensors"
    save_lora_checkpoint(lora_model(), good)
    qkv_b = "decoder.layers.0.self_attention.linear_qkv.lora_B.weight"
    q = "decoder.layers.0.self_attention.linear_qkv.lora_q"

    def wider_ffn(tensors, header):  # a checkpoint of a model with ffn 128, tensors and header
        header["geometry"].update(ffn_hidden_size=128)
        for name in list(tensors):
            if "linear_fc1.lora_B" in name:
                tensors[name] = torch.zeros(256, 4)
            elif "linear_fc2.lora_A" in name:
                tensors[name] = torch.zeros(4, 128)

    # Each variant is a checkpoint whose tensors fit its own header (a file that does not is
    # refused as it is read: "shape"), made for another model than this one.
    variants = {
        "alpha": lambda t, h: h["lora_config"].update(alpha=16.0),
        "geometry": wider_ffn,
        "missing": lambda t, h: (t.pop(qkv_b), t.pop(qkv_b.replace("lora_B", "lora_A"))),
        "extra": lambda t, h: t.update({f"{q}.lora_A.weight": torch.zeros(4, 64),
                                        f"{q}.lora_B.weight": torch.zeros(64, 4)}),
        "shape": lambda t, h: t.update({qkv_b: torch.zeros(t[qkv_b].shape[0] - 16, 4)}),
    }
    model = lora_model(lora_seed=9)
    lora_helpers.set_nonzero_B(model, seed=3)
    before = lora_state(model)
    results = {}
    for name, mutate in variants.items():
        write_variant(good, f"{tmp}/{name}.safetensors", mutate)
    data = open(good, "rb").read()
    open(f"{tmp}/truncated.safetensors", "wb").write(data[: len(data) // 2])
    corrupted = bytearray(data)
    corrupted[-5] ^= 0xFF  # a bit flip in the last tensor's bytes; the header still parses
    open(f"{tmp}/corrupted.safetensors", "wb").write(bytes(corrupted))
    for name in [*variants, "truncated", "corrupted"]:
        results[name] = outcome(ValueError, load_lora_checkpoint, model,
                                f"{tmp}/{name}.safetensors")
    results["lora"] = (lora_state(model), before)
    return results


def test_every_adapter_mismatch_is_named_and_leaves_the_model_untouched(tmp_path):
    (errors,) = run_on_ranks(adapter_mismatches, world_size=1, args=(str(tmp_path),))
    expected = {
        "alpha": "LoRAConfig.alpha is 8.0 in the model, 16.0",
        "geometry": "ffn_hidden_size: 128 vs 96",
        "missing": "lacks tensor decoder.layers.0.self_attention.linear_qkv.lora_A.weight, "
                   "decoder.layers.0.self_attention.linear_qkv.lora_B.weight",
        "extra": "no adapter for: ['decoder.layers.0.self_attention.linear_qkv.lora_q.lora_A",
        "shape": "the tensors do not fit the header: decoder.layers.0.self_attention.linear_qkv."
                 "lora_B.weight has shape [112, 4]; the header's config and geometry give "
                 "[128, 4]",
        "truncated": "not a readable safetensors file",
        "corrupted": "is corrupted (SHA-256 mismatch)",
    }
    for name, fragment in expected.items():
        assert_raised(errors[name], re.escape(fragment))
    assert_same(*errors["lora"], "adapters after the refused loads")


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.distributed.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
    from megatron_cpu.launch import initialize_model_parallel
    initialize_model_parallel(tp=1)
    import test_checkpoints
    from support import lora_helpers
    from megatron_lora import save_lora_checkpoint
    model = test_checkpoints.lora_model()
    lora_helpers.set_nonzero_B(model, seed=99)
    def stuck(fd):  # stop the writer after the temp file is written, before the rename
        print("writing", flush=True)
        time.sleep(3600)
    os.fsync = stuck
    save_lora_checkpoint(model, {path!r})
""")


def save_first(path):
    from megatron_lora import save_lora_checkpoint

    save_lora_checkpoint(lora_model(), path)


def test_a_save_killed_mid_write_leaves_the_old_checkpoint(tmp_path):
    from megatron_lora import read_lora_checkpoint

    path = tmp_path / "adapter.safetensors"
    run_on_ranks(save_first, world_size=1, args=(str(path),))
    old_bytes = path.read_bytes()
    script = KILLED_SAVE.format(tests=os.path.dirname(__file__), store=tmp_path / "store",
                                path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == old_bytes
    assert read_lora_checkpoint(path).config == LoRAConfig(r=4, alpha=8).resolve_targets(
        ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
