"""Settings come from the environment; a bad value stops the process at start with a clear message.

Each case starts a fresh Python process (settings are read once per process) with a clean
environment: no .env file, only the variables under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a Python subprocess per settings case

ROOT = Path(__file__).resolve().parent.parent

SETUP = "import django; django.setup()"
DUMP = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'DEBUG': s.DEBUG, 'ENGINE': s.DATABASES['default']['ENGINE'], "
    "'OPTIONS': s.DATABASES['default'].get('OPTIONS', {}), 'BROKER': s.CELERY_BROKER_URL, "
    "'SSL_REDIRECT': s.SECURE_SSL_REDIRECT, 'SESSION_COOKIE_SECURE': s.SESSION_COOKIE_SECURE, "
    "'CSRF_COOKIE_SECURE': s.CSRF_COOKIE_SECURE, 'HSTS': s.SECURE_HSTS_SECONDS, "
    "'PROXY_SSL_HEADER': getattr(s, 'SECURE_PROXY_SSL_HEADER', None), "
    "'STATIC_BACKEND': s.STORAGES['staticfiles']['BACKEND'], 'ALLOWED_HOSTS': s.ALLOWED_HOSTS}))"
)

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "x" * 50,
    "API_KEY_PEPPER": "p" * 32,
    "ALLOWED_HOSTS": "api.example.com",
    "DATABASE_URL": "postgres://crosslogic:secret@db.internal:5432/crosslogic",
    "REDIS_URL": "redis://redis.internal:6379/0",
}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "CROSSLOGIC_ENV_FILE": "",  # a developer's .env must not leak into these cases
    }
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def _fails_naming(result: subprocess.CompletedProcess, name: str) -> str:
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured:"), result.stderr
    assert name in last
    return last


def test_development_defaults_need_no_environment():
    result = _python(DUMP)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["DEBUG"] is True
    assert values["ENGINE"] == "django.db.backends.sqlite3"
    assert values["BROKER"].startswith("filesystem://")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    code = (
        "import django; django.setup(); from django.db import connection; c = connection.cursor(); "
        "c.execute('PRAGMA journal_mode'); print(c.fetchone()[0]); c.execute('PRAGMA busy_timeout'); "
        "print(c.fetchone()[0])"
    )
    result = _python(code, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["wal", "20000"]


def test_redis_url_makes_redis_the_celery_broker():
    result = _python(DUMP, REDIS_URL="redis://127.0.0.1:6379/3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["BROKER"] == "redis://127.0.0.1:6379/3"


def test_production_environment_turns_on_the_security_settings():
    result = _python(DUMP, **PRODUCTION)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["DEBUG"] is False
    assert values["ENGINE"] == "django.db.backends.postgresql"
    assert values["BROKER"] == PRODUCTION["REDIS_URL"]
    assert values["SSL_REDIRECT"] and values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["HSTS"] >= 31536000
    assert values["PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["STATIC_BACKEND"] == "whitenoise.storage.CompressedManifestStaticFilesStorage"
    assert values["ALLOWED_HOSTS"] == ["api.example.com"]


def test_missing_secret_key_with_debug_off_fails_naming_it():
    env = {k: v for k, v in PRODUCTION.items() if k != "SECRET_KEY"}
    _fails_naming(_python(SETUP, **env), "SECRET_KEY")


def test_short_or_development_secret_key_with_debug_off_fails():
    _fails_naming(_python(SETUP, **{**PRODUCTION, "SECRET_KEY": "too-short"}), "SECRET_KEY")
    dev_secret = "dev-insecure-secret-key-change-me-0123456789abcdef"
    _fails_naming(_python(SETUP, **{**PRODUCTION, "SECRET_KEY": dev_secret}), "SECRET_KEY")


def test_missing_api_key_pepper_with_debug_off_fails_naming_it():
    env = {k: v for k, v in PRODUCTION.items() if k != "API_KEY_PEPPER"}
    _fails_naming(_python(SETUP, **env), "API_KEY_PEPPER")


def test_missing_allowed_hosts_with_debug_off_fails_naming_it():
    env = {k: v for k, v in PRODUCTION.items() if k != "ALLOWED_HOSTS"}
    _fails_naming(_python(SETUP, **env), "ALLOWED_HOSTS")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mongodb://db.internal/crosslogic"),
        ("DATABASE_URL", "db.internal"),
        ("DATABASE_URL", "postgres://db.internal:notaport/crosslogic"),
        ("DATABASE_URL", "postgres://db.internal:5432/"),
        ("REDIS_URL", "http://redis.internal:6379/0"),
        ("DB_CONN_MAX_AGE", "sixty"),
        ("SECURE_HSTS_SECONDS", "1y"),
        ("API_KEY_LAST_USED_RESOLUTION_S", "1.5"),
        ("DEBUG", "maybe"),
        ("SESSION_COOKIE_SECURE", "treu"),
        ("FLEET_DEFAULT_LAUNCHER", "kubernetes"),
        ("LOG_LEVEL", "LOUD"),
        ("NODE_REGISTRATION_RATE", "30 per minute"),
        ("TRUSTED_PROXY_COUNT", "-1"),
        ("FLEET_SKY_STATUS_TIMEOUT_S", "0"),
        ("FLEET_CLUSTER_PREFIX", "9lives"),  # SkyPilot cluster names start with a letter
        ("FLEET_CLUSTER_PREFIX", "cross logic"),
        ("FLEET_CLUSTER_PREFIX", "crosslogic/prod"),
        ("SKYPILOT_USER_ID", "-fleet"),
        ("SKYPILOT_SERVICE_ACCOUNT_TOKEN", "not-a-sky-token"),
        ("SKYPILOT_API_SERVER_ENDPOINT", "skypilot.internal:46580"),
        ("FLEET_RELAUNCH_MAX_FAILURES", "0"),
    ],
)
def test_invalid_value_fails_at_start_naming_the_setting(name, value):
    _fails_naming(_python(SETUP, **{name: value}), name)


def test_a_skypilot_endpoint_in_production_needs_a_pinned_identity():
    env = {**PRODUCTION, "SKYPILOT_API_SERVER_ENDPOINT": "https://skypilot.internal"}
    _fails_naming(_python(SETUP, **env), "SKYPILOT_SERVICE_ACCOUNT_TOKEN")
    assert _python(SETUP, **env, SKYPILOT_SERVICE_ACCOUNT_TOKEN="sky_abc").returncode == 0


def test_env_file_supplies_values_the_environment_does_not(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("REDIS_URL=redis://127.0.0.1:6379/4\nLOG_LEVEL=nonsense\n")
    result = _python(DUMP, CROSSLOGIC_ENV_FILE=str(env_file), LOG_LEVEL="WARNING")
    assert result.returncode == 0, result.stderr  # the real environment wins over the file
    assert json.loads(result.stdout)["BROKER"] == "redis://127.0.0.1:6379/4"
