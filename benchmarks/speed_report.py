"""Statistics, run information, result files and the README table of `speed.py` (one JSON per row)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

SCHEMA = "mmpeft-speed/1"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "open_clip_torch", "mmpeft")


def quantiles(values: list[float]) -> dict:
    """Median, 10th / 90th percentile, min and max of a list of seconds."""
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9), "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


def spread(values: list[float]) -> dict:
    """Median, min, max and (max - min) / median of one figure over the runs of a side."""
    mid = statistics.median(values)
    return {"median": mid, "min": min(values), "max": max(values), "values": values,
            "spread": (max(values) - min(values)) / mid if mid else 0.0}


def summarize_side(runs: list[dict], warmup: int) -> dict:
    """A side's runs: samples/s over the timed steps of each run, the pooled step-time distribution, peaks."""
    rates, pooled = [], []
    for run in runs:
        timed = run["step_seconds"][warmup:] or run["step_seconds"][-1:]
        rates.append(run["batch"] * len(timed) / sum(timed))
        pooled += timed
    out = {"samples_per_s": spread(rates), "step_seconds": quantiles(pooled),
           "peak_memory_gib": spread([r["peak_memory_gib"] for r in runs]),
           "trainable_parameters": runs[0]["trainable_parameters"]}
    walls = [r["wall_seconds"] for r in runs if "wall_seconds" in r]
    if walls:
        out["wall_seconds"] = spread(walls)
    return out


def ratios(pairs: list[tuple[dict, dict]], warmup: int) -> dict:
    """mmpeft / plain per A/B pair (samples/s; plain / mmpeft for wall time and peak): median over the pairs."""
    def rate(run):
        timed = run["step_seconds"][warmup:] or run["step_seconds"][-1:]
        return run["batch"] * len(timed) / sum(timed)

    out = {"samples_per_s": spread([rate(a) / rate(b) for a, b in pairs]),
           "peak_memory": spread([a["peak_memory_gib"] / b["peak_memory_gib"] for a, b in pairs])}
    if all("wall_seconds" in a and "wall_seconds" in b for a, b in pairs):
        out["wall_speedup"] = spread([b["wall_seconds"] / a["wall_seconds"] for a, b in pairs])
    return out


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor())


def run_info(root: Path, argv: list[str]) -> dict:
    """Command, commit, package versions and hardware of this invocation."""
    import torch

    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "mmpeft", "benchmarks"], capture_output=True,
                           text=True).stdout.strip()
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"command": "python benchmarks/speed.py " + " ".join(argv), "git_commit": commit,
            "uncommitted_changes": bool(dirty), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": versions,
            "hardware": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                         "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                         "gpu": torch.cuda.get_device_name() if cuda else None},
            "peak_memory": "CUDA max_memory_allocated" if cuda else "CPU peak resident set (VmHWM)"}


def row_name(cfg: dict) -> str:
    tag = f"-{cfg['tag']}" if cfg.get("tag") else ""
    return f"{cfg['device']}-{cfg['kind']}-{cfg['shape']}-{cfg['mode']}-{cfg['precision']}-b{cfg['batch']}{tag}"


def write_row(out_dir: Path, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{row_name(result['config'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def table(results: list[dict]) -> str:
    """One line per row: medians over the runs (min–max) and the ratios over the A/B pairs."""
    lines = ["| device | kind | shapes | mode | precision (mmpeft / plain) | batch | mmpeft samples/s | plain samples/s "
             "| × plain (median of pairs, min–max) | pairs | peak GiB mmpeft / plain | wall × | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: row_name(r["config"])):
        c, m, p, x = r["config"], r["sides"]["mmpeft"], r["sides"]["plain"], r["ratios"]
        wall = _fmt(x["wall_speedup"]) if "wall_speedup" in x else ""
        load = "–".join(f"{v:.1f}" for v in (min(r["load_avg"]), max(r["load_avg"])))
        lines.append(f"| {c['device']} | {c['kind']} | {c['shape']} | {c['mode']}{' ' + c['tag'] if c.get('tag') else ''}"
                     f" | {r['precision_used']['mmpeft']} / {r['precision_used']['plain']} | {c['batch']} "
                     f"| {_fmt(m['samples_per_s'])} | {_fmt(p['samples_per_s'])} | **{_fmt(x['samples_per_s'])}** "
                     f"| {c['pairs']} | {m['peak_memory_gib']['median']:.2f} / {p['peak_memory_gib']['median']:.2f} "
                     f"| {wall} | {load} |")
    return "\n".join(lines)


def update_readme(readme: Path, results_dir: Path) -> None:
    """Regenerate the table between the speed markers from every JSON in `results_dir`."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results = [r for r in results if r.get("schema") == SCHEMA]
    replace_block(readme, "speed", "Generated by `benchmarks/speed.py` from `benchmarks/results/speed/*.json`; load "
                  "avg = `os.getloadavg()` (1 min) around each run, on a machine whose cores other jobs may share."
                  f"\n\n{table(results)}")


def replace_block(readme: Path, name: str, body: str) -> None:
    """Put `body` between the `<!-- name:start -->` / `<!-- name:end -->` markers of `readme` (appended if none)."""
    block = f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(rf"<!-- {name}:start -->.*<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
