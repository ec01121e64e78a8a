"""A Hugging Face hub for `hf://` tests: no hub is reachable from the machines the tests run on.

A small HTTP server speaking the part of the hub's protocol that `huggingface_hub`'s own
`snapshot_download` uses (the model's revision and commit, the commit's file tree, each file's
metadata by HEAD and its bytes by GET, errors with the hub's `X-Error-Code`), pointed at by
`HF_ENDPOINT` as a mirror is. It serves real folders; what the tests check is inferd's side,
driven by the official client. Each request's path is recorded, and files can be made to fail
(403) to stand for a download cut short.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _blob_id(data: bytes) -> str:
    """Git's id of a file (what the hub reports as `oid` for a file not in LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324


class Hub(ThreadingHTTPServer):
    """Repositories by id (`ORG/NAME`), each one folder at one commit, `main` its only branch."""

    daemon_threads = True

    def __init__(self, repos: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}  # noqa: S324
        self.seen: list[str] = []
        self.failing: set[str] = set()  # file names answered 403
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Hub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        folder = self.repos[repo]
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reads `Hub.seen`

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def _answer(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.seen.append(path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            commit = self._commit(repo, revision)
            if commit is None:
                return
            files = self.server.files(repo)
            if kind == "revision":
                siblings = [{"rfilename": name} for name in files]
                self._json({"id": repo, "modelId": repo, "sha": commit, "siblings": siblings})
            elif kind == "tree":
                self._json(
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
                        for name, data in files.items()
                    ]
                )
            else:
                self._error(404, "EntryNotFound", f"no route {path}")
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            commit = self._commit(repo, revision)
            if commit is None:
                return
            files = self.server.files(repo)
            if name not in files:
                self._error(404, "EntryNotFound", f"{name} is not in {repo}")
            elif name in self.server.failing:
                self._error(403, "", f"{name}: access denied")
            else:
                data = files[name]
                self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{_blob_id(data)}"'})
        else:
            self._error(404, "", f"no route {path}")

    def _commit(self, repo: str, revision: str) -> str | None:
        """The commit `revision` names in `repo`, or None once the hub's 404 is sent."""
        if repo not in self.server.repos:
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return None
        commit = self.server.commits[repo]
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return commit

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        """`data` with `headers` and its length; the body only for GET (HEAD: the headers)."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
