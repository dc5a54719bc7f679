"""The comparison's results as a Markdown table and PNG charts: mean ± std over seeds per configuration and
training size, the paired differences between configurations, and the learning curves (`curves.py`)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from .curves import LEARNING_CURVE, learning_curve_chart

logger = logging.getLogger("mmpeft")

# (key in a run record, column / axis label, chart file)
MEASURES = (
    ("test_macro_f1", "test macro-F1", "test_f1.png"),
    ("train_seconds", "training time (s)", "train_time.png"),
    ("peak_memory_gib", "peak memory (GiB)", "peak_memory.png"),
    ("trainable_parameters", "trainable parameters", "trainable_parameters.png"),
    ("adapter_bytes", "adapter size (bytes)", "adapter_size.png"),
)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (configuration, shots), by configuration then k: counts, and (mean, std, n) of each measure."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["shots"]), []).append(run)
    rows = []
    for (config, shots), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row = {"config": config, "shots": shots, "ok": len(ok), "failed": len(group) - len(ok),
               "seeds": [r["seed"] for r in ok]}
        for key, *_ in (*MEASURES, ("test_accuracy",), ("train_examples",)):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key] = (statistics.fmean(values), std, len(values))
        rows.append(row)
    order = {config: i for i, config in enumerate(dict.fromkeys(r["config"] for r in runs))}
    return sorted(rows, key=lambda r: (order[r["config"]], float("inf") if r["shots"] is None else r["shots"]))


def _mean_std(stat: tuple | None, fmt: str = "{:.3f}") -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if n > 1 else "")


def _size(stat: tuple | None) -> str:
    if stat is None:
        return "–"
    value = stat[0]
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def markdown(results: dict) -> str:
    """results.md: the setup, one table row per configuration and k, an F1-by-k table, and the failed runs."""
    meta, runs = results["meta"], results["runs"]
    rows = summarize(runs)
    with_shots = any(r["shots"] is not None for r in rows)
    lines = [f"# Comparison: {meta['task']}" + (f" ({meta['attribute']})" if meta.get("attribute") else ""), "",
             f"- base config: `{meta['base'] or 'built-in defaults'}`"
             + (f", every run with `{' '.join(meta['extra_overrides'])}`" if meta["extra_overrides"] else ""),
             f"- task overrides: `{' '.join(meta['task_overrides'])}`"
             + (f"; quick: `{' '.join(meta['quick_overrides'])}`" if meta["quick"] else ""),
             f"- seeds {', '.join(map(str, meta['seeds']))}; mean ± std (sample) over the seeds that finished",
             *([f"- step budget: {meta['step_budget']}"] if meta.get("step_budget") else []),
             f"- feature cache (`train.feature_cache`): {_feature_cache(runs)}",
             f"- device: {meta['device']}; peak memory: {meta['memory']}",
             f"- git commit {meta.get('git_commit') or 'unknown'}, torch {meta['torch']}, {meta['started']}", "",
             "| config | " + ("k | " if with_shots else "") + "runs | test macro-F1 | test accuracy | train time (s) | "
             "peak memory (GiB) | trainable params | adapter size |",
             "|---|" + ("---:|" if with_shots else "") + "---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        runs_cell = f"{row['ok']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        params = row.get("trainable_parameters")
        shots_cell = "all" if row["shots"] is None else str(row["shots"])
        cells = [row["config"], *([shots_cell] if with_shots else []), runs_cell,
                 _mean_std(row.get("test_macro_f1")), _mean_std(row.get("test_accuracy")),
                 _mean_std(row.get("train_seconds"), "{:.1f}"), _mean_std(row.get("peak_memory_gib"), "{:.2f}"),
                 f"{params[0]:,.0f}" if params else "–", _size(row.get("adapter_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _by_size(rows) + paired_lines(results.get("paired"))
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for run in failed:
            last = (run.get("error") or "no error recorded").strip().splitlines()
            lines.append(f"- {run['config']}" + (f" k={run['shots']}" if run["shots"] is not None else "")
                         + f" seed {run['seed']}: `{last[-1] if last else ''}` (log: {run['output_dir']}/log.txt)")
    configs = meta.get("configs") or {}
    if configs:
        lines += ["", "## Configurations", ""]
        lines += [f"- **{name}**: `{' '.join(overrides)}`" for name, overrides in configs.items()]
    return "\n".join(lines) + "\n"


def _by_size(rows: list[dict]) -> list[str]:
    """Test macro-F1 with one column per training size (examples per class; `all` last)."""
    shots = sorted({r["shots"] for r in rows}, key=lambda k: float("inf") if k is None else k)
    if len(shots) < 2:
        return []
    cell = {(r["config"], r["shots"]): r for r in rows}
    lines = ["", "## Test macro-F1 by training size (examples per class)", "",
             "| config | " + " | ".join("all" if k is None else f"k={k}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for config in dict.fromkeys(r["config"] for r in rows):
        lines.append(f"| {config} | " + " | ".join(
            _mean_std(cell.get((config, k), {}).get("test_macro_f1")) for k in shots) + " |")
    return lines


def paired_lines(paired: list[dict] | None) -> list[str]:
    """The paired differences, the better configuration first; 'A beats B' only where the interval excludes 0."""
    if not paired:
        return []
    first = paired[0]
    lines = ["", "## Paired differences in test macro-F1", "",
             f"A − B on the same test rows: mean over seeds, 95 % percentile interval of {first['resamples']} "
             "bootstrap resamples of test rows and of seeds (compare/stats.py). 'A beats B' only where the "
             "interval excludes 0.", ""]
    for shots in dict.fromkeys(p["shots"] for p in paired):
        lines += [f"**{'all' if shots is None else f'k={shots}'}**", ""]
        for p in (p for p in paired if p["shots"] == shots):
            a, b, diff, low, high = p["a"], p["b"], p["difference"], p["low"], p["high"]
            if diff < 0:
                a, b, diff, low, high = b, a, -diff, -high, -low
            lines.append(f"- {a} − {b}: {diff:+.3f} [{low:+.3f}, {high:+.3f}] ({p['seeds']} seed"
                         f"{'s' if p['seeds'] > 1 else ''}, {p['rows']} rows) → {p['verdict']}")
        lines.append("")
    return lines[:-1]


def _feature_cache(runs: list[dict]) -> str:
    """Whether the on-disk / in-memory feature cache was on, per run (the runs' `feature_cache`; absent = off)."""
    by_state: dict[str, dict] = {}
    for run in runs:
        by_state.setdefault(run.get("feature_cache") or "off", {})[run["config"]] = None
    if len(by_state) <= 1:
        return f"{next(iter(by_state), 'off')} for every run"
    return "; ".join(f"{state}: {', '.join(configs)}" for state, configs in by_state.items())


def charts(results: dict, out: Path) -> list[Path]:
    """One bar chart per measure (bars per k when several), and F1 against k with ± std bands."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in library code

    rows = summarize(results["runs"])
    configs = list(dict.fromkeys(r["config"] for r in rows))
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    cell = {(r["config"], r["shots"]): r for r in rows}
    meta = results["meta"]
    title = f"{meta['task']}{f' ({a})' if (a := meta.get('attribute')) else ''} on {meta['device']}"
    written = []
    width = 0.8 / len(shots)
    several_seeds = any(stat[2] > 1 for r in rows for key, *_ in MEASURES if (stat := r.get(key)))
    for key, label, filename in MEASURES:
        fig = Figure(figsize=(max(6.0, 1.1 * len(configs)), 4.0), layout="constrained")
        ax = fig.add_subplot()
        values = []
        for i, k in enumerate(shots):
            stats = [cell.get((c, k), {}).get(key) for c in configs]
            means = [s[0] if s else 0.0 for s in stats]
            values += [s[0] for s in stats if s]
            xs = [j + (i - (len(shots) - 1) / 2) * width for j in range(len(configs))]
            errors = [s[1] if s else 0.0 for s in stats] if several_seeds else None
            bars = ax.bar(xs, means, width, yerr=errors, capsize=3,
                          label=None if k is None else f"k={k}")
            if len(shots) == 1:
                ax.bar_label(bars, labels=[_bar_text(key, s) for s in stats], fontsize=8, padding=2)
        if key in ("trainable_parameters", "adapter_bytes") and values and max(values) > 0:
            ax.set_yscale("log" if min(values) > 0 else "symlog")
        ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: {title}", fontsize=10)
        if len(shots) > 1:
            ax.legend(fontsize=8)
        fig.savefig(out / filename, dpi=120)
        written.append(out / filename)
    if len(shots) > 1:
        written.append(learning_curve_chart(rows, title, out / LEARNING_CURVE))
    return written


def _bar_text(key: str, stat: tuple | None) -> str:
    if stat is None:
        return "failed"
    if key == "adapter_bytes":
        return _size(stat)
    if key == "trainable_parameters":
        return f"{stat[0]:,.0f}"
    fmt = {"test_macro_f1": "{:.3f}", "train_seconds": "{:.1f}", "peak_memory_gib": "{:.2f}"}.get(key, "{:.3g}")
    return fmt.format(stat[0])


def write_report(results: dict, out: Path) -> list[Path]:
    """results.md, and the charts when matplotlib is installed (`pip install 'mmpeft[compare]'`)."""
    from .wise import markdown_table

    (out / "results.md").write_text(markdown(results) + markdown_table(results.get("wise")), encoding="utf-8")
    written = [out / "results.json", out / "results.md"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no charts (pip install 'mmpeft[compare]').")
        return written
    return written + charts(results, out)
