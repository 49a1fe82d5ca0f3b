"""Training with LoRA is the same computation at every tensor-parallel size, and LoRA adds
only the rank-sized communication the sharding rule implies."""

import pytest
import torch

from lora_common import LoRAConfig
from megatron_cpu.collective_bytes import count_collective_bytes
from megatron_cpu.ddp_training import Schedule
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, tiny_gpt

CONFIG = LoRAConfig(r=4, alpha=8)
LAYOUTS = [(2, False), (2, True), (1, False)]
STEPS = 3
CLIPPED = Schedule(warmup_steps=1, decay_style="cosine", clip_grad=0.1)


def train_each_layout():
    from megatron_lora import get_lora_parameters, lora_spec, mark_only_lora_as_trainable

    out = {}
    for tp, sp in LAYOUTS:
        initialize_model_parallel(tp=tp)
        config = tiny_gpt.transformer_config(sequence_parallel=sp)
        model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG), config=config)
        mark_only_lora_as_trainable(model)
        lora_helpers.set_nonzero_B(model)
        losses = lora_helpers.train_with_megatron_ddp(model, config, steps=STEPS)
        out[(tp, sp)] = (losses, lora_helpers.full_state(get_lora_parameters(model)))
    return out


def test_tp2_and_sp_train_like_tp1():
    ranks = run_on_ranks(train_each_layout, world_size=2)
    ref_losses, ref_weights = ranks[0][(1, False)]
    assert len(set(ref_losses)) == STEPS  # the loss moves, so equality below means something
    for rank in ranks:
        for layout, (losses, weights) in rank.items():
            assert losses == pytest.approx(ref_losses, rel=1e-5), layout
            for name, value in ref_weights.items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6,
                                           msg=f"{layout} {name}")


def first_grad_norm(model, config):
    """Megatron's grad norm of the first step's finalized grads, and the plain norm over this
    rank's grads (the whole model's norm where nothing is sharded)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_cpu.ddp_training import grad_norm

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    tiny_gpt.loss(ddp).backward()
    finalize_model_grads([ddp])
    params = [p for p in ddp.parameters() if p.requires_grad]
    for param in params:
        param.grad = param.main_grad
    plain = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    return grad_norm(params), plain


def norms_and_clipped_training():
    from megatron_lora import lora_spec, mark_only_lora_as_trainable

    out = {}
    for tp, sp in LAYOUTS:
        initialize_model_parallel(tp=tp)
        config = tiny_gpt.transformer_config(sequence_parallel=sp)
        models = []
        for _ in range(2):
            model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG), config=config)
            mark_only_lora_as_trainable(model)
            lora_helpers.set_nonzero_B(model)
            models.append(model)
        norms = first_grad_norm(models[0], config)
        losses = lora_helpers.train_with_megatron_ddp(models[1], config, steps=STEPS,
                                                      schedule=CLIPPED)
        out[(tp, sp)] = norms, losses
    return out


def test_clipping_uses_the_whole_models_grad_norm_at_every_tp_size():
    """Replicated A/B counted once per TP group, `sequence_parallel` grads summed first: the norm
    is the TP=1 model's, so warmup, cosine decay and clipping train alike at every TP size."""
    ranks = run_on_ranks(norms_and_clipped_training, world_size=2)
    (ref_norm, plain), ref_losses = ranks[0][(1, False)]
    assert ref_norm == pytest.approx(plain, rel=1e-6)  # TP=1: Megatron's norm is the plain one
    assert ref_norm > 2 * CLIPPED.clip_grad  # clipping bites
    for rank in ranks:
        for layout, ((norm, local), losses) in rank.items():
            assert norm == pytest.approx(ref_norm, rel=1e-5), layout
            if layout[0] == 2:
                assert local != pytest.approx(ref_norm, rel=1e-3), layout  # the shard is not it
            assert losses == pytest.approx(ref_losses, rel=1e-5), layout


def one_step_bytes(lora: bool, sp: bool) -> int:
    """Bytes this rank sends through collectives in one forward and backward."""
    from megatron_lora import lora_spec

    initialize_model_parallel(tp=2)
    spec = lora_spec(tiny_gpt.local_spec(), CONFIG) if lora else tiny_gpt.local_spec()
    model = tiny_gpt.build_gpt(spec, sequence_parallel=sp)
    for name, param in model.named_parameters():  # same backward graph with and without LoRA
        param.requires_grad_(".lora_" in name or "word_embeddings" in name)
    with count_collective_bytes() as counts:
        tiny_gpt.loss(model).backward()
    return sum(counts.values())


def measure_comm():
    return {(lora, sp): one_step_bytes(lora, sp) for lora in (False, True) for sp in (False, True)}


def test_lora_adds_only_rank_sized_traffic():
    ranks = run_on_ranks(measure_comm, world_size=2, tp=2)
    assert ranks[0] == ranks[1]
    counts = ranks[0]
    g = tiny_gpt.Geometry()
    tokens, rank_bytes = tiny_gpt.SEQ * tiny_gpt.BATCH, CONFIG.r * 4  # fp32
    # Per layer: no SP, one [tokens, r] all-reduce per target (column: dh in backward; row: A x
    # in forward). SP: column all-gathers A x (forward) and reduce-scatters dh (backward); row
    # reduce-scatters A x (forward) and all-gathers dh (backward): two per target.
    assert counts[(True, False)] - counts[(False, False)] == g.layers * 4 * tokens * rank_bytes
    assert counts[(True, True)] - counts[(False, True)] == g.layers * 8 * tokens * rank_bytes
    for sp in (False, True):
        extra = counts[(True, sp)] - counts[(False, sp)]
        assert extra <= 0.2 * counts[(False, sp)]  # r=4 vs hidden=64 here; r/hidden in general


def column_dropout_losses():
    """With dropout on column targets only, masks come from the stream every TP rank shares,
    so TP=2 (no SP) draws exactly the masks TP=1 draws."""
    from megatron_lora import lora_spec

    config = LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["linear_qkv", "linear_fc1"])
    out = {}
    for tp in (2, 1):
        initialize_model_parallel(tp=tp)
        model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), config))
        lora_helpers.set_nonzero_B(model)
        model.train()
        out[tp] = [tiny_gpt.loss(model, step).item() for step in range(2)]
        model.eval()
        out[(tp, "eval")] = tiny_gpt.loss(model).item()
    return out


def test_adapter_dropout_agrees_across_ranks_holding_the_same_tokens():
    rank0, rank1 = run_on_ranks(column_dropout_losses, world_size=2)
    assert rank0[2] == pytest.approx(rank0[1], rel=1e-6)
    assert rank0[2] == rank1[2]
    assert rank0[(1, "eval")] not in rank0[1]  # dropout did change the training loss
