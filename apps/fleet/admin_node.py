"""The node page's buttons (drain, terminate, relaunch, force terminated, check health) and its
log tail. Destructive actions open a confirmation page first (apps.core.admin_confirm); each
button calls the same service as the change list's bulk action."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse

from apps.core.admin_confirm import actor, object_action_view
from apps.fleet import services
from apps.fleet.health import run_health_checks
from apps.fleet.launchers import get_launcher
from apps.fleet.models import HEALTH_CHECKED_STATUSES, LIVE_STATUSES, Node, NodeStatus
from apps.fleet.transitions import IllegalTransition


@dataclass(frozen=True)
class NodeAction:
    name: str
    label: str
    statuses: frozenset[str]
    question: str
    submit_label: str
    service: Callable[..., Node]


NODE_ACTIONS = {
    a.name: a
    for a in (
        NodeAction(
            "drain",
            "Drain…",
            frozenset({NodeStatus.READY, NodeStatus.UNHEALTHY}),
            "Drain {obj}? It takes no new requests, finishes the ones in flight, then is terminated.",
            "Yes, drain",
            services.node_drain,
        ),
        NodeAction(
            "terminate",
            "Terminate…",
            LIVE_STATUSES,
            "Terminate {obj} now? Requests in flight on it fail, and its machine is torn down.",
            "Yes, terminate",
            services.node_terminate,
        ),
        NodeAction(
            "relaunch",
            "Relaunch…",
            frozenset(NodeStatus.values),
            "Replace {obj} with a fresh node in the same placement? This one is torn down if it still runs.",
            "Yes, relaunch",
            services.node_relaunch,
        ),
        NodeAction(
            "force_terminated",
            "Force terminated…",
            frozenset({NodeStatus.TERMINATING, NodeStatus.FAILED}),
            "Mark {obj} terminated now? Its teardown keeps being retried in the background until confirmed.",
            "Yes, mark terminated",
            services.node_force_terminated,
        ),
    )
}


class NodePageMixin:
    """Mixed into NodeAdmin (a ModelAdmin): URLs, buttons and views of one node's page."""

    def node_page_urls(self) -> list:
        model_admin = self._model_admin()
        wrap = model_admin.admin_site.admin_view
        return [
            path("<path:object_id>/do/<str:action>/", wrap(self.node_action_view), name="fleet_node_action"),
            path("<path:object_id>/check-health/", wrap(self.node_check_health_view), name="fleet_node_check_health"),
            path("<path:object_id>/log/", wrap(self.node_log_view), name="fleet_node_log"),
        ]

    def _model_admin(self) -> admin.ModelAdmin:
        assert isinstance(self, admin.ModelAdmin)
        return self

    def node_buttons(self, request: HttpRequest, node: Node) -> dict[str, object]:
        model_admin = self._model_admin()
        if not model_admin.has_change_permission(request, node):
            return {"object_actions": [], "can_check_health": False}
        buttons = [
            {"name": a.name, "label": a.label, "url": reverse("admin:fleet_node_action", args=[node.pk, a.name])}
            for a in NODE_ACTIONS.values()
            if node.status in a.statuses
        ]
        return {
            "object_actions": buttons,
            "can_check_health": node.status in HEALTH_CHECKED_STATUSES and bool(node.endpoint_url),
            "check_health_url": reverse("admin:fleet_node_check_health", args=[node.pk]),
        }

    def node_action_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        chosen = NODE_ACTIONS.get(action)
        if chosen is None:
            raise Http404("No such node action.")
        return object_action_view(
            self._model_admin(),
            request,
            object_id,
            applies=lambda node: node.status in chosen.statuses,
            title=f"{chosen.label.rstrip('…')} node",
            question=chosen.question,
            submit_label=chosen.submit_label,
            run=lambda node, reason: chosen.service(node=node, actor=actor(request), reason=reason),
            done=f"{chosen.label.rstrip('…')}: done for {{obj}}.",
            reason_required=False,
            refused=(IllegalTransition, ValidationError),
            reason_names_actor=False,
        )

    def node_check_health_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        model_admin = self._model_admin()
        node = model_admin.get_object(request, object_id)
        if node is None:
            raise Http404("No such node.")
        if not model_admin.has_change_permission(request, node):
            raise PermissionDenied
        change_url = reverse("admin:fleet_node_change", args=[node.pk])
        if request.method != "POST":  # a check writes (status, counters): only from the page's form
            return HttpResponseRedirect(change_url)
        summary = run_health_checks([node.pk])
        if not summary.checked:
            model_admin.message_user(
                request, f"{node} is {node.status} or has no endpoint yet: nothing to check.", messages.WARNING
            )
        else:
            changes = "; ".join(summary.transitions) or "no status change"
            verdict = "healthy" if summary.healthy else "not healthy"
            model_admin.message_user(request, f"Checked {node} in {summary.seconds:.1f}s: {verdict}; {changes}.")
        return HttpResponseRedirect(change_url)

    def node_log_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        model_admin = self._model_admin()
        node = model_admin.get_object(request, object_id)
        if node is None:
            raise Http404("No such node.")
        if not model_admin.has_view_or_change_permission(request, node):
            raise PermissionDenied
        text = get_launcher(node.launcher).log_tail(node)
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        response["Cache-Control"] = "no-store"
        return response
