"""Merge the results of several `recipes/compare.py` runs of one task into a single report.

    python benchmarks/merge_compare.py OUT DIR [DIR ...]

Each DIR holds a `results.json` written by `recipes/compare.py` (same task, base config and overrides; the
script refuses otherwise). OUT gets one `results.json` (every run, ordered by configuration and seed, with
`meta.merged_from` naming the sources), `results.md` and the charts, as one comparison would have written.
Use it when a comparison was split across invocations (by configuration or seed) to keep every core busy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmpeft.compare.runner import CONFIGS
from mmpeft.compare.report import write_report
from mmpeft.compare.stats import paired_differences

SAME = ("task", "base", "extra_overrides", "task_overrides", "quick", "attribute")


def recorded_configs(sources: list[Path], loaded: list[dict]) -> dict[str, list[str]]:
    """Every configuration's overrides as its comparison recorded them (shipped or added with --define); a name
    that two sources define differently cannot be merged."""
    configs: dict[str, list[str]] = {}
    for source, result in zip(sources, loaded):
        for name, overrides in result["meta"]["configs"].items():
            if configs.setdefault(name, overrides) != overrides:
                raise SystemExit(f"{source}/results.json defines configuration {name!r} as {overrides}, another "
                                 f"source as {configs[name]}: only runs of one comparison can be merged.")
    for result in loaded:
        missing = sorted({run["config"] for run in result["runs"]} - set(configs))
        if missing:
            raise SystemExit(f"runs of configuration(s) {missing} have no recorded definition in meta.configs.")
    return configs


def merge(sources: list[Path]) -> dict:
    loaded = [json.loads((source / "results.json").read_text()) for source in sources]
    meta = dict(loaded[0]["meta"])
    for source, result in zip(sources[1:], loaded[1:]):
        differ = [key for key in SAME if result["meta"].get(key) != meta.get(key)]
        if differ:
            raise SystemExit(f"{source}/results.json differs from {sources[0]}/results.json in {differ}: "
                             "only runs of one comparison can be merged.")
    configs = recorded_configs(sources, loaded)
    # The shipped configurations in their own order, then those added with --define in the order first seen.
    order = [*(n for n in CONFIGS[meta["task"]] if n in configs), *(n for n in configs if n not in CONFIGS[meta["task"]])]
    runs = sorted((run for result in loaded for run in result["runs"]),
                  key=lambda run: (order.index(run["config"]), run["shots"] or 0, run["seed"]))
    keys = [(run["config"], run["shots"], run["seed"]) for run in runs]
    if len(keys) != len(set(keys)):
        raise SystemExit(f"a (config, shots, seed) appears in more than one source: {sorted(keys)}")
    names = list(dict.fromkeys(run["config"] for run in runs))
    meta.update(
        configs={name: configs[name] for name in names},
        shots=sorted({run["shots"] for run in runs}, key=lambda k: k or 0),
        seeds=sorted({run["seed"] for run in runs}),
        started=min(result["meta"]["started"] for result in loaded),
        finished=max(result["meta"].get("finished", "") for result in loaded),
        git_commit=", ".join(dict.fromkeys(str(result["meta"]["git_commit"]) for result in loaded)),
        merged_from=[{"out": str(source), "configs": list(result["meta"]["configs"]), "seeds": result["meta"]["seeds"],
                      "git_commit": result["meta"]["git_commit"], "started": result["meta"]["started"]}
                     for source, result in zip(sources, loaded)],
    )
    return {"meta": meta, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("sources", type=Path, nargs="+")
    args = parser.parse_args()
    results = merge(args.sources)
    results["paired"] = paired_differences(results["runs"])  # from the runs' own folders (test_predictions.jsonl)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for path in write_report(results, args.out):
        print(f"written: {path}")


if __name__ == "__main__":
    main()
