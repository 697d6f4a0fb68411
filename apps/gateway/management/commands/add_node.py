"""``manage.py add_node``: register a vLLM server that already runs (on-prem, or the simulator) as
a ``static`` node, probe its /health once (and /v1/models, to check the key and the served model
name the gateway will use), and mark it ready or failed."""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

import httpx
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import URLValidator
from django.utils import timezone

from apps.catalog.models import Model
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import IllegalTransition, node_create, node_transition

ACTOR = "add_node"


def probe_health(endpoint: str, *, timeout_s: float) -> tuple[bool, str, float]:
    """One GET {endpoint}/health: (healthy, reason when not, latency in ms)."""
    started = time.perf_counter()
    try:
        response = httpx.get(endpoint + "/health", timeout=timeout_s, follow_redirects=False)
    except httpx.TimeoutException:
        return False, f"health probe timed out after {timeout_s:g}s", (time.perf_counter() - started) * 1000
    except httpx.HTTPError as exc:
        return False, f"health probe failed: {type(exc).__name__}: {exc}", (time.perf_counter() - started) * 1000
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return False, f"health probe answered HTTP {response.status_code}", latency_ms
    return True, "", latency_ms


def probe_models(endpoint: str, *, served_name: str, api_key: str | None, timeout_s: float) -> str:
    """GET {endpoint}/v1/models as the gateway will call it: "" when it serves ``served_name``, else why not."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(endpoint + "/v1/models", headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return f"GET /v1/models failed: {type(exc).__name__}: {exc}"
    if response.status_code == 401:
        return "the server refused the API key" if api_key else "the server requires an API key (--api-key)"
    if response.status_code != 200:
        return f"GET /v1/models answered HTTP {response.status_code}"
    try:
        served = [card["id"] for card in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return "GET /v1/models did not answer a model list"
    if served_name not in served:
        return f"the server serves {', '.join(served) or 'no model'}, not {served_name}"
    return ""


def _endpoint(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]  # the gateway appends /v1/...; accept the SDK-style base URL too
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise CommandError(f"--endpoint {raw!r} is not an http(s) URL, e.g. http://10.0.0.5:8000") from None
    return url


class Command(BaseCommand):
    help = ("Register an existing vLLM server (or the simulator) as a static node: probes /health once and "
            "marks the node ready, or failed with the reason (non-zero exit).")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="The catalog model's served name.")
        parser.add_argument("--endpoint", required=True, help="Base URL of the vLLM server, e.g. http://10.0.0.5:8000")
        parser.add_argument("--api-key", default=None,
                            help="The key the server was started with (vllm --api-key); kept for the gateway.")
        parser.add_argument("--timeout", type=float, default=5.0, help="Health probe timeout in seconds.")

    def handle(self, *args: Any, **opts: Any) -> None:
        endpoint = _endpoint(str(opts["endpoint"]))
        timeout_s = float(opts["timeout"])
        if timeout_s <= 0:
            raise CommandError("--timeout must be positive.")
        try:
            model = Model.objects.get(name=opts["model"])
        except Model.DoesNotExist:
            raise CommandError(f"Unknown model {opts['model']!r}: add it to the catalog first.") from None
        api_key = opts["api_key"] or None
        try:
            node = node_create(model=model, launcher="static", endpoint_url=endpoint, actor=ACTOR)
        except ValidationError as exc:
            raise CommandError(f"Cannot register the node: {'; '.join(exc.messages)}") from None
        self.stdout.write(f"node {node.pk} ({node}) registered for {model.name} at {endpoint}; probing /health")

        healthy, reason, latency_ms = probe_health(endpoint, timeout_s=timeout_s)
        if healthy:
            # The gateway sends the catalog name with this key: check both work before routing to it.
            reason = probe_models(endpoint, served_name=model.name, api_key=api_key, timeout_s=timeout_s)
            healthy = not reason
        fields: dict[str, object] = {"last_health_at": timezone.now(), "health_latency_ms": round(latency_ms, 2)}
        try:
            if healthy:
                state = dict(node.launcher_state)
                if api_key:
                    state[SEALED_STATIC_KEY] = seal_static_key(api_key)
                node_transition(node=node, to=NodeStatus.READY, reason="health probe succeeded", actor=ACTOR,
                                expected_from=NodeStatus.PENDING, launcher_state=state, **fields)
            else:
                node_transition(node=node, to=NodeStatus.FAILED, reason=reason, actor=ACTOR,
                                expected_from=NodeStatus.PENDING, consecutive_failures=1, **fields)
        except IllegalTransition as exc:
            current = Node.objects.filter(pk=node.pk).values_list("status", flat=True).first()
            raise CommandError(f"node {node.pk} changed under us (now {current}): {exc}") from None
        if not healthy:
            raise CommandError(f"node {node.pk} failed: {reason}")
        self.stdout.write(self.style.SUCCESS(f"node {node.pk} is ready ({latency_ms:.0f} ms)"))
