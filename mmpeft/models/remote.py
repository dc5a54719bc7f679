"""Where a saved run lives: a local folder, or a Hub repo id downloaded through `huggingface_hub.snapshot_download`
into the standard cache (`HF_HUB_OFFLINE=1` reads a revision downloaded before).

An existing local path always wins; anything else shaped like `owner/name` is a repo id."""

from __future__ import annotations

from pathlib import Path

from ..config import REPO_ID
from ..errors import HubError, MissingPathError

# What a run folder holds on the Hub (checkpoints and logs are uploaded only when asked; never needed to load).
RUN_PATTERNS = ["mmpeft.json", "adapter_config.json", "adapter_model.safetensors", "head.safetensors"]


def is_repo_id(location: str) -> bool:
    """A Hub repo id: `owner/name`, and not an existing local path (which wins)."""
    return not Path(location).expanduser().exists() and REPO_ID.fullmatch(str(location)) is not None


def locate_run(location: str | Path, revision: str | None = None) -> Path:
    """The local folder of a saved run: `location` itself, or the downloaded snapshot of the repo id `location`."""
    location = str(location)
    if Path(location).expanduser().exists():
        if revision is not None:
            raise MissingPathError(f"--revision {revision} names a Hub revision, but {location} is a local folder; "
                                   "drop --revision, or pass a repo id (owner/name).")
        return Path(location).expanduser()
    if not is_repo_id(location):
        return Path(location)  # a missing folder: reading its run record says so
    return download_run(location, revision)


def download_run(repo_id: str, revision: str | None) -> Path:
    """`snapshot_download` of the files a run needs, then a check that each one is really there."""
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id} (revision {revision or 'main'})"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=RUN_PATTERNS))
    except RevisionNotFoundError:
        raise HubError(f"{at}: the repo has no such revision; pass a branch, tag or commit it has.") from None
    except IncompleteSnapshotError as err:  # offline, and the cached snapshot lacks files: name ours
        folder = check_downloaded(Path(err.snapshot_path), f"{at} (offline)")
        raise HubError(f"{at}: the Hub cannot be reached and the cached snapshot {folder} is incomplete "
                       f"({str(err).split(': ', 1)[-1].split('.')[0]}); download it again online.") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubError(f"{repo_id}: no such repo, or it is private and your token cannot read it (set HF_TOKEN or "
                       "run `hf auth login`); check the id.") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{at}: the Hub cannot be reached (offline, HF_HUB_OFFLINE=1 or no network) and this revision "
                       "is not in the local cache; download it once while online.") from None
    except (HfHubHTTPError, httpx2.HTTPError) as err:
        raise HubError(f"{at}: download failed ({type(err).__name__}: {str(err).splitlines()[0]}); nothing was "
                       "loaded. Try again later.") from None
    return check_downloaded(folder, at)


def check_downloaded(folder: Path, where: str) -> Path:
    """`snapshot_download` can hand back a cached snapshot that lacks a file: name every missing one."""
    import json

    manifest = folder / "mmpeft.json"
    if not manifest.is_file():
        raise HubError(f"{where} holds no mmpeft.json: it is not a run pushed by `mmpeft push` (or the cached "
                       f"snapshot {folder} is incomplete: download it again online).")
    record = json.loads(manifest.read_text())
    expected = list(record.get("files") or {})
    if record.get("files", {}).get("adapter_model.safetensors") or not record.get("files"):
        modes = record.get("tower_modes", {})
        if any(mode != "frozen" for mode in modes.values()):
            expected += ["adapter_config.json", "adapter_model.safetensors"]
    if record.get("task", "classification") == "classification":
        expected.append("head.safetensors")
    missing = sorted({name for name in expected if not (folder / name).is_file()})
    if missing:
        raise HubError(f"{where}: the downloaded snapshot {folder} lacks {', '.join(missing)}; download it again "
                       "online (without HF_HUB_OFFLINE), or check that the repo holds these files.")
    return folder
