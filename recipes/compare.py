"""Fine-tuning configurations side by side: same task, seed and budget, each run in a fresh process.

    python recipes/compare.py --task sentiment --quick                       # smoke test, a few minutes on a CPU
    python recipes/compare.py --task sentiment --seeds 0,1,2 --out out/compare-sentiment
    python recipes/compare.py --task fewshot --shots 1,2,4,8,16 --seeds 0,1,2 --out out/compare-fewshot
    python recipes/compare.py --task fewshot --configs zero_shot,lora_both,lora_both_reg model.name=my/clip

Writes <out>/results.json (every run), results.md (mean ± std over seeds) and PNG charts. The same command is
`mmpeft compare`; the comparison itself is `mmpeft.compare.runner.compare`.
"""

import argparse
import sys
from pathlib import Path

from mmpeft.cli import report_user_errors
from mmpeft.compare.runner import add_compare_arguments, run_from_args

BASE = Path(__file__).resolve().parent / "configs" / "embedded_sentiment.yaml"


def recipe_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compare_arguments(parser, default_base=str(BASE))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(report_user_errors(recipe_main, "compare.py") or 0)
