"""`mmpeft` command line: one `add_<command>` function per command (its arguments) and one `_<command>` that runs
it, grouped by what they do with a run; user errors (`MmpeftError`) print their message and exit 2."""

from __future__ import annotations

import argparse
import sys

from .common import add_train_arguments, config_from_args, parse_with_overrides, report_user_errors
from .run import add_eval, add_explain, add_predict, add_train
from .share import add_card, add_embed, add_inspect, add_interpolate, add_merge, add_push, add_search
from .tools import add_backbones, add_bench, add_compare, add_data, add_plan

__all__ = ["COMMANDS", "add_train_arguments", "build_parser", "config_from_args", "main", "parse_with_overrides",
           "report_user_errors"]


# One function per command: each adds its sub-parser (help, arguments) and the function that runs it.
COMMANDS = (add_train, add_eval, add_predict, add_push, add_card, add_data, add_compare, add_explain,
            add_backbones, add_merge, add_interpolate, add_plan, add_inspect, add_embed, add_search, add_bench)


def build_parser():
    parser = argparse.ArgumentParser(prog="mmpeft", description="Fine-tune vision-language dual encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv, passthrough=True)
    return report_user_errors(lambda: args.func(args), f"mmpeft {args.command}")


if __name__ == "__main__":
    sys.exit(main())
