"""What bf16 costs in accuracy: the embedded task trained at fp32 and at bf16, side by side, same seeds.

    python benchmarks/precision_f1.py                       # seeds 0 1: ~10 min on 2 cores
    python benchmarks/precision_f1.py --seeds 0 --steps 4   # smoke

Each run is `mmpeft train` on the embedded default (README's first command) in a fresh process, once with
`train.mixed_precision=no` and once with `train.mixed_precision=bf16`, which is what `auto` picks at ViT-B widths
on a bf16 CPU and brings the bf16 choices of `mmpeft/models/precision.py` (backbone weights stored in bf16,
eager attention on the CPU). `auto` itself keeps the tiny default in fp32, so bf16 is named here to be measured.
Writes results/precision_f1.json and the table in benchmarks/README.md: test macro-F1 per precision and seed and
the largest bf16 - fp32 difference (issue 13: within 0.5 points).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed_report  # noqa: E402  (benchmarks/ is no package)

PRECISIONS = ("no", "bf16")


def train(precision: str, seed: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mmpeft.cli", "train", f"train.mixed_precision={precision}", f"train.seed={seed}",
           f"train.output_dir={out}", "train.progress=false", "train.tracker=null", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"precision": precision, "seed": seed, "test_macro_f1": metrics["test"]["macro_f1"],
            "test_accuracy": metrics["test"]["accuracy"], "train_seconds": metrics["train_seconds"],
            "mixed_precision": metrics["mixed_precision"], "choices": metrics.get("precision", {}),
            "steps": metrics["steps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (smoke); default: the full run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision_f1.json")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    extra = [f"train.max_steps={args.steps}"] if args.steps else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmpeft-precision-") as work:
        for seed in args.seeds:
            for precision in PRECISIONS:  # A B A B: each seed's pair runs back to back
                rows.append(train(precision, seed, Path(work) / f"{precision}-{seed}", extra))
                print(json.dumps(rows[-1]), flush=True)
    by = {(r["precision"], r["seed"]): r for r in rows}
    gaps = [by["bf16", s]["test_macro_f1"] - by["no", s]["test_macro_f1"] for s in args.seeds]
    result = {"run": speed_report.run_info(HERE.parent, sys.argv[1:]), "rows": rows,
              "largest_gap_points": 100 * max(abs(g) for g in gaps), "gaps_points": [100 * g for g in gaps]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| seed | fp32 test macro-F1 | bf16 test macro-F1 | bf16 − fp32 (points) | train s fp32 / bf16 |",
             "|---|---|---|---|---|"]
    for seed, gap in zip(args.seeds, gaps):
        a, b = by["no", seed], by["bf16", seed]
        lines.append(f"| {seed} | {a['test_macro_f1']:.4f} | {b['test_macro_f1']:.4f} | {100 * gap:+.2f} "
                     f"| {a['train_seconds']:.0f} / {b['train_seconds']:.0f} |")
    choices = by["bf16", args.seeds[0]]["choices"]
    body = (f"`python benchmarks/precision_f1.py {' '.join(sys.argv[1:])}`, {result['run']['date']}, commit "
            f"{result['run']['git_commit'][:7]}; bf16 runs: weights {choices.get('weights')}, attention "
            f"{choices.get('attention')}. Largest difference: **{result['largest_gap_points']:.2f} points**.\n\n"
            + "\n".join(lines))
    speed_report.replace_block(args.readme, "precision-f1", body)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
