"""The model card of a saved run (`README.md`), built with huggingface_hub's `ModelCard` / `ModelCardData` /
`EvalResult`: the YAML the Hub indexes (base model, adapter relation, tags, `model-index` with the test metrics)
and a body that says what the model does, how to use it with stock peft + transformers and with mmpeft, what
training cost, how each class scored, and what the run does not show.

The Hub has no task type for image + text classification: `model-index` uses `image-text-classification`
(retrieval: `image-text-retrieval`) and the tags say so. For a local manifest `dataset_type` is the `datasets`
builder that reads it (`json` for .jsonl, `csv`, `arrow` for a saved datasets folder) and `dataset_name` is the
file or folder name; the embedded world data is `mmpeft-world`."""

from __future__ import annotations

import json
from pathlib import Path

from ..backbones.registry import resolve_short_name
from ..models.remote import is_repo_id
from ..models.saving import read_manifest

TASKS = {"classification": ("image-text-classification", "Image + text classification"),
         "retrieval": ("image-text-retrieval", "Image-text retrieval")}
CLASSIFICATION_METRICS = (("accuracy", "accuracy", "Accuracy", None), ("macro_f1", "f1", "Macro F1", "macro"),
                          ("weighted_f1", "f1", "Weighted F1", "weighted"))
DATASET_TYPES = {".jsonl": "json", ".csv": "csv"}
STOCK_FAMILIES = ("clip", "siglip", "blip")  # transformers models: stock peft + AutoModel load them


def hub_base_id(record: dict) -> str | None:
    """The recorded backbone name when it is a Hub id anyone can resolve; None for a local path or short name."""
    name = record["backbone"]["name"]
    return name if resolve_short_name(name) is None and is_repo_id(name) else None


def read_metrics(out_dir: Path) -> dict:
    path = out_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _dataset(record: dict, split: str) -> tuple[str, str]:
    path = (record["config"].get("data") or {}).get(split)
    if not path:
        return "mmpeft-world", f"embedded world set ({split})"
    return DATASET_TYPES.get(Path(path).suffix.lower(), "arrow"), Path(path).name


def eval_results(record: dict, metrics: dict) -> list:
    """`EvalResult`s of the test split (the eval split when the run had no test set)."""
    from huggingface_hub import EvalResult

    split = "test" if "test" in metrics else "eval"
    scores = metrics.get(split)
    if not scores:
        return []
    task_type, task_name = TASKS[record["task"]]
    dataset_type, dataset_name = _dataset(record, split)
    if record["task"] == "retrieval":
        chosen = [(k, "recall", k.replace("_", " "), None) for k in scores if "recall@" in k]
    else:
        chosen = [m for m in CLASSIFICATION_METRICS if m[0] in scores]
    return [EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type,
                       dataset_name=dataset_name, dataset_split=split, metric_type=metric_type,
                       metric_name=metric_name, metric_config=config, metric_value=round(float(scores[key]), 4))
            for key, metric_type, metric_name, config in chosen]


def card_data(record: dict, metrics: dict, *, base_model_id: str, model_name: str):
    from huggingface_hub import ModelCardData

    task_type = TASKS[record["task"]][0]
    tags = ["mmpeft", "lora", record["backbone"]["family"], f"base_model:adapter:{base_model_id}", task_type,
            "image-text" if record["task"] == "retrieval" else "multimodal-classification"]
    results = eval_results(record, metrics)
    return ModelCardData(model_name=model_name, base_model=base_model_id, base_model_relation="adapter",
                         library_name="peft", tags=tags, eval_results=results or None,
                         metrics=sorted({r.metric_type for r in results}) or None)


def _usage(record: dict, repo: str, base_model_id: str) -> str:
    loader = "load_adapter" if record["task"] == "classification" else "load_retrieval_model"
    lines = ["## How to use", "", "With mmpeft (`pip install mmpeft`): backbone, adapter, head and label map in one call.",
             "", "```python", "import mmpeft", "", f'model = mmpeft.{loader}("{repo}")']
    if record["task"] == "classification":
        lines += ['print(mmpeft.predict(model, ["cat.jpg"], ["what a day"])[0])  # {"label": ..., "probabilities": ...}',
                  "```", "", "```bash", f'mmpeft predict --adapter {repo} --image cat.jpg --text "what a day"',
                  f"mmpeft predict --adapter {repo} --data posts.jsonl --output predictions.jsonl",
                  f"mmpeft eval --adapter {repo} --data test.jsonl"]
    if record["backbone"]["family"] not in STOCK_FAMILIES:
        return "\n".join([*lines, "```", "", f"The `{record['backbone']['family']}` backbone is not a transformers "
                          "model: load it with mmpeft.", ""])
    lines += ["```", "", "With stock peft + transformers (the backbone with the adapter; the fusion head and label map "
              "are mmpeft's, in `head.safetensors` and `mmpeft.json`):", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModel", "",
              f'base = AutoModel.from_pretrained("{base_model_id}"'
              + (f', revision="{record["backbone"]["revision"]}")' if record["backbone"].get("revision") else ")"),
              f'model = PeftModel.from_pretrained(base, "{repo}")  # or peft.AutoPeftModel.from_pretrained("{repo}")',
              "```", ""]
    return "\n".join(lines)


def _training(record: dict, metrics: dict) -> str:
    cfg, hardware = record["config"], record.get("hardware") or {}
    towers = ", ".join(f"{tower} `{mode}`" for tower, mode in record["tower_modes"].items())
    lora = {t: cfg["model"][t]["lora"] for t in record["tower_modes"] if record["tower_modes"][t] == "lora"}
    device = hardware.get("accelerator") or (f"CPU ({hardware.get('cpu')}, {hardware.get('cpu_count')} cores)"
                                             if hardware else "hardware not recorded (saved by an older mmpeft)")
    lines = ["## Training", "", f"- Towers: {towers}; head `{cfg['head']['type']}` ({cfg['head']['mode']})",
             *(f"- LoRA on the {t} tower: r={s['r']}, alpha={s['alpha']}, dropout={s['dropout']}" for t, s in lora.items()),
             f"- Optimizer {cfg['train']['optimizer']}, learning rates LoRA {cfg['train']['lr_lora']}, head "
             f"{cfg['train']['lr_head']}, full {cfg['train']['lr_full']}; batch {cfg['data']['batch_size']}, "
             f"seed {cfg['train']['seed']}, mixed precision {metrics.get('mixed_precision', cfg['train']['mixed_precision'])}",
             f"- Budget: {metrics.get('steps', '?')} steps (best at step {metrics.get('best_step', '?')}), "
             f"{metrics.get('train_seconds', 0):.0f} s, {metrics.get('num_processes', 1)} process(es) on {device}, "
             f"peak memory {metrics.get('peak_memory_gib', 0):.2f} GiB",
             "", "| part | trainable | total |", "|---|---:|---:|"]
    for part, counts in (metrics.get("trainable_parameters") or {}).items():
        lines.append(f"| {part} | {counts['trainable']:,} | {counts['total']:,} |")
    lines += ["", "The resolved config is `config.yaml` in this repo (and `config` in `mmpeft.json`).", ""]
    return "\n".join(lines)


def _evaluation(record: dict, metrics: dict) -> str:
    split = "test" if "test" in metrics else "eval"
    scores = metrics.get(split)
    if not scores:
        return "## Evaluation\n\nThe run recorded no evaluation.\n"
    lines = ["## Evaluation", "", f"On the {split} split ({_dataset(record, split)[1]}, {scores.get('num_samples', '?')} "
             "examples):", ""]
    if record["task"] == "retrieval":
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in scores.items()
                                                       if "recall" in k and isinstance(v, float)]
        return "\n".join(lines) + "\n"
    lines += ["| metric | value |", "|---|---:|"] + [f"| {name} | {scores[key]:.4f} |"
                                                   for key, _, name, _ in CLASSIFICATION_METRICS if key in scores]
    lines += ["", "| class | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
              for name, row in scores.get("per_class", {}).items()]
    return "\n".join(lines) + "\n"


def comparison_charts(record: dict) -> list[Path]:
    """The charts of the `mmpeft compare` run this run belongs to (uploaded as `comparison/<name>`)."""
    folder = Path((record.get("comparison") or {}).get("folder") or "")
    return sorted(folder.glob("*.png")) if record.get("comparison") and folder.is_dir() else []


def _comparison(record: dict) -> str:
    origin = record.get("comparison")
    if not origin:
        return ""
    table = Path(origin.get("folder") or "") / "results.md"
    body = table.read_text() if table.is_file() else "(the comparison's results.md was not found when this card " \
                                                     "was built)"
    charts = "".join(f"\n![{p.stem}](comparison/{p.name})\n" for p in comparison_charts(record))
    return (f"## Comparison\n\nThis run is configuration `{origin.get('config')}` of an `mmpeft compare` run; "
            f"all of its configurations:\n\n{body}\n{charts}")


def _limitations(record: dict) -> str:
    return ("## Limitations\n\n- Scores hold for data like the evaluation set above; they say nothing about other "
            "domains, languages or image styles.\n- The fusion head reads the backbone's embeddings: load the "
            "adapter onto exactly the recorded base (mmpeft checks its weight fingerprint "
            f"`{record['backbone']['fingerprint']}`).\n- The Hub has no pipeline for image + text classification: "
            "the widget and Inference API do not run this model.\n")


def build_card(out_dir: str | Path, *, base_model_id: str | None = None, repo_id: str | None = None):
    """The `ModelCard` of the run in `out_dir`. `base_model_id` is the Hub id of the backbone (required when the run
    recorded a local path or short name); `repo_id` is where it will live (the folder name otherwise)."""
    from huggingface_hub import ModelCard

    from ..errors import HubError

    out_dir = Path(out_dir)
    record, metrics = read_manifest(out_dir), read_metrics(out_dir)
    base_model_id = base_model_id or hub_base_id(record)
    if base_model_id is None:
        raise HubError(f"{out_dir} was trained on {record['backbone']['name']!r}, a local path or short name that "
                       "nobody else can resolve: pass --base-model-id with the Hub id of the same weights "
                       "(e.g. openai/clip-vit-base-patch16).")
    repo = repo_id or out_dir.resolve().name
    data = card_data(record, metrics, base_model_id=base_model_id, model_name=repo.split("/")[-1])
    labels = ", ".join(f"`{name}`" for name in record.get("label_names", []))
    what = (f"classifies an image + text pair into {len(record['label_names'])} classes: {labels}"
            if record["task"] == "classification" else "embeds images and captions for image-text retrieval")
    intro = (f"# {repo.split('/')[-1]}\n\nA LoRA adapter for [{base_model_id}](https://huggingface.co/{base_model_id}) "
             f"trained with [mmpeft](https://github.com/mmpeft/mmpeft) that {what}.\n")
    body = "\n".join([intro, _usage(record, repo, base_model_id), _training(record, metrics),
                      _evaluation(record, metrics), _comparison(record), _limitations(record)])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(out_dir: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """Write (or refresh) `<out_dir>/README.md`: the card `mmpeft push` uploads. An earlier mmpeft card or peft's
    template card is replaced; any other README.md (one you wrote) only with `overwrite=True`."""
    from ..errors import PathExistsError

    path = Path(out_dir) / "README.md"
    card = str(build_card(out_dir, **kwargs))
    if path.is_file() and not overwrite:
        text = path.read_text(encoding="utf-8", errors="replace")
        ours = "- mmpeft\n" in text.split("\n---", 1)[0] or "[More Information Needed]" in text
        if not ours:
            raise PathExistsError(f"{path} exists and is not a model card mmpeft or peft wrote; move it away, or "
                                  "pass --overwrite to replace it.")
    path.write_text(card, encoding="utf-8")
    return path
