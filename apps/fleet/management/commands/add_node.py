"""``manage.py add_node``: register a vLLM server that already runs (on-prem, or the simulator) as a
``static`` node; one probe marks it ready or failed (apps.fleet.static_nodes.static_node_add)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.catalog.models import ServedModel
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import IllegalTransition
from apps.fleet.static_nodes import static_node_add


class Command(BaseCommand):
    help = (
        "Register an existing vLLM server (or the simulator) as a static node: probes /health once and "
        "marks the node ready, or failed with the reason (non-zero exit)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="The catalog model's served name.")
        parser.add_argument("--endpoint", required=True, help="Base URL of the vLLM server, e.g. http://10.0.0.5:8000")
        parser.add_argument(
            "--api-key",
            default=None,
            help="The key the server was started with (vllm --api-key); kept for the gateway.",
        )
        parser.add_argument("--timeout", type=float, default=5.0, help="Health probe timeout in seconds.")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            model = ServedModel.objects.get(name=opts["model"])
        except ServedModel.DoesNotExist:
            raise CommandError(f"Unknown model {opts['model']!r}: add it to the catalog first.") from None
        try:
            node = static_node_add(
                model=model,
                endpoint_url=str(opts["endpoint"]),
                api_key=opts["api_key"] or None,
                timeout_s=float(opts["timeout"]),
            )
        except ValidationError as exc:
            raise CommandError(f"Cannot register the node: {'; '.join(exc.messages)}") from None
        except IllegalTransition as exc:
            current = Node.objects.filter(pk=exc.node.pk).values_list("status", flat=True).first()
            raise CommandError(f"node {exc.node.pk} changed under us (now {current}): {exc}") from None
        self.stdout.write(f"node {node.pk} ({node}) registered for {model.name} at {node.endpoint_url}")
        if node.status != NodeStatus.READY:
            raise CommandError(f"node {node.pk} failed: {node.status_reason}")
        self.stdout.write(self.style.SUCCESS(f"node {node.pk} is ready ({node.health_latency_ms or 0:.0f} ms)"))
