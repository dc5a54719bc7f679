"""`mmpeft explain`: modality contribution, saliency, calibration and errors of a loaded classifier on a labelled
split, written as `report.md` + PNGs + `explain.json` (every number of the report)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError, PathExistsError
from .calibration import calibration_report, gallery
from .contribution import modality_contribution
from .saliency import saliency_batch
from .split import ExplainSplit, encode_split, load_split

SECTIONS = ("contribution", "saliency", "calibration")


def parse_sections(methods: str) -> tuple[str, ...]:
    wanted = SECTIONS if methods == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in wanted if m not in SECTIONS]
    if unknown or not wanted:
        raise ConfigError(f"--methods {methods!r}: unknown {unknown}; expected 'all' or a comma list of "
                          f"{', '.join(SECTIONS)}.")
    return wanted


def check_budget(*, examples: int, permutations: int, shapley_permutations: int, shapley_examples: int | None,
                 image_baseline: str) -> None:
    """Every bad number at once, before anything loads or runs."""
    problems = [f"{flag} must be {rule}, got {value}" for flag, value, ok, rule in (
        ("--examples", examples, examples >= 0, ">= 0"),
        ("--permutations", permutations, permutations >= 1, ">= 1"),
        ("--shapley-permutations", shapley_permutations, shapley_permutations >= 0, ">= 0 (0 skips Shapley)"),
        ("--shapley-examples", shapley_examples, shapley_examples is None or shapley_examples >= 1, ">= 1"),
        ("--image-baseline", image_baseline, image_baseline in ("mean", "data"), "'mean' or 'data'")) if not ok]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        problems.append("the report's figures need matplotlib: pip install 'mmpeft[explain]'")
    if problems:
        raise ConfigError("mmpeft explain: " + "; ".join(problems) + ".")


def _subset_order(split: ExplainSplit, contribution: dict) -> list[str]:
    names = list(contribution["permutation"]["subsets"])
    return [n for n in names if n == "overall" or n.startswith("class=")] + \
        [n for n in names if split.group_column and n.startswith(split.group_column + "=")]


def _contribution_table(contribution: dict, subsets: list[str]) -> list[str]:
    perm, shap, gates = contribution["permutation"], contribution.get("shapley"), contribution.get("gates")
    head = "| subset | n | text permuted: changed | image permuted: changed | text: acc. drop | image: acc. drop |"
    rule = "|---|---|---|---|---|---|"
    if shap:
        head, rule = head + " T-SHAP ± SE | V-SHAP | Shapley n |", rule + "---|---|---|"
    if gates:
        head, rule = head + " gate text / image |", rule + "---|"
    lines = [head, rule]
    for name in subsets:
        row = perm["subsets"][name]
        t, i = row["text"], row["image"]
        cells = [name, str(row["examples"]), f"{t['changed_mean']:.3f} ± {t['changed_std']:.3f}",
                 f"{i['changed_mean']:.3f} ± {i['changed_std']:.3f}", f"{t['accuracy_drop']:.3f}",
                 f"{i['accuracy_drop']:.3f}"]
        if shap:
            s = shap["subsets"].get(name)
            cells += [f"{s['t_shap']:.3f} ± {s['t_shap_se']:.3f}", f"{s['v_shap']:.3f}", str(s["examples"])] if s \
                else ["–", "–", "0"]
        if gates:
            g = gates.get(name)
            cells.append(f"{g['text']:.3f} / {g['image']:.3f}" if g else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _saliency_entries(model, split: ExplainSplit, indices: list[int], batch_size: int = 16) -> list[dict]:
    """Saliency of the chosen examples, batched, with what the gallery shows beside each map."""
    from ..data.dataset import Collator

    dataset = split.loader.dataset
    collate = split.loader.collate_fn
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([dataset[i] for i in chunk]) if isinstance(collate, Collator) else None
        for i, sal in zip(chunk, saliency_batch(model, batch)):
            ex = split.examples[i]
            out.append({"index": i, "row": ex.row, "label": ex.label, "text": ex.text,
                        "pred": split.label_names[sal.target], "confidence": max(sal.probabilities),
                        "group": f"{split.group_column}={split.groups[i]}" if split.groups else None,
                        "image": dataset.load_image(i), "saliency": sal})
    return out


def _write_gallery(entries, chosen: dict[str, list[int]], out: Path, figures: dict) -> list[str]:
    from .plots import saliency_gallery

    lines = []
    titles = {"confident_correct": "Most confident correct predictions",
              "confident_wrong": "Most confident errors",
              "least_confident_correct": "Least confident correct predictions",
              "requested": "Rows asked for"}
    by_index = {e["index"]: e for e in entries}
    for kind, indices in chosen.items():
        if not indices:
            continue
        name = f"saliency_{kind}.png"
        saliency_gallery([by_index[i] for i in indices], out / name, titles[kind])
        figures[kind] = name
        lines += [f"### {titles[kind]}", "", f"![{titles[kind]}]({name})", ""]
    return lines


def _support_lines(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    sal = entries[0]["saliency"]
    lines = ["| tower | method | applies | why not |", "|---|---|---|---|"]
    for tower, maps in (("image", sal.image), ("text", sal.text)):
        for method in ("relevance", "rollout", "gradcam", "gradxinput"):
            why = sal.skipped.get(f"{tower}/{method}", "")
            lines.append(f"| {tower} | {method} | {'yes' if method in maps else 'no'} | {why} |")
    return lines


def explain_run(model, data: str | ExplainSplit, out_dir: str | Path, *, examples: int = 12, methods: str = "all",
                rows: tuple[int, ...] = (), permutations: int = 10, shapley_permutations: int = 8,
                shapley_examples: int | None = 300, image_baseline: str = "mean", batch_size: int | None = None,
                seed: int = 0, progress: bool = True, overwrite: bool = False, group_column: str = "decided_by"
                ) -> dict:
    """Explain a loaded classifier on a labelled manifest and write the report into `out_dir`."""
    sections = parse_sections(methods)
    check_budget(examples=examples, permutations=permutations, shapley_permutations=shapley_permutations,
                 shapley_examples=shapley_examples, image_baseline=image_baseline)
    out = Path(out_dir)
    if (out / "explain.json").exists() and not overwrite:
        raise PathExistsError(f"{out} already holds a report (explain.json); pass --overwrite or another --out.")
    split = data if isinstance(data, ExplainSplit) else load_split(model, data, group_column=group_column,
                                                                   batch_size=batch_size)
    known_rows = {ex.row: i for i, ex in enumerate(split.examples)}
    missing = [r for r in rows if r not in known_rows]
    if missing:
        raise ConfigError(f"--rows {missing}: no such rows in {split.source} (rows are the manifest's line numbers "
                          f"as in error messages; it has rows {min(known_rows)}–{max(known_rows)}).")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    encoded = encode_split(model, split, progress=progress)
    result = {"backbone": model.source.name, "data": split.source,
              "examples": len(split.labels), "family": model.family.name, "head": model.config.head.type,
              "label_names": split.label_names, "group_column": split.group_column, "sections": list(sections)}
    figures: dict[str, str] = {}
    md = [f"# Explanation report: {model.config.head.type} head on {model.source.name} ({model.family.name})", "",
          f"Data: `{split.source}`, {len(split.labels)} labelled examples."]
    if "contribution" in sections:
        md += _contribution_section(model, split, encoded, result, figures, out, permutations=permutations,
                                    shapley_permutations=shapley_permutations, shapley_examples=shapley_examples,
                                    image_baseline=image_baseline, seed=seed, progress=progress)
    calibration = calibration_report(encoded.logits, split.labels, split.label_names)
    chosen = gallery(encoded.logits, split.labels, examples)
    if rows:
        chosen["requested"] = [known_rows[r] for r in rows]
    if "calibration" in sections:
        md += _calibration_section(calibration, chosen, result, figures, out)
    if "saliency" in sections:
        indices = sorted({i for v in chosen.values() for i in v})
        entries = _saliency_entries(model, split, indices)
        result["saliency"] = {"selection": chosen, "support": entries[0]["saliency"].skipped if entries else {},
                              "examples": {e["row"]: {**e["saliency"].to_dict(), "label": e["label"]}
                                           for e in entries}}
        md += ["", "## Saliency", "", "Methods per tower on this model:", "", *_support_lines(entries), "",
               *_write_gallery(entries, chosen, out, figures)]
    result["figures"] = figures
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "explain.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text("\n".join(md) + "\n")
    return result


def _contribution_section(model, split, encoded, result, figures, out, **kw) -> list[str]:
    from .plots import contribution_chart

    contribution = modality_contribution(model, split, encoded, **kw)
    result["contribution"] = contribution
    subsets = _subset_order(split, contribution)
    figures["contribution"] = contribution_chart(contribution, subsets, out / "contribution.png").name
    shap = contribution.get("shapley")
    lines = ["", "## Modality contribution", "",
             f"*Permutation* (perceptual score, Gat et al. 2021): one modality shuffled across the split, "
             f"{contribution['permutation']['permutations']} permutations (mean ± std); base accuracy "
             f"{contribution['permutation']['base']['accuracy']:.4f}, macro-F1 "
             f"{contribution['permutation']['base']['macro_f1']:.4f}."]
    if shap:
        lines.append(f"*Shapley shares* (MM-SHAP, Parcalabescu & Frank 2023): Shapley values of the predicted-class "
                     f"logit over text tokens (BOS/EOS excluded) and about as many image patch groups, "
                     f"{shap['permutations']} sampled permutations per example on {shap['examples']} examples "
                     f"({shap['forwards']} tower forwards); masked image groups show "
                     f"{'the processor mean pixel' if kw['image_baseline'] == 'mean' else 'another image of the split'}"
                     "; ± is the standard error over examples (the per-example estimate's mean standard error is "
                     "in explain.json).")
    if contribution.get("gates"):
        lines.append("The gated head's learned gate weights (text / image), averaged, are beside them.")
    lines += ["", *_contribution_table(contribution, subsets), "", f"![modality contribution]({figures['contribution']})"]
    return lines


def _calibration_section(calibration, chosen, result, figures, out) -> list[str]:
    from ..training.metrics import format_report
    from .plots import reliability_chart

    result["calibration"] = calibration
    figures["calibration"] = reliability_chart(calibration, out / "calibration.png").name
    lines = ["", "## Calibration and errors", "", "```", format_report(calibration["metrics"]), "```", "",
             f"Expected calibration error (15 bins): {calibration['reliability']['ece']:.4f}; "
             f"{calibration['errors']} error(s) in {calibration['metrics']['num_samples']} examples.", ""]
    if "least_confident_correct" in chosen:
        lines += [f"The model makes only {calibration['errors']} error(s) here, fewer than the gallery's "
                  f"{len(chosen['confident_wrong']) + len(chosen['least_confident_correct'])} places: the least "
                  "confident correct predictions are shown instead.", ""]
    return lines + [f"![calibration]({figures['calibration']})"]
