"""Rank-side cases for test_reliability.py: each runs a verb on bad input and returns what it
saw (the outcome, the model's parameters, `requires_grad` flags and module classes, and the
files' hashes, before and after); the test judges."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from lora_common import LoRAConfig
from support import lora_helpers, tiny_gpt, tiny_mla
from support.outcomes import outcome

CONFIG = LoRAConfig(r=4, alpha=8)
MLA_TARGETS = tiny_mla.TARGETS + ("linear_fc1", "linear_fc2")


# --- evidence ---------------------------------------------------------------------------------


def files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path (temporaries included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def state(model) -> dict:
    """What a refused verb must leave as it was: every parameter's value and `requires_grad`,
    and every module's class (a LoRA linear is a subclass swapped in and out)."""
    return {"params": params(model),
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "classes": {n: type(m).__name__ for n, m in model.named_modules()}}


def observe(call, model, folder: Path) -> dict:
    """What `call()` raised (any error: the test says which one it must be), with the model's
    state (`state`) and the folder's files before and after."""
    before, hashes = state(model), files(folder)
    result = outcome(Exception, call)
    after = state(model)
    return {"outcome": result, "params_before": before["params"],
            "params_after": after["params"],
            "state_before": {k: before[k] for k in ("requires_grad", "classes")},
            "state_after": {k: after[k] for k in ("requires_grad", "classes")},
            "files_before": hashes, "files_after": files(folder)}


def lora_gpt(config=CONFIG, seed: int = 0, b_seed: int = 7, **overrides):
    from megatron_lora import lora_spec

    model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), config), seed=seed, **overrides)
    lora_helpers.set_nonzero_B(model, seed=b_seed)
    return model


def lora_mla(config: LoRAConfig, seed: int = 0, b_seed: int = 7, **overrides):
    from megatron_lora import lora_spec

    model = tiny_mla.build(lora_spec(tiny_mla.local_spec(), config), seed=seed, **overrides)
    lora_helpers.set_nonzero_B(model, seed=b_seed)
    return model


# --- 1. a dist checkpoint with another adapter set ---------------------------------------------


def dist_checkpoint_cases(tmp: str) -> dict:
    """Checkpoints of a fused four-target model, a canonical one and a qkv-only one, loaded
    into models of another adapter set (weights and adapters unlike every checkpoint's), with
    our loader and with megatron-core's own inside `allow_missing_adapters`."""
    from megatron.core import dist_checkpointing

    import megatron_lora as ml

    folder = Path(tmp)
    qkv_only = LoRAConfig(r=4, alpha=8, target_modules=["linear_qkv"])
    canonical = LoRAConfig(r=4, alpha=8, canonical=True)
    for name, config in (("fused", CONFIG), ("canonical", canonical), ("qkv", qkv_only)):
        ml.save_dist_checkpoint(lora_gpt(config), folder / name)
    ml.save_dist_checkpoint(tiny_gpt.build_gpt(), folder / "base")

    def megatron_load(model, name, strict):
        def load():
            with ml.allow_missing_adapters():
                loaded = dist_checkpointing.load(model.sharded_state_dict(), str(folder / name),
                                                 strict=strict)
            model.load_state_dict(loaded[0] if isinstance(loaded, tuple) else loaded,
                                  strict=False)
        return load

    seen = {}
    for case, config, source in (("canonical_into_fused", CONFIG, "canonical"),
                                 ("fused_into_canonical", canonical, "fused"),
                                 ("qkv_into_four", CONFIG, "qkv"),
                                 ("four_into_qkv", qkv_only, "fused")):
        model = lora_gpt(config, seed=5, b_seed=11)
        seen[case] = observe(lambda m=model, s=source: ml.load_dist_checkpoint(m, folder / s),
                             model, folder)
    for strict in ("log_unexpected", "raise_unexpected"):
        model = lora_gpt(CONFIG, seed=5, b_seed=11)
        seen["hook_qkv_into_four", strict] = observe(megatron_load(model, "qkv", strict),
                                                     model, folder)
    model = lora_gpt(qkv_only, seed=5, b_seed=11)
    seen["hook_four_into_qkv"] = observe(megatron_load(model, "fused", "log_unexpected"),
                                         model, folder)
    # what still loads: a base-only checkpoint (adapters at their init), the same adapter set
    model = lora_gpt(CONFIG, seed=5, b_seed=11)
    seen["base_only"] = outcome(Exception, ml.load_dist_checkpoint, model, folder / "base")
    seen["same_set"] = outcome(Exception, megatron_load(lora_gpt(canonical, seed=5),
                                                        "canonical", "raise_unexpected"))
    return seen


# --- 2. a refused PEFT import -----------------------------------------------------------------


def _edit_peft(folder: Path, edit_tensors=None, edit_config=None) -> None:
    from safetensors.torch import load_file, save_file

    from lora_common.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    if edit_tensors is not None:
        tensors = load_file(folder / ADAPTER_WEIGHTS_FILE)
        edit_tensors(tensors)
        save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
        edit_config(config)
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))


def _key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight"


def peft_import_cases(tmp: str) -> dict:
    """PEFT imports that only a rebuilt adapter can refuse, into models carrying trained LoRA of
    another rank (so the import must rebuild them): a model wrapped in DDP, an MLA adapter whose
    kv_b_proj B is wrong in layer 1 only, an adapter for MLA's uncompressed q_proj in a model
    that compresses q (its target matches no module). And an MLA adapter whose o_proj input
    (heads x v_head_dim) is not the hidden size imports exactly."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    import megatron_lora as ml

    warnings.simplefilter("ignore")  # the export's note on DeepSeek-V3's dense MLP
    folder = Path(tmp)
    seen = {}
    ml.export_peft_adapter(lora_gpt(LoRAConfig(r=8, alpha=16)), folder / "dense")
    model = lora_gpt(seed=3, b_seed=3)
    wrapped = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    seen["ddp"] = observe(lambda: ml.import_peft_adapter(wrapped, folder / "dense"), model,
                          folder)

    mla = LoRAConfig(r=4, alpha=8, target_modules=MLA_TARGETS)
    ml.export_peft_adapter(lora_mla(mla), folder / "mla", architecture="DeepseekV3ForCausalLM")
    seen["mla_rows"] = lora_mla(mla).get_submodule(
        "decoder.layers.1.self_attention.linear_kv_up_proj").lora_B.weight.shape[0]
    bad_b = folder / "mla_bad_layer1"
    bad_b.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad_b / name).write_bytes((folder / "mla" / name).read_bytes())

    def taller_kv_b(tensors):
        key = _key(1, "kv_b_proj", "B")
        tensors[key] = torch.zeros(tensors[key].shape[0] + 4, tensors[key].shape[1])

    _edit_peft(bad_b, edit_tensors=taller_kv_b)
    q_proj = folder / "mla_q_proj"
    q_proj.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (q_proj / name).write_bytes((folder / "mla" / name).read_bytes())

    def add_q_proj(tensors):
        for layer in (0, 1):
            tensors[_key(layer, "q_proj", "A")] = torch.ones(4, 64)
            tensors[_key(layer, "q_proj", "B")] = torch.ones(96, 4)

    _edit_peft(q_proj, edit_tensors=add_q_proj,
               edit_config=lambda c: c.update(target_modules=[*c["target_modules"], "q_proj"]))
    trained = LoRAConfig(r=2, alpha=8, target_modules=MLA_TARGETS)
    for canonical in (False, True):
        model = lora_mla(trained, seed=3, b_seed=3)
        seen["mla_b", canonical] = observe(
            lambda m=model, c=canonical: ml.import_peft_adapter(m, bad_b, canonical=c),
            model, folder)
        model = lora_mla(trained, seed=3, b_seed=3)
        seen["mla_q_proj", canonical] = observe(
            lambda m=model, c=canonical: ml.import_peft_adapter(m, q_proj, canonical=c),
            model, folder)

    # o_proj's input 4 heads x v_head_dim 24 = 96, not hidden 64: PEFT's shapes, imported as
    # they are in both modes (the export of the model it came from, read back exactly)
    wide = LoRAConfig(r=4, alpha=8, target_modules=tiny_mla.TARGETS)
    source = lora_mla(wide, v_head_dim=24)
    ml.export_peft_adapter(source, folder / "mla_v24", architecture="DeepseekV3ForCausalLM")
    seen["v24_source"] = lora_helpers.full_state(ml.get_lora_parameters(source))
    for canonical in (False, True):
        model = tiny_mla.build(tiny_mla.local_spec(), v_head_dim=24)
        seen["v24", canonical] = outcome(Exception, ml.import_peft_adapter, model,
                                         folder / "mla_v24", canonical=canonical)
        seen["v24_adapters", canonical] = lora_helpers.full_state(ml.get_lora_parameters(model))
    return seen


# --- 3. an export that does not fit its architecture -------------------------------------------


def export_cases(tmp: str) -> dict:
    """An MLA model exported live under the default (Llama) architecture, a standard one as
    DeepSeek-V3: refused on every rank before anything is written; their adapter checkpoints
    for the offline export."""
    import megatron_lora as ml

    folder = Path(tmp)
    mla = lora_mla(LoRAConfig(r=4, alpha=8, target_modules=MLA_TARGETS))
    ml.save_lora_checkpoint(mla, folder / "mla.safetensors")
    dense = lora_gpt()
    ml.save_lora_checkpoint(dense, folder / "dense.safetensors")
    return {"mla_as_llama": observe(lambda: ml.export_peft_adapter(mla, folder / "out"), mla,
                                    folder),
            "dense_as_deepseek": observe(lambda: ml.export_peft_adapter(
                dense, folder / "out", architecture="DeepseekV3ForCausalLM"), dense, folder)}


# --- 5. the adapter sync's producer on bad tensors ----------------------------------------------


def producer_cases() -> dict:
    """`gather_peft_adapter` over mappings a trainer could hand it by mistake: an integer
    adapter, a numpy one, a meta one, a list of pairs instead of a mapping; the mapping is
    left as it was. `merged_weights` over an integer adapter."""
    import megatron_lora as ml

    model = lora_gpt()
    name = "decoder.layers.1.mlp.linear_fc2.lora_B.weight"
    good = {f"module.{n}": p.detach().clone() for n, p in ml.get_lora_parameters(model).items()}
    key = f"module.{name}"
    bad = {"integer": good[key].to(torch.int32), "numpy": good[key].numpy(),
           "meta": torch.empty_like(good[key], device="meta")}
    seen = {}
    for case, value in bad.items():
        tensors = {**good, key: value}
        seen[case] = outcome(Exception, ml.gather_peft_adapter, tensors, model)
    seen["pairs"] = outcome(Exception, ml.gather_peft_adapter, list(good.items()), model)
    # the merged stream reads the same mappings
    whole = {f"module.{n}": p.detach().clone() for n, p in model.named_parameters()}
    seen["merged_integer"] = outcome(Exception, ml.merged_weights,
                                     {**whole, key: bad["integer"]}, model)
    seen["good_after"] = good
    seen["good_before"] = {f"module.{n}": p.detach().clone()
                           for n, p in ml.get_lora_parameters(model).items()}
    return seen


# --- 7. re-applying LoRA of another mode -------------------------------------------------------


def reapply_cases(tmp: str) -> dict:
    """Canonical LoRA applied over a model carrying fused LoRA: refused naming the module and
    the field that differs, the model untouched."""
    import megatron_lora as ml

    model = lora_gpt()
    return {"canonical_over_fused": observe(lambda: ml.apply_lora_to_megatron_model(
        model, LoRAConfig(r=4, alpha=8, canonical=True)), model, Path(tmp))}
