"""Run every benchmark, then write benchmarks/RESULTS.md and benchmarks/results.png.

    python -m benchmarks.run_all            # the full run (`make bench`): tens of minutes on 2 cores
    python -m benchmarks.run_all --quick    # smoke run; writes under out/bench-quick/ instead

Each benchmark runs in its own process (a crash in one does not lose the others; memory from
one cannot skew the next) and prints its table as it goes; `benchmarks/fsdp_vs_peft.py` runs too
when it exists. A GPU run's output (benchmarks/gpu.sh) is included when saved as
benchmarks/gpu_results.txt.
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

from benchmarks import machine, report
from benchmarks.chart import write_chart

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JSON_BENCHMARKS = ("step_time", "comm_bytes", "peak_memory", "merged_stream")
OUTPUTS = ("RESULTS.md", "results.png", "results.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few rounds")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks",
                        choices=JSON_BENCHMARKS + ("profile_lora", "fsdp_vs_peft"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the chart from results.json, run nothing")
    parser.add_argument("--out", help="folder for RESULTS.md and results.png "
                                      "(default: benchmarks/, or out/bench-quick/ with --quick)")
    return parser.parse_args(argv)


def tee(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` from the repo root, echo its output live, return (exit code, output)."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        if line.startswith("USDT:"):  # torch.profiler's start/stop chatter
            continue
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines)


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
        return rewrite_report(out_dir)
    selected = args.only or JSON_BENCHMARKS + ("profile_lora", "fsdp_vs_peft")
    commit = git_commit()  # the code as it was when the run started
    quick = ["--quick"] if args.quick else []
    results, texts, failed = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in JSON_BENCHMARKS:
            if name not in selected:
                continue
            path = os.path.join(tmp, f"{name}.json")
            code, _ = tee([sys.executable, "-m", f"benchmarks.{name}", *quick, "--json", path])
            if code == 0:
                with open(path) as f:
                    results[name] = json.load(f)
            else:
                failed.append(name)
    if "profile_lora" in selected:
        profile_args = ["--hidden", "256", "--repeats", "5", "--profile-steps", "2"] \
            if args.quick else []
        code, texts["profile_lora"] = tee([sys.executable, "-m", "benchmarks.profile_lora",
                                           "--threads", "1", *profile_args])
        if code:
            failed.append("profile_lora")
    fsdp_script = os.path.join(HERE, "fsdp_vs_peft.py")
    if "fsdp_vs_peft" in selected and os.path.exists(fsdp_script):
        code, texts["fsdp_vs_peft"] = tee([sys.executable, fsdp_script, *quick])
        if code:
            failed.append("fsdp_vs_peft")
    gpu_file = os.path.join(HERE, "gpu_results.txt")
    if os.path.exists(gpu_file):
        with open(gpu_file) as f:
            texts["gpu"] = f.read()

    if "merged_stream" in results:
        from megatron_lora import merge

        if "STUB" in (merge.__doc__ or ""):
            results["merged_stream"]["note"] = (
                "**Measured against a local stand-in for `iter_merged_weights`** (the real one "
                "was not on this branch yet).")
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "") + \
        (" --only " + " ".join(args.only) if args.only else "")
    header = {"command": command, "quick": args.quick, "commit": commit,
              "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
              "machine": machine.describe(), "chart": "results.png",
              "note": f"Failed: {', '.join(failed)} (see the console output)." if failed else ""}
    results["title"] = f"{command} | {header['date']} | {header['machine']}"
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"header": header, "texts": texts, **results}, f, indent=1)
    rewrite_report(out_dir)
    return 1 if failed else 0


def rewrite_report(out_dir: str) -> int:
    """RESULTS.md and results.png from results.json (after a run, or after editing the
    report's prose)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    header, texts = results.pop("header"), results.pop("texts", {})
    write_chart(os.path.join(out_dir, "results.png"), results)
    report.write_results(os.path.join(out_dir, "RESULTS.md"), header, results, texts)
    print(f"\nwrote {os.path.join(out_dir, 'RESULTS.md')} and results.png from results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
