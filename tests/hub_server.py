"""A small Hugging Face Hub stand-in for tests: the endpoints huggingface_hub's client calls to create a repo,
commit (preupload + the ndjson commit payload), read repo / revision info and the file tree, and download files.

It binds 127.0.0.1 only, on a free port, serves from a daemon thread and stops when the `with` block ends (or after
`lifetime` seconds at most). Every repo is a list of commits, each commit a full snapshot stored on disk under
`root/<owner>/<name>/<commit id>/`; `fail` makes chosen endpoints answer an error status (e.g. {"commit": 500}).
Every request line and header it receives is appended to `root/requests.log`, so a test can check what reached it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml


class FakeHub:
    def __init__(self, root: Path, *, token: str, user: str = "alice", lifetime: float = 300):
        self.root, self.token, self.user, self.lifetime = Path(root), token, user, lifetime
        self.root.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "branches": {name: [commit ids]}}
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.timeout = 1
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self) -> None:
        timer = threading.Timer(self.lifetime, self.server.shutdown)  # never outlives a hung test
        timer.daemon = True
        timer.start()
        self.server.serve_forever(poll_interval=0.1)
        timer.cancel()

    # --- storage ---------------------------------------------------------------------------------------------

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        return list(self.repos[repo_id]["branches"].get(branch, []))

    def files(self, repo_id: str, commit: str) -> dict[str, bytes]:
        folder = self.root / repo_id / commit
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def add_commit(self, repo_id: str, branch: str, files: dict[str, bytes], parent: str | None) -> str:
        base = self.files(repo_id, parent) if parent else {}
        base.update(files)
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in base.items()))
                              .encode() + str(time.time_ns()).encode()).hexdigest()
        folder = self.root / repo_id / digest
        for name, content in base.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        self.repos[repo_id]["branches"].setdefault(branch, []).append(digest)
        return digest

    def seed(self, repo_id: str, folder: Path) -> str:
        """Store a local folder as a repo's first commit (e.g. a tiny base model that adapters name)."""
        with self.lock:
            self.repos[repo_id] = {"private": False, "branches": {}}
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
            return self.add_commit(repo_id, "main", files, None)

    def resolve(self, repo_id: str, revision: str) -> str | None:
        revision = unquote(revision)
        branches = self.repos[repo_id]["branches"]
        if revision in branches:
            return branches[revision][-1]
        return revision if any(revision in c for c in branches.values()) else None


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _log(self) -> None:
            with open(hub.root / "requests.log", "a") as log:
                log.write(f"{self.command} {self.path}\n")

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": message}, {"X-Error-Message": message})

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:
            self._log()
            path, body = urlparse(self.path).path, self._body()
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
            if not match:
                return self._error(404, f"no route {path}")
            repo_id, action, revision = match.groups()
            if repo_id not in hub.repos:
                return self._error(404, "Repository not found")
            if repo_id.split("/")[0] != hub.user:
                return self._error(403, "You don't have the rights to write to this repo")
            if action in hub.fail:
                return self._error(hub.fail[action], f"injected failure of {action}")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                   "oid": None} for f in files]})
            if action == "branch":
                with hub.lock:
                    branches = hub.repos[repo_id]["branches"]
                    branches.setdefault(unquote(revision), list(branches["main"]))
                return self._send(200, {})
            return self._commit(repo_id, unquote(revision), body)

        def _validate_yaml(self, payload: dict) -> None:
            text = payload["content"]
            try:
                if text.startswith("---"):
                    yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}]})
            return self._send(200, {"errors": [], "warnings": []})

        def _create(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            if repo_id.split("/")[0] != hub.user:
                return self._error(403, "You don't have the rights to create a model under this namespace")
            if "create" in hub.fail:
                return self._error(hub.fail["create"], "injected failure of create")
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {}}
                hub.add_commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs\n"}, None)
            return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            if any(line["key"] not in ("header", "file") for line in lines):
                return self._error(400, "this fake Hub takes regular file additions only")
            with hub.lock:
                if branch not in hub.repos[repo_id]["branches"]:
                    return self._error(404, f"Revision not found: {branch}")
                head = hub.commits(repo_id, branch)[-1]
                if header.get("parentCommit") not in (None, head):
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
                commit = hub.add_commit(repo_id, branch, files, head)
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit}", "commitOid": commit,
                                    "success": True})

        def do_GET(self) -> None:
            self._log()
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._log()
            self._get(head=True)

        def _get(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            match = tree or resolve or info
            if not match:
                return self._error(404, f"no route {path}")
            repo_id = match.group(1)
            if repo_id not in hub.repos or (hub.repos[repo_id]["private"] and not self._authorized()):
                return self._send(404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                                  head=head)
            if "download" in hub.fail:
                return self._error(hub.fail["download"], "injected failure of download")
            commit = hub.resolve(repo_id, match.group(2) or "main")
            if commit is None:
                return self._send(404, {"error": "Invalid rev id"},
                                  {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, head=head)
            files = hub.files(repo_id, commit)
            if resolve:
                return self._file(files, commit, resolve.group(3), head)
            if tree:
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("1", "true")
                prefix = (tree.group(3) or "").strip("/")
                entries = [{"type": "file", "oid": hashlib.sha1(v).hexdigest(), "size": len(v), "path": k}
                           for k, v in files.items()
                           if k.startswith(prefix) and (recursive or "/" not in k[len(prefix):].strip("/"))]
                return self._send(200, entries)
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit,
                                    "private": hub.repos[repo_id]["private"],
                                    "siblings": [{"rfilename": k} for k in files]})

        def _file(self, files: dict[str, bytes], commit: str, name: str, head: bool) -> None:
            if name not in files:
                return self._send(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                   "X-Repo-Commit": commit}, head=head)
            content = files[name]
            etag = hashlib.sha256(content).hexdigest()
            self._send(200, content, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                      "Content-Type": "application/octet-stream"}, head=head)

    return Handler
