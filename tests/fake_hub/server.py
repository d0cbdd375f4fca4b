"""A small Hugging Face hub on 127.0.0.1 for the real huggingface_hub client (`HF_ENDPOINT`).

It speaks the calls `HfApi.model_info/dataset_info`, `snapshot_download` and `hf_hub_download`
make, with the headers the client reads (huggingface_hub/file_download.py, utils/_http.py):
  GET  /api/{models|datasets}/{repo}[/revision/{rev}]   → {id, sha, siblings, gated, ...}
  GET  /api/{models|datasets}/{repo}/tree/{rev}[/path]  → [{type, path, size, oid, lfs}]
  HEAD/GET /{repo}/resolve/{rev}/{file}, /datasets/{repo}/resolve/{rev}/{file}
       small files: 200 with X-Repo-Commit, ETag, Content-Length (Range → 206);
       large ("LFS") files: 302 to a CDN host (`localhost`, not the endpoint's host, so the client
       does not follow it on HEAD and reads X-Linked-Etag / X-Linked-Size from the redirect);
  GET  /cdn/{sha256}                                    → the bytes (Range → 206)
Uploads, as `create_repo` + `upload_folder` make them (huggingface_hub/hf_api.py, _commit_api.py):
  GET  /api/whoami-v2                                  → the token's user, orgs and role (`add_user`)
  POST /api/validate-yaml                              → README.md's YAML front matter checked
  POST /api/repos/create                               → a new (private) repo; 409 when it exists
  POST /api/{models|datasets}/{repo}/preupload/{rev}   → every file "regular" (base64 in the commit,
                                                          so no LFS or Xet storage is needed)
  POST /api/{models|datasets}/{repo}/commit/{rev}      → the NDJSON commit applied; {commitOid}
A private repo answers 404 RepoNotFound to anyone but a token of its namespace, as the hub does.
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) the way the
hub does, so the client raises its own exception types. A gated repo answers 401 without a
token and 403 with a wrong one. Every request is recorded (`requests`, and `ranges` for resumed downloads) for the tests to
count; `cut_after` drops the connection half-way through the next large download.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

LFS_THRESHOLD = 10_000  # bytes; the hub stores big files in LFS/Xet and redirects to a CDN


@dataclass
class Repo:
    repo_type: str  # "model" | "dataset"
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag → commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated_token: str | None = None  # set: the token that opens it
    private: bool = False


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 → bytes (the CDN)
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []  # Range headers of resumed downloads
        # Set: the next download of a larger file sends this many bytes, then the connection drops.
        self.cut_after: int | None = None
        self.users: dict[str, dict] = {}  # token → {name, orgs, role}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- content ------------------------------------------------------------------------------
    def commit(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes],
        branch: str = "main",
        gated_token: str | None = None,
    ) -> str:
        """A new commit with exactly `files` on `branch`; returns its 40-hex hash."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
        if gated_token is not None:
            repo.gated_token = gated_token
        digest = hashlib.sha1()
        digest.update(repo.refs.get(branch, "").encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def add_user(self, token: str, name: str, orgs: tuple[str, ...] = (), role: str = "write") -> None:
        """A token the upload routes accept: `role` "write" or "read" (a read token pushes nothing)."""
        self.users[token] = {"name": name, "orgs": list(orgs), "role": role}

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.refs.get(revision, revision)]

    def commit_folder(self, repo_type: str, repo_id: str, folder: Path, **kwargs) -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(repo_type, repo_id, files, **kwargs)

    def count(self, method: str | None = None, pattern: str = "") -> int:
        with self._lock:
            return sum(1 for m, path in self.requests if (method is None or m == method) and re.search(pattern, path))

    def downloads(self) -> list[str]:
        """Paths of the GETs that sent file bytes (resolve of small files, CDN of large ones)."""
        with self._lock:
            return [
                path for m, path in self.requests if m == "GET" and ("/resolve/" in path or path.startswith("/cdn/"))
            ]

    # ---- server -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The network cut: the port is closed, connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # ---- helpers ------------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Code": code} if code else {}
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _json(self, data) -> None:
        self._send(200, json.dumps(data).encode())

    def _bytes(self, data: bytes, headers: dict[str, str]) -> None:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:  # a resumed download
            with self.state._lock:
                self.state.ranges.append(match.group(0))
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            part = data[start : end + 1]
            self._send(
                206, part, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, "application/octet-stream"
            )
        elif self.state.cut_after is not None and self.command == "GET" and len(data) > self.state.cut_after:
            cut, self.state.cut_after = self.state.cut_after, None
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True  # fewer bytes than Content-Length: a dropped connection
        else:
            self._send(200, data, {**headers, "Accept-Ranges": "bytes"}, "application/octet-stream")

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo.private and not self._may_write(repo_id, read=True):
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo.gated_token is not None:
            auth = self.headers.get("Authorization", "")
            if not auth:
                self._error(
                    401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must be authenticated."
                )
                return None
            if auth != f"Bearer {repo.gated_token}":
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list.",
                )
                return None
        return repo

    def _commit(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _user(self) -> dict | None:
        auth = self.headers.get("Authorization", "")
        return self.state.users.get(auth[len("Bearer ") :]) if auth.startswith("Bearer ") else None

    def _may_write(self, repo_id: str, read: bool = False) -> bool:
        user = self._user()
        if user is None or (user["role"] != "write" and not read):
            return False
        return repo_id.split("/")[0] in (user["name"], *user["orgs"])

    # ---- uploads ------------------------------------------------------------------------------
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        with self.state._lock:
            self.state.requests.append(("POST", path))
        if path == "/api/validate-yaml":  # upload_folder checks a README.md's metadata first
            content = json.loads(body).get("content", "")
            front = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                ok = front is None or isinstance(yaml.safe_load(front.group(1)), dict)
            except yaml.YAMLError:
                ok = False
            if not ok:
                return self._send(400, json.dumps({"errors": [{"message": "invalid YAML metadata"}]}).encode())
            return self._json({"errors": [], "warnings": []})
        if path == "/api/repos/create":
            data = json.loads(body)
            repo_type = data.get("type") or "model"
            repo_id = f"{data.get('organization') or self._user_name()}/{data['name']}"
            if not self._may_write(repo_id):
                return self._error(403, None, f"You don't have the rights to create a {repo_type} under this namespace")
            url = f"{self.state.endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
            with self.state._lock:
                if (repo_type, repo_id) in self.state.repos:
                    return self._send(409, json.dumps({"error": "You already created this repo", "url": url}).encode())
                self.state.repos[(repo_type, repo_id)] = Repo(
                    repo_type,
                    repo_id,
                    private=data.get("visibility", "private" if data.get("private") else "public") == "private",
                )
            self.state.commit(repo_type, repo_id, {".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"})
            return self._json({"url": url, "name": repo_id})
        upload = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not upload:
            return self._error(404, None, f"no route {path}")
        repo_type, repo_id = upload.group(1)[:-1], upload.group(2)
        if (repo_type, repo_id) not in self.state.repos:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if not self._may_write(repo_id):
            return self._error(403, None, f"You don't have the rights to write to {repo_id}")
        if upload.group(3) == "preupload":
            return self._json(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in json.loads(body)["files"]
                    ]
                }
            )
        repo = self.state.repos[(repo_type, repo_id)]
        branch = unquote(upload.group(4))
        files = dict(repo.commits.get(repo.refs.get(branch, ""), {}))
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] == "lfsFile":
                return self._error(400, None, "the fake hub stores regular files only")
        sha = self.state.commit(repo_type, repo_id, files, branch=branch)
        return self._json({"commitUrl": f"{self.state.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})

    def _user_name(self) -> str:
        user = self._user()
        return user["name"] if user else "anonymous"

    # ---- routes -------------------------------------------------------------------------------
    def do_HEAD(self):  # noqa: N802
        self._route()

    def do_GET(self):  # noqa: N802
        self._route()

    def _route(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/agent-harnesses":
            # The client's best-effort telemetry registry (utils/_detect_agent.py), not a repo call.
            return self._error(404, None, "no registry here")
        if path == "/api/whoami-v2":
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._json(
                {
                    "type": "user",
                    "name": user["name"],
                    "orgs": [{"name": org, "roleInOrg": "write"} for org in user["orgs"]],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user["role"]}},
                }
            )
        with self.state._lock:
            self.state.requests.append((self.command, path))
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?", path)
        if api:
            repo_type = api.group(1)[:-1]
            repo = self._repo(repo_type, api.group(2))
            if repo is None:
                return
            sha = self._commit(repo, api.group(4) or "main")
            if sha is None:
                return
            files = repo.commits[sha]
            if api.group(3) == "tree":
                prefix = unquote(api.group(5) or "")
                return self._json(
                    [
                        {
                            "type": "file",
                            "path": name,
                            "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest(),
                            **(
                                {
                                    "lfs": {
                                        "oid": hashlib.sha256(data).hexdigest(),
                                        "size": len(data),
                                        "pointerSize": 134,
                                    }
                                }
                                if len(data) >= LFS_THRESHOLD
                                else {}
                            ),
                        }
                        for name, data in sorted(files.items())
                        if name.startswith(prefix)
                    ]
                )
            return self._json(
                {
                    "id": repo.repo_id,
                    "_id": sha[:24],
                    "sha": sha,
                    "private": repo.private,
                    "gated": "manual" if repo.gated_token else False,
                    "disabled": False,
                    "lastModified": "2026-11-30T12:00:00.000Z",
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())],
                }
            )
        resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            repo = self._repo("dataset" if resolve.group(1) else "model", resolve.group(2))
            if repo is None:
                return
            sha = self._commit(repo, resolve.group(3))
            if sha is None:
                return
            name = unquote(resolve.group(4))
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist on {resolve.group(3)}")
            if len(data) >= LFS_THRESHOLD:
                blob = hashlib.sha256(data).hexdigest()
                port = self.server.server_address[1]
                return self._send(
                    302,
                    b"",
                    {
                        "Location": f"http://localhost:{port}/cdn/{blob}",
                        "X-Repo-Commit": sha,
                        "X-Linked-Etag": f'"{blob}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                    },
                )
            return self._bytes(data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if cdn and cdn.group(1) in self.state.blobs:
            data = self.state.blobs[cdn.group(1)]
            return self._bytes(data, {"ETag": f'"{cdn.group(1)}"'})
        self._error(404, None, f"no route {path}")
