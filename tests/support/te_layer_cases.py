"""Rank-side cases for test_te_emulation.py: megatron-core's TE wrappers, built on the TE
emulation, next to the megatron-core local layers they stand in for, fed the same data.

Each case returns `{quantity: (te_value, local_value)}` for the parent to compare. Nothing here
imports megatron at module level: the launcher imports this module in the rank process before
`te_emulation.enable()` runs, and megatron must not see "no TE" first.
"""

from __future__ import annotations

import torch

from megatron_lora.layers.sharding import shard
from support import tiny_gpt
from support.compare import identity

HIDDEN = 64
OUT = 96
SEQ = 8
BATCH = 2
# Attributes megatron reads on parameters (grad clipping, dist checkpointing, SP grad
# reduction), with the defaults it assumes when one is absent.
PARALLEL_ATTRIBUTES = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1,
                       "sequence_parallel": False}


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _data(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seq_shard(full, sp):
    """Under sequence parallelism a rank sees its slice of the sequence (dim 0)."""
    world, rank = _tp()
    return shard(full, 0, rank, world) if sp else full


def _leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def _attributes(param):
    return {a: getattr(param, a, default) for a, default in PARALLEL_ATTRIBUTES.items()}


def _set_bias(modules, full_bias, dim_split):
    """Give every module the same non-zero bias (this rank's slice when it is split)."""
    world, rank = _tp()
    value = shard(full_bias, 0, rank, world) if dim_split else full_bias
    with torch.no_grad():
        for module in modules:
            module.bias.copy_(value)


def column_linear(config):
    """TEColumnParallelLinear vs ColumnParallelLinear, bias fused into the output, in the
    config's params dtype."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear

    kwargs = dict(config=config, init_method=config.init_method, gather_output=False, bias=True,
                  skip_bias_add=False)
    torch.manual_seed(7)
    te = TEColumnParallelLinear(HIDDEN, OUT, is_expert=False, **kwargs)
    torch.manual_seed(7)
    local = ColumnParallelLinear(HIDDEN, OUT, **kwargs)
    _set_bias((te, local), _data(OUT, seed=1), dim_split=True)
    dtype = config.params_dtype
    x_full = _data(SEQ, BATCH, HIDDEN, seed=2).to(dtype)
    out = {}
    for name, module in (("te", te), ("local", local)):
        x = _leaf(_seq_shard(x_full, config.sequence_parallel))
        y, bias = module(x)
        (y * _data(*y.shape, seed=3).to(dtype)).sum().backward()
        out[name] = dict(out=y, returned_bias=bias, dx=x.grad, dweight=module.weight.grad,
                         dbias=module.bias.grad, weight=module.weight,
                         weight_attributes=_attributes(module.weight),
                         bias_attributes=_attributes(module.bias))
    return {k: (out["te"][k], out["local"][k]) for k in out["te"]}


def row_linear(config):
    """TERowParallelLinear vs RowParallelLinear, bias returned (skip_bias_add)."""
    from megatron.core.extensions.transformer_engine import TERowParallelLinear
    from megatron.core.tensor_parallel import RowParallelLinear

    kwargs = dict(config=config, init_method=config.init_method, bias=True,
                  input_is_parallel=True, skip_bias_add=True)
    torch.manual_seed(8)
    te = TERowParallelLinear(OUT, HIDDEN, is_expert=False, **kwargs)
    torch.manual_seed(8)
    local = RowParallelLinear(OUT, HIDDEN, **kwargs)
    _set_bias((te, local), _data(HIDDEN, seed=4), dim_split=False)
    world, rank = _tp()
    x_local = shard(_data(SEQ, BATCH, OUT, seed=5), 2, rank, world)  # input split on features
    out = {}
    for name, module in (("te", te), ("local", local)):
        x = _leaf(x_local)
        y, bias = module(x)
        ((y + bias) * _data(*y.shape, seed=6)).sum().backward()
        out[name] = dict(out=y, returned_bias=bias, dx=x.grad, dweight=module.weight.grad,
                         dbias=module.bias.grad, weight=module.weight,
                         weight_attributes=_attributes(module.weight),
                         bias_attributes=_attributes(module.bias))
    return {k: (out["te"][k], out["local"][k]) for k in out["te"]}


def column_wgrad_shortcuts(config, fused_config):
    """TE's two weight-grad shortcuts next to ColumnParallelLinear's plain wgrad: a frozen
    weight (no wgrad at all, as for LoRA's base) and fuse_wgrad_accumulation (wgrad added to
    `main_grad`, a placeholder returned as the grad since megatron's DDP marks
    `grad_added_to_main_grad`)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear

    modules = {}
    for name, cls, cfg in (("frozen", TEColumnParallelLinear, config),
                           ("fused", TEColumnParallelLinear, fused_config),
                           ("local", ColumnParallelLinear, config),
                           ("local_frozen", ColumnParallelLinear, config)):
        torch.manual_seed(7)
        extra = {"is_expert": False} if cls is TEColumnParallelLinear else {}
        modules[name] = cls(HIDDEN, OUT, config=cfg, init_method=cfg.init_method,
                            gather_output=False, bias=False, skip_bias_add=False, **extra)
    for name in ("frozen", "local_frozen"):
        modules[name].weight.requires_grad_(False)
    fused = modules["fused"].weight
    fused.main_grad = torch.full_like(fused, 0.5)  # accumulates onto what is there
    fused.grad_added_to_main_grad = False
    x_full = _data(SEQ, BATCH, HIDDEN, seed=2)
    dx = {}
    for name, module in modules.items():
        x = _leaf(_seq_shard(x_full, config.sequence_parallel))
        y, _ = module(x)
        (y * _data(*y.shape, seed=3)).sum().backward()
        dx[name] = x.grad
    local_dweight = modules["local"].weight.grad
    return dict(frozen_dx=(dx["frozen"], dx["local_frozen"]),
                frozen_grad=modules["frozen"].weight.grad,
                fused_dx=(dx["fused"], dx["local"]),
                fused_main_grad=(fused.main_grad, local_dweight + 0.5),
                fused_marked=fused.grad_added_to_main_grad)


class NormThenColumn(torch.nn.Module):
    """The local layers' equivalent of TELayerNormColumnParallelLinear: norm, then column linear."""

    def __init__(self, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        super().__init__()
        self.norm = WrappedTorchNorm(config, HIDDEN, eps=config.layernorm_epsilon)
        self.linear = ColumnParallelLinear(HIDDEN, OUT, config=config,
                                           init_method=config.init_method, gather_output=False,
                                           bias=True, skip_bias_add=False)

    def forward(self, x):
        normed = self.norm(x)
        return self.linear(normed)[0], normed


def _build_te_layernorm_column(config):
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    torch.manual_seed(9)
    te = TELayerNormColumnParallelLinear(HIDDEN, OUT, config=config,
                                         init_method=config.init_method, gather_output=False,
                                         bias=True, skip_bias_add=False, is_expert=False)
    _set_bias((te,), _data(OUT, seed=10), dim_split=True)
    return te


def _build_layernorm_column(config):
    """Both modules, with the same weights and non-trivial norm parameters."""
    te = _build_te_layernorm_column(config)
    torch.manual_seed(9)
    local = NormThenColumn(config)
    _set_bias((local.linear,), _data(OUT, seed=10), dim_split=True)
    with torch.no_grad():
        gamma = 1 + 0.1 * _data(HIDDEN, seed=11)
        te.layer_norm_weight.copy_(gamma)
        local.norm.weight.copy_(gamma)
        if config.normalization == "LayerNorm":
            te.layer_norm_bias.copy_(0.1 * _data(HIDDEN, seed=12))
            local.norm.bias.copy_(te.layer_norm_bias)
    return te, local


def _norm_grads(te, local):
    grads = {"dgamma": (te.layer_norm_weight.grad, local.norm.weight.grad)}
    if te.layer_norm_bias is not None:
        grads["dbeta"] = (te.layer_norm_bias.grad, local.norm.bias.grad)
    return grads


def zero_centered_gamma(config, zero_centered_config):
    """layernorm_zero_centered_gamma: TE stores gamma - 1 (initialized to zeros) and scales by
    1 + gamma; the local norm (which has no such option) holds 1 + gamma."""
    te = _build_te_layernorm_column(zero_centered_config)
    initial = te.layer_norm_weight.detach().clone()
    _, local = _build_layernorm_column(config)
    with torch.no_grad():
        te.layer_norm_weight.copy_(local.norm.weight - 1)
    x_full = _data(SEQ, BATCH, HIDDEN, seed=17)
    outs = []
    for module in (te, local):
        x = _leaf(_seq_shard(x_full, config.sequence_parallel))
        y = module(x)[0]
        y.sum().backward()
        outs.append((y, x.grad))
    return dict(initial_gamma=initial,
                out=(outs[0][0], outs[1][0]), dx=(outs[0][1], outs[1][1]),
                dgamma=(te.layer_norm_weight.grad, local.norm.weight.grad))


def layernorm_column_linear(config):
    """TELayerNormColumnParallelLinear vs norm + ColumnParallelLinear; then with
    return_layernorm_output switched on for the built module, plain and gathered, with a loss
    that also depends on the returned norm output."""
    te, local = _build_layernorm_column(config)
    sp = config.sequence_parallel
    x_full = _data(SEQ, BATCH, HIDDEN, seed=13)
    g_out = _data(SEQ, BATCH, OUT // _tp()[0], seed=14)
    g_norm_full = _data(SEQ, BATCH, HIDDEN, seed=15)
    result = {}

    x_te, x_local = _leaf(_seq_shard(x_full, sp)), _leaf(_seq_shard(x_full, sp))
    y_te, _ = te(x_te)
    y_local, _ = local(x_local)
    (y_te * g_out).sum().backward()
    (y_local * g_out).sum().backward()
    result["plain"] = dict(out=(y_te, y_local), dx=(x_te.grad, x_local.grad),
                           dweight=(te.weight.grad, local.linear.weight.grad),
                           weight=(te.weight, local.linear.weight),
                           weight_attributes=(_attributes(te.weight),
                                              _attributes(local.linear.weight)),
                           gamma_attributes=(_attributes(te.layer_norm_weight),
                                             _attributes(local.norm.weight)),
                           **_norm_grads(te, local))

    for gathered in (False, True):
        te.zero_grad(), local.zero_grad()
        te.return_layernorm_output = True
        te.return_layernorm_output_gathered = gathered
        g_norm = g_norm_full if gathered else _seq_shard(g_norm_full, sp)
        x_te, x_local = _leaf(_seq_shard(x_full, sp)), _leaf(_seq_shard(x_full, sp))
        (y_te, ln_out), _ = te(x_te)
        y_local, normed = local(x_local)
        (y_te * g_out).sum().add((ln_out * g_norm).sum()).backward()
        # TE keeps the gradient of a returned norm output only when it is not gathered.
        local_loss = (y_local * g_out).sum()
        if not gathered:
            local_loss = local_loss + (normed * g_norm).sum()
        local_loss.backward()
        reference_norm = local.norm(x_full) if gathered else normed
        result["gathered" if gathered else "returned"] = dict(
            out=(y_te, y_local), norm_output=(ln_out, reference_norm),
            dx=(x_te.grad, x_local.grad), **_norm_grads(te, local))
    return result


def fp8_layernorm_column_linear(config):
    """TELayerNormColumnParallelLinear with return_layernorm_output under fp8_autocast, per
    recipe, next to the same module outside it."""
    import transformer_engine as te_pkg
    from megatron.core import parallel_state
    from transformer_engine.pytorch import emulation
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager, fp8_autocast

    te, _ = _build_layernorm_column(config)
    te.return_layernorm_output = True
    x = _seq_shard(_data(SEQ, BATCH, HIDDEN, seed=16), config.sequence_parallel)
    (out_hp, ln_hp), _ = te(x)
    recipes = te_pkg.common.recipe
    format_ = recipes.Format.HYBRID
    result = {"high_precision": dict(out=out_hp, norm_output=ln_hp)}
    for recipe in (recipes.DelayedScaling(fp8_format=format_),
                   recipes.Float8CurrentScaling(fp8_format=format_),
                   recipes.MXFP8BlockScaling()):
        emulation.reset_stats()
        x_leaf = _leaf(x)
        with fp8_autocast(enabled=True, fp8_recipe=recipe,
                          fp8_group=parallel_state.get_amax_reduction_group()):
            enabled_inside = FP8GlobalStateManager.is_fp8_enabled()
            (out, ln_out), _ = te(x_leaf)
        out.sum().add(ln_out.sum()).backward()
        result[type(recipe).__name__] = dict(
            out=out, norm_output=ln_out, module_fp8=te.fp8,
            module_recipe=(identity(te.fp8_meta["recipe"]), identity(recipe)),
            enabled_inside=enabled_inside,
            enabled_after=FP8GlobalStateManager.is_fp8_enabled(), stats=dict(emulation.stats),
            dx=x_leaf.grad,
            # the norm output rounded to the FP8 grid: equal to it only if it was FP8 already
            quantized_norm_output=emulation.quantize(ln_out.detach()),
            expected_out=_expected_fp8_out(te, ln_hp, config.sequence_parallel))
    return result


def _expected_fp8_out(te, ln_out, sp):
    """The emulated FP8 GEMM spelled out: e4m3-rounded (gathered) input and weight."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from transformer_engine.pytorch.emulation import quantize

    x = gather_from_sequence_parallel_region(ln_out) if sp else ln_out
    return quantize(x) @ quantize(te.weight.detach()).t() + te.bias.detach()


def all_layer_cases():
    """Every case at TP=2, TP=2 with SP, and TP=1 (the 2 ranks then are data-parallel)."""
    from megatron_cpu.launch import initialize_model_parallel

    results = {}
    for tp, sp in [(2, False), (2, True), (1, False)]:
        initialize_model_parallel(tp=tp)

        def config(sp=sp, **overrides):  # the tiny GPT's config (RMSNorm, fp32) with overrides
            return tiny_gpt.transformer_config(sequence_parallel=sp, **overrides)

        rms, ln = config(), config(normalization="LayerNorm")
        results[(tp, sp)] = {
            "column": column_linear(rms),
            "column[bf16]": column_linear(config(params_dtype=torch.bfloat16)),
            "column_wgrad_shortcuts": column_wgrad_shortcuts(
                rms, config(gradient_accumulation_fusion=True)),
            "row": row_linear(rms),
            "layernorm_column[RMSNorm]": layernorm_column_linear(rms),
            "layernorm_column[LayerNorm]": layernorm_column_linear(ln),
            "zero_centered_gamma": zero_centered_gamma(
                rms, config(layernorm_zero_centered_gamma=True)),
            "fp8": fp8_layernorm_column_linear(rms),
        }
    results["context_parallel_attention"] = context_parallel_attention()
    return results


# ----- context parallelism: the emulated attention over a CP group ---------------------------

def _zigzag(full: torch.Tensor, starts: list[int], rank: int, cp: int) -> torch.Tensor:
    """This rank's rows of packed sequences (`starts`: their offsets, the last the end) in the
    CP layout: of each sequence's `2 cp` chunks, chunks `rank` and `2 cp - 1 - rank`."""
    rows = []
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        chunk = (end - start) // (2 * cp)
        for index in (rank, 2 * cp - 1 - rank):
            rows.append(full[start + index * chunk:start + (index + 1) * chunk])
    return torch.cat(rows)


def context_parallel_attention() -> dict:
    """TE's DotProductAttention (emulated) on packed sequences (THD, causal, GQA), once whole on
    every rank and once over a CP group of both ranks in the zigzag layout: outputs and the
    grads of q, k and v, this rank's rows of the whole run beside the CP run's."""
    import torch.distributed as dist
    from transformer_engine.pytorch import DotProductAttention

    heads, groups, dim, cp = 4, 2, 8, dist.get_world_size()
    padded = torch.tensor([0, 8, 20, 24], dtype=torch.int32)    # where each sequence lies
    lengths = torch.tensor([0, 7, 19, 23], dtype=torch.int32)   # ... and its tokens (7, 11, 4)
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(24, n, dim, generator=generator) for n in (heads, groups, groups)]
    weight = torch.randn(24, heads * dim, generator=generator)

    def run(q, k, v, w, cp_group):
        attention = DotProductAttention(heads, dim, num_gqa_groups=groups, qkv_format="thd",
                                        attn_mask_type="padding_causal", cp_group=cp_group,
                                        cp_global_ranks=list(range(cp)), cp_stream=None)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(q, k, v, cu_seqlens_q=lengths, cu_seqlens_kv=lengths,
                        cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded)
        (out * w).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    whole = run(*full, weight, None)
    rank, starts = dist.get_rank(), padded.tolist()
    mine = [_zigzag(t, starts, rank, cp) for t in (*full, weight)]
    return {"whole": [_zigzag(t, starts, rank, cp) for t in whole],
            "cp": run(*mine, dist.group.WORLD)}
