"""RESULTS.md from results.json: the prose of report_template.md with its directives replaced.

    {{run}}                  command, date, machine, commit, chart of the run
    {{targets}}              targets.json's entries, each next to its measured value
    {{table NAME}}           the tables of benchmark NAME (its module's TABLES)
    {{table NAME.KEY}}       one of them
    {{NAME.FIELD}}           a field of NAME's result, e.g. {{step_time.setup}}

A benchmark in results.json that the template does not mention gets a section of its own at
the end (its docstring's first line, its setup line, its tables), so a new benchmark shows up
before anyone writes prose for it.
"""

from __future__ import annotations

import importlib
import json
import os
import re

from benchmarks.common import Column, markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "report_template.md")
DIRECTIVE = re.compile(r"\{\{\s*(.+?)\s*\}\}")
NOT_MEASURED = "_Not measured in this run._"


def load_targets() -> list[dict]:
    with open(os.path.join(HERE, "targets.json")) as f:
        return json.load(f)["entries"]


def find_row(results: dict, entry: dict) -> dict | None:
    rows = results.get(entry["benchmark"], {}).get("rows", [])
    return next((row for row in rows
                 if all(row.get(k) == v for k, v in entry["row"].items())), None)


def verdict(value: float, entry: dict) -> str:
    fmt = entry.get("format", "{:.3f}")
    if "range" in entry:
        low, high = entry["range"]
        return "below the range" if value < low else "above the range" if value > high \
            else "inside the range"
    gap = value - entry["at_most"]
    if gap <= 0:
        return "met"
    if fmt.endswith("%}"):
        return f"**missed by {100 * gap:.2f} points**"
    return f"**missed by {fmt.format(gap)}** ({value / entry['at_most'] - 1:.1%} over)"


def as_written(value: float, fmt: str) -> str:
    """A target as targets.json writes it (0.72, 3%), not padded to the measured precision."""
    return f"{100 * value:g}%" if fmt.endswith("%}") else f"{value:g}"


TARGET_COLUMNS = [Column(header, header) for header in
                  ("quantity", "row", "measured", "target", "verdict", "source")]


def targets_table(results: dict, quick: bool) -> str:
    rows = []
    for entry in load_targets():
        fmt = entry.get("format", "{:.3f}")
        where = ", ".join(f"{k} {v}" for k, v in entry["row"].items())
        goal = ("-".join(as_written(v, fmt) for v in entry["range"]) if "range" in entry
                else f"<= {as_written(entry['at_most'], fmt)}")
        row = find_row(results, entry)
        if quick:  # smoke sizes: a row may match by name (fsdp_vs_peft's) at another model size
            measured, judged = "not judged in a --quick run", ""
        elif row is None:
            measured, judged = "not measured in this run", ""
        else:
            also = ", ".join(f"{label} {fmt.format(row[key])}"
                             for label, key in entry.get("also", {}).items())
            measured = f"**{fmt.format(row[entry['key']])}**" + (f" ({also})" if also else "")
            judged = verdict(row[entry["key"]], entry)
        rows.append({"quantity": entry["what"], "row": f"{entry['benchmark']}: {where}",
                     "measured": measured, "target": goal, "verdict": judged,
                     "source": entry["source"]})
    return markdown_table(TARGET_COLUMNS, rows)


def tables(name: str, key: str | None, results: dict) -> str:
    if name not in results:
        return NOT_MEASURED
    columns = importlib.import_module(f"benchmarks.{name}").TABLES
    keys = [key] if key else list(columns)
    return "\n\n".join(markdown_table(columns[k], results[name][k]) for k in keys)


def run_header(run: dict) -> str:
    lines = [f"- Command: `{run['command']}`", f"- Date: {run['date']}",
             f"- Machine: {run['machine']}", f"- Commit: {run['commit']}",
             f"- Chart: [{run['chart']}]({run['chart']})"]
    for update in run.get("updates", []):
        lines.append(f"- Updated: `{update['command']}` ({update['date']}, commit "
                     f"{update['commit']}): {', '.join(update['benchmarks'])}")
    if run.get("quick"):
        lines.append("\n**This is a `--quick` smoke run: small sizes, few rounds. Do not draw "
                     "conclusions from its numbers.**")
    if run.get("failed"):
        lines.append(f"\nFailed: {', '.join(run['failed'])} (see the console output).")
    return "\n".join(lines)


def unmentioned_section(name: str, result: dict, results: dict) -> str:
    doc = importlib.import_module(f"benchmarks.{name}").__doc__ or name
    return (f"\n## {doc.strip().splitlines()[0]}\n\n{result.get('setup', '')}\n\n"
            f"{tables(name, None, results)}\n")


def render(run: dict, results: dict) -> str:
    with open(TEMPLATE) as f:
        template = f.read()
    mentioned = set()

    def replace(match: re.Match) -> str:
        words = match.group(1).split()
        if words == ["run"]:
            return run_header(run)
        if words == ["targets"]:
            return targets_table(results, run.get("quick", False))
        if words[0] == "table":
            name, _, key = words[1].partition(".")
            mentioned.add(name)
            return tables(name, key or None, results)
        name, field = words[0].split(".", 1)
        mentioned.add(name)
        return str(results[name][field]) if name in results else "(not measured)"

    text = DIRECTIVE.sub(replace, template)
    for name, result in results.items():
        if name not in mentioned:
            text += unmentioned_section(name, result, results)
    return text
