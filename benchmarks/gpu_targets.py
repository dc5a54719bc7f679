"""One line per GPU target of issue 13, read from the result files `gpu_suite.sh` wrote (PASS / FAIL / MISSING).

    python benchmarks/gpu_targets.py --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name, result file under speed/, figure, bound): ratios are mmpeft / plain of the same run.
SPEED_TARGETS = [
    ("B/16 LoRA batch 64, step: samples/s x plain >= 2.5", "cuda-step-b16-lora-bf16-b64", "ratio", 2.5),
    ("B/16 LoRA batch 64, step: peak memory x plain <= 0.75", "cuda-step-b16-lora-bf16-b64", "memory", 0.75),
    ("L/14 LoRA batch 64, step: samples/s x plain >= 2", "cuda-step-l14-lora-bf16-b64", "ratio", 2.0),
    ("B/16 full batch 64, step: samples/s x plain >= 1.3", "cuda-step-b16-full-bf16-b64", "ratio", 1.3),
    ("L/14 full batch 64, step: samples/s x plain >= 1.3", "cuda-step-l14-full-bf16-b64", "ratio", 1.3),
]
# (name, memory json, mode, bound in GiB)
MEMORY_TARGETS = [
    ("L/14 QLoRA batch 64: peak <= 3 GiB", "memory_cuda_l14.json", "qlora_nf4+gc", 3.0),
    ("B/16 QLoRA batch 64: peak <= 2 GiB", "memory_cuda_b16.json", "qlora_nf4+gc", 2.0),
]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def speed_lines(folder: Path) -> list[str]:
    lines = []
    for name, row, figure, bound in SPEED_TARGETS:
        result = _load(folder / f"{row}.json")
        if result is None:
            lines.append(f"MISSING  {name}: no {row}.json")
            continue
        r = result["ratios"]
        value = r["samples_per_s"]["median"] if figure == "ratio" else r["peak_memory"]["median"]
        ok = value >= bound if figure == "ratio" else value <= bound
        lines.append(f"{'PASS' if ok else 'FAIL'}     {name}: {value:.2f} (pairs {result['config']['pairs']})")
    e2e, step = _load(folder / "cuda-e2e-b16-lora-bf16-b64.json"), _load(folder / "cuda-step-b16-lora-bf16-b64.json")
    name = "B/16 LoRA batch 64: end to end within 10 % of mmpeft's own step-only rate"
    if e2e is None or step is None:
        lines.append(f"MISSING  {name}")
    else:
        share = e2e["sides"]["mmpeft"]["samples_per_s"]["median"] / step["sides"]["mmpeft"]["samples_per_s"]["median"]
        lines.append(f"{'PASS' if share >= 0.9 else 'FAIL'}     {name}: {share:.2f} of it")
    return lines


def memory_lines(folder: Path) -> list[str]:
    lines = []
    for name, file, mode, bound in MEMORY_TARGETS:
        result = _load(folder / file)
        row = next((m for m in (result or {}).get("modes", []) if m.get("mode") == mode and "error" not in m), None)
        if row is None:
            lines.append(f"MISSING  {name}: no {mode} row in {file}")
            continue
        peak = row["train_peak_gib"]
        lines.append(f"{'PASS' if peak <= bound else 'FAIL'}     {name}: {peak:.2f} GiB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    for line in speed_lines(args.results / "speed") + memory_lines(args.results):
        print("TARGET " + line)


if __name__ == "__main__":
    main()
