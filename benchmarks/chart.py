"""The PNG next to RESULTS.md: measured step-time ratios against the FLOP model (and the targets
of targets.json), and torch's peak memory of LoRA vs full fine-tuning."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYOUT_COLORS = {"TP=1": "tab:blue", "TP=2": "tab:orange", "TP=2 SP": "tab:green"}
MIB = 1 / 2**20


def _ratio_panel(ax, rows, key: str, title: str, targets: list[dict]) -> None:
    layouts = [layout for layout in LAYOUT_COLORS if any(r["layout"] == layout for r in rows)]
    configs = sorted({(r["hidden"], r["r"]) for r in rows})
    width = 0.8 / max(1, len(layouts))
    for i, layout in enumerate(layouts):
        by_config = {(r["hidden"], r["r"]): r for r in rows if r["layout"] == layout}
        xs = [c + (i - (len(layouts) - 1) / 2) * width for c in range(len(configs))]
        measured = [by_config[c][key] if c in by_config else float("nan") for c in configs]
        expected = [by_config[c][f"theory {key}"] if c in by_config else float("nan")
                    for c in configs]
        ax.bar(xs, measured, width, color=LAYOUT_COLORS[layout], label=f"{layout} measured")
        ax.scatter(xs, expected, marker="_", s=200, color="black", zorder=3,
                   label="FLOP theory" if i == 0 else None)
    for target in targets:
        if target["benchmark"] == "step_time" and target["key"] == key and "at_most" in target:
            where = ", ".join(f"{k} {v}" for k, v in target["row"].items())
            ax.axhline(target["at_most"], color="red", linestyle="--", linewidth=1,
                       label=f"target at {where}: {target['at_most']}")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"h{h}\nr{r}" for h, r in configs], fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _memory_panel(ax, rows) -> None:
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["full_allocator_peak"] * MIB for r in rows], 0.4,
           label="full FT + Adam", color="tab:red")
    ax.bar([x + 0.2 for x in xs], [r["lora_allocator_peak"] * MIB for r in rows], 0.4,
           label="LoRA + Adam", color="tab:blue")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"hidden {r['hidden']}" for r in rows])
    ax.set_ylabel("MiB")
    ax.set_title("torch peak allocated during training steps")
    ax.legend(fontsize=8)


def write_chart(path: str, results: dict, targets: list[dict], title: str) -> None:
    step_rows = results.get("step_time", {}).get("rows", [])
    memory_rows = results.get("peak_memory", {}).get("rows", [])
    panels = 2 + bool(memory_rows)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    if step_rows:
        _ratio_panel(axes[0], step_rows, "lora/full", "LoRA step / full fine-tuning step", targets)
        _ratio_panel(axes[1], step_rows, "lora/frozen", "LoRA step / frozen-base step", targets)
    if memory_rows:
        _memory_panel(axes[2], memory_rows)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
