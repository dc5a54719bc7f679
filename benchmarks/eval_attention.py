"""Does eager attention pay at evaluation? The forward pass `mmpeft eval` runs, SDPA against eager, alternating.

    python benchmarks/eval_attention.py            # B/32 LoRA classifier, batch 32, ~1 min on 2 cores

`model.attn_implementation=auto` picks eager for training under bf16 on the CPU because torch's CPU flash-attention
*backward* in bf16 is the slower kernel (models/precision.py). Evaluation has no backward: this measures the
forward alone, under bf16 autocast with the fp32 weights `load_adapter` gives, and writes
results/eval_attention.json. `mmpeft eval` / `predict` keep the loaded implementation (SDPA) unless this shows
eager paying.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import plain_loop  # noqa: E402  (benchmarks/ is no package)
import speed_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import torch

    from mmpeft import build_classifier, load_backbone, load_config
    from mmpeft.backbones.embedded import cache_dir
    from mmpeft.models.precision import set_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="b32", choices=sorted(plain_loop.SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "eval_attention.json")
    args = parser.parse_args(argv)
    checkpoint = plain_loop.checkpoint_for(args.shape, cache_dir())
    cfg = load_config(None, [f"model.name={checkpoint}"])
    backbone = load_backbone(cfg.model.name)
    model = build_classifier(backbone, cfg, ["negative", "neutral", "positive"]).eval()
    batch = plain_loop.synthetic_batch(backbone.model.config, args.batch, torch.device("cpu"), 0, None)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    seconds = {"sdpa": [], "eager": []}
    for _ in range(args.repeats):  # A B A B
        for implementation in seconds:
            set_attention(model, implementation)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(**batch)  # warm-up after the switch
                start = time.perf_counter()
                model(**batch)
                model(**batch)
                seconds[implementation].append((time.perf_counter() - start) / 2)
    result = {"run": speed_report.run_info(HERE.parent, sys.argv[1:]), "shape": args.shape, "batch": args.batch,
              "precision": "bf16 autocast, fp32 weights", "seconds_per_forward": seconds,
              "median": {k: statistics.median(v) for k, v in seconds.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("shape", "batch", "seconds_per_forward", "median")}))


if __name__ == "__main__":
    main()
