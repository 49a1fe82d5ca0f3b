"""`shard`/`unshard` reproduce Megatron's own tensor-parallel split, strides included."""

import pytest
import torch

from megatron_lora.layers.sharding import shard, unshard


@pytest.mark.parametrize("world, stride, dim",
                         [(1, 1, 0), (2, 1, 0), (2, 2, 0), (4, 2, 1), (2, 1, 1)])
def test_shard_matches_megatron_cpu_init_split(world, stride, dim):
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    full = torch.randn(16, 8) if dim == 0 else torch.randn(8, 16)
    for rank in range(world):
        local = torch.empty(16 // world, 8) if dim == 0 else torch.empty(8, 16 // world)
        _initialize_affine_weight_cpu(
            local, *full.shape, 16 // world, dim, lambda w: w.copy_(full), stride=stride,
            rank=rank, world_size=world,
        )
        assert torch.equal(shard(full, dim, rank, world, stride), local)
    assert torch.equal(
        unshard([shard(full, dim, r, world, stride) for r in range(world)], dim, stride), full)


def test_uneven_split_names_the_sizes():
    with pytest.raises(ValueError, match="size 6 does not split into 4 ranks x stride 1"):
        shard(torch.zeros(6, 2), 0, 0, 4)
