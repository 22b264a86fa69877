"""A Hub on loopback for download tests: the few endpoints huggingface_hub calls to list a
model repository and fetch its files (repo info, tree, resolve with HEAD, GET and Range), served
from a folder. It can fail a file's first downloads, as a Hub that is down for a moment does, and
records every request, so a test sees which files were fetched."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, Path], fail: dict[str, int] | None = None, gated: tuple[str, ...] = ()):
        """repos: repo id -> folder of its files; fail: file name -> how many of its first GETs
        answer 500 (the Hub's client does not retry those); gated: repos that answer 403 as a
        gated repository does to a user who has not accepted its terms."""
        self.repos = {repo: {p.name: p for p in sorted(folder.iterdir()) if p.is_file()} for repo, folder in repos.items()}
        self.shas = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.fail = dict(fail or {})
        self.gated = set(gated)
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.sent: list[str] = []  # files whose bytes went out whole
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> tuple[list[str], list[str]]:
        """(files asked for, files sent whole) since the last call, each in order."""
        asked = [p.rsplit("/", 1)[-1] for m, p, _ in self.log if m == "GET" and "/resolve/" in p]
        sent = list(self.sent)
        self.log.clear()
        self.sent.clear()
        return asked, sent

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append((h.command, path, h.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = next((m.group(1) for m in (info, tree, resolve) if m), None)
        if repo in self.gated:
            h.send_response(403)
            h.send_header("X-Error-Code", "GatedRepo")
            h.send_header("X-Error-Message", "Access to model is restricted.")
            h.send_header("Content-Length", "0")
            return h.end_headers()
        if info and info.group(1) in self.repos:
            repo = info.group(1)
            return self._json(h, {"id": repo, "modelId": repo, "sha": self.shas[repo], "private": False,
                                  "gated": False, "siblings": [{"rfilename": n} for n in self.repos[repo]]}, body)
        if tree and tree.group(1) in self.repos:
            repo = tree.group(1)
            return self._json(h, [{"type": "file", "path": n, "size": p.stat().st_size,
                                   "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                                  for n, p in self.repos[repo].items()], body)
        if resolve and resolve.group(1) in self.repos and resolve.group(3) in self.repos[resolve.group(1)]:
            repo, name = resolve.group(1), resolve.group(3)
            return self._file(h, repo, name, body)
        h.send_response(404)
        h.send_header("X-Error-Code", "RepoNotFound" if not (info or tree or resolve) or
                      (resolve or info or tree).group(1) not in self.repos else "EntryNotFound")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _json(self, h, data, body: bool) -> None:
        raw = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if body:
            h.wfile.write(raw)

    def _file(self, h, repo: str, name: str, body: bool) -> None:
        if body and self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            h.send_response(500)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.repos[repo][name].read_bytes()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
        h.send_response(206 if ranged else 200)
        h.send_header("X-Repo-Commit", self.shas[repo])
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        h.wfile.write(data[start:])
        self.sent.append(name)
