"""Rank-side cases for test_te_emulation.py: a tiny GPT built from megatron-core's TE spec on
the TE emulation, next to the same GPT built from the local spec.

No megatron import at module level (see te_layer_cases.py).
"""

from __future__ import annotations

import torch

from support import tiny_gpt


def _by_local_name(model, values):
    return {tiny_gpt.te_to_local_name(name): values(p) for name, p in model.named_parameters()}


def _reseed(seed: int = 1234) -> None:
    """The default RNG and megatron's tracker states as a fresh launch has them."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def te_and_local_gpt(sp: bool):
    """Loss, weights and grads of the TE-spec and the local-spec GPT (same seed), keyed by
    local-spec names. Attention dropout is on: both draw its mask under megatron's RNG tracker
    (its TP-rank state, or the default state under SP), so the same RNG states give the same
    masks."""
    local = tiny_gpt.build_gpt(tiny_gpt.local_spec(), sequence_parallel=sp, attention_dropout=0.1)
    te = tiny_gpt.build_gpt(tiny_gpt.te_spec(), sequence_parallel=sp, attention_dropout=0.1)
    losses = []
    for model in (te, local):
        _reseed()
        loss = tiny_gpt.loss(model)
        loss.backward()
        losses.append(loss.detach())
    weights = (_by_local_name(te, lambda p: p.detach().clone()), tiny_gpt.full_state(local))
    grads = (_by_local_name(te, lambda p: p.grad), {n: p.grad for n, p in local.named_parameters()})
    state_dict_keys = (sorted(te.state_dict()), sorted(local.state_dict()))
    return dict(loss=tuple(losses), weights=weights, grads=grads, state_dict_keys=state_dict_keys)


def gpu_style_init_weights():
    """Weights of both specs built with `use_cpu_initialization=False`: each rank draws its own
    shard under megatron's RNG tracker (TE's reset_parameters vs megatron's GPU init path)."""
    models = []
    for spec in (tiny_gpt.te_spec(), tiny_gpt.local_spec()):
        _reseed()  # the tracker's states advance with every draw
        models.append(tiny_gpt.build_gpt(spec, use_cpu_initialization=False))
    te, local = models
    return _by_local_name(te, lambda p: p.detach().clone()), tiny_gpt.full_state(local)


def fp8_through_megatron_config(sp: bool):
    """The TE-spec GPT with megatron's own FP8 switch (`TransformerConfig(fp8=...,
    fp8_recipe=...)`, which makes megatron enter `fp8_autocast` around the layers), per recipe,
    next to the same model without FP8."""
    from transformer_engine.pytorch import emulation

    result = {"high_precision": tiny_gpt.loss(tiny_gpt.build_gpt(tiny_gpt.te_spec(),
                                                                 sequence_parallel=sp)).item()}
    for recipe in ("delayed", "tensorwise", "mxfp8"):
        model = tiny_gpt.build_gpt(tiny_gpt.te_spec(), sequence_parallel=sp, fp8="hybrid",
                                   fp8_recipe=recipe)
        emulation.reset_stats()
        loss = tiny_gpt.loss(model)
        forward_stats = dict(emulation.stats)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        result[recipe] = dict(loss=loss.item(), stats=forward_stats, grads=grads)
    return result


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def te_rng_tracker_streams():
    """megatron's `te_rng_tracker=True` builds its tracker on TE's CudaRNGStatesTracker: the
    tensor-parallel stream differs per TP rank and continues where it stopped."""
    from megatron.core.extensions.transformer_engine import TECudaRNGStatesTracker
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234, te_rng_tracker=True, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    # isinstance, by class name: unpickling the classes would import megatron's TE extension
    # in the pytest process
    result = dict(tracker_classes=[_class_name(cls) for cls in type(tracker).__mro__],
                  te_tracker_class=_class_name(TECudaRNGStatesTracker), first=first,
                  second=second, default=torch.rand(4))
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    return result


def which_te():
    """What megatron-core detected: the TE version and whether its TE-dependent modules are on."""
    import transformer_engine
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.utils import get_te_version

    return dict(version=str(get_te_version()), module_file=transformer_engine.__file__,
                extension_has_te=te_extension.HAVE_TE, specs_have_te=gpt_layer_specs.HAVE_TE)


def all_gpt_cases():
    from megatron_cpu.launch import initialize_model_parallel

    results = {"which_te": which_te()}
    for tp, sp in [(2, False), (2, True), (1, False)]:
        initialize_model_parallel(tp=tp)
        results[(tp, sp)] = te_and_local_gpt(sp)
    initialize_model_parallel(tp=2)
    results["gpu_style_init"] = gpu_style_init_weights()
    results["fp8"] = fp8_through_megatron_config(sp=True)
    results["te_rng_tracker"] = te_rng_tracker_streams()
    return results
