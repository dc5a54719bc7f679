"""Configs from YAML files with `section.key=value` overrides, and from the dicts saved in run records."""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, MissingPathError
from . import sections
from .sections import Config

logger = logging.getLogger(__name__)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false; `no`, `off`, `yes` stay strings (`mixed_precision: no`)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list(_first)
    )


# YAML 1.1 reads `1e-3` (no dot) as a string; learning rates are written that way.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    """Parse YAML as a config (1.2 booleans, `1e-3` as a float)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def config_from_dict(data: dict, *, strict: bool = True) -> Config:
    """A `Config` from a nested dict (e.g. the `config` of a saved run record), validated.

    `strict=False` is for configs saved by earlier runs: a value today's checks would refuse is logged as a
    warning instead of refused, so an old run still loads and evaluates as it was trained.
    """
    if strict:
        return _build(Config, data, "")
    try:
        return _build(Config, data, "")
    except ConfigError as err:
        logger.warning("A saved config does not pass today's checks (loaded as saved): %s", err)
        with sections.unchecked():
            return _build(Config, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the list of valid ones."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"`{where or 'config'}` must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"Unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {names}.")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            if value is None and type(None) in typing.get_args(hint):
                kwargs[key] = None  # an optional section switched off (`model.quantization: null`)
                continue
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        sub = f"{where}.{key}" if where else key
        kwargs[key] = _build(hint, value, sub) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override `{dotted}`: `{key}` is not a section.")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults), apply `a.b=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"Config file {path} does not exist.")
        try:
            tree = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections (model:, head:, data:, train:), "
                              f"got a {type(tree).__name__}.")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like `section.key=value`, e.g. `train.epochs=5`.")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), parse_yaml(raw) if raw != "" else None)
    try:
        return _build(Config, tree, "")
    except TypeError as err:  # a wrong type reaching a dataclass constructor
        raise ConfigError(f"Invalid config{f' in {path}' if path else ''}: {err}") from None
