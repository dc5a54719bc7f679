"""The learning-curve chart: test macro-F1 against training-set size (mean ± std bands over seeds, one line per
configuration) with what each configuration costs beside it (train time and peak memory against size; trainable
parameters and adapter size per configuration)."""

from __future__ import annotations

from pathlib import Path

LEARNING_CURVE = "learning_curve.png"


def _size_of(row: dict) -> float | None:
    """A row's x: its training examples (mean over seeds; the same for balanced subsets), else per-class size."""
    examples = row.get("train_examples")
    if examples:
        return examples[0]
    return None if row["shots"] is None else float(row["shots"])


def _line(ax, rows: list[dict], key: str, label: str, color) -> None:
    points = sorted((x, r[key]) for r in rows if key in r and (x := _size_of(r)) is not None)
    if not points:
        return
    xs, stats = [p[0] for p in points], [p[1] for p in points]
    means = [s[0] for s in stats]
    ax.plot(xs, means, marker="o", markersize=4, label=label, color=color)
    ax.fill_between(xs, [m - s[1] for m, s in zip(means, stats)], [m + s[1] for m, s in zip(means, stats)],
                    color=color, alpha=0.15, linewidth=0)


def _size_ticks(ax, rows: list[dict]) -> None:
    ticks = {}
    for row in rows:
        x = _size_of(row)
        if x is not None:
            ticks[x] = f"{x:.0f}\n" + ("all" if row["shots"] is None else f"{row['shots']}/class")
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
    ax.minorticks_off()


def _cost_bars(ax, configs: list[str], rows: list[dict], key: str, label: str, colors: dict, scale: float = 1.0):
    """One bar per configuration: its value at the largest size (parameters and adapter size do not vary)."""
    values = []
    for config in configs:
        found = [r[key][0] for r in rows if r["config"] == config and key in r]
        values.append(found[-1] / scale if found else 0.0)
    bars = ax.barh(range(len(configs)), values, color=[colors[c] for c in configs])
    ax.bar_label(bars, labels=[f"{v:,.0f}" if scale == 1 else f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.set_yticks(range(len(configs)), configs, fontsize=7)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:  # a frozen probe beside full fine-tuning: log scale
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 3, max(positive) * 8)
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif positive:
        ax.set_xlim(0, max(positive) * 1.3)
    ax.set_title(label, fontsize=9)


def learning_curve_chart(rows: list[dict], title: str, path: Path) -> Path:
    """The curve (left) and the costs (right) in one PNG; `rows` are `report.summarize`'s."""
    from matplotlib.figure import Figure

    configs = list(dict.fromkeys(r["config"] for r in rows))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan"]
    colors = {c: palette[i % len(palette)] for i, c in enumerate(configs)}
    fig = Figure(figsize=(15, 6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
    ax = left.add_subplot()
    for config in configs:
        _line(ax, [r for r in rows if r["config"] == config], "test_macro_f1", config, colors[config])
    _size_ticks(ax, rows)
    ax.set_xlabel("training examples (log scale; per class, or the whole split)")
    ax.set_ylabel("test macro-F1 (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"learning curves: {title}", fontsize=10)
    (time_ax, memory_ax), (params_ax, adapter_ax) = right.subplots(2, 2)
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        _line(time_ax, mine, "train_seconds", config, colors[config])
        _line(memory_ax, mine, "peak_memory_gib", config, colors[config])
    for cost_ax, label in ((time_ax, "train time (s)"), (memory_ax, "peak memory (GiB)")):
        _size_ticks(cost_ax, rows)
        cost_ax.set_title(f"{label} against size", fontsize=9)
        cost_ax.grid(alpha=0.3)
    _cost_bars(params_ax, configs, rows, "trainable_parameters", "trainable parameters", colors)
    _cost_bars(adapter_ax, configs, rows, "adapter_bytes", "adapter size (MB)", colors, scale=1e6)
    right.suptitle("cost", fontsize=10)
    fig.savefig(path, dpi=110)
    return path
