"""`mmpeft inspect OUT_DIR`: which modules of which tower got LoRA, their ranks, what trains, what was saved.

Read from the saved files alone (`mmpeft.json`, the stock peft `adapter_config.json` and
`adapter_model.safetensors`, `head.safetensors`): no backbone is loaded, so it works offline and in a second.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ..backbones import get_family
from ..errors import AdapterError
from ..models.saving import HEAD_WEIGHTS, read_manifest

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise AdapterError(f"{path}: not a readable safetensors file ({err}).") from None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _alpha(module: str, config: dict) -> float:
    """peft's rule: the first `alpha_pattern` key matching the end of the module name, else `lora_alpha`."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return alpha
    return config.get("lora_alpha")


def _fold(names: list[str]) -> tuple[str, int] | None:
    """One pattern naming exactly `names` (`layers.{0,1}.self_attn.{k,q}_proj` style), or None."""
    split = [name.split(".") for name in names]
    if len({len(parts) for parts in split}) != 1:
        return None
    folded, combinations = [], 1
    for column in zip(*split):
        values = sorted(set(column), key=lambda v: (len(v), v))
        combinations *= len(values)
        folded.append(values[0] if len(values) == 1 else "{" + ",".join(values) + "}")
    return (".".join(folded), len(names)) if combinations == len(set(names)) else None


def layer_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Module names as few patterns as say exactly them: all in one, else one per layer skeleton, else each."""
    whole = _fold(names)
    if whole:
        return [whole]
    skeletons = defaultdict(list)
    for name in names:
        skeletons[re.sub(r"\.\d+(?=\.|$)", ".#", name)].append(name)
    patterns = []
    for members in skeletons.values():
        folded = _fold(members)
        patterns += [folded] if folded else [(name, 1) for name in members]
    return sorted(patterns)


def inspect_run(out_dir: str | Path) -> dict:
    """Per tower: LoRA modules grouped by layer pattern (rank, alpha, count), fully trained modules, trainable
    weights; the head's size; every saved file with its size."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    family = get_family(manifest["backbone"]["family"])
    config_path = out_dir / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    shapes = _tensor_shapes(out_dir / ADAPTER_WEIGHTS)
    if adapter_config and not shapes:
        raise AdapterError(f"{out_dir}: {ADAPTER_CONFIG} is there but {ADAPTER_WEIGHTS} is missing or empty.")
    towers: dict[str, dict] = defaultdict(lambda: {"lora": defaultdict(list), "full": set(), "trainable": 0})
    for key, shape in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        tower = towers[family.tower_of(name) or "other"]
        tower["trainable"] += _numel(shape)
        match = re.fullmatch(r"(.+)\.lora_A(?:\.[^.]+)?\.weight", name)
        if match:
            module = match.group(1)
            tower["lora"][(shape[0], _alpha(module, adapter_config))].append(module)
        elif ".lora_" not in name:
            tower["full"].add(name.rsplit(".", 1)[0])
    report_towers = {}
    for tower_name, tower in sorted(towers.items()):
        groups = []
        for (rank, alpha), modules in sorted(tower["lora"].items()):
            groups += [{"pattern": pattern, "modules": count, "r": rank, "alpha": alpha}
                       for pattern, count in layer_patterns(sorted(modules))]
        report_towers[tower_name] = {"lora": groups, "lora_modules": sum(len(m) for m in tower["lora"].values()),
                                     "full_modules": sorted(tower["full"]), "trainable": tower["trainable"]}
    head = _tensor_shapes(out_dir / HEAD_WEIGHTS)
    files = sorted((str(p.relative_to(out_dir)), p.stat().st_size) for p in out_dir.rglob("*") if p.is_file())
    return {"out_dir": str(out_dir), "task": manifest.get("task", "classification"), "backbone": manifest["backbone"],
            "tower_modes": manifest.get("tower_modes", {}), "towers": report_towers,
            "head": {"type": manifest.get("config", {}).get("head", {}).get("type"),
                     "parameters": sum(_numel(s) for s in head.values())} if head else None,
            "label_names": manifest.get("label_names"), "files": [{"path": p, "bytes": n} for p, n in files]}


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_inspection(report: dict) -> str:
    backbone = report["backbone"]
    lines = [f"{report['out_dir']}: {report['task']} run on {backbone['name']!r} ({backbone['family']}), "
             f"towers {', '.join(f'{t} {m}' for t, m in report['tower_modes'].items())}"]
    for name, tower in report["towers"].items():
        lines.append(f"{name} tower: {tower['lora_modules']} LoRA module(s), {tower['trainable']:,} trained weights")
        lines += [f"  {g['pattern']}  r={g['r']} alpha={g['alpha']}  ({g['modules']} modules)" for g in tower["lora"]]
        if tower["full_modules"]:
            lines.append(f"  fully trained (modules_to_save): {len(tower['full_modules'])} module(s), e.g. "
                         f"{tower['full_modules'][0]}")
    if not report["towers"]:
        lines.append("no adapter: both towers frozen")
    if report["head"]:
        lines.append(f"head: {report['head']['type']}, {report['head']['parameters']:,} weights, labels "
                     f"{', '.join(report['label_names'] or [])}")
    width = max(len(f["path"]) for f in report["files"])
    lines.append("files:")
    lines += [f"  {f['path']:<{width}}  {_size(f['bytes'])}" for f in report["files"]]
    return "\n".join(lines)
