"""Benchmarks of megatron-lora (not tests: nothing here asserts a speed).

    python -m benchmarks.run_all            # everything, writes benchmarks/RESULTS.md + chart
    python -m benchmarks.run_all --quick    # smoke run in a few minutes
    python -m benchmarks.step_time --help   # one benchmark on its own

Each benchmark prints a table: the median of several runs and the ratios side by side,
under a line describing the machine.
"""

import warnings

# Library warnings (no apex, no Transformer Engine, deprecations) are noise in a benchmark's
# table; spawned TP ranks import this package too, so the filter reaches them.
warnings.simplefilter("ignore")
