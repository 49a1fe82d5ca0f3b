"""Per-step progress on rank 0: a tqdm bar on a terminal; elsewhere (CI, `make demo 2> log`) a plain
line every tenth of the steps and at the last, since tqdm's carriage-return updates pile up into
one line of a log.

    progress = Progress("LoRA on task B", steps)
    for step in range(steps):
        ...
        progress.update(step, loss=f"{loss:.3f}", lr=f"{lr:.1e}")
    progress.close()
"""

from __future__ import annotations

import sys


class Progress:
    """Progress of `total` steps labelled `label`, written to `stream` (stderr, where tqdm
    writes): a bar where it is a terminal, else `lines` plain lines."""

    def __init__(self, label: str, total: int, stream=None, lines: int = 10):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.every = max(1, total // lines)
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, dynamic_ncols=True, file=self.stream)

    def update(self, step: int, **fields: str) -> None:
        """Step `step` (0-based) is done; `fields` are shown beside it."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**fields)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            shown = " ".join(f"{name} {value}" for name, value in fields.items())
            print(f"{self.label}: step {step + 1}/{self.total} {shown}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
