"""What every command line of mmpeft shares: the training arguments (also the recipes'), overrides anywhere on
the line, and user errors printed as messages with exit code 2."""

from __future__ import annotations

import argparse
import sys

from ..errors import MmpeftError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command line, shared by `mmpeft train` and the recipes."""
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); without it, the embedded default "
                        "(the values of recipes/configs/embedded_sentiment.yaml)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop unreadable or invalid rows and report them (= data.skip_bad_rows=true)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 model.text.mode=frozen")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
                         passthrough: bool = False) -> argparse.Namespace:
    """`parse_args`, with `section.key=value` overrides accepted before options too (`a=1 --config x b=2`):
    argparse alone takes the positionals of one run of arguments only and calls the rest unrecognized.
    `passthrough`: a command that declares `passes_unknown_arguments` (`mmpeft bench`) gets the rest as
    `harness_args`."""
    args, extra = parser.parse_known_args(argv)
    if passthrough and extra and getattr(args, "passes_unknown_arguments", False):
        args.harness_args = extra
        return args
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    unknown = [x for x in extra if x not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def config_from_args(args: argparse.Namespace):
    from ..config import load_config

    return load_config(args.config, [*args.overrides, *(["data.skip_bad_rows=true"] if args.skip_bad_rows else [])])


def report_user_errors(run, prog: str) -> int:
    """Run `run()`; an error the user can fix (`MmpeftError`: config, data, path, checkpoint, ...) prints its message
    without a traceback and exits 2. Anything else is a bug or comes from inside a library: its traceback stays.

    An int that `run()` returns is the exit code (e.g. `mmpeft compare`: 1 when a run failed); anything else is 0.
    """
    try:
        result = run()
    except MmpeftError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """Where a saved run's backbone is loaded from, for every command that loads one."""
    p.add_argument("--base", help="load the backbone from here instead of the recorded name")
    p.add_argument("--trust-pickle-weights", action="store_true",
                   help="also read a backbone stored as pytorch_model.bin (with torch.load weights_only=True)")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """How a manifest is batched and what happens to its bad rows, for every command that reads one."""
    p.add_argument("--batch-size", type=int, help="examples per batch (default: the run's eval batch size)")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers (capped at the cores; default 2)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows and report them")
