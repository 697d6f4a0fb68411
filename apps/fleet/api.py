"""Management API for nodes (staff only) and the node registration endpoint (token only).

Plain reads are a ViewSet; launching and every action with side effects call apps.fleet.services.
"""

from __future__ import annotations

import logging
from typing import Any

import django_filters
from django.core.exceptions import ValidationError
from django.db import transaction
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.authentication import get_authorization_header
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from apps.core.api import Conflict
from apps.core.fields import StrictCharField
from apps.core.filters import StrictFilterSet
from apps.fleet import services
from apps.fleet.health import run_health_checks
from apps.fleet.models import LIVE_STATUSES, Launcher, Node, NodeStatus
from apps.fleet.placement import Placement
from apps.fleet.serializers import (
    NodeEventSerializer,
    NodeLaunchSerializer,
    NodeSerializer,
    RegistrationSerializer,
)
from apps.fleet.transitions import IllegalTransition
from apps.tenancy.permissions import IsStaff

log = logging.getLogger(__name__)


class NodeFilterSet(StrictFilterSet):
    model = django_filters.CharFilter(field_name="model__name")
    status = django_filters.MultipleChoiceFilter(choices=NodeStatus.choices)
    launcher = django_filters.ChoiceFilter(choices=Launcher.choices)
    cloud = django_filters.CharFilter()
    live = django_filters.BooleanFilter(method="filter_live")

    class Meta:
        model = Node
        fields = ["model", "status", "launcher", "cloud", "region", "accelerator"]

    def filter_live(self, queryset, name: str, value: bool):
        return queryset.filter(status__in=LIVE_STATUSES) if value else queryset.exclude(status__in=LIVE_STATUSES)


def _actor(request: Request) -> str:
    return f"staff:{getattr(request.user, 'username', request.user)}"


class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """GPU nodes. ``POST`` launches one; actions terminate, drain, relaunch and check health."""

    queryset = Node.objects.select_related("model", "launch_profile").order_by("-id")
    serializer_class = NodeSerializer
    permission_classes = [IsStaff]
    filterset_class = NodeFilterSet
    search_fields = ["cluster_name", "endpoint_url", "model__name"]
    ordering_fields = ["id", "status", "requested_at", "ready_at", "requests_waiting"]

    @extend_schema(request=NodeLaunchSerializer, responses={201: NodeSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = NodeLaunchSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        model = fields.pop("model")
        (node,) = services.node_request_launch(model=model, placement=Placement(**fields), actor=_actor(request))
        return Response(NodeSerializer(node).data, status=status.HTTP_201_CREATED)

    def _act(self, request: Request, fn, **kwargs: Any) -> Response:
        node = self.get_object()
        try:
            with transaction.atomic():
                result = fn(node=node, actor=_actor(request), **kwargs)
        except IllegalTransition as exc:
            raise Conflict(f"{exc}.") from exc
        except ValidationError as exc:
            raise Conflict(" ".join(exc.messages)) from exc
        return Response(NodeSerializer(result).data)

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"])
    def terminate(self, request: Request, pk: str | None = None) -> Response:
        """Tear the node down now (in-flight requests are cut; use drain to let them finish)."""
        return self._act(request, services.node_terminate)

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"], url_path="force-terminated")
    def force_terminated(self, request: Request, pk: str | None = None) -> Response:
        """A node stuck in terminating (or failed): mark it terminated now; its teardown keeps
        being retried until the launcher confirms the machine is gone."""
        return self._act(request, services.node_force_terminated)

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, pk: str | None = None) -> Response:
        """Stop routing to the node, wait for in-flight requests, then tear it down."""
        return self._act(request, services.node_drain)

    @extend_schema(request=None, responses={201: NodeSerializer})
    @action(detail=True, methods=["post"])
    def relaunch(self, request: Request, pk: str | None = None) -> Response:
        """Replace the node with a fresh one in the same placement; returns the new node."""
        response = self._act(request, services.node_relaunch)
        response.status_code = status.HTTP_201_CREATED
        return response

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"], url_path="check-health")
    def check_health(self, request: Request, pk: str | None = None) -> Response:
        """Check this node's /health and /metrics now and return the updated node."""
        node = self.get_object()
        run_health_checks([node.pk])
        node.refresh_from_db()
        return Response(NodeSerializer(node).data)

    @extend_schema(responses=NodeEventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str | None = None) -> Response:
        """The node's event log, newest first."""
        node = self.get_object()
        page = self.paginate_queryset(node.events.all())
        return self.get_paginated_response(NodeEventSerializer(page, many=True).data)


class RegistrationThrottle(SimpleRateThrottle):
    """NODE_REGISTRATION_RATE attempts per client address, counted in the shared cache. A cache
    that is down does not keep nodes from registering: the token check still guards the door."""

    scope = "node-register"

    def get_cache_key(self, request: Request, view: Any) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}

    def allow_request(self, request: Request, view: Any) -> bool:
        try:
            return super().allow_request(request, view)
        except Exception as exc:  # the cache (Redis) is unreachable
            log.warning("registration throttle skipped: cache unavailable (%s)", exc)
            return True


class NodeRegisterView(APIView):
    """Called by a node once vLLM answers /health. Authenticated by its one-time token only."""

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = [RegistrationThrottle]

    @extend_schema(
        request=RegistrationSerializer,
        responses={
            200: inline_serializer(
                "NodeRegistered",
                {
                    "node": serializers.IntegerField(),
                    "cluster_name": StrictCharField(allow_null=True),
                    "status": serializers.ChoiceField(choices=NodeStatus.choices),
                },
            )
        },
    )
    def post(self, request: Request) -> Response:
        data = RegistrationSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        token = fields.pop("token") or _bearer(request)
        try:
            node = services.node_register(token=token, **fields)
        except services.RegistrationError as exc:
            error_type = "authentication_error" if exc.status == 401 else "conflict"
            return Response({"error": {"message": exc.message, "type": error_type}}, status=exc.status)
        return Response({"node": node.pk, "cluster_name": node.cluster_name, "status": node.status})


def _bearer(request: Request) -> str:
    parts = get_authorization_header(request).decode("latin-1").split()
    return parts[1] if len(parts) == 2 and parts[0] == "Bearer" else ""
