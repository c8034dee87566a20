"""A small Hugging Face Hub stand-in on 127.0.0.1 for the real ``huggingface_hub`` client.

It serves the endpoints the client uses to load a model repository:

* ``GET /api/models/{repo}/revision/{rev}`` -- revision info: the commit ``sha`` and the
  ``siblings`` with sizes, git blob ids and (large files) LFS sha256;
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` -- file metadata (``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``) and bytes, with range requests
  (``206 Partial Content``) -- and the ``X-Error-Code`` headers of the real Hub on 404s.

Every request is logged (method, path, range, status, bytes sent) so tests can count them.
Faults can be armed per file: drop the connection after N bytes, serve flipped bytes, and move
a branch to another commit right after a revision lookup.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) > 10_000_000


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class Faults:
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # file -> [bytes, times]
    corrupt: dict[str, int] = field(default_factory=dict)  # file -> times left (-1: always)
    move_after_info: dict[tuple[str, str], str] = field(default_factory=dict)  # -> commit
    stall: dict[str, float] = field(default_factory=dict)  # file -> seconds before the body


class FakeHub:
    """Repositories (commit -> files) behind a threaded HTTP server."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> files
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch/tag -> commit
        self.log: list[Logged] = []
        self.faults = Faults()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------- content

    def add_commit(
        self, repo: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None
    ) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        digest.update(str(len(self.commits.get(repo, {}))).encode())
        commit = digest.hexdigest()
        with self.lock:
            self.commits.setdefault(repo, {})[commit] = dict(files)
            self.refs.setdefault(repo, {})[branch] = commit
            if tag:
                self.refs[repo][tag] = commit
        return commit

    def add_folder(self, repo: str, folder: Path, *, extra: dict[str, bytes] | None = None) -> str:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file()
        }
        files.update(extra or {})
        return self.add_commit(repo, files)

    def commit_of(self, repo: str, rev: str) -> str | None:
        with self.lock:
            if rev in self.commits.get(repo, {}):
                return rev
            return self.refs.get(repo, {}).get(rev)

    # ------------------------------------------------------------------------------ counting

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        with self.lock:
            return [
                r for r in self.log if (method is None or r.method == method) and contains in r.path
            ]

    def downloads(self, name: str) -> list[Logged]:
        """GETs of file ``name`` that fetched from its start (not header range reads)."""
        return [
            r
            for r in self.requests("GET", f"/{name}")
            if "/resolve/" in r.path and r.path.endswith(f"/{name}") and r.range is None
        ]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    # -------------------------------------------------------------------------------- server

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)/revision/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        return

    def _record(self, status: int, sent: int) -> None:
        with self.owner.lock:
            self.owner.log.append(
                Logged(
                    self.command,
                    unquote(urlparse(self.path).path),
                    self.headers.get("Range"),
                    status,
                    sent,
                )
            )

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status, 0)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        m = _INFO.match(path)
        if m:
            return self._info(m["repo"], m["rev"])
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m["repo"], m["rev"], m["path"])
        return self._error(404, "RepoNotFound")

    def _info(self, repo: str, rev: str) -> None:
        hub = self.owner
        if repo not in hub.commits:
            return self._error(404, "RepoNotFound")
        commit = hub.commit_of(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        files = hub.commits[repo][commit]
        siblings = []
        for name, data in sorted(files.items()):
            entry: dict[str, Any] = {
                "rfilename": name,
                "size": len(data),
                "blobId": git_blob_id(data),
            }
            if is_lfs(name, data):
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        body = json.dumps(
            {"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._record(200, len(body))
        moved = hub.faults.move_after_info.pop((repo, rev), None)
        if moved is not None:
            with hub.lock:
                hub.refs[repo][rev] = moved

    def _resolve(self, repo: str, rev: str, name: str) -> None:
        hub = self.owner
        if repo not in hub.commits:
            return self._error(404, "RepoNotFound")
        commit = hub.commit_of(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        data = hub.commits[repo][commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", commit)
        lfs = is_lfs(name, data)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        start, stop, status = 0, len(data), 200
        rng = self.headers.get("Range")
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
            if m:
                start = int(m[1])
                stop = min(len(data), int(m[2]) + 1) if m[2] else len(data)
                status = 206
        body = data[start:stop]
        left = 0
        if self.command == "GET" and rng is None:  # whole-file downloads, not header reads
            with hub.lock:
                left = hub.faults.corrupt.get(name, 0)
                if left:
                    hub.faults.corrupt[name] = left - 1 if left > 0 else left
            if left and body:
                flipped = bytearray(body)
                flipped[len(flipped) // 2] ^= 0xFF
                body = bytes(flipped)
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return self._record(status, 0)
        drop = None
        with hub.lock:
            spec = hub.faults.drop_after.get(name)
            if spec and spec[1] > 0 and status == 200:
                spec[1] -= 1
                drop = spec[0]
            stall = hub.faults.stall.get(name, 0.0) if rng is None else 0.0
        if stall:
            time.sleep(stall)
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self._record(status, drop)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)
        self._record(status, len(body))
