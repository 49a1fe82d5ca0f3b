"""Rank-side cases for test_te_lora.py: LoRA on megatron-core's TE wrappers (on the TE emulation)
next to LoRA on the local layers. No megatron import at module level: the TE emulation must be
on the path before megatron is imported (see te_emulation)."""

from __future__ import annotations

import argparse

import torch

from lora_common import LoRAConfig, add_lora_arguments
from support import lora_helpers, tiny_gpt

CONFIG = LoRAConfig(r=4, alpha=8)


def te_lora_spec():
    """The TE LoRA spec the way slime builds it: `--spec megatron_lora get_gpt_lora_spec`."""
    from megatron_lora import get_gpt_lora_spec

    args = add_lora_arguments(argparse.ArgumentParser()).parse_args(
        ["--lora-r", str(CONFIG.r), "--lora-alpha", str(CONFIG.alpha)])
    args.transformer_impl = "transformer_engine"
    return get_gpt_lora_spec(args, tiny_gpt.transformer_config())


def by_local_name(named: dict) -> dict:
    return {tiny_gpt.te_to_local_name(name): value for name, value in named.items()}


def te_vs_local(layouts):
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import get_lora_parameters, lora_spec

    out = {}
    for tp, sp in layouts:
        initialize_model_parallel(tp=tp)
        te_plain = tiny_gpt.build_gpt(tiny_gpt.te_spec(), sequence_parallel=sp)
        te = tiny_gpt.build_gpt(te_lora_spec(), sequence_parallel=sp)
        local = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG), sequence_parallel=sp)
        te_logits = tiny_gpt.logits(te)
        r = {"classes": sorted({type(m).__name__ for m in te.modules()
                                if "LoRA" in type(m).__name__}),
             "b0_logits": (te_logits, tiny_gpt.logits(te_plain))}
        for model in (te, local):
            lora_helpers.set_nonzero_B(model)
            # Non-trivial norm weights: an adapter fed the pre-norm input would now differ.
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "layer_norm_weight" in name or "layernorm.weight" in name:
                        param.copy_(torch.linspace(0.5, 2.0, param.numel()))
        losses, grads = [], []
        for model in (te, local):
            loss = tiny_gpt.loss(model)
            loss.backward()
            losses.append(loss.item())
            grads.append(by_local_name({n: lora_helpers.full_grad(p)
                                        for n, p in get_lora_parameters(model).items()}))
        r["losses"], r["grads"] = losses, grads
        from megatron_lora import merge_lora_weights, unmerge_lora_weights

        unmerged = tiny_gpt.logits(te)
        merge_lora_weights(te)
        r["merged_error"] = (tiny_gpt.logits(te) - unmerged).abs().max().item()
        unmerge_lora_weights(te)
        out[(tp, sp)] = r
    return out


def adapter_input_is_normalized():
    """One TE fused-norm LoRA linear: its LoRA contribution is s * B A norm(x), not s * B A x."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    from megatron_lora import lora_linear_class

    config = tiny_gpt.transformer_config()
    cls = lora_linear_class(TELayerNormColumnParallelLinear, CONFIG)
    layer = cls(64, 32, config=config, init_method=torch.nn.init.zeros_, gather_output=False,
                bias=False, skip_bias_add=False, is_expert=False)
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(0))
        layer.layer_norm_weight.copy_(torch.linspace(0.5, 2.0, 64))
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(1))
    out, _ = layer(x)  # the base weight is zero: out is the adapter's contribution alone
    normalized = torch.nn.functional.rms_norm(x, (64,), layer.layer_norm_weight,
                                              config.layernorm_epsilon)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = CONFIG.scaling * normalized @ A.t() @ B.t()
    pre_norm = CONFIG.scaling * x @ A.t() @ B.t()
    return {"normalized_error": (out - expected).abs().max().item(),
            "pre_norm_error": (out - pre_norm).abs().max().item(),
            "class": type(layer).__name__}


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes of every matmul-family op torch runs."""

    OPS = ("mm", "addmm", "bmm", "matmul", "linear")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((name, tuple(t.shape for t in tensors),
                              {str(t.dtype) for t in tensors}))
        return func(*args, **(kwargs or {}))


def lora_matmuls_under_fp8():
    """Inside TE's FP8 autocast the base GEMM goes through FP8 while every LoRA matmul (the
    ones with a dimension of size r) runs in the activation dtype."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe
    from transformer_engine.pytorch import emulation

    model = tiny_gpt.build_gpt(te_lora_spec(), params_dtype=torch.bfloat16, bf16=True)
    lora_helpers.set_nonzero_B(model)
    emulation.reset_stats()
    recorder = MatmulDtypes()
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe.DelayedScaling()), recorder:
        tiny_gpt.loss(model).backward()
    lora = [entry for entry in recorder.seen if any(CONFIG.r in shape for shape in entry[1])]
    return {"fp8_gemms": emulation.stats["fp8_gemms"],
            "lora_matmuls": len(lora),
            "lora_dtypes": sorted({dtype for _, _, dtypes in lora for dtype in dtypes})}


CANONICAL = LoRAConfig(r=4, alpha=8, canonical=True)


def te_canonical_vs_local(layouts):
    """Canonical (per-projection) LoRA on the TE spec (q/k/v and gate/up adapters inside
    TELayerNormColumnParallelLinear, fed the normalized input) next to the local spec's: B = 0
    vs the TE base; with non-zero B and norm weights: loss and full adapter grads; merged error."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import get_lora_parameters, lora_spec, merge_lora_weights

    out = {}
    for tp, sp in layouts:
        initialize_model_parallel(tp=tp)
        te_plain = tiny_gpt.build_gpt(tiny_gpt.te_spec(), sequence_parallel=sp)
        te = tiny_gpt.build_gpt(lora_spec(tiny_gpt.te_spec(), CANONICAL), sequence_parallel=sp)
        local = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CANONICAL),
                                   sequence_parallel=sp)
        r = {"classes": sorted({type(m).__name__ for m in te.modules()
                                if "LoRA" in type(m).__name__ and hasattr(m, "lora_split")}),
             "b0_logits": (tiny_gpt.logits(te), tiny_gpt.logits(te_plain))}
        losses, grads = [], []
        for model in (te, local):
            lora_helpers.set_nonzero_B(model)
            with torch.no_grad():  # an adapter fed the pre-norm input would now differ
                for name, param in model.named_parameters():
                    if "layer_norm_weight" in name or "layernorm.weight" in name:
                        param.copy_(torch.linspace(0.5, 2.0, param.numel()))
            loss = tiny_gpt.loss(model)
            loss.backward()
            losses.append(loss.item())
            grads.append(by_local_name({n: lora_helpers.full_grad(p)
                                        for n, p in get_lora_parameters(model).items()}))
        r["losses"], r["grads"] = losses, grads
        te.eval()
        with torch.no_grad():
            unmerged = tiny_gpt.logits(te)
            merge_lora_weights(te)
            r["merged_error"] = (tiny_gpt.logits(te) - unmerged).abs().max().item()
        out[(tp, sp)] = r
    return out
