"""apps/catalog/hf.py against a local HTTP server standing in for the Hugging Face hub (HF_ENDPOINT).

The server speaks the few hub routes huggingface_hub uses: repo info, the file tree, and
HEAD/GET on /resolve/. Nothing is faked inside the library: snapshot_download does its real
allow-pattern filtering, metadata checks and downloads against it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from django.core.management import call_command

from apps.catalog import hf, storage
from apps.catalog.models import UploadStatus
from apps.catalog.tests.conftest import make_model_folder
from apps.catalog.transfer import ALLOW_PATTERNS, MANIFEST_NAME

pytestmark = pytest.mark.slow  # starts a local hub server

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """Repos at commits: ``repos[repo]`` is the folder at COMMIT; ``snapshots[(repo, sha)]`` other
    commits; ``branches`` maps a branch (or tag) to the commit it names now, as the hub's refs do."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.snapshots: dict[tuple[str, str], Path] = {}
        self.branches: dict[str, str] = {"main": COMMIT}
        self.required_token = ""
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization)

    def commit(self, repo: str, revision: str) -> str | None:
        sha = self.branches.get(revision, revision)
        if (repo, sha) in self.snapshots or (repo in self.repos and sha == COMMIT):
            return sha
        return None

    def folder(self, repo: str, sha: str) -> Path:
        return self.snapshots.get((repo, sha)) or self.repos[repo]

    def files(self, repo: str, sha: str = COMMIT) -> list[str]:
        root = self.folder(repo, sha)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: object) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
            if hub.required_token and self.headers.get("Authorization") != f"Bearer {hub.required_token}":
                self._send(401, b'{"error": "Invalid credentials"}', {"X-Error-Code": "RepoNotFound"})
                return
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo, rest = "/".join(parts[2:4]), parts[4:]
                if repo not in hub.repos:
                    self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    return
                sha = hub.commit(repo, rest[1]) if len(rest) > 1 else None
                if rest[:1] in (["revision"], ["tree"]) and sha is None:
                    self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
                    return
                if rest[:1] == ["revision"]:
                    siblings = [{"rfilename": f} for f in hub.files(repo, sha)]
                    self._json({"id": repo, "modelId": repo, "sha": sha, "siblings": siblings, "private": False})
                    return
                if rest[:1] == ["tree"]:
                    root = hub.folder(repo, sha)
                    self._json(
                        [
                            {"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": "0" * 40}
                            for f in hub.files(repo, sha)
                        ]
                    )
                    return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
                sha = hub.commit(repo, parts[3])
                file = hub.folder(repo, sha) / rel if sha else Path("/nonexistent")
                if not file.is_file():
                    self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"})
                    return
                assert sha is not None  # no commit, no file
                body = file.read_bytes()
                self._send(
                    200,
                    body,
                    {
                        "X-Repo-Commit": sha,
                        "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    },
                )
                return
            self._send(404, b"no such route")

        do_GET = _route  # noqa: N815 - http.server's naming
        do_HEAD = _route  # noqa: N815

    return Handler


@pytest.fixture
def local_hub(settings):
    hub = LocalHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.HF_ENDPOINT = f"http://127.0.0.1:{server.server_address[1]}"
    settings.HF_TOKEN = ""
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_repo(local_hub, tmp_path) -> Path:
    folder = make_model_folder(tmp_path / "hub-repo", big=2 * 1024 * 1024)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(b"\x80\x04pickle")
    (folder / "tokenizer.model").write_bytes(b"sentencepiece")
    local_hub.repos["acme/tiny-llama"] = folder
    return folder


def test_repo_files_lists_the_repo_through_hf_endpoint(local_hub, hub_repo):
    files = hf.repo_files(repo="acme/tiny-llama", revision="main")

    assert "pytorch_model.bin" in files and "model-00001-of-00002.safetensors" in files
    assert any(path.startswith("/api/models/acme/tiny-llama/tree/main") for _, path, _ in local_hub.requests)


def test_download_fetches_only_what_vllm_needs(local_hub, hub_repo, tmp_path):
    dest = hf.download(repo="acme/tiny-llama", revision="main", allow_patterns=ALLOW_PATTERNS, dest=tmp_path / "dl")

    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert got == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (dest / "model-00001-of-00002.safetensors").read_bytes() == (
        hub_repo / "model-00001-of-00002.safetensors"
    ).read_bytes()
    fetched = {path for method, path, _ in local_hub.requests if method == "GET" and "/resolve/" in path}
    assert not any(p.endswith((".bin", ".pth", "README.md")) for p in fetched)


def test_the_token_is_sent_when_set(local_hub, hub_repo, settings):
    local_hub.required_token = settings.HF_TOKEN = "hf_test_token_123"

    assert "config.json" in hf.repo_files(repo="acme/tiny-llama", revision="main")
    assert all(auth == "Bearer hf_test_token_123" for _, _, auth in local_hub.requests)


def test_an_unknown_repo_is_a_clear_hub_error(local_hub):
    with pytest.raises(hf.HubError, match=r"acme/missing@main not found"):
        hf.repo_files(repo="acme/missing", revision="main")


def test_an_unreachable_mirror_is_a_clear_hub_error(settings):
    from apps.catalog.tests.conftest import _free_port

    settings.HF_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(hf.HubError, match="Check HF_ENDPOINT"):
        hf.repo_files(repo="acme/tiny-llama", revision="main")


@pytest.mark.django_db
def test_upload_model_from_the_local_hub_end_to_end(r2, local_hub, hub_repo, catalog_model):
    call_command("upload_model", catalog_model.name, "--from-hf", "acme/tiny-llama@main", "--sync")

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED
    prefix = f"models/acme--tiny-llama/{COMMIT}"
    keys = {o.key for o in storage.list_objects(r2, f"{prefix}/")}
    assert f"{prefix}/tokenizer.model" in keys
    assert not any(k.endswith((".bin", ".pth", "README.md")) or "/.cache/" in k for k in keys)
    assert len(catalog_model.manifest) == 8


# --- revisions are pinned to commits (issue #10, defect 10) -------------------------------------
def test_resolve_revision_names_the_commit_a_branch_points_at(local_hub, hub_repo):
    assert hf.resolve_revision(repo="acme/tiny-llama", revision="main") == COMMIT
    assert hf.resolve_revision(repo="acme/tiny-llama", revision=COMMIT) == COMMIT
    with pytest.raises(hf.HubError, match=r"Revision 'no-such-branch' not found in acme/tiny-llama"):
        hf.resolve_revision(repo="acme/tiny-llama", revision="no-such-branch")


@pytest.mark.django_db
def test_an_upload_is_pinned_to_the_commit_and_a_later_push_never_overwrites_it(
    r2, local_hub, hub_repo, catalog_model, tmp_path
):
    call_command("upload_model", catalog_model.name, "--from-hf", "acme/tiny-llama@main", "--sync")

    first = f"models/acme--tiny-llama/{COMMIT}"
    catalog_model.refresh_from_db()
    assert catalog_model.storage_uri == f"s3://{r2}/{first}"
    manifest = json.loads(storage.get_bytes(r2, f"{first}/{MANIFEST_NAME}"))
    assert (manifest["source"]["revision"], manifest["source"]["commit"]) == ("main", COMMIT)
    downloads = [path for method, path, _ in local_hub.requests if method == "GET" and "/resolve/" in path]
    assert downloads and all(f"/resolve/{COMMIT}/" in path for path in downloads)  # never by branch name
    served = storage.get_bytes(r2, f"{first}/config.json")

    # Someone pushes to main: new weights and config under a new commit.
    pushed = shutil.copytree(hub_repo, tmp_path / "pushed")
    (pushed / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 128}')
    second_commit = "fedcba9876543210fedcba9876543210fedcba98"
    local_hub.snapshots[("acme/tiny-llama", second_commit)] = pushed
    local_hub.branches["main"] = second_commit

    call_command("upload_model", catalog_model.name, "--from-hf", "acme/tiny-llama@main", "--sync")

    second = f"models/acme--tiny-llama/{second_commit}"
    catalog_model.refresh_from_db()
    assert catalog_model.storage_uri == f"s3://{r2}/{second}"
    assert storage.get_bytes(r2, f"{second}/config.json") == (pushed / "config.json").read_bytes()
    assert storage.get_bytes(r2, f"{first}/config.json") == served  # what running nodes stream is untouched


# --- file selection (issue #10, defect 11) --------------------------------------------------------
@pytest.mark.django_db
def test_duplicate_consolidated_weights_are_not_downloaded_and_every_sentencepiece_file_is(
    r2, local_hub, hub_repo, catalog_model
):
    (hub_repo / "consolidated.safetensors").write_bytes(b"the same weights again, unsharded")
    (hub_repo / "tokenizer_v2.model").write_bytes(b"sentencepiece v2")
    (hub_repo / "sentencepiece.bpe.model").write_bytes(b"sentencepiece bpe")

    call_command("upload_model", catalog_model.name, "--from-hf", "acme/tiny-llama@main", "--sync")

    fetched = {
        path.rsplit("/", 1)[-1] for method, path, _ in local_hub.requests if method == "GET" and "/resolve/" in path
    }
    assert "consolidated.safetensors" not in fetched
    prefix = f"models/acme--tiny-llama/{COMMIT}"
    keys = {o.key.removeprefix(f"{prefix}/") for o in storage.list_objects(r2, f"{prefix}/")}
    assert {"tokenizer.model", "tokenizer_v2.model", "sentencepiece.bpe.model"} <= keys
    assert "consolidated.safetensors" not in keys
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= keys
