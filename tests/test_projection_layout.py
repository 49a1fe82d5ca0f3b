"""The per-projection layout (`layers/projection_layout.py`): on every TP rank, the one adapter
that canonical adapters amount to is this rank's shard of the fused adapter PEFT's separate
q/k/v (gate/up) adapters fuse into, laid out as Megatron splits the base weight."""

import pytest
import torch

from megatron_lora.interop import hf_mapping
from megatron_lora.layers.projection_layout import ProjectionLayout
from megatron_lora.layers.sharding import shard

R, HIDDEN = 3, 10


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def padded(B, index, parts):
    """B `[rows, r]` in the columns of projection `index` of a `[rows, parts * r]` block."""
    block = torch.zeros(B.shape[0], parts * R)
    block[:, index * R:(index + 1) * R] = B
    return block


@pytest.mark.parametrize("heads, groups, tp", [(4, 2, 1), (4, 2, 2), (8, 4, 2), (4, 4, 4)])
@pytest.mark.parametrize("present", [("q", "k", "v"), ("q", "v"), ("k",)])
def test_qkv_per_rank_is_the_shard_of_the_fused_adapter(heads, groups, tp, present):
    kv = 5
    rows = {"q": heads * kv, "k": groups * kv, "v": groups * kv}
    A = {p: random(R, HIDDEN, seed=i) for i, p in enumerate(present)}
    B = {p: random(rows[p], R, seed=10 + i) for i, p in enumerate(present)}
    # The full fused adapter: A stacked, B blocks fused with Megatron's per-group layout.
    blocks = [padded(B[p], present.index(p), len(present)) if p in B
              else torch.zeros(rows[p], len(present) * R) for p in "qkv"]
    full_B = hf_mapping.fuse_qkv(*blocks, heads, groups, kv)
    full_A = torch.cat([A[p] for p in present])
    layout = ProjectionLayout.qkv(heads, groups, kv)
    out_local = (heads + 2 * groups) * kv // tp
    for rank in range(tp):
        local_B = {p: shard(b, 0, rank, tp) for p, b in B.items()}  # each split on its own rows
        A_eff, B_eff = layout.fuse(A, local_B, out_local)
        assert torch.equal(A_eff, full_A)
        assert torch.equal(B_eff, shard(full_B, 0, rank, tp))  # the base weight's split


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_fc1_per_rank_is_the_swiglu_shard(tp):
    ffn = 6
    A = {p: random(R, HIDDEN, seed=i) for i, p in enumerate(("gate", "up"))}
    B = {p: random(ffn, R, seed=10 + i) for i, p in enumerate(("gate", "up"))}
    full_B = hf_mapping.fuse_fc1(padded(B["gate"], 0, 2), padded(B["up"], 1, 2))
    for rank in range(tp):
        local_B = {p: shard(b, 0, rank, tp) for p, b in B.items()}
        _, B_eff = ProjectionLayout.fc1().fuse(A, local_B, 2 * ffn // tp)
        assert torch.equal(B_eff, shard(full_B, 0, rank, tp, stride=2))  # SwiGLU's stride 2


def test_the_fused_adapter_computes_each_projection_own_delta():
    heads, groups, kv = 4, 2, 5
    layout = ProjectionLayout.qkv(heads, groups, kv)
    A = {p: random(R, HIDDEN, seed=i) for i, p in enumerate("qv")}
    B = {"q": random(heads * kv, R, seed=1), "v": random(groups * kv, R, seed=2)}
    A_eff, B_eff = layout.fuse(A, B, (heads + 2 * groups) * kv)
    q, k, v = hf_mapping.split_qkv(B_eff @ A_eff, heads, groups, kv)
    torch.testing.assert_close(q, B["q"] @ A["q"])
    torch.testing.assert_close(v, B["v"] @ A["v"])
    assert not k.any()


def test_fuse_is_differentiable_to_each_projection():
    layout = ProjectionLayout.fc1()
    A = {p: random(R, HIDDEN, seed=i).requires_grad_() for i, p in enumerate(("gate", "up"))}
    B = {p: random(4, R, seed=5 + i).requires_grad_() for i, p in enumerate(("gate", "up"))}
    A_eff, B_eff = layout.fuse(A, B, 8)
    (B_eff @ A_eff).square().sum().backward()
    for p in ("gate", "up"):
        delta = B[p] @ A[p]
        torch.testing.assert_close(B[p].grad, 2 * delta.detach() @ A[p].detach().t())


def test_rows_that_are_not_whole_projections_are_named():
    layout = ProjectionLayout.qkv(4, 2, 5)
    with pytest.raises(ValueError, match="not whole groups"):
        layout.rows(33)
    with pytest.raises(ValueError, match=r"B of q has shape \(8, 3\)"):
        layout.fuse({"q": random(R, HIDDEN, seed=0)}, {"q": random(8, R, seed=1)}, 40)
