"""The WiSE-FT α sweep: a fine-tuned prompt-head run interpolated towards its zero-shot start at several α, each
model scored on the usual test split and on a shifted one (world scenes of the colour-shape pairs held out of
pretraining). `mmpeft compare --task fewshot --wise-alphas 0,0.25,0.5,0.75,1` runs it after training."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..data.loaders import make_loader
from ..data.manifest import read_split
from ..errors import ConfigError
from ..export.interpolate import check_alpha, interpolate
from ..models.saving import load_adapter
from ..training.metrics import classification_metrics


def parse_alphas(text: str) -> list[float]:
    """`0,0.25,0.5` as floats in [0, 1] (the command line's `--wise-alphas`)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--wise-alphas expects comma-separated numbers in [0, 1], got {text!r}.") from None
    if not values:
        raise ConfigError("--wise-alphas needs at least one value, e.g. 0,0.25,0.5,0.75,1.")
    return [check_alpha(a) for a in values]


@torch.no_grad()
def score(model, manifest: str | Path) -> dict[str, float]:
    """Accuracy and macro-F1 of a loaded classifier on a labelled manifest."""
    data = model.config.data
    split = read_split(manifest, image_column=data.image_column, text_column=data.text_column,
                       label_column=data.label_column, label_names=model.label_names,
                       require_text=model.config.head.reads_captions, allow_outside_root=data.allow_outside_root)
    loader, _ = make_loader(split, model.label_names, model.source, data, train=False)
    model.eval()
    preds, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels"))
        batch.pop("index", None)
        preds.append(model(**batch).argmax(-1))
    metrics = classification_metrics(torch.cat(labels).numpy(), torch.cat(preds).numpy(), model.label_names)
    return {"accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"])}


def alpha_sweep(run_dir: str | Path, alphas: list[float], splits: dict[str, str | Path]) -> list[dict]:
    """One row per (α, split): `{"alpha", "split", "accuracy", "macro_f1", "interpolated"}`. The interpolated
    folders are written beside the run, scored and removed."""
    run_dir = Path(run_dir)
    rows = []
    work = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-wise-"))
    try:
        for alpha in alphas:
            folder = work / f"alpha-{alpha:g}"
            record = interpolate(run_dir, folder, alpha)
            model = load_adapter(folder)
            how = {part: record[part] for part in ("text", "vision", "head")}
            for name, manifest in splits.items():
                rows.append({"alpha": alpha, "split": name, **score(model, manifest), "interpolated": how})
            del model
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def comparison_sweep(results: dict, out: Path, alphas: list[float], attribute: str, quick: bool, log=print) -> dict:
    """The sweep over every trained, finished prompt-head run of a few-shot comparison: `results["wise"]`."""
    from ..world.fewshot import write_fewshot_shifted

    shifted = write_fewshot_shifted(out / "data" / f"{attribute}-shifted", attribute=attribute,
                                    per_class=10 if quick else 50)
    sweeps = []
    for run in results["runs"]:
        if run["status"] != "ok" or not run.get("trained"):
            continue
        test = next(o.split("=", 1)[1] for o in run["overrides"] if o.startswith("data.test="))
        rows = alpha_sweep(run["output_dir"], alphas, {"test": test, "shifted": shifted})
        sweeps.append({"config": run["config"], "shots": run["shots"], "seed": run["seed"], "rows": rows})
        log(f"WiSE-FT {run['config']} k={run['shots']} seed {run['seed']}: " + ", ".join(
            f"a={r['alpha']:g} {r['split']} {r['accuracy']:.3f}" for r in rows))
    return {"alphas": alphas, "shifted": str(shifted), "sweeps": sweeps}


def markdown_table(wise: dict | None) -> str:
    """results.md's WiSE-FT section: accuracy on test / shifted per run and α ('' without a sweep)."""
    if not wise or not wise.get("sweeps"):
        return ""
    alphas = wise["alphas"]
    lines = ["", "## WiSE-FT: accuracy at each alpha (test / shifted: held-out colour-shape pairs)", "",
             "| config | k | seed | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|---|---|" + "---|" * len(alphas)]
    for sweep in wise["sweeps"]:
        acc = {(r["alpha"], r["split"]): r["accuracy"] for r in sweep["rows"]}
        cells = [f"{acc[a, 'test']:.3f} / {acc[a, 'shifted']:.3f}" for a in alphas]
        lines.append(f"| {sweep['config']} | {sweep['shots']} | {sweep['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
