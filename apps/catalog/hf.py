"""The one module that talks to the Hugging Face hub (the only importer of huggingface_hub).

``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN`` (gated or private repos) come from settings. Tests
replace :func:`resolve_revision`, :func:`repo_files` and :func:`download` with a fake that serves a
local folder, or point HF_ENDPOINT at a local hub (test_hf.py);
:func:`filter_paths` stays real so the allow-pattern filtering is the library's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects


class HubError(Exception):
    """The hub refused or failed; ``str()`` says what to fix."""


def _endpoint() -> str | None:
    return settings.HF_ENDPOINT or None


def _token() -> str | None:
    return settings.HF_TOKEN or None


def _translate(exc: Exception, repo: str, revision: str) -> HubError:
    where = f"{_endpoint() or 'https://huggingface.co'}/{repo}@{revision}"
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where} is gated: accept its licence on the hub with the account whose HF_TOKEN is set.")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"Repository {where} not found (or private: set HF_TOKEN).")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"Revision '{revision}' not found in {repo}.")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"The hub failed for {where}: {exc}")
    return HubError(f"Could not reach the hub for {where}: {type(exc).__name__}: {exc}. Check HF_ENDPOINT/network.")


def filter_paths(paths: Iterable[str], allow_patterns: list[str]) -> list[str]:
    """The subset of ``paths`` that ``snapshot_download(allow_patterns=...)`` would fetch."""
    return sorted(filter_repo_objects(list(paths), allow_patterns=allow_patterns))


def resolve_revision(*, repo: str, revision: str) -> str:
    """The commit sha that ``revision`` (a branch, tag or sha) names now.

    Uploads pin it: the prefix, the manifest and the download all use the sha, so a later push to
    the branch can never overwrite objects that running nodes stream from.
    """
    try:
        sha = HfApi(endpoint=_endpoint(), token=_token()).model_info(repo, revision=revision).sha
    except Exception as exc:
        raise _translate(exc, repo, revision) from exc
    if not sha:
        raise HubError(f"The hub gave no commit for {repo}@{revision}; cannot pin the upload to it.")
    return sha


def repo_files(*, repo: str, revision: str) -> list[str]:
    """Every file path in the repo at ``revision`` (used to refuse pickle-only repos up front)."""
    try:
        return HfApi(endpoint=_endpoint(), token=_token()).list_repo_files(repo, revision=revision)
    except Exception as exc:
        raise _translate(exc, repo, revision) from exc


def download(*, repo: str, revision: str, allow_patterns: list[str], dest: Path) -> Path:
    """Download the matching files into ``dest`` (a plain folder laid out like the repo).

    Files already in ``dest`` are not fetched again, so a retried upload resumes its download.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            repo,
            revision=revision,
            local_dir=dest,
            allow_patterns=allow_patterns,
            token=_token(),
            endpoint=_endpoint(),
        )
    except Exception as exc:
        raise _translate(exc, repo, revision) from exc
    return dest
