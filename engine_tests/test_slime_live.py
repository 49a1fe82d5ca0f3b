"""slime's own code against the live SGLang server: slime 624b824a with our patch
(`../shared/vendor`), its LoRA actor at TP=2 + SP (fp32) with `--lora-sync adapter`, its colocated
weight updater and its `SGLangEngine` request code (no stand-in engine): after the first sync
(base and adapter) and after each of two `train` rollouts, SGLang serves the actor's log-probs for
the adapter slime's rollout requests name, and the base for requests that name none.
Rank side: `tests/support/slime/live.py`."""

from __future__ import annotations

import functools

import pytest
from conftest import MEASURED

TOLERANCE = 1e-4
EFFECT = 100 * TOLERANCE


def _why_not() -> str | None:
    from support import sglang_wheel
    from support.slime import sources

    return sources.missing_reason() or sglang_wheel.missing_reason()


def largest(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def live_run(sglang_server, model_dir, tmp_path_factory):
    if _why_not():
        pytest.skip(_why_not())
    from megatron_cpu.processes import run_on_ranks
    from support.slime import live, runtime, sources

    trees = sources.prepare(tmp_path_factory.mktemp("slime-sources"))
    work = tmp_path_factory.mktemp("slime-live")
    return run_on_ranks(live.run_live, world_size=2, timeout=900,
                        args=(str(work), model_dir, sglang_server.url),
                        setup=functools.partial(runtime.setup, str(trees.slime),
                                                str(trees.megatron_lm), True))[0]


def test_slime_syncs_base_then_adapters_that_sglang_serves(live_run):
    syncs = live_run["syncs"]
    MEASURED["slime-sglang-adapter"] = (
        f"served vs trainer max |diff| {max(largest(s['served'], s['trainer']) for s in syncs):.1e}"
        f", adapter effect {largest(syncs[-1]['served'], syncs[-1]['served_base']):.2f}")
    assert live_run["lora_sync_args"] == (True, "adapter")
    # slime's colocated path sent the unmerged base once, then adapters only
    assert [s["sent_base"] for s in syncs] == [True, False, False]
    for index, sync in enumerate(syncs):
        assert largest(sync["served"], sync["trainer"]) <= TOLERANCE, index
        assert largest(sync["served_base"], sync["trainer_base"]) <= TOLERANCE, index
    assert largest(syncs[0]["trainer"], syncs[0]["trainer_base"]) == 0  # B = 0 at the start
    assert largest(syncs[-1]["served"], syncs[-1]["served_base"]) >= EFFECT
    assert largest(syncs[2]["served"], syncs[1]["served"]) >= EFFECT
