"""Catalog fixtures: a real S3 protocol server (moto's) behind an https front that refuses what
Cloudflare R2 refuses (r2_front.py), and a fake hub at hf.py's boundary."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """``moto_server`` in a subprocess for the whole session; yields its http:// URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        env={**os.environ, "MOTO_PORT": str(port)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)  # noqa: S310 - our own localhost server
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start (see {log.name})")
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def r2_front_server(moto_endpoint, tmp_path_factory):
    """The R2-faithful https front (test CA from trustme) before moto, for the whole session."""
    from apps.catalog.tests.r2_front import R2Front

    with R2Front(upstream=moto_endpoint, workdir=tmp_path_factory.mktemp("r2-front")) as front:
        yield front


@pytest.fixture
def r2_front(r2_front_server):
    """The front with its per-test state reset: refusals counted from zero, R2's page size."""
    r2_front_server.reset()
    return r2_front_server


def set_moto_auth(endpoint: str, enforce: bool) -> None:
    """Make moto check credentials (it accepts any by default): unknown keys get InvalidAccessKeyId."""
    request = urllib.request.Request(  # noqa: S310 - our own localhost server
        f"{endpoint}/moto-api/reset-auth",
        data=b"0" if enforce else b"inf",
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=5).read()  # noqa: S310


@pytest.fixture
def r2(settings, r2_front, tmp_path):
    """Settings pointing at the R2 front (https, region auto, the project's default checksum mode)
    with a fresh bucket, small multipart sizes, fast progress; yields the bucket."""
    from apps.catalog import storage

    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    settings.R2_ENDPOINT_URL = r2_front.url
    settings.R2_CA_BUNDLE = str(r2_front.ca_file)
    settings.R2_REGION = "auto"
    settings.R2_ACCESS_KEY_ID = "test-key-id"
    settings.R2_SECRET_ACCESS_KEY = "test-secret"
    settings.R2_BUCKET = bucket
    settings.R2_MULTIPART_THRESHOLD_MB = 5
    settings.R2_MULTIPART_CHUNK_MB = 5
    settings.R2_MAX_CONCURRENCY = 4
    settings.R2_MAX_ATTEMPTS = 2
    settings.R2_CONNECT_TIMEOUT_S = 2
    settings.R2_READ_TIMEOUT_S = 30
    settings.UPLOAD_PROGRESS_INTERVAL_S = 0.05
    settings.UPLOAD_FILE_RETRIES = 1
    settings.UPLOAD_WORK_DIR = tmp_path / "work"
    storage.create_bucket(bucket)
    storage.request_log.reset()
    return bucket


BIG_FILE_BYTES = 12 * 1024 * 1024  # above the 5 MB multipart threshold: 3 parts


def make_model_folder(root: Path, *, big: int = BIG_FILE_BYTES) -> Path:
    """A small model laid out like a hub repo: sharded safetensors, configs, tokenizer, and a README."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    (root / "generation_config.json").write_text('{"temperature": 0.6}')
    (root / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (root / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(big))
    (root / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1024 * 1024))
    (root / "README.md").write_text("# a model card vLLM does not need\n")
    return root


@pytest.fixture
def model_folder(tmp_path) -> Path:
    return make_model_folder(tmp_path / "model")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace hf.py's two network calls with a hub that serves local folders.

    ``fake_hub.repos[(repo, revision)] = folder``; each (repo, revision) has the commit
    ``fake_hub.commit(repo, revision)``, which the hub also accepts as the revision. Downloads go
    through the real ``hf.filter_paths`` (huggingface_hub's allow-pattern filter), as snapshot_download would.
    """
    from apps.catalog import hf

    class FakeHub:
        def __init__(self) -> None:
            self.repos: dict[tuple[str, str], Path] = {}
            self.downloads: list[tuple[str, str, list[str]]] = []

        @staticmethod
        def commit(repo: str, revision: str) -> str:
            return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()  # noqa: S324 - a fake commit id

        def _folder(self, repo: str, revision: str) -> Path:
            for (known_repo, known_revision), folder in self.repos.items():
                if known_repo == repo and revision in (known_revision, self.commit(repo, known_revision)):
                    return folder
            raise hf.HubError(f"Repository {repo}@{revision} not found (or private: set HF_TOKEN).")

        def resolve_revision(self, *, repo: str, revision: str) -> str:
            self._folder(repo, revision)
            return revision if len(revision) == 40 else self.commit(repo, revision)

        def repo_files(self, *, repo: str, revision: str) -> list[str]:
            folder = self._folder(repo, revision)
            return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

        def download(self, *, repo: str, revision: str, allow_patterns: list[str], dest: Path) -> Path:
            folder = self._folder(repo, revision)
            wanted = hf.filter_paths(self.repo_files(repo=repo, revision=revision), allow_patterns)
            self.downloads.append((repo, revision, wanted))
            for rel in wanted:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, dest / rel)
            return dest

    hub = FakeHub()
    monkeypatch.setattr(hf, "resolve_revision", hub.resolve_revision)
    monkeypatch.setattr(hf, "repo_files", hub.repo_files)
    monkeypatch.setattr(hf, "download", hub.download)
    return hub
