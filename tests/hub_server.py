"""Two real Hub servers on 127.0.0.1 for the tests, each started and stopped by the test suite.

``HubServer``: a small Hub-protocol server of our own (stdlib ``http.server``) that the real ``huggingface_hub``
client can push to: ``whoami-v2``, ``repos/create``, repo info, ``preupload`` (every file "regular", so contents travel
inline in the NDJSON commit, no LFS), ``commit`` (with the ``parentCommit`` check), ``branch``, ``refs``, ``tree``,
``commits``, ``validate-yaml`` and ``HEAD``/``GET .../resolve/...``. Every repository is a bare git repository under
``root/models/<namespace>/<name>``; each commit is a real git commit.

``OlahServer``: the ``olah`` Hub mirror (PyPI) serving the same git repositories read-only, so downloads in the tests
go through an independent implementation of the Hub's download protocol.

Both bind 127.0.0.1 on a port the OS picks, answer every request within a timeout and stop by themselves after
``max_seconds`` (the olah child process also exits when its parent dies), so a killed test run leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hub-test-server",
    "GIT_AUTHOR_EMAIL": "hub@127.0.0.1",
    "GIT_COMMITTER_NAME": "hub-test-server",
    "GIT_COMMITTER_EMAIL": "hub@127.0.0.1",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GitRepo:
    """A bare git repository written with plumbing commands only (any branch, no working tree)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def git(self, *args: str, stdin: bytes = b"", env: Optional[dict] = None) -> bytes:
        full_env = {**os.environ, **_GIT_ENV, "GIT_DIR": self.path, **(env or {})}
        result = subprocess.run(["git", *args], input=stdin, capture_output=True, env=full_env, timeout=60)
        if result.returncode != 0:
            raise HubError(500, f"git {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def init(self) -> None:
        os.makedirs(self.path)
        subprocess.run(
            ["git", "init", "-q", "--bare", "-b", "main", self.path], check=True, env={**os.environ, **_GIT_ENV}
        )
        self.commit("main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit", parent_required=False)

    def resolve(self, revision: str) -> Optional[str]:
        if not revision or revision.startswith("-") or ".." in revision:
            return None
        full_env = {**os.environ, **_GIT_ENV, "GIT_DIR": self.path}
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}"],
            capture_output=True,
            env=full_env,
            timeout=60,
        )
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def branches(self) -> dict[str, str]:
        out = self.git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/").decode()
        return dict(line.split(" ", 1) for line in out.splitlines() if line)

    def entries(self, commit: str, path: str = "", recursive: bool = True) -> list[dict]:
        args = ["ls-tree", "-l", "--full-tree"] + (["-r", "-t"] if recursive else []) + [commit]
        if path:
            args += ["--", path.rstrip("/") + "/"]
        entries = []
        for line in self.git(*args).decode().splitlines():
            meta, name = line.split("\t", 1)
            _, kind, oid, size = meta.split()
            entry = {"type": "directory" if kind == "tree" else "file", "oid": oid, "path": name}
            entry["size"] = 0 if kind == "tree" else int(size)
            entries.append(entry)
        return entries

    def blob(self, commit: str, path: str) -> Optional[str]:
        out = self.git("ls-tree", "--full-tree", commit, "--", path).decode().strip()
        if not out:
            return None
        meta, _ = out.split("\t", 1)
        _, kind, oid = meta.split()
        return oid if kind == "blob" else None

    def commit(
        self,
        branch: str,
        files: dict[str, bytes],
        deletions: list[tuple[str, bool]],
        message: str,
        parent_required: bool = True,
        expected_parent: Optional[str] = None,
    ) -> str:
        parent = self.resolve(f"refs/heads/{branch}")
        if parent is None and parent_required:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if expected_parent is not None and expected_parent != parent:
            raise HubError(412, f"A commit has happened since {expected_parent}; the branch is now at {parent}.")
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            if parent is not None:
                self.git("read-tree", parent, env=env)
            for path, is_folder in deletions:
                listed = self.git("ls-files", "--", path.rstrip("/") + ("/" if is_folder else ""), env=env).decode()
                names = listed.splitlines()
                if not names:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                self.git("update-index", "--force-remove", "--", *names, env=env)
            lines = []
            for path, content in files.items():
                oid = self.git("hash-object", "-w", "--stdin", stdin=content).decode().strip()
                lines.append(f"100644 blob {oid}\t{path}\n")
            if lines:
                self.git("update-index", "--add", "--index-info", stdin="".join(lines).encode(), env=env)
            tree = self.git("write-tree", env=env).decode().strip()
        parents = ["-p", parent] if parent else []
        commit = self.git("commit-tree", tree, *parents, "-m", message or "commit").decode().strip()
        # compare-and-swap: a concurrent commit to the same branch makes this fail instead of losing it
        self.git("update-ref", f"refs/heads/{branch}", commit, parent or "0" * 40)
        return commit


class HubServer:
    """The upload (and download) side of the Hub, backed by bare git repositories under ``root``."""

    def __init__(
        self,
        root: str,
        token: Optional[str] = None,
        user: str = "tester",
        orgs: tuple[str, ...] = ("org",),
        max_seconds: float = 600,
    ) -> None:
        self.root, self.token, self.user, self.orgs = root, token, user, orgs
        self.max_seconds = max_seconds
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.private: set[str] = set()
        self._write_lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._timer: Optional[threading.Timer] = None

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        os.makedirs(os.path.join(self.root, "models"), exist_ok=True)
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        self._timer = threading.Timer(self.max_seconds, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- repositories ----------------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> str:
        return os.path.join(self.root, "models", *repo_id.split("/"))

    def repo(self, repo_id: str, authorized: bool = True) -> GitRepo:
        path = self.repo_dir(repo_id)
        if not os.path.isdir(path) or (repo_id in self.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return GitRepo(path)

    def all_blobs(self, repo_id: str) -> list[bytes]:
        """The contents of every file in every commit of a repository (to check what was ever uploaded)."""
        repo = GitRepo(self.repo_dir(repo_id))
        oids = set()
        for commit in repo.git("rev-list", "--all").decode().split():
            oids.update(e["oid"] for e in repo.entries(commit) if e["type"] == "file")
        return [repo.git("cat-file", "blob", oid) for oid in sorted(oids)]

    def commit_count(self, repo_id: str, revision: str = "main") -> int:
        return int(GitRepo(self.repo_dir(repo_id)).git("rev-list", "--count", revision).decode())

    def edit_file(self, repo_id: str, path: str, content: bytes, branch: str = "main") -> str:
        """Commit a change as if someone edited the file on the Hub's website."""
        with self._write_lock:
            return GitRepo(self.repo_dir(repo_id)).commit(branch, {path: content}, [], f"Update {path}")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stay silent before its connection is dropped

    def log_message(self, format, *args):  # quiet: the tests read self.hub.requests instead
        pass

    # ---- plumbing --------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head=head)

    def _body(self) -> bytes:
        return self._request_body

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append((method, path))
        # read the whole body first: an error answered before reading it would leave it to be parsed as the next
        # request on this keep-alive connection
        length = int(self.headers.get("Content-Length") or 0)
        self._request_body = self.rfile.read(length) if length else b""
        try:
            for pattern, verbs, handler in _ROUTES:
                match = re.fullmatch(pattern, path)
                if match and method in verbs:
                    handler(self, method, query, **{k: v for k, v in match.groupdict().items() if v is not None})
                    return
            raise HubError(404, f"No route for {method} {path}")
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # a bug or a malformed request: answer 500 rather than dropping the connection
            err = exc if isinstance(exc, HubError) else HubError(500, f"{type(exc).__name__}: {exc}")
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message.splitlines()[0][:200]}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = json.dumps({"error": err.message}).encode()
            try:
                self._send(err.status, body, headers, head=method == "HEAD")
            except (BrokenPipeError, ConnectionResetError):
                pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ---- endpoints -------------------------------------------------------------------------------------------------
    def whoami(self, method, query):
        self._require_auth()
        orgs = [{"name": org, "type": "org"} for org in self.hub.orgs]
        self._json(200, {"type": "user", "name": self.hub.user, "orgs": orgs, "auth": {"type": "access_token"}})

    def create_repo(self, method, query):
        self._require_auth()
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server holds model repositories only.")
        namespace = payload.get("organization") or self.hub.user
        if namespace not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, f"You cannot create repositories in {namespace!r}.")
        name = payload.get("name") or ""
        if not re.fullmatch(_NAME, name):
            raise HubError(400, f"Invalid repository name {name!r}.")
        repo_id = f"{namespace}/{name}"
        with self.hub._write_lock:
            if os.path.isdir(self.hub.repo_dir(repo_id)):
                self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
                return
            GitRepo(self.hub.repo_dir(repo_id)).init()
            if payload.get("visibility") == "private" or payload.get("private"):
                self.hub.private.add(repo_id)
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, method, query):
        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML in README.md: {exc}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def repo_info(self, method, query, repo, revision="main"):
        git = self.hub.repo(repo, self._authorized())
        commit = git.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = [{"rfilename": e["path"]} for e in git.entries(commit) if e["type"] == "file"]
        card = {}
        readme = git.blob(commit, "README.md")
        if readme:
            text = git.git("cat-file", "blob", readme).decode(errors="replace")
            match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
            card = (yaml.safe_load(match.group(1)) or {}) if match else {}
        self._json(
            200,
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit,
                "private": repo in self.hub.private,
                "disabled": False,
                "gated": False,
                "tags": card.get("tags", []) if isinstance(card, dict) else [],
                "cardData": card,
                "siblings": siblings,
            },
        )

    def refs(self, method, query, repo):
        git = self.hub.repo(repo, self._authorized())
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in git.branches().items()]
        self._json(200, {"branches": branches, "tags": [], "converts": []})

    def create_branch(self, method, query, repo, branch):
        self._require_auth()
        git = self.hub.repo(repo)
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        with self.hub._write_lock:
            if branch in git.branches():
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            commit = git.resolve(start)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            git.git("update-ref", f"refs/heads/{branch}", commit, "0" * 40)
        self._json(200, {})

    def tree(self, method, query, repo, revision, path=""):
        git = self.hub.repo(repo, self._authorized())
        commit = git.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(200, git.entries(commit, path.strip("/"), recursive=recursive))

    def commits(self, method, query, repo, revision):
        git = self.hub.repo(repo, self._authorized())
        commit = git.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        out = git.git(
            "log", "--format=%H%x00%s%x00%cd", "--date=format-local:%Y-%m-%dT%H:%M:%S.000Z", commit, env={"TZ": "UTC"}
        ).decode()
        rows = [line.split("\x00") for line in out.splitlines() if line]
        self._json(200, [{"id": c, "title": t, "message": "", "authors": [], "date": d} for c, t, d in rows])

    def preupload(self, method, query, repo, revision):
        self._require_auth()
        git = self.hub.repo(repo)
        commit = git.resolve(revision)
        files = json.loads(self._body() or b"{}").get("files", [])
        answer = []
        for file in files:
            oid = git.blob(commit, file["path"]) if commit else None
            answer.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answer, "commitOid": commit})

    def commit(self, method, query, repo, revision):
        self._require_auth()
        git = self.hub.repo(repo)
        header, files, deletions = {}, {}, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((value["path"], key == "deletedFolder"))
            elif key == "lfsFile":
                raise HubError(400, "This test server takes regular files only (preupload never answers 'lfs').")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if revision.startswith("refs/"):
            raise HubError(400, f"Cannot commit to {revision!r} on this test server; use a branch name.")
        message = header.get("summary", "")
        if header.get("description"):
            message += "\n\n" + header["description"]
        with self.hub._write_lock:
            oid = git.commit(revision, files, deletions, message, expected_parent=header.get("parentCommit"))
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})

    def resolve_file(self, method, query, repo, revision, path):
        git = self.hub.repo(repo, self._authorized())
        commit = git.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        oid = git.blob(commit, path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = git.git("cat-file", "blob", oid)
        headers = {
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "none",
        }
        self._send(200, content, headers, head=method == "HEAD")


_API = rf"/api/models/{_REPO}"
_ROUTES = [
    (r"/api/whoami-v2", ("GET",), _Handler.whoami),
    (r"/api/repos/create", ("POST",), _Handler.create_repo),
    (r"/api/validate-yaml", ("POST",), _Handler.validate_yaml),
    (rf"{_API}(?:/revision/(?P<revision>.+))?", ("GET",), _Handler.repo_info),
    (rf"{_API}/refs", ("GET",), _Handler.refs),
    (rf"{_API}/branch/(?P<branch>.+)", ("POST",), _Handler.create_branch),
    (rf"{_API}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", ("GET",), _Handler.tree),
    (rf"{_API}/commits/(?P<revision>.+)", ("GET",), _Handler.commits),
    (rf"{_API}/preupload/(?P<revision>.+)", ("POST",), _Handler.preupload),
    (rf"{_API}/commit/(?P<revision>.+)", ("POST",), _Handler.commit),
    (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", ("GET", "HEAD"), _Handler.resolve_file),
]


# ---- olah ----------------------------------------------------------------------------------------------------------


def _wait_until_up(url: str, deadline: float, process: Optional[subprocess.Popen] = None) -> None:
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} in time")


class OlahServer:
    """``olah`` (a Hub mirror on PyPI) serving the git repositories under ``mirrors_root``, read-only, offline."""

    def __init__(self, mirrors_root: str, workdir: str, max_seconds: float = 600, startup_timeout: float = 60) -> None:
        self.mirrors_root, self.workdir = mirrors_root, workdir
        self.max_seconds, self.startup_timeout = max_seconds, startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> OlahServer:
        os.makedirs(self.workdir, exist_ok=True)
        config = os.path.join(self.workdir, "olah.toml")
        with open(config, "w") as f:
            f.write(
                "[basic]\n"
                'host = "127.0.0.1"\n'
                f"repos-path = {json.dumps(os.path.join(self.workdir, 'cache'))}\n"
                f"mirrors-path = [{json.dumps(self.mirrors_root)}]\n"
                # a closed port: nothing is ever fetched upstream
                'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
                "metadata-cache-ttl = 0\n"
                "[accessibility]\noffline = true\n"
            )
        port_file = os.path.join(self.workdir, "port")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([repo_root, *(p for p in sys.path if p)])
        self._log = open(os.path.join(self.workdir, "olah.log"), "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.hub_server",
                "olah",
                config,
                port_file,
                str(os.getpid()),
                str(self.max_seconds),
            ],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + self.startup_timeout
            while not os.path.exists(port_file) and time.monotonic() < deadline and self.process.poll() is None:
                time.sleep(0.05)
            if not os.path.exists(port_file):
                raise RuntimeError("olah did not report its port")
            with open(port_file) as f:
                self.url = f"http://127.0.0.1:{int(f.read())}"
            _wait_until_up(f"{self.url}/api/models/x/y/revision/main", deadline, self.process)
        except Exception as exc:
            self.stop()
            with open(os.path.join(self.workdir, "olah.log"), errors="replace") as f:
                raise RuntimeError(f"olah failed to start: {exc}\n{f.read()[-3000:]}") from exc
        return self

    def stop(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            self._log.close()

    def __enter__(self) -> OlahServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _run_olah(config: str, port_file: str, parent_pid: int, max_seconds: float) -> None:
    """Child process: olah's app on a port bound here (no race for it), exiting with its parent or in time."""

    def watchdog():
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline and os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    import uvicorn
    from olah import server as olah_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sys.argv = ["olah", "--config", config, "--log-path", os.path.join(os.path.dirname(config), "logs")]
    olah_server.init()
    settings = olah_server.app.state.app_settings.config
    settings.port = port
    settings.mirror_netloc = settings.mirror_lfs_netloc = f"127.0.0.1:{port}"
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    server = uvicorn.Server(uvicorn.Config(olah_server.app, log_level="warning", timeout_keep_alive=5))
    server.run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "olah":
        _run_olah(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit("usage: python -m tests.hub_server olah CONFIG PORT_FILE PARENT_PID MAX_SECONDS")
