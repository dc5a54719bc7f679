"""Publish a saved run on the Hugging Face Hub: `create_repo(exist_ok=True)`, then one `create_commit` holding the
stock peft adapter, the head and label map, the run record, the resolved config, the metrics, charts and the card.

One commit means all or nothing: a failure part-way leaves the repo at the commit it held before (the repo itself
may have been created) and the local folder is never changed. The token comes from `HF_TOKEN` or the
huggingface_hub login and goes only into the client's Authorization header: no message, log or file holds it.

What the uploaded copy says about local paths: `adapter_config.json` names the base by its Hub id and revision (so
stock `AutoPeftModel` finds it); in `mmpeft.json` and `config.yaml` the backbone is the Hub id, data manifests are
reduced to their file names and `train.output_dir` / `train.resume_from` are dropped. The local files keep theirs."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..config import HubConfig
from ..errors import HubError
from ..models.integrity import verify_weight_hashes
from ..models.remote import REPO_ID
from ..models.saving import ADAPTER_FILES, HEAD_WEIGHTS, RUN_RECORD, read_manifest
from .card import build_card, comparison_charts, hub_base_id

CHART_SUFFIXES = (".png", ".svg")
LOG_FILES = ("log.txt",)


def push_after_training(cfg) -> str | None:
    """`hub.push=true`: push the run's best adapter once training has ended (main process only); prints the URL."""
    from accelerate import PartialState

    if not cfg.hub.push or not PartialState().is_main_process:
        return None
    url = push_run(cfg.train.output_dir, cfg.hub)
    print(f"pushed {cfg.train.output_dir} to {url}")
    return url


def push_run(out_dir: str | Path, hub_cfg: HubConfig) -> str | None:
    """What the training loop calls when it ends: push `out_dir` as `hub_cfg` says; the commit URL, or None when
    `hub_cfg.push` is off."""
    if not hub_cfg.push:
        return None
    return push(out_dir, hub_cfg.repo_id, private=hub_cfg.private, revision=hub_cfg.revision,
                base_model_id=hub_cfg.base_model_id, include_checkpoints=hub_cfg.include_checkpoints,
                include_logs=hub_cfg.include_logs)


def public_record(record: dict, base_model_id: str, base_revision: str | None) -> dict:
    """The run record as uploaded: the base by its Hub id, no local paths (see the module docstring)."""
    record = json.loads(json.dumps(record))
    record["backbone"].update(name=base_model_id, revision=base_revision)
    config = record["config"]
    config["model"].update(name=base_model_id, revision=base_revision)
    for split in ("train", "eval", "test"):
        if config["data"].get(split):
            config["data"][split] = Path(config["data"][split]).name
    config["train"].update(output_dir=None, resume_from=None)
    if record.get("comparison"):
        record["comparison"].pop("folder", None)
    return record


def public_adapter_config(out_dir: Path, base_model_id: str, base_revision: str | None) -> bytes:
    config = json.loads((out_dir / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=base_model_id, revision=base_revision)
    return json.dumps(config, indent=2, sort_keys=True).encode()


def upload_plan(out_dir: Path, record: dict, *, base_model_id: str, base_revision: str | None, repo_id: str,
                include_checkpoints: bool, include_logs: bool) -> dict[str, bytes | Path]:
    """path in repo -> bytes or local file: exactly what the commit holds."""
    import yaml

    public = public_record(record, base_model_id, base_revision)
    plan: dict[str, bytes | Path] = {RUN_RECORD: json.dumps(public, indent=2).encode(),
                                     "config.yaml": yaml.safe_dump(public["config"], sort_keys=False).encode()}
    if (out_dir / "adapter_config.json").is_file():
        plan["adapter_config.json"] = public_adapter_config(out_dir, base_model_id, base_revision)
    for name in (*ADAPTER_FILES[1:], HEAD_WEIGHTS, "metrics.json"):
        if (out_dir / name).is_file():
            plan[name] = out_dir / name
    for chart in sorted(p for p in out_dir.iterdir() if p.suffix in CHART_SUFFIXES and p.is_file()):
        plan[chart.name] = chart
    for chart in comparison_charts(record):
        plan[f"comparison/{chart.name}"] = chart
    extra = []
    if include_checkpoints:
        extra += sorted((out_dir / "checkpoints").rglob("*"))
    if include_logs:
        extra += [*sorted((out_dir / "logs").rglob("*")), *(out_dir / name for name in LOG_FILES)]
    for path in extra:
        if path.is_file():
            plan[path.relative_to(out_dir).as_posix()] = path
    card = build_card(out_dir, base_model_id=base_model_id, repo_id=repo_id)
    plan["README.md"] = str(card).encode()
    return plan


def push(out_dir: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
         base_model_id: str | None = None, include_checkpoints: bool = False, include_logs: bool = False,
         commit_message: str | None = None) -> str:
    """Upload the run in `out_dir` to `repo_id` in one commit; returns the commit URL. See the module docstring."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    out_dir = Path(out_dir)
    if not REPO_ID.fullmatch(repo_id or ""):
        raise HubError(f"--repo-id must look like owner/name, got {repo_id!r}.")
    record = read_manifest(out_dir)
    verify_weight_hashes(out_dir, record.get("files"))  # never publish a damaged adapter
    base_revision = record["backbone"].get("revision")
    recorded_id = hub_base_id(record)
    if base_model_id is None and recorded_id is None:
        raise HubError(f"{out_dir} was trained on {record['backbone']['name']!r}, a local path or short name that "
                       "nobody else can resolve: pass --base-model-id with the Hub id of the same weights (e.g. "
                       "openai/clip-vit-base-patch16). Nothing was uploaded.")
    base_model_id = base_model_id or recorded_id
    if not REPO_ID.fullmatch(base_model_id):
        raise HubError(f"--base-model-id must be a Hub id (owner/name), got {base_model_id!r}.")
    token = get_token()
    if not token:
        raise HubError("No Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access). "
                       "Nothing was uploaded.")
    plan = upload_plan(out_dir, record, base_model_id=base_model_id, base_revision=base_revision, repo_id=repo_id,
                       include_checkpoints=include_checkpoints, include_logs=include_logs)
    api = HfApi(token=token)
    with hub_errors(repo_id, stage="create the repo"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    with hub_errors(repo_id, stage="commit"):
        parent = api.repo_info(repo_id, revision=revision).sha
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes)
                                         else str(content)) for name, content in plan.items()]
        info = api.create_commit(repo_id, operations, revision=revision, parent_commit=parent,
                                 commit_message=commit_message or f"Upload {out_dir.name} with mmpeft push")
    return info.commit_url


@contextmanager
def hub_errors(repo_id: str, stage: str):
    """Turn the client's failures into one `HubError` each: no token accepted, someone else's repo, no network,
    a server error. Messages never hold the token (the client's errors carry no request headers)."""
    try:
        yield
    except Exception as err:
        message = hub_error_message(err, repo_id, stage)
        if message is None:
            raise
        raise HubError(message) from None


def hub_error_message(err: BaseException, repo_id: str, stage: str) -> str | None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    kept = ("Nothing was changed in the repo" if stage == "create the repo" else
            "The repo (created first if it was new) holds no new commit") + "; the local folder is untouched."
    owner = repo_id.split("/")[0]
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return f"The Hub rejected the token (401) while trying to {stage} {repo_id}: set a valid HF_TOKEN or run " \
                   f"`hf auth login`. {kept}"
        if status == 403:
            return f"Not allowed to {stage} {repo_id} (403): the namespace {owner!r} is someone else's or the token " \
                   f"has no write access; push to your own namespace or use a write token. {kept}"
        if status == 412:
            return f"{repo_id} changed while pushing (someone else committed); push again. {kept}"
        if status >= 500:
            return f"The Hub failed with {status} while trying to {stage} {repo_id}; try again later. {kept}"
        return f"The Hub refused to {stage} {repo_id} ({status}: {str(err).splitlines()[0]}). {kept}"
    if isinstance(err, (httpx2.HTTPError, OSError)):
        return f"Cannot reach the Hub to {stage} {repo_id} ({type(err).__name__}); check the network. {kept}"
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return f"The Hub refused the model card's YAML: {err}. {kept}"
    return None
