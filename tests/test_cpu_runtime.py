"""megatron-core on CPU: TP=2 (with and without SP) computes what TP=1 computes; the launcher
reports a failing rank's traceback and never hangs."""

import time

import pytest
import torch

from megatron_cpu.launch import RankError, initialize_model_parallel, run_on_ranks
from support import tiny_gpt
from support.compare import assert_same


def loss_and_grad_norms():
    """Loss and the global grad norm of a tiny GPT at TP=2, TP=2+SP, and TP=1."""
    from megatron.core import parallel_state

    out = {}
    for tp, sp in [(2, False), (2, True), (1, False)]:
        initialize_model_parallel(tp=tp)
        model = tiny_gpt.build_gpt(sequence_parallel=sp)
        loss = tiny_gpt.loss(model)
        loss.backward()
        # Grad norm over the full (unsharded) model: sum of squares of the split params over
        # the TP group; replicated params counted once. SP-marked replicated params (norms)
        # hold partial grads that Megatron all-reduces.
        split, replicated = torch.zeros(()), torch.zeros(())
        group = parallel_state.get_tensor_model_parallel_group()
        for param in model.parameters():
            grad = param.grad
            if getattr(param, "sequence_parallel", False):
                grad = grad.clone()
                torch.distributed.all_reduce(grad, group=group)
            if getattr(param, "tensor_model_parallel", False):
                split += grad.pow(2).sum()
            else:
                replicated += grad.pow(2).sum()
        torch.distributed.all_reduce(split, group=group)
        out[(tp, sp)] = (loss.item(), (split + replicated).sqrt().item())
    return out


def test_gpt_same_loss_and_grads_at_tp1_tp2_and_sp():
    ranks = run_on_ranks(loss_and_grad_norms, world_size=2)
    assert ranks[0] == ranks[1]
    reference = ranks[0][(1, False)]
    for layout, (loss, grad_norm) in ranks[0].items():
        assert loss == pytest.approx(reference[0], rel=1e-6), layout
        assert grad_norm == pytest.approx(reference[1], rel=1e-5), layout


def rng_streams():
    """Draws under Megatron's RNG tracker: the TP-region stream differs per TP rank, the
    default stream agrees within the TP group."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tp_region = torch.rand(4)
        with get_cuda_rng_tracker().fork("data-parallel-rng"):
            nested = torch.rand(4)
        tp_region_after_nested = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        tp_region_again = torch.rand(4)
    return tp_region, nested, tp_region_after_nested, tp_region_again, torch.rand(4)


def test_rng_tracker_forks_named_cpu_states():
    rank0, rank1 = run_on_ranks(rng_streams, world_size=2, tp=2)
    tp_region, nested, after_nested, again, default = range(5)
    assert not torch.equal(rank0[tp_region], rank1[tp_region])  # per-TP-rank dropout
    assert_same(rank0[nested], rank1[nested], "nested data-parallel stream")
    assert_same(rank0[default], rank1[default], "default stream")
    # A fork continues its stream where it stopped, nested forks included.
    assert not torch.equal(rank0[tp_region], rank0[again])
    assert not torch.equal(rank0[after_nested], rank0[again])


def uneven_gather_and_reduce_scatter():
    """megatron-core's own sequence-parallel gather and reduce-scatter with unequal pieces (what
    the MoE dispatcher runs over expert-TP): rank i holds i + 2 rows of value i + 1."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    sizes = [2, 3]
    mine = torch.full((sizes[rank], 3), float(rank + 1), requires_grad=True)
    gathered = mappings.gather_from_sequence_parallel_region(
        mine, tensor_parallel_output_grad=True, group=group, output_split_sizes=sizes)
    # backward of the gather: the reduce-scatter of unequal pieces
    weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weights * (rank + 1)).sum().backward()
    scattered = mappings.reduce_scatter_to_sequence_parallel_region(
        weights * (rank + 1), group=group, input_split_sizes=sizes)
    return gathered.detach(), mine.grad, scattered, weights


def test_uneven_gather_and_reduce_scatter_on_gloo():
    """NCCL gathers and reduce-scatters pieces of unequal sizes, gloo refuses them: the CPU
    runtime gives megatron-core's functions the same results."""
    ranks = run_on_ranks(uneven_gather_and_reduce_scatter, world_size=2, tp=2)
    weights = ranks[0][3]
    want_gathered = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)])
    summed = weights * (1 + 2)  # the sum over both ranks of weights * (rank + 1)
    for rank, (gathered, grad, scattered, _) in enumerate(ranks):
        assert_same(gathered, want_gathered, f"rank {rank} gathered")
        piece = summed[:2] if rank == 0 else summed[2:]
        assert_same(grad, piece, f"rank {rank} grad through the gather")
        assert_same(scattered, piece, f"rank {rank} reduce-scattered")


def fail_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    torch.distributed.barrier()  # rank 0 would wait here forever without the launcher


def test_a_failing_rank_fails_the_run_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one is broken"):
        run_on_ranks(fail_on_rank_one, world_size=2, timeout=60)
    assert time.monotonic() - start < 60


def sleep_forever():
    time.sleep(3600)


def test_a_hanging_run_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 10s"):
        run_on_ranks(sleep_forever, world_size=2, timeout=10)
    assert time.monotonic() - start < 30


def test_progress_off_a_terminal_is_a_plain_line_every_tenth_of_the_steps():
    """CI and `make demo 2> log` read these lines; a tqdm bar would be one line of carriage
    returns there."""
    import io

    from megatron_cpu.progress import Progress

    stream = io.StringIO()
    progress = Progress("LoRA", 25, stream=stream)
    for step in range(25):
        progress.update(step, loss=f"{1 / (step + 1):.3f}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "LoRA: step 2/25 loss 0.500"
    assert lines[-1] == "LoRA: step 25/25 loss 0.040"
    assert len(lines) == 13 and "\r" not in stream.getvalue()
