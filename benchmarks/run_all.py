"""Run every benchmark, then write results.json, RESULTS.md and results.png.

    python -m benchmarks.run_all                # the full run (`make bench`): tens of minutes
    python -m benchmarks.run_all --quick        # smoke run; writes under out/bench-quick/ instead
    python -m benchmarks.run_all --report-only  # RESULTS.md and the chart again from results.json
    python -m benchmarks.run_all --only NAME..  # those again, the others kept from results.json

Each benchmark runs in its own process (a crash in one does not lose the others; memory from
one cannot skew the next) as `python -m benchmarks.NAME [--quick] --json FILE`, and prints its
table as it goes. Adding a benchmark: a script with that interface and a `TABLES` of columns,
and its name in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

from benchmarks import common, report
from benchmarks.chart import write_chart

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHMARKS = ("step_time", "comm_bytes", "peak_memory", "merged_stream", "profile_lora",
              "fsdp_vs_peft", "moe_step", "sync_bytes", "sync_fidelity", "engine_sync")
CHART = "results.png"
OUTPUTS = ("RESULTS.md", CHART, "results.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few rounds")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the chart from results.json, run nothing")
    parser.add_argument("--out", help="folder of the outputs "
                                      "(default: benchmarks/, or out/bench-quick/ with --quick)")
    return parser.parse_args(argv)


def tee(cmd: list[str]) -> int:
    """Run `cmd` from the repo root, echo its output live, return its exit code."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if not line.startswith("USDT:"):  # torch.profiler's start/stop chatter
            print(line, end="", flush=True)
    return proc.wait()


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
        # The runner's own outputs do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":!benchmarks/{name}" for name in OUTPUTS)],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out or (os.path.join(ROOT, "out", "bench-quick") if args.quick else HERE)
    os.makedirs(out_dir, exist_ok=True)
    if args.report_only:
        return write_report(out_dir)
    command = shlex.join(["python", "-m", "benchmarks.run_all", *(argv or sys.argv[1:])])
    run = {"command": command, "quick": args.quick, "commit": git_commit(),  # as the run starts
           "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
           "machine": common.describe_machine(), "chart": CHART, "failed": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or BENCHMARKS:
            path = os.path.join(tmp, f"{name}.json")
            if tee([sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] * args.quick),
                    "--json", path]) == 0:
                with open(path) as f:
                    results[name] = json.load(f)
            else:
                run["failed"].append(name)
    path, failed = os.path.join(out_dir, "results.json"), run["failed"]
    if args.only and os.path.exists(path):
        # a partial run updates its benchmarks in the recorded results and keeps the others
        with open(path) as f:
            recorded = json.load(f)
        update = {key: run[key] for key in ("command", "date", "commit", "failed")}
        run = recorded["run"]
        run.setdefault("updates", []).append({**update, "benchmarks": sorted(results)})
        results = {**recorded["benchmarks"], **results}
    with open(path, "w") as f:
        json.dump({"run": run, "benchmarks": results}, f, indent=1)
    write_report(out_dir)
    return 1 if failed else 0


def write_report(out_dir: str) -> int:
    """RESULTS.md and the chart from results.json (after a run, or after editing the prose in
    report_template.md or the targets in targets.json)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        recorded = json.load(f)
    run, results = recorded["run"], recorded["benchmarks"]
    title = f"{run['command']} | {run['date']} | {run['machine']}"
    write_chart(os.path.join(out_dir, CHART), results, report.load_targets(), title)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(report.render(run, results))
    print(f"\nwrote {os.path.join(out_dir, 'RESULTS.md')} and {CHART} from results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
