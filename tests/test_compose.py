"""docker-compose.yml, the Dockerfile and .env.example describe one consistent production setup.

No Docker engine runs here, so the files are read and cross-checked: the topology, health checks,
start order, volumes, the commands (against what is installed), and that every variable used or
setting read is documented in .env.example.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
APP_SERVICES = ("migrate", "web", "worker", "beat")

# `NAME=value` or a commented default `# NAME=value`.
DOCUMENTED = set(re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, flags=re.MULTILINE))


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command if isinstance(command, list) else command.split()


def _volume(spec: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; an interpolated host path counts as a bind mount."""
    source, target = re.sub(r"\$\{[^}]*\}", "/host-path", spec).split(":")[:2]
    return source, target


def _settings_read_from_environment() -> set[str]:
    """Every name crosslogic/settings.py reads through env(...), env.<cast>(...) or _env_or_fail(...)."""
    tree = ast.parse((ROOT / "crosslogic" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        is_env = (isinstance(func, ast.Name) and func.id in {"env", "_env_or_fail"}) or (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "env"
        )
        first = node.args[0]
        if is_env and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value)
    return names


def test_the_production_topology_is_complete():
    assert set(SERVICES) == {"postgres", "redis", "migrate", "web", "proxy", "worker", "beat", "skypilot"}
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name


def test_application_services_share_one_image_built_here_and_read_env_file():
    for name in APP_SERVICES:
        service = SERVICES[name]
        assert service["build"] == ".", name
        assert service["image"] == SERVICES["web"]["image"], name
        assert service["env_file"] == ".env", name
        assert "DATABASE_URL" in service["environment"] and "REDIS_URL" in service["environment"], name


@pytest.mark.parametrize(
    ("service", "probe"),
    [
        ("postgres", "pg_isready"),
        ("redis", "redis-cli"),
        ("web", "/health"),
        ("worker", "inspect ping"),
        ("skypilot", "/api/health"),
        ("proxy", "/health"),
    ],
)
def test_long_running_services_have_health_checks(service, probe):
    healthcheck = SERVICES[service]["healthcheck"]
    assert not healthcheck.get("disable")
    assert probe in " ".join(healthcheck["test"])
    assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}


def test_start_order_waits_on_health_and_on_the_migration():
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in SERVICES.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            assert condition in allowed, (name, condition)
            if condition == "service_healthy":
                assert not SERVICES[dependency].get("healthcheck", {}).get("disable"), (name, dependency)
            if condition == "service_completed_successfully":
                assert SERVICES[dependency].get("restart") == "no", dependency  # a one-shot job
    for name in ("web", "worker", "beat"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert _command("migrate")[-2:] == ["migrate", "--noinput"]


def test_no_dependency_cycle():
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle: {' -> '.join((*path, name))}"
        for dependency in SERVICES[name].get("depends_on") or {}:
            visit(dependency, (*path, name))

    for name in SERVICES:
        visit(name, ())


def test_web_runs_the_asgi_application_under_gunicorn_with_uvicorn_workers():
    command = _command("web")
    assert command[0] == "gunicorn"
    assert "crosslogic.asgi:application" in command
    worker_class = command[command.index("--worker-class") + 1]
    module, _, cls = worker_class.rpartition(".")
    worker = getattr(importlib.import_module(module), cls)
    import uvicorn_worker

    from crosslogic.server import GuardedHttpToolsProtocol

    # gunicorn's --limit-request-* never reach uvicorn's parser: the worker must bring the edge limits.
    assert issubclass(worker, uvicorn_worker.UvicornWorker)
    assert worker.CONFIG_KWARGS["http"] is GuardedHttpToolsProtocol
    assert "0.0.0.0:8000" in command
    assert "ports" not in SERVICES["web"]  # reachable only through the proxy
    assert SERVICES["web"]["expose"] == ["8000"]


def test_the_proxy_terminates_tls_in_front_of_web_with_the_repository_config():
    proxy = SERVICES["proxy"]
    assert re.fullmatch(r"\$\{NGINX_IMAGE:-nginx:1\.\d+(-alpine)?\}", proxy["image"])
    mounts = dict(_volume(volume)[::-1] for volume in proxy["volumes"])
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/nginx.conf"
    assert (ROOT / "deploy" / "nginx.conf").is_file()
    assert "/etc/nginx/tls" in mounts
    assert any(port.endswith(":443") for port in proxy["ports"])
    assert proxy["depends_on"] == {"web": {"condition": "service_healthy"}}
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server web:8000;" in conf and "/etc/nginx/tls/fullchain.pem" in conf
    # Django trusts exactly one proxy's X-Forwarded-For, and nginx overwrites (not appends) it.
    assert SERVICES["web"]["environment"]["TRUSTED_PROXY_COUNT"] == "${TRUSTED_PROXY_COUNT:-1}"
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf


def test_worker_and_beat_run_the_project_celery_app_with_the_database_scheduler():
    worker, beat = _command("worker"), _command("beat")
    assert worker[:4] == ["celery", "-A", "crosslogic", "worker"]
    assert beat[:4] == ["celery", "-A", "crosslogic", "beat"]
    scheduler = beat[beat.index("--scheduler") + 1]
    module, _, cls = scheduler.partition(":")
    assert getattr(importlib.import_module(module), cls)
    assert SERVICES["beat"]["healthcheck"] == {"disable": True}  # no port to probe; one instance


def test_skypilot_api_server_matches_the_client_and_keeps_its_state():
    service = SERVICES["skypilot"]
    image = service["image"]
    default_image = re.fullmatch(r"\$\{SKYPILOT_IMAGE:-(.+)\}", image).group(1)
    repository, _, tag = default_image.partition(":")
    assert repository == "berkeleyskypilot/skypilot"
    assert tag == importlib.metadata.version("skypilot")  # API server and SDK speak one version
    assert service["command"] == ["sky", "api", "start", "--deploy", "--foreground"]
    targets = [_volume(volume)[1] for volume in service["volumes"]]
    assert "/root/.sky" in targets and "/root/.aws" in targets
    # The dashboard is published on loopback only; the control plane reaches it on the compose network.
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert SERVICES["web"]["environment"]["SKYPILOT_API_SERVER_ENDPOINT"].endswith("http://skypilot:46580}")


def test_named_volumes_are_declared_and_used():
    used = set()
    for service in SERVICES.values():
        for volume in service.get("volumes") or []:
            source = _volume(volume)[0]
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used == set(COMPOSE["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]


def test_every_variable_compose_uses_is_documented_in_env_example():
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_TEXT))
    assert used, "the pattern must find the variables"
    assert used - DOCUMENTED == set()


def test_every_setting_is_documented_in_env_example():
    read = _settings_read_from_environment()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= read  # the parser finds them
    assert read - DOCUMENTED == set()


def test_no_secret_is_hard_coded_in_compose():
    secretish = re.compile(r"PASSWORD|SECRET|PEPPER|TOKEN|ACCESS_KEY")
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)), (name, key, value)
    # Connection URLs carry the password only through interpolation.
    for url in re.findall(r"postgres://[^\s\"']+", COMPOSE_TEXT):
        assert "${POSTGRES_PASSWORD}" in url


@pytest.mark.slow  # starts a Python subprocess
def test_env_example_is_a_valid_production_configuration(tmp_path):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "CROSSLOGIC_ENV_FILE": str(ROOT / ".env.example"),
        # What an operator fills in; everything else comes from the example file.
        "SECRET_KEY": "operator-chosen-secret-key-0123456789-abcdefghij",
        "API_KEY_PEPPER": "operator-chosen-pepper-0123",
        "DATABASE_URL": "postgres://crosslogic:pw@postgres:5432/crosslogic",
    }
    code = "import django; django.setup(); from django.conf import settings as s; print(s.DEBUG, s.ALLOWED_HOSTS)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False ['crosslogic.example.com']"


def test_dockerfile_builds_a_non_root_python_311_image_from_the_pinned_requirements():
    lines = [line.strip() for line in DOCKERFILE.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert any(line.startswith("COPY requirements.txt constraints.txt") for line in lines)
    assert "pip install -r requirements.txt -c constraints.txt" in DOCKERFILE
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    last_run = max(i for i, line in enumerate(lines) if line.startswith("RUN "))
    last_user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert last_user > last_run  # nothing runs as root after the switch
    assert "collectstatic --noinput" in DOCKERFILE
    assert "HEALTHCHECK" in DOCKERFILE and "/health" in DOCKERFILE
    assert "crosslogic.asgi:application" in DOCKERFILE and "crosslogic.server.UvicornWorker" in DOCKERFILE


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".venv", ".git", "var"} <= ignored
