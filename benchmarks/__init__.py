"""Benchmarks of megatron-lora (not tests: nothing here asserts a speed).

    python -m benchmarks.run_all            # everything: results.json, RESULTS.md, results.png
    python -m benchmarks.run_all --quick    # smoke run, written to out/bench-quick/
    python -m benchmarks.step_time --help   # one benchmark on its own

One script per measurement (step_time, comm_bytes, peak_memory, merged_stream, profile_lora,
fsdp_vs_peft), each printing its table under a line describing the machine; what they share is
in common.py, the model they time in decoder_stack.py, its FLOP model in theory.py.
"""

import warnings

# Library warnings (no apex, no Transformer Engine, deprecations) are noise in a benchmark's
# table; spawned TP ranks import this package too, so the filter reaches them.
warnings.simplefilter("ignore")
