"""`megatron-lora demo` at a tiny size does what a user sees it do, with its default schedule:
the LoRA model learns task B (to an accuracy an unlearned model cannot reach), inside
`disable_lora` the base still solves task A, merged equals unmerged, and every artifact the demo
promises is written."""

import json

from megatron_lora.cli import main

# Measured once at this size for seeds 0-4: task B accuracy 100% after LoRA for every seed.
TINY = ["--hidden", "64", "--layers", "1", "--vocab", "32", "--seq", "16", "--batch", "8",
        "--steps", "100", "--base-steps", "40"]


def test_demo_learns_task_B_at_a_tiny_size_for_two_seeds(tmp_path):
    out = tmp_path / "demo"
    for seed in (4, 0):  # the second run goes into the first one's folder
        assert main(["demo", "--out", str(out), "--seed", str(seed), *TINY]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["seed"] == seed
        assert summary["tp"] == 2 and summary["sequence_parallel"]
        assert summary["schedule"]["decay_style"] == "cosine"
        assert summary["schedule"]["clip_grad"] > 0
        # The base answers t + 1, right for task B only where 3t + 1 = t + 1 (mod 32): on 2 of
        # the 32 tokens. Learning task B means answering it nearly always.
        assert summary["task_B_before_lora"]["accuracy"] < 0.2
        assert summary["task_B_after_lora"]["accuracy"] >= 0.95
        assert summary["task_A_with_lora_disabled"]["accuracy"] >= 0.95
        assert summary["merged_vs_unmerged_max_rel_logit_diff"] < 1e-5
        assert 0 < summary["trainable_fraction"] < 0.2
    for artifact in ("adapter.safetensors", "peft/adapter_config.json",
                     "peft/adapter_model.safetensors", "loss.png"):
        assert (out / artifact).is_file(), artifact
