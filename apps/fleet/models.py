from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import models
from django.utils import timezone


class Launcher(models.TextChoices):
    SKYPILOT = "skypilot", "SkyPilot"
    LOCAL = "local", "Local process"
    STATIC = "static", "Static endpoint"


class NodeStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PROVISIONING = "provisioning", "Provisioning"
    LOADING = "loading", "Loading weights"
    READY = "ready", "Ready"
    UNHEALTHY = "unhealthy", "Unhealthy"
    DRAINING = "draining", "Draining"
    STOPPING = "stopping", "Stopping (warm pool)"
    STOPPED = "stopped", "Stopped (warm pool)"
    TERMINATING = "terminating", "Terminating"
    TERMINATED = "terminated", "Terminated"
    FAILED = "failed", "Failed"


S = NodeStatus
# The node state machine. Anything not listed here is refused by node_transition().
TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.LOADING, S.READY, S.TERMINATING, S.TERMINATED, S.FAILED}),
    S.PROVISIONING: frozenset({S.LOADING, S.READY, S.TERMINATING, S.FAILED}),
    S.LOADING: frozenset({S.READY, S.UNHEALTHY, S.TERMINATING, S.FAILED}),
    S.READY: frozenset({S.UNHEALTHY, S.DRAINING, S.TERMINATING, S.FAILED}),
    S.UNHEALTHY: frozenset({S.READY, S.DRAINING, S.TERMINATING, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING, S.TERMINATING, S.FAILED}),
    # The warm pool: a drained node's machine is stopped (its disk kept) instead of torn down, and a
    # later scale-up restarts it: SkyPilot relaunches onto the stopped cluster (→ provisioning, the
    # node registers again); a paused local process resumes as it was (→ loading, then the health
    # check). A stopped node whose machine vanished is terminated; one kept past WARM_POOL_TTL_S is
    # torn down.
    S.STOPPING: frozenset({S.STOPPED, S.TERMINATING, S.FAILED}),
    S.STOPPED: frozenset({S.PROVISIONING, S.LOADING, S.TERMINATING, S.TERMINATED, S.FAILED}),
    S.TERMINATING: frozenset({S.TERMINATED, S.FAILED}),
    S.FAILED: frozenset({S.TERMINATING, S.TERMINATED}),
    S.TERMINATED: frozenset(),
}
# Nodes that occupy (or will occupy) a GPU machine: what max_replicas bounds.
LIVE_STATUSES = frozenset({S.PENDING, S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY, S.DRAINING, S.STOPPING})
# Nodes whose machine exists but is stopped or stopping: no GPU billed, their disk is.
WARM_STATUSES = frozenset({S.STOPPING, S.STOPPED})
HEALTH_CHECKED_STATUSES = frozenset({S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY})


class LaunchProfile(models.Model):
    """Where a SkyPilot node may run: an ordered failover list of placements (first = preferred).

    ``placements`` is ``[{"cloud": "aws", "region": "us-east-1"}, {"cloud": "gcp"}, …]``; SkyPilot
    tries them in order (``resources.ordered``) and reports every failed attempt.
    """

    name = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    placements = models.JSONField(default=list, help_text='Ordered: [{"cloud": "aws", "region": "us-east-1"}, …]')
    accelerator = models.CharField(max_length=32, blank=True, help_text="Overrides the model's; e.g. L4:1.")
    use_spot = models.BooleanField("spot", default=True)
    disk_size_gb = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: derived from model size.")
    is_active = models.BooleanField("active", default=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        allowed = {"cloud", "region", "zone"}
        if not isinstance(self.placements, list) or not self.placements:
            raise ValidationError({"placements": 'Give at least one placement, e.g. [{"cloud": "aws"}].'})
        for i, placement in enumerate(self.placements):
            if not isinstance(placement, dict) or not placement.get("cloud"):
                raise ValidationError({"placements": f"Placement {i + 1} needs a cloud."})
            unknown = set(placement) - allowed
            if unknown or not all(isinstance(v, str) for v in placement.values()):
                raise ValidationError({"placements": f"Placement {i + 1}: only string cloud/region/zone."})


class Node(models.Model):
    model = models.ForeignKey("catalog.ServedModel", on_delete=models.PROTECT, related_name="nodes")
    launch_profile = models.ForeignKey(
        LaunchProfile,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="nodes",
        help_text="Ordered cloud/region failover list (SkyPilot only); overrides cloud/region.",
    )
    launcher = models.CharField(max_length=16, choices=Launcher.choices, default=Launcher.SKYPILOT)
    cloud = models.CharField(max_length=32, blank=True)
    region = models.CharField(max_length=64, blank=True)
    accelerator = models.CharField(max_length=32, blank=True)
    use_spot = models.BooleanField("spot", default=True)
    hourly_cost = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal("0"))
    # Derived from the id once saved, so a retried launch can never create a second cluster.
    cluster_name = models.CharField(max_length=64, unique=True, null=True, blank=True, editable=False)
    endpoint_url = models.URLField(max_length=300, blank=True)
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.PENDING)
    status_reason = models.TextField(blank=True)
    status_changed_at = models.DateTimeField(default=timezone.now, help_text="When the status last changed.")
    # Kept after use (registered_at is set) so a replayed token is told apart from a wrong one.
    registration_token_digest = models.CharField(max_length=64, blank=True, editable=False, db_index=True)
    registered_at = models.DateTimeField(null=True, blank=True)
    launcher_state = models.JSONField(
        default=dict, blank=True, help_text="Backend bookkeeping: SkyPilot request ids, local pid."
    )

    requested_at = models.DateTimeField(default=timezone.now)
    provisioned_at = models.DateTimeField(null=True, blank=True)
    weights_loaded_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    terminated_at = models.DateTimeField(null=True, blank=True)
    # Warm pool: when the machine was last stopped, when its last restart was asked for (its ready_at
    # then measures the warm start), how often it was restarted, and what it costs while stopped
    # (its disk: WARM_POOL_DISK_USD_PER_GB_MONTH times its size), for the economics.
    stopped_at = models.DateTimeField(null=True, blank=True)
    restart_requested_at = models.DateTimeField(null=True, blank=True)
    warm_starts = models.PositiveIntegerField(default=0)
    stopped_hourly_cost = models.DecimalField(
        max_digits=10, decimal_places=4, default=Decimal("0"), help_text="USD per hour while stopped (disk)."
    )

    last_health_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    health_latency_ms = models.FloatField(null=True, blank=True)
    requests_running = models.PositiveIntegerField(default=0)
    requests_waiting = models.PositiveIntegerField(default=0)
    kv_cache_usage = models.FloatField(null=True, blank=True, help_text="0..1")

    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["model", "status"]),
            models.Index(fields=["status"]),
            models.Index(fields=["launcher"]),
            models.Index(fields=["cloud"]),
        ]

    def __str__(self) -> str:
        return self.cluster_name or f"node-{self.pk}"

    @property
    def launch_started_at(self) -> datetime:
        """When the current launch began: the first launch, or the last warm restart."""
        return self.restart_requested_at or self.requested_at

    @property
    def cold_start_seconds(self) -> float | None:
        if self.ready_at is None or self.restart_requested_at is not None:
            return None
        return (self.ready_at - self.requested_at).total_seconds()

    @property
    def warm_start_seconds(self) -> float | None:
        if self.ready_at is None or self.restart_requested_at is None or self.ready_at < self.restart_requested_at:
            return None
        return (self.ready_at - self.restart_requested_at).total_seconds()


class NodeEvent(models.Model):
    """Append-only log of every transition, action and error on a node."""

    class Kind(models.TextChoices):
        TRANSITION = "transition", "Transition"
        ACTION = "action", "Action"
        ERROR = "error", "Error"
        INFO = "info", "Info"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.TRANSITION)
    from_status = models.CharField(max_length=16, choices=NodeStatus.choices, blank=True)
    to_status = models.CharField(max_length=16, choices=NodeStatus.choices, blank=True)
    message = models.TextField(blank=True)
    actor = models.CharField(max_length=150, default="system")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["node", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.node}: {self.from_status}→{self.to_status} {self.message[:40]}"


class ModelScale(models.Model):
    """The autoscaler's state for one model: what it wants (desired), what there is, why, and the
    hysteresis it carries from one run to the next. Written only by apps.fleet.autoscale."""

    model = models.OneToOneField("catalog.ServedModel", on_delete=models.CASCADE, related_name="scale")
    desired = models.PositiveSmallIntegerField(default=0)
    ready = models.PositiveSmallIntegerField(default=0, help_text="Ready nodes at the last decision.")
    starting = models.PositiveSmallIntegerField(default=0, help_text="Pending/provisioning/loading nodes.")
    stopped = models.PositiveSmallIntegerField(default=0, help_text="Warm pool: stopped nodes.")
    reason = models.TextField(blank=True)
    inputs = models.JSONField(default=dict, blank=True, help_text="What the last decision saw.")
    decided_at = models.DateTimeField(null=True, blank=True)
    changed_at = models.DateTimeField(null=True, blank=True, help_text="When desired last changed.")
    # Hysteresis: since when demand has wanted more (or fewer) nodes than desired, and the most it
    # wanted meanwhile (a scale-down goes to the peak of its window, not to the last sample).
    above_since = models.DateTimeField(null=True, blank=True)
    below_since = models.DateTimeField(null=True, blank=True)
    below_peak = models.PositiveSmallIntegerField(default=0)
    last_busy_at = models.DateTimeField(null=True, blank=True, help_text="Last time any request was seen.")
    # Recent demand samples [[unix_ts, demand], …] for the trend that launches ahead of a cold start.
    samples = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "model scale"

    def __str__(self) -> str:
        return f"{self.model_id}: desired {self.desired}"


class ScaleDecision(models.Model):
    """Append-only: each change of a model's desired replicas, with the inputs that made it."""

    model = models.ForeignKey("catalog.ServedModel", on_delete=models.CASCADE, related_name="scale_decisions")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    previous = models.PositiveSmallIntegerField()
    desired = models.PositiveSmallIntegerField()
    reason = models.TextField()
    inputs = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["model", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.model_id}: {self.previous} → {self.desired}"
