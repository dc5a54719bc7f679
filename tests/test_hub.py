"""Publishing and reusing runs through the real huggingface_hub client against a local fake Hub (tests/hub_server.py).

The client reads `HF_ENDPOINT` when it is imported, so every Hub call runs in a subprocess (the `mmpeft` command, or
a short script) whose environment points at the server; this process only reads what arrived on the server's disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cat_dog_rows, train_quick_run
from hub_server import FakeHub

from mmpeft import load_adapter

TOKEN = "hf_TESTtoken_do_not_leak_123"
BASE_ID = "alice/tiny-clip-base"
EXPECTED = {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml",
            "head.safetensors", "metrics.json", "mmpeft.json"}


@pytest.fixture(scope="module")
def run(tiny_paths, tmp_path_factory) -> dict:
    out, data = train_quick_run(tiny_paths["clip"], tmp_path_factory.mktemp("hub-run"), cat_dog_rows())
    return {"out": out, "data": data, "base": tiny_paths["clip"]}


@pytest.fixture
def hub(tmp_path, run):
    with FakeHub(tmp_path / "hub", token=TOKEN, lifetime=240) as server:
        server.seed(BASE_ID, run["base"])
        yield server


def env_for(hub: FakeHub, tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, OMP_NUM_THREADS="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                                         env.get("PYTHONPATH", "")]))
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def mmpeft_cli(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpeft.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=180, cwd=cwd)


def folder_state(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(hub, tmp_path, run, *extra, **env_extra):
    return mmpeft_cli(env_for(hub, tmp_path, **env_extra), "push", run["out"], "--repo-id", "alice/clip-lora",
                      "--base-model-id", BASE_ID, *extra)


def test_push_is_one_commit_with_the_run_and_a_valid_card(hub, tmp_path, run):
    from huggingface_hub import ModelCard

    before = folder_state(run["out"])
    result = push(hub, tmp_path, run)
    assert result.returncode == 0, result.stderr
    commits = hub.commits("alice/clip-lora")
    assert len(commits) == 2  # the repo's initial commit, then exactly one commit holding everything
    files = hub.files("alice/clip-lora", commits[-1])
    assert set(files) == EXPECTED
    assert folder_state(run["out"]) == before  # the local folder is untouched

    (tmp_path / "card.md").write_bytes(files["README.md"])
    card = ModelCard.load(tmp_path / "card.md")
    data = card.data.to_dict()
    assert card.data.model_name == "clip-lora"
    assert data["base_model"] == BASE_ID and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert {"mmpeft", "lora", "clip", f"base_model:adapter:{BASE_ID}", "image-text-classification"} <= set(data["tags"])
    test = json.loads(files["metrics.json"])["test"]
    values = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert values == {("accuracy", None): round(test["accuracy"], 4), ("f1", "macro"): round(test["macro_f1"], 4),
                      ("f1", "weighted"): round(test["weighted_f1"], 4)}
    assert {r.dataset_type for r in card.data.eval_results} == {"json"}
    assert "| cat |" in card.text and "More Information Needed" not in card.text

    adapter_config = json.loads(files["adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == BASE_ID  # stock AutoPeftModel finds the base
    uploaded_record = files["mmpeft.json"].decode() + files["config.yaml"].decode()
    assert str(run["out"].parent) not in uploaded_record and str(run["base"]) not in uploaded_record
    assert yaml.safe_load(files["config.yaml"])["model"]["name"] == BASE_ID
    # The token went only into the Authorization header: no uploaded file, no output, no local file holds it.
    for name, content in files.items():
        assert TOKEN.encode() not in content, name
    assert TOKEN not in result.stdout + result.stderr
    assert not any(TOKEN.encode() in content for content, _ in folder_state(run["out"]).values())


@pytest.mark.slow  # several fresh processes, each importing torch
def test_load_from_repo_id_reproduces_the_local_model(hub, tmp_path, run):
    assert push(hub, tmp_path, run).returncode == 0
    images = [run["data"].parent / f"img_train_{i}.png" for i in range(4)]
    texts = [r["text"] for r in cat_dog_rows(4)]
    script = textwrap.dedent(f"""
        import sys, torch, mmpeft
        from mmpeft.export.inference import encode_batch
        model = mmpeft.load_adapter("alice/clip-lora")
        with torch.no_grad():
            logits = model(**encode_batch(model, {[str(p) for p in images]!r}, {texts!r}))
        torch.save({{"logits": logits, "folder": str(model.run_folder)}}, sys.argv[1])
    """)
    env = env_for(hub, tmp_path)
    for offline in (None, "1"):  # online, then offline from the warm cache
        out = tmp_path / f"logits-{offline}.pt"
        result = subprocess.run([sys.executable, "-c", script, str(out)], env={**env, **(
            {"HF_HUB_OFFLINE": offline} if offline else {})}, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        remote = torch.load(out)
        local = load_adapter(run["out"])
        from mmpeft.export.inference import encode_batch

        with torch.no_grad():
            expected = local(**encode_batch(local, images, texts))
        torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=0)
        assert str(tmp_path / "hf-home") in remote["folder"]

    # A cached snapshot that lacks a file: named, exit 2 (offline, so nothing can fill the gap).
    Path(remote["folder"], "head.safetensors").unlink()
    result = mmpeft_cli({**env, "HF_HUB_OFFLINE": "1"}, "predict", "--adapter", "alice/clip-lora", "--image",
                        images[0], "--text", "x")
    assert result.returncode == 2 and "lacks head.safetensors" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # several fresh processes, each importing torch
def test_eval_and_batch_predict_take_a_repo_id(hub, tmp_path, run):
    assert push(hub, tmp_path, run).returncode == 0
    env = env_for(hub, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    result = mmpeft_cli(env, "eval", "--adapter", "alice/clip-lora", "--revision", "main", "--data", run["data"],
                        "--num-workers", "0", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    written = work / f"eval-alice--clip-lora-{run['data'].stem}.json"  # not into the Hub cache
    assert json.loads(written.read_text())["accuracy"] == json.loads((run["out"] / "metrics.json").read_text())[
        "test"]["accuracy"]
    result = mmpeft_cli(env, "predict", "--adapter", "alice/clip-lora", "--revision", "no-such-branch", "--image",
                        run["data"].parent / "img_train_0.png", "--text", "x")
    assert result.returncode == 2 and "no such revision" in result.stderr, result.stderr[-2000:]


def test_failed_commit_leaves_the_repo_and_the_folder_as_they_were(hub, tmp_path, run):
    hub.fail["commit"] = 500
    before = folder_state(run["out"])
    result = push(hub, tmp_path, run)
    assert result.returncode == 2
    assert "500" in result.stderr and "holds no new commit" in result.stderr and "untouched" in result.stderr
    assert "Traceback" not in result.stderr
    assert [set(hub.files("alice/clip-lora", c)) for c in hub.commits("alice/clip-lora")] == [{".gitattributes"}]
    assert folder_state(run["out"]) == before
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.slow  # several fresh processes, each importing torch
@pytest.mark.parametrize("case", ["bad-token", "no-token", "other-owner", "local-base", "network-down"])
def test_push_failures_give_one_message_each(hub, tmp_path, run, case):
    env = env_for(hub, tmp_path)
    args = ["push", run["out"], "--repo-id", "alice/clip-lora", "--base-model-id", BASE_ID]
    expected = {"bad-token": "rejected the token (401)", "no-token": "No Hugging Face token",
                "other-owner": "someone else's", "local-base": "--base-model-id", "network-down": "Cannot reach"}[case]
    if case == "bad-token":
        env["HF_TOKEN"] = "hf_wrong"
    elif case == "no-token":
        env.pop("HF_TOKEN")
    elif case == "other-owner":
        args[3] = "bob/clip-lora"
    elif case == "local-base":
        args = args[:4]
    else:
        import socket

        with socket.socket() as s:  # a port with nothing listening
            s.bind(("127.0.0.1", 0))
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = mmpeft_cli(env, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert TOKEN not in result.stdout + result.stderr
    assert "alice/clip-lora" not in hub.repos or len(hub.commits("alice/clip-lora")) == 1


@pytest.mark.slow  # several fresh processes, each importing torch
def test_stock_peft_loads_the_pushed_folder_without_mmpeft(hub, tmp_path, run):
    assert push(hub, tmp_path, run).returncode == 0
    pushed = hub.root / "alice/clip-lora" / hub.commits("alice/clip-lora")[-1]
    script = textwrap.dedent("""
        import sys, torch
        from peft import PeftModel
        from transformers import CLIPModel
        base = CLIPModel.from_pretrained(sys.argv[1])
        model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
        torch.manual_seed(0)
        ids, pixels = torch.randint(1, 90, (2, 7)), torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out = {"text": model.get_text_features(input_ids=ids), "image": model.get_image_features(pixel_values=pixels)}
        out = {k: getattr(v, "pooler_output", v) for k, v in out.items()}
        assert not any(name.startswith("mmpeft") for name in sys.modules), "mmpeft was imported"
        torch.save({**out, "ids": ids, "pixels": pixels}, sys.argv[3])
    """)
    out = tmp_path / "stock.pt"
    env = {k: v for k, v in env_for(hub, tmp_path).items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(run["base"]), str(pushed), str(out)], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    stock = torch.load(out)
    model = load_adapter(run["out"])
    with torch.no_grad():
        text = model.base.get_text_features(input_ids=stock["ids"])
        image = model.base.get_image_features(pixel_values=stock["pixels"])
    torch.testing.assert_close(stock["text"], getattr(text, "pooler_output", text))
    torch.testing.assert_close(stock["image"], getattr(image, "pooler_output", image))


@pytest.mark.slow  # several fresh processes, each importing torch
def test_card_command_writes_the_card_push_uploads(hub, tmp_path, run):
    from huggingface_hub import ModelCard

    env = env_for(hub, tmp_path)
    result = mmpeft_cli(env, "card", run["out"])
    assert result.returncode == 2 and "--base-model-id" in result.stderr
    result = mmpeft_cli(env, "card", run["out"], "--base-model-id", BASE_ID, "--repo-id", "alice/clip-lora")
    assert result.returncode == 0, result.stderr[-2000:]
    try:
        local = (run["out"] / "README.md").read_text()
        assert push(hub, tmp_path, run).returncode == 0
        uploaded = hub.files("alice/clip-lora", hub.commits("alice/clip-lora")[-1])["README.md"].decode()
        assert local == uploaded
        assert ModelCard(local).data.base_model == BASE_ID
    finally:
        (run["out"] / "README.md").unlink()
