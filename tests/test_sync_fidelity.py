"""The rollout policy after a weight sync, merged vs adapter (benchmarks/sync_fidelity.py measures
it; this is its bound): on a small Megatron GPT with bf16 weights and a trained adapter, the
engine that holds the bf16 base plus the adapter is closer to the trained policy than the one
that holds `W + s B A` rounded to bf16."""

from __future__ import annotations

from megatron_cpu.launch import run_on_ranks

LRS = (1e-4, 1e-3)  # an RL-sized step and a larger one


def fidelity() -> list[dict]:
    from benchmarks.sync_fidelity import measure

    return [measure(hidden=128, layers=2, r=16, steps=5, lr=lr, base_steps=8,
                    base_lr=1e-2) for lr in LRS]


def test_adapter_sync_is_closer_to_the_trained_policy_than_merged_bf16():
    (rows,) = run_on_ranks(fidelity, world_size=1)
    for row in rows:
        # the adapter moved the policy; the adapter sync keeps all but its bf16 rounding of it
        assert row["kl_adapter"] < row["kl_base"] / 1e3, row
        # what the sync itself loses: merged bf16 rounds a share of the delta away
        assert row["kl_merged"] > 5 * row["kl_adapter"], row
        assert row["max_kl_merged"] > row["max_kl_adapter"], row
        # in bf16 arithmetic against the trainer's own bf16 forward (base + branch): the
        # adapter engine computes exactly what the trainer does, the merged one does not
        assert row["kl_adapter_vs_trainer"] == 0.0 < row["kl_merged_vs_trainer"], row
