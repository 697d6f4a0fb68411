"""The production configuration passes Django's deployment checks and builds its static files.

Runs `manage.py` in a subprocess with a production-like environment (what docker-compose gives
the containers), so the settings are read exactly as they would be there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts manage.py check, as a subprocess

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "k8Jx2-production-like-secret-key-for-the-deploy-check-0123456789",
    "API_KEY_PEPPER": "production-like-pepper-0123456789",
    "ALLOWED_HOSTS": "api.example.com,admin.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://admin.example.com",
    "DATABASE_URL": "postgres://crosslogic:secret@127.0.0.1:5432/crosslogic",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SECURE_HSTS_PRELOAD": "true",
}


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "CROSSLOGIC_ENV_FILE": "",
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **PRODUCTION, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_check_deploy_is_clean_with_a_production_environment():
    result = _manage("check", "--deploy", "--fail-level", "WARNING")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output


def test_check_deploy_flags_a_production_environment_that_turns_security_off():
    # The check above can fail: switching the secure defaults off is reported.
    result = _manage(
        "check", "--deploy", "--fail-level", "WARNING", SESSION_COOKIE_SECURE="false", SECURE_SSL_REDIRECT="false"
    )
    assert result.returncode != 0
    assert "security.W012" in result.stderr and "security.W008" in result.stderr


def test_collectstatic_builds_the_hashed_compressed_files_whitenoise_serves(tmp_path):
    result = _manage("collectstatic", "--noinput", STATIC_ROOT=str(tmp_path / "static"))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = tmp_path / "static" / "staticfiles.json"
    assert manifest.is_file()
    assert list((tmp_path / "static" / "admin" / "css").glob("base.*.css.gz"))
