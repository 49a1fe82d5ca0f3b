"""The round trip: LoRA trained at TP=2 + SP (fp32) on a small Qwen2 converted to Megatron,
synced to a live engine after each of 3 optimizer steps; after every sync the engine's prompt
log-probs (every position of 3 prompts) equal the trainer's log-softmax, and base requests equal
the trainer inside `disable_lora`. Both engines, both sync modes (merged: SGLang's tensor and disk
endpoints, vLLM's reload from disk), fused and canonical LoRA. Rank side:
`tests/support/engine_round_trip.py`; the syncs: `tests/support/engine_sync.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import MEASURED

TOLERANCE = 1e-4  # fp32 on both sides: measured a few 1e-6
EFFECT = 100 * TOLERANCE  # the trained adapter must move log-probs far more than the tolerance

CASES = [("sglang", "adapter", False), ("sglang", "adapter", True),
         ("sglang", "merged_tensor", False), ("sglang", "merged_disk", False),
         ("vllm", "adapter", False), ("vllm", "adapter", True), ("vllm", "merged_disk", False)]


def _id(case):
    engine, mode, canonical = case
    return f"{engine}-{mode}" + ("-canonical" if canonical else "")


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_engine_serves_the_trainers_model_after_every_sync(case, request, model_dir, tmp_path):
    from megatron_cpu.launch import run_on_ranks
    from support import engine_round_trip

    engine, mode, canonical = case
    server = request.getfixturevalue(f"{engine}_server")
    out = run_on_ranks(engine_round_trip.round_trip, world_size=2, tp=2, timeout=900,
                       args=(model_dir, engine, server.url, mode, canonical, str(tmp_path)))[0]
    records = out["records"]
    worst = max(largest(r["served"], r["trainer"]) for r in records)
    effect = largest(records[-1]["trainer"], records[-1]["trainer_base"])
    MEASURED[_id(case)] = (f"served vs trainer max |diff| {worst:.1e}, adapter effect "
                           f"{effect:.2f}, {out['sent_bytes']} bytes per sync")
    assert [r["version"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert largest(r["served"], r["trainer"]) <= TOLERANCE, (r["version"], r["served"],
                                                                 r["trainer"])
        if mode == "adapter":  # the base, no adapter named, beside it
            assert largest(r["served_base"], r["trainer_base"]) <= TOLERANCE, r["version"]
    # before training B = 0: the synced adapter (or merged model) is the base
    assert torch.equal(records[0]["trainer"], records[0]["trainer_base"])
    # a check that a zero adapter would pass is no check: training moved the served log-probs
    # far beyond the tolerance, at every step
    assert largest(records[-1]["trainer"], records[-1]["trainer_base"]) >= EFFECT
    for before, after in zip(records, records[1:], strict=False):
        assert largest(after["served"], before["served"]) >= EFFECT, after["version"]
    assert out["losses"][-1] < out["losses"][0]
    if mode != "adapter":  # the merged syncs replaced the engine's base: sent back, served again
        restored = out["restored"]
        assert largest(restored["served"], restored["trainer_base"]) <= TOLERANCE
