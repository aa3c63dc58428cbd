"""A small Hugging Face Hub-compatible HTTP server for tests: real ``huggingface_hub`` client code talks to it.

It implements the endpoints ``huggingface_hub`` (2.x) calls to create repos, commit files and download them,
with the headers its downloader relies on, and nothing it does not call:

* ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``POST /api/validate-yaml``;
* ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``POST /api/models/{repo}/paths-info/{rev}``;
* ``GET /api/models/{repo}/refs``, ``POST /api/models/{repo}/branch/{name}``, ``GET /api/models/{repo}/commits/{rev}``;
* ``POST /api/models/{repo}/preupload/{rev}`` (answers ``lfs`` for weights and big files, ``regular`` otherwise);
* ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer, upload + verify actions) and ``.../verify``;
* ``POST /api/models/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile, deletedFolder; honours
  ``parentCommit``);
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: regular files answer 200 with ``ETag`` (git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files answer 302 to the storage origin with ``X-Linked-Etag``
  (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, as the Hub redirects to its CDN.

LFS objects are stored, uploaded and downloaded through a second listener (another port, so another origin:
the client drops the ``Authorization`` header on the redirect exactly as it does for the Hub's CDN), which also
answers ``Range`` requests (safetensors header reads).

Uploads use plain LFS: the client picks Xet by itself when ``hf_xet`` is installed, so the tests set
``HF_HUB_DISABLE_XET`` (``huggingface_hub.constants.HF_HUB_DISABLE_XET``); this server has no Xet CAS.

History is a chain of commits per branch with 40-hex ids (a hash of parent, message and tree), so branch names
and commit ids both work as revisions. Tokens map to user names; a request with an unknown token gets 401
("Invalid credentials in Authorization header"), writes need a token of the repo's namespace.

Fault injection: ``server.fault = "lfs-upload"`` (or ``"commit"``) makes the server read part of the next such
request's body and then drop the TCP connection without answering; ``server.fault_times`` bounds how many
requests are dropped (default: all of them) and ``server.dropped`` counts them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# Like the Hub's default .gitattributes: these go to LFS whatever their size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_id(data: bytes) -> str:
    """The git blob id (sha1 of ``blob <size>\\0<data>``), what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A file in a commit's tree: a regular blob (``data``) or an LFS pointer (``lfs_sha256``)."""

    size: int
    blob_id: str
    data: bytes | None = None
    lfs_sha256: str | None = None


@dataclass
class Commit:
    """One commit: its id, parent, message and the whole tree (path -> entry)."""

    oid: str
    parent: str | None
    title: str
    tree: dict[str, Entry]
    date: str


@dataclass
class Repo:
    """A model repo: owner namespace, visibility, branches (name -> commit id) and every commit by id."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name, ``refs/heads/<name>`` or a full commit id points at."""
        revision = revision.removeprefix("refs/heads/")
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class _DroppedConnection(Exception):
    """Raised inside a handler to close the socket without an answer."""


class HubServer:
    """A Hub-compatible server on 127.0.0.1 (two free ports: API and LFS storage), run in daemon threads.

    Args:
        tokens: access token -> user name.
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {"hf_test_write_token": "alice"})
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.fault: str | None = None
        self.fault_times: int | None = None
        self.dropped = 0
        self.requests: list[tuple[str, str]] = []
        self._api = self._storage = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        """Bind both listeners to free ports and serve them in daemon threads."""
        self._api = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, storage=False))
        self._storage = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, storage=True))
        for srv in (self._api, self._storage):
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop serving and close both sockets (later requests are refused: the network is 'down')."""
        for srv in (self._api, self._storage):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Hub endpoint (what ``HF_ENDPOINT`` would be)."""
        return f"http://127.0.0.1:{self._api.server_address[1]}"

    @property
    def storage_url(self) -> str:
        """The LFS storage origin (the 'CDN')."""
        return f"http://127.0.0.1:{self._storage.server_address[1]}"

    # -- state helpers used by handlers and tests ------------------------------------------------------------
    def head(self, repo_id: str, branch: str = "main") -> str | None:
        """Commit id a branch of a repo points at (None if the repo or branch does not exist)."""
        with self.lock:
            repo = self.repos.get(repo_id)
            return None if repo is None else repo.branches.get(branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file of a repo at a revision (LFS files resolved from storage)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            return {p: e.data if e.data is not None else self.lfs[e.lfs_sha256] for p, e in commit.tree.items()}

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """Create a repo with an initial commit holding ``.gitattributes``, as the Hub does."""
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            tree = {".gitattributes": Entry(len(GITATTRIBUTES), git_blob_id(GITATTRIBUTES), GITATTRIBUTES)}
            self._commit(repo, "main", "initial commit", tree)
            return repo

    def _commit(self, repo: Repo, branch: str, title: str, tree: dict[str, Entry]) -> Commit:
        parent = repo.branches.get(branch)
        listing = json.dumps(
            {"parent": parent, "title": title, "time": time.time_ns(), "tree": {p: e.blob_id for p, e in tree.items()}},
            sort_keys=True,
        )
        oid = hashlib.sha1(listing.encode()).hexdigest()
        commit = Commit(oid, parent, title, tree, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _should_drop(self, kind: str) -> bool:
        with self.lock:
            if self.fault != kind or (self.fault_times is not None and self.dropped >= self.fault_times):
                return False
            self.dropped += 1
            return True


class HttpError(Exception):
    """An error answer: status, message, and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, extra: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _make_handler(hub: HubServer, storage: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing --------------------------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            path = url.path
            with hub.lock:
                hub.requests.append((method, path))
            try:
                if storage:
                    self._storage(method, path)
                else:
                    self._route(method, path)
            except _DroppedConnection:
                # Reset instead of a clean close, so the client sees the connection drop mid-request.
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            except HttpError as e:
                # The request body may be unread: close rather than parse it as the next request.
                self.close_connection = True
                headers = {**e.headers, "Connection": "close"}
                if e.code:
                    headers["X-Error-Code"] = e.code
                headers["X-Error-Message"] = e.message
                self._send_json({"error": e.message, **e.extra}, e.status, headers)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._dispatch("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                return self.rfile.read(n)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return b""

        def _drop_mid_body(self) -> None:
            # Read part of the body first: the client is mid-upload when the connection goes.
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(n // 2, 1 << 16) if n else 1)
            raise _DroppedConnection

        def _json(self) -> dict:
            body = self._body()
            return json.loads(body) if body else {}

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str | None = None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers, "application/json")

        def _user(self, required: bool = False) -> str | None:
            auth = self.headers.get("Authorization", "")
            if not auth:
                if required:
                    raise HttpError(401, "You must be authenticated to access this resource")
                return None
            token = auth.removeprefix("Bearer ").strip()
            user = hub.tokens.get(token)
            if user is None:
                raise HttpError(401, "Invalid credentials in Authorization header")
            return user

        def _repo(self, repo_id: str, write: bool = False) -> Repo:
            user = self._user(required=write)
            repo = hub.repos.get(repo_id)
            # Like the Hub, a private repo of someone else is "not found" rather than "forbidden".
            if repo is None or (repo.private and user != repo_id.split("/")[0]):
                raise HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            if write and user != repo_id.split("/")[0]:
                raise HttpError(403, f"You don't have the rights to write to {repo_id}")
            return repo

        def _commit_at(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(unquote(revision))
            if commit is None:
                raise HttpError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
            return commit

        # -- API -------------------------------------------------------------------------------------------
        def _route(self, method: str, path: str) -> None:
            m = None

            def match(pattern: str) -> bool:
                nonlocal m
                m = re.fullmatch(pattern, path)
                return m is not None

            if method == "GET" and match(r"/api/whoami-v2"):
                user = self._user(required=True)
                return self._send_json(
                    {
                        "type": "user",
                        "name": user,
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                    }
                )
            if method == "POST" and match(r"/api/repos/create"):
                return self._create_repo()
            if method == "POST" and match(r"/api/validate-yaml"):
                content = self._json().get("content", "")
                parts = content.split("---")
                try:
                    if content.startswith("---") and len(parts) >= 3:
                        yaml.safe_load(parts[1])
                except yaml.YAMLError as e:
                    raise HttpError(400, f"Invalid metadata in README.md: {e}") from e
                return self._send_json({"errors": [], "warnings": []})
            if method == "GET" and match(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"):
                return self._repo_info(m["repo"], m["rev"] or "main")
            if method == "GET" and match(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"):
                return self._tree(m["repo"], m["rev"], unquote(m["path"] or ""))
            if method == "POST" and match(rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)"):
                return self._paths_info(m["repo"], m["rev"])
            if method == "GET" and match(rf"/api/models/{_REPO}/refs"):
                repo = self._repo(m["repo"])
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
                return self._send_json({"branches": branches, "tags": [], "converts": []})
            if method == "POST" and match(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"):
                return self._create_branch(m["repo"], unquote(m["branch"]))
            if method == "GET" and match(rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)"):
                return self._commits(m["repo"], m["rev"])
            if method == "POST" and match(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"):
                return self._preupload(m["repo"], m["rev"])
            if method == "POST" and match(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"):
                return self._commit(m["repo"], m["rev"])
            if method == "POST" and match(rf"/{_REPO}\.git/info/lfs/objects/batch"):
                return self._lfs_batch(m["repo"])
            if method == "POST" and match(rf"/{_REPO}\.git/info/lfs/objects/verify"):
                obj = self._json()
                if hub.lfs.get(obj.get("oid")) is None or len(hub.lfs[obj["oid"]]) != obj.get("size"):
                    raise HttpError(404, f"LFS object {obj.get('oid')} was not uploaded")
                return self._send_json({"success": True})
            if method in ("GET", "HEAD") and match(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"):
                return self._resolve(m["repo"], m["rev"], unquote(m["path"]))
            raise HttpError(404, f"No such endpoint: {method} {path}")

        def _create_repo(self) -> None:
            user = self._user(required=True)
            body = self._json()
            namespace = body.get("organization") or user
            repo_id = f"{namespace}/{body['name']}"
            if body.get("type", "model") != "model":
                raise HttpError(400, "this test server only hosts model repos")
            if namespace != user:
                raise HttpError(403, f"You don't have the rights to create a repo under {namespace}")
            with hub.lock:
                if repo_id in hub.repos:
                    raise HttpError(409, "You already created this model repo", extra={"url": f"{hub.url}/{repo_id}"})
                private = body.get("visibility") == "private" or bool(body.get("private"))
                hub.create_repo(repo_id, private=private)
            self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _file_info(self, path: str, e: Entry) -> dict:
            info = {"type": "file", "oid": e.blob_id, "size": e.size, "path": path}
            if e.lfs_sha256 is not None:
                info["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": 134}
            return info

        def _repo_info(self, repo_id: str, revision: str) -> None:
            with hub.lock:
                repo = self._repo(repo_id)
                commit = self._commit_at(repo, revision)
                siblings = [
                    {
                        "rfilename": p,
                        "size": e.size,
                        "blobId": e.blob_id,
                        **(
                            {"lfs": {"sha256": e.lfs_sha256, "size": e.size, "pointerSize": 134}}
                            if e.lfs_sha256
                            else {}
                        ),
                    }
                    for p, e in sorted(commit.tree.items())
                ]
            self._send_json(
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": commit.oid,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "lastModified": commit.date,
                    "createdAt": commit.date,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "library_name": None,
                    "siblings": siblings,
                }
            )

        def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            with hub.lock:
                commit = self._commit_at(self._repo(repo_id), revision)
                out, dirs = [], set()
                base = prefix.rstrip("/") + "/" if prefix else ""
                if prefix and not any(p.startswith(base) for p in commit.tree):
                    raise HttpError(404, f"{prefix} does not exist at {revision}", "EntryNotFound")
                for p, e in sorted(commit.tree.items()):
                    if not p.startswith(base):
                        continue
                    rest = p[len(base) :]
                    parts = rest.split("/")
                    for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                        d = base + "/".join(parts[:i])
                        if d not in dirs:
                            dirs.add(d)
                            out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d})
                    if recursive or len(parts) == 1:
                        out.append(self._file_info(p, e))
            self._send_json(out)

        def _paths_info(self, repo_id: str, revision: str) -> None:
            raw = self._body()
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(raw).get("paths", [])
            else:
                paths = parse_qs(raw.decode()).get("paths", [])
            with hub.lock:
                commit = self._commit_at(self._repo(repo_id), revision)
                out = []
                for p in paths:
                    if p in commit.tree:
                        out.append(self._file_info(p, commit.tree[p]))
                    elif any(q.startswith(p.rstrip("/") + "/") for q in commit.tree):
                        out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
            self._send_json(out)

        def _create_branch(self, repo_id: str, branch: str) -> None:
            body = self._json()
            with hub.lock:
                repo = self._repo(repo_id, write=True)
                if branch in repo.branches:
                    raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
                start = self._commit_at(repo, body.get("startingPoint") or "main")
                repo.branches[branch] = start.oid
            self._send_json({})

        def _commits(self, repo_id: str, revision: str) -> None:
            with hub.lock:
                repo = self._repo(repo_id)
                commit = self._commit_at(repo, revision)
                out = []
                while commit is not None:
                    out.append(
                        {
                            "id": commit.oid,
                            "title": commit.title,
                            "message": "",
                            "date": commit.date,
                            "authors": [{"user": repo_id.split("/")[0]}],
                        }
                    )
                    commit = repo.commits.get(commit.parent) if commit.parent else None
            self._send_json(out)

        def _preupload(self, repo_id: str, revision: str) -> None:
            body = self._json()
            with hub.lock:
                repo = self._repo(repo_id, write=True)
                commit = repo.resolve(unquote(revision))
                tree = commit.tree if commit is not None else {}
                files = []
                for f in body.get("files", []):
                    lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                    old = tree.get(f["path"])
                    oid = None if old is None else (old.lfs_sha256 or old.blob_id)
                    files.append(
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
            self._send_json({"files": files, "commitOid": commit.oid if commit else None})

        def _lfs_batch(self, repo_id: str) -> None:
            body = self._json()
            with hub.lock:
                self._repo(repo_id, write=True)
                objects = []
                for o in body.get("objects", []):
                    entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                    if o["oid"] not in hub.lfs:
                        entry["actions"] = {
                            "upload": {"href": f"{hub.storage_url}/upload/{o['oid']}?size={o['size']}", "header": {}},
                            "verify": {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                        }
                    objects.append(entry)
            self._send_json(
                {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                headers={"Content-Type": "application/vnd.git-lfs+json"},
            )

        def _commit(self, repo_id: str, revision: str) -> None:
            branch = unquote(revision).removeprefix("refs/heads/")
            with hub.lock:
                repo = self._repo(repo_id, write=True)
            if hub._should_drop("commit"):
                self._drop_mid_body()
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            with hub.lock:
                if branch not in repo.branches:
                    raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                head = repo.commits[repo.branches[branch]]
                tree = dict(head.tree)
                title = "Upload files"
                for item in lines:
                    key, value = item["key"], item["value"]
                    if key == "header":
                        title = value.get("summary") or title
                        parent = value.get("parentCommit")
                        if parent is not None and parent != head.oid:
                            raise HttpError(412, f"A commit has happened since {parent}: {branch} is at {head.oid}")
                    elif key == "file":
                        data = base64.b64decode(value["content"])
                        tree[value["path"]] = Entry(len(data), git_blob_id(data), data)
                    elif key == "lfsFile":
                        data = hub.lfs.get(value["oid"])
                        if data is None:
                            raise HttpError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                        pointer = (
                            f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\n"
                            f"size {len(data)}\n".encode()
                        )
                        tree[value["path"]] = Entry(len(data), git_blob_id(pointer), lfs_sha256=value["oid"])
                    elif key == "deletedFile":
                        if tree.pop(value["path"], None) is None:
                            raise HttpError(
                                404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound"
                            )
                    elif key == "deletedFolder":
                        base = value["path"].rstrip("/") + "/"
                        for p in [p for p in tree if p.startswith(base)]:
                            del tree[p]
                    else:
                        raise HttpError(400, f"unknown commit operation {key!r}")
                commit = hub._commit(repo, branch, title, tree)
            self._send_json(
                {"success": True, "commitOid": commit.oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.oid}"}
            )

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            with hub.lock:
                repo = self._repo(repo_id)
                commit = self._commit_at(repo, revision)
                entry = commit.tree.get(path)
            if entry is None:
                raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
            if entry.lfs_sha256 is not None:
                headers.update(
                    {
                        "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                        "X-Linked-Size": entry.size,
                        "ETag": f'"{entry.blob_id}"',
                        "Location": f"{hub.storage_url}/lfs/{entry.lfs_sha256}?repo={quote(repo_id)}",
                    }
                )
                return self._send(302, b"", headers)
            headers["ETag"] = f'"{entry.blob_id}"'
            self._send_range(entry.data, headers)

        def _send_range(self, data: bytes, headers: dict) -> None:
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
            if rng is None:
                return self._send(200, data, headers, "application/octet-stream")
            start = int(rng[1])
            end = min(int(rng[2]) if rng[2] else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers, "application/octet-stream")

        # -- LFS storage origin ----------------------------------------------------------------------------
        def _storage(self, method: str, path: str) -> None:
            m = re.fullmatch(r"/(upload|lfs)/([0-9a-f]{64})", path)
            if m is None:
                raise HttpError(404, f"No such object: {path}")
            oid = m[2]
            if method == "PUT" and m[1] == "upload":
                if hub._should_drop("lfs-upload"):
                    self._drop_mid_body()
                data = self._body()
                if hashlib.sha256(data).hexdigest() != oid:
                    raise HttpError(400, f"uploaded content does not match sha256 {oid}")
                with hub.lock:
                    hub.lfs[oid] = data
                return self._send(200, b"", {"ETag": f'"{oid}"'})
            if method in ("GET", "HEAD") and m[1] == "lfs":
                with hub.lock:
                    data = hub.lfs.get(oid)
                if data is None:
                    raise HttpError(404, f"No such object: {oid}")
                return self._send_range(data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})
            raise HttpError(405, f"{method} not allowed on {path}")

    return Handler
