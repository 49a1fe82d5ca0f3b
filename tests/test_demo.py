"""`megatron-lora demo` runs end to end (at a tiny size): the LoRA loss falls, merged equals
unmerged, and every artifact the demo promises is written."""

import json

from megatron_lora.cli import main


def test_demo_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "30", "--base-steps", "30", "--hidden", "64",
            "--layers", "1", "--vocab", "32", "--seq", "16", "--batch", "8"]
    assert main(argv) == 0
    assert main(argv) == 0  # a second run into the same folder works
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tp"] == 2 and summary["sequence_parallel"]
    assert summary["task_B_after_lora"]["loss"] < 0.5 * summary["task_B_before_lora"]["loss"]
    assert summary["merged_vs_unmerged_max_abs_logit_diff"] < 1e-4
    assert 0 < summary["trainable_fraction"] < 0.2
    for artifact in ("adapter.safetensors", "peft/adapter_config.json",
                     "peft/adapter_model.safetensors", "loss.png"):
        assert (out / artifact).is_file(), artifact
