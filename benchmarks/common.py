"""What every benchmark script shares: the machine line, the timer, Megatron's parallel state
for a layout, the table a script prints (and RESULTS.md renders), and the command line.

No megatron import at module level: fsdp_vs_peft runs where megatron-core is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- where it ran ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str = "cpu", libraries: tuple[str, ...] = ("megatron.core",)) -> str:
    """One line: the device (CPU model, cores, torch threads, or the GPU) and the versions of
    python, torch and `libraries` (import names; megatron.core prints as megatron-core)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in libraries:
        try:
            version = importlib.import_module(name).__version__
        except ImportError:
            version = "absent"
        versions.append(f"{name.replace('.', '-')} {version}")
    return f"{where}; {', '.join(versions)}"


# --- timing ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Samples:
    wall: list[float] = dataclasses.field(default_factory=list)  # seconds
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds, if asked


def time_in_turns(steps: dict[str, Callable[[], Any]], *, rounds: int, steps_per_round: int = 1,
                  warmup: int = 1, sync: Callable[[], None] = lambda: None,
                  each_step: bool = False, cpu_time: bool = False,
                  rotate: bool = True) -> dict[str, Samples]:
    """Seconds per step of each callable, the variants taking turns: the order rotates every
    round (unless `rotate` is off), so a noisy neighbour (other processes on a shared machine)
    slows every variant alike instead of whichever ran last. One sample per round (the mean of
    its `steps_per_round` calls), or with `each_step` one per call. CPU time is read only when
    asked: it is a syscall inside the timed window."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync()
    samples = {name: Samples() for name in names}
    calls, samples_per_turn = (1, steps_per_round) if each_step else (steps_per_round, 1)
    for round_index in range(rounds):
        shift = round_index % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            for _ in range(samples_per_turn):
                wall = time.perf_counter()
                cpu = time.process_time() if cpu_time else 0.0
                for _ in range(calls):
                    steps[name]()
                sync()
                samples[name].wall.append((time.perf_counter() - wall) / calls)
                if cpu_time:
                    samples[name].cpu.append((time.process_time() - cpu) / calls)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread (max - min) / median: how much to trust a median."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def synchronizer(device: str) -> Callable[[], None]:
    """What ends a timed region: CUDA runs asynchronously, the CPU does not."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


# --- Megatron's parallel state --------------------------------------------------------------

@contextlib.contextmanager
def single_rank(device: str = "cpu"):
    """A one-rank gloo process group with Megatron's state at TP=1, in this very process (no
    spawned ranks, so the run gets every core). No collective runs at TP=1, so gloo serves on
    a GPU too and needs no NCCL setup there."""
    from megatron.core import parallel_state

    from megatron_cpu.launch import initialize_model_parallel

    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    store = tempfile.mkdtemp(prefix="single_rank.")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}/store",
                                         rank=0, world_size=1)
    try:
        initialize_model_parallel(tp=1)  # on CPU this also turns on megatron_lora's CPU runtime
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)


def parse_layout(name: str) -> tuple[int, bool]:
    """"1" (TP=1), "2" (TP=2), "2sp" (TP=2 with sequence parallelism) -> (tp, sp)."""
    sp = name.endswith("sp")
    return int(name[:-2] if sp else name), sp


def layout_label(tp: int, sp: bool) -> str:
    return f"TP={tp}" + (" SP" if sp else "")


def run_layout(fn: Callable[..., Any], tp: int, device: str, *args: Any) -> Any:
    """`fn(tp, *args)` under Megatron's parallel state, rank 0's result: TP=1 in this process,
    TP>1 in spawned gloo ranks (CPU only)."""
    if tp == 1:
        with single_rank(device):
            return fn(tp, *args)
    if device != "cpu":
        raise ValueError("TP > 1 benchmarks run on CPU ranks (gloo) only")
    from megatron_cpu.launch import run_on_ranks

    return run_on_ranks(fn, world_size=tp, tp=tp, args=(tp, *args), timeout=3600)[0]


# --- tables ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a result table: printed by the script and rendered in RESULTS.md."""

    header: str
    value: str | Callable[[dict], Any]  # a key of the row, or a function of the row
    fmt: str = "{}"
    bold: bool = False  # the ratio the table is about, bold in RESULTS.md

    def cell(self, row: dict) -> str:
        value = row[self.value] if isinstance(self.value, str) else self.value(row)
        return "" if value is None else self.fmt.format(value)


class TablePrinter:
    """Prints rows as they are measured (a full run takes minutes per layout), the header once.
    Column widths come from the headers, or from `widths_from` rows when all are known."""

    def __init__(self, columns: list[Column], widths_from: list[dict] = ()):
        self.columns = columns
        self.widths = [max([len(c.header), 6, *(len(c.cell(row)) for row in widths_from)]) + 2
                       for c in columns]
        self.started = False

    def _line(self, cells: list[str]) -> str:
        # The first column names the row (a layout, a category): left-aligned.
        first, *rest = zip(cells, self.widths, strict=True)
        return first[0].ljust(first[1]) + "".join(cell.rjust(w) for cell, w in rest)

    def print(self, rows: list[dict]) -> None:
        if not self.started:
            print(self._line([c.header for c in self.columns]))
            self.started = True
        for row in rows:
            print(self._line([c.cell(row) for c in self.columns]), flush=True)


def print_table(columns: list[Column], rows: list[dict]) -> None:
    TablePrinter(columns, widths_from=rows).print(rows)


def markdown_table(columns: list[Column], rows: list[dict]) -> str:
    def cell(column: Column, row: dict) -> str:
        text = column.cell(row)
        return f"**{text}**" if column.bold and text else text

    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- command line and results.json ----------------------------------------------------------

def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick (smoke sizes) and --json (where run_all
    collects the result)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few rounds")
    parser.add_argument("--json", help="also write the result here")
    return parser


def write_json(path: str | None, result: dict) -> None:
    """The result as run_all stores it in results.json: {"machine", "setup", tables of rows,
    and whatever parameters the report's prose quotes}."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
