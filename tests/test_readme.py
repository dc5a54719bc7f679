"""README's commands, checked so README cannot drift: every `mmpeft ...`, recipe and `accelerate launch` line of its
shell blocks must parse with today's command line and, for training and comparisons, give a valid config; the ones
that need no trained run, no data of the user's and no Hub (`backbones`, `plan`, `data make-*`) run for real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmpeft.cli import build_parser, config_from_args, main, parse_with_overrides

ROOT = Path(__file__).parents[1]
RECIPES = {"recipes/lora_sentiment.py": "train", "recipes/lora_retrieval.py": "train", "recipes/compare.py": "compare"}
RUN_FOR_REAL = ("backbones", "plan", "data")


def readme_commands() -> list[list[str]]:
    """Each command of README's ```bash blocks as `mmpeft` arguments (recipes as the command they share)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and "=" in words[0] and not words[0].startswith("-"):  # ENV=1 accelerate launch ...
                words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
            if not words:
                continue
            if words[0] == "mmpeft":
                commands.append(words[1:])
            elif words[0] in ("accelerate", "python") and any(w in RECIPES for w in words):
                at = next(i for i, w in enumerate(words) if w in RECIPES)
                retrieval = words[at].endswith("lora_retrieval.py") and not any(w.startswith("--config") for w in words)
                commands.append([RECIPES[words[at]], *words[at + 1:], *(["task=retrieval"] if retrieval else [])])
    return commands


COMMANDS = readme_commands()


def test_readme_has_commands_to_check():
    assert len(COMMANDS) > 15 and {c[0] for c in COMMANDS} >= {"train", "eval", "predict", "compare", "plan"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses_and_its_config_is_valid(argv):
    args = parse_with_overrides(build_parser(), argv)
    if args.command == "train":
        config_from_args(args)  # raises ConfigError naming the key, as the command would
    elif args.command == "compare":
        from mmpeft.compare.runner import TASK_OVERRIDES, plan_configs
        from mmpeft.config import load_config

        for overrides in plan_configs(args.task, args.configs, dict(args.define)).values():
            load_config(args.base, [*TASK_OVERRIDES[args.task], *overrides, *args.overrides])


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] in RUN_FOR_REAL],
                         ids=lambda c: " ".join(c)[:60])
def test_readme_command_runs_offline(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data commands write relative folders
    if argv[:2] == ["data", "make-sentiment"]:
        argv = [*argv, "--train", "30", "--val", "9", "--test", "9"]  # the same command, a smaller set
    assert main(argv) == 0
