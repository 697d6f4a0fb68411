from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

served_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$",
    "Use letters, digits and . _ : / - (starting with a letter or digit), at most 128 characters.",
)
storage_uri_validator = RegexValidator(
    r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$",
    "Use s3://bucket/prefix with a valid bucket name.",
)

accelerator_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_-]*(:[1-9][0-9]?)?$",
    "Use SkyPilot syntax: an accelerator name with an optional count, e.g. L4:1 or A100-80GB:2.",
)
# A vLLM parser name as `vllm serve` takes it (hermes, llama3_json, granite-20b-fc, deepseek_r1, …).
vllm_parser_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]*$",
    "A vLLM parser name: lower-case letters, digits, '_' and '-', e.g. hermes.",
)
# Flags that belong to tool_call_parser / reasoning_parser, never to extra_vllm_args.
PARSER_FLAGS = frozenset({"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"})


class UploadStatus(models.TextChoices):
    NONE = "none", "Not uploaded"
    QUEUED = "queued", "Queued"
    UPLOADING = "uploading", "Uploading"
    VERIFYING = "verifying", "Verifying"
    UPLOADED = "uploaded", "Uploaded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class VerifyStatus(models.TextChoices):
    NEVER = "", "Not verified"
    RUNNING = "running", "Verifying"
    OK = "ok", "Verified"
    MISMATCH = "mismatch", "Mismatch"
    ERROR = "error", "Could not verify"


class JobOrigin(models.TextChoices):
    """What started an upload or a verification (``requested_by`` says who, when it was a person)."""

    ADMIN = "admin", "Admin"
    API = "api", "Management API"
    COMMAND = "command", "Management command"
    MIGRATION = "migration", "Carried over from the catalog row"


# What staff set on a served model, in the admin's form and the management API alike (the rest is
# written by the weights pipeline and the autoscaler).
EDITABLE_FIELDS = (
    "name",
    "is_active",
    "hf_repo",
    "hf_revision",
    "storage_uri",
    "accelerator",
    "dtype",
    "max_model_len",
    "context_length",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "tool_call_parser",
    "reasoning_parser",
    "extra_vllm_args",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "target_kv_cache_usage",
    "target_queue_wait_s",
    "scale_up_window_s",
    "scale_down_window_s",
    "idle_to_zero_s",
    "spot_fallback",
    "spot_fallback_preemptions",
    "spot_fallback_window_s",
    "warm_pool",
)


class ServedModel(models.Model):
    """A catalog entry: what customers call (``name``) and how a node serves it."""

    name = models.CharField(
        "served name",
        max_length=128,
        unique=True,
        validators=[served_name_validator],
        help_text="The `model` string customers send.",
    )
    hf_repo = models.CharField("Hugging Face repo", max_length=200, blank=True)
    hf_revision = models.CharField("revision", max_length=100, blank=True, default="main")
    storage_uri = models.CharField(
        max_length=500,
        blank=True,
        validators=[storage_uri_validator],
        help_text="s3://bucket/prefix where the safetensors live (R2).",
    )
    total_bytes = models.PositiveBigIntegerField(default=0)
    manifest = models.JSONField(default=list, blank=True, help_text="[{path, size, sha256}]")

    dtype = models.CharField(max_length=16, default="auto")
    max_model_len = models.PositiveIntegerField(null=True, blank=True)
    tensor_parallel_size = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1)])
    gpu_memory_utilization = models.FloatField(
        default=0.9, validators=[MinValueValidator(0.05), MaxValueValidator(0.99)]
    )
    accelerator = models.CharField(
        "recommended accelerator",
        max_length=32,
        default="L4:1",
        validators=[accelerator_validator],
        help_text="SkyPilot syntax, e.g. L4:1, A100-80GB:2.",
    )
    extra_vllm_args = models.JSONField(
        default=list, blank=True, help_text='Extra `vllm serve` args, e.g. ["--enable-prefix-caching"].'
    )
    # vLLM answers 400 to any request with `tools` unless it runs with --enable-auto-tool-choice
    # --tool-call-parser <parser>; reasoning models need --reasoning-parser to split their thinking.
    tool_call_parser = models.CharField(
        "tool-call parser",
        max_length=32,
        blank=True,
        validators=[vllm_parser_validator],
        help_text="vLLM --tool-call-parser for this model (e.g. hermes, llama3_json, mistral, pythonic); "
        "empty: requests with tools are refused.",
    )
    reasoning_parser = models.CharField(
        "reasoning parser",
        max_length=32,
        blank=True,
        validators=[vllm_parser_validator],
        help_text="vLLM --reasoning-parser (e.g. deepseek_r1, qwen3); empty for models that do not reason.",
    )
    context_length = models.PositiveIntegerField(null=True, blank=True)
    price_input_per_mtok = models.DecimalField(
        "price per 1M input tokens (USD)",
        max_digits=12,
        decimal_places=6,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
    )
    price_output_per_mtok = models.DecimalField(
        "price per 1M output tokens (USD)",
        max_digits=12,
        decimal_places=6,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
    )
    min_replicas = models.PositiveSmallIntegerField(default=0, help_text="0 lets the model scale to zero when idle.")
    max_replicas = models.PositiveSmallIntegerField(default=1)
    # The autoscaler's policy (apps.fleet.autoscale; docs/fleet.md explains the formula).
    target_ongoing_requests = models.PositiveSmallIntegerField(
        "target ongoing requests per node",
        default=16,
        validators=[MinValueValidator(1)],
        help_text="Running + waiting requests one node should carry; more demand adds nodes.",
    )
    target_kv_cache_usage = models.FloatField(
        "target KV-cache use",
        null=True,
        blank=True,
        default=0.8,
        validators=[MinValueValidator(0.05), MaxValueValidator(1.0)],
        help_text="0.05–1: mean KV-cache use of the ready nodes above this adds nodes. Empty: not used.",
    )
    target_queue_wait_s = models.FloatField(
        "target queue wait (s)",
        null=True,
        blank=True,
        validators=[MinValueValidator(0.05)],
        help_text="Estimated wait in vLLM's queue above this adds nodes. Empty: not used.",
    )
    scale_up_window_s = models.PositiveIntegerField(
        "scale-up window (s)",
        default=0,
        validators=[MaxValueValidator(3600)],
        help_text="Demand must stay above capacity this long before nodes are added (0: at once).",
    )
    scale_down_window_s = models.PositiveIntegerField(
        "scale-down window (s)",
        default=300,
        validators=[MaxValueValidator(86400)],
        help_text="Demand must stay below capacity this long before a node is drained.",
    )
    idle_to_zero_s = models.PositiveIntegerField(
        "idle before zero (s)",
        default=900,
        validators=[MaxValueValidator(7 * 86400)],
        help_text="With min replicas 0: no request at all for this long drains the last node.",
    )
    spot_fallback = models.BooleanField(
        "spot with on-demand fallback",
        default=True,
        help_text="Launch on-demand when a spot launch fails for capacity or spot nodes were preempted "
        "too often; back to spot on a later scale-up once the window has passed.",
    )
    spot_fallback_preemptions = models.PositiveSmallIntegerField(
        "preemptions before fallback",
        default=2,
        validators=[MinValueValidator(1)],
        help_text="N: this many spot preemptions of the model within the window switch new launches to on-demand.",
    )
    spot_fallback_window_s = models.PositiveIntegerField(
        "preemption window (s)",
        default=1800,
        validators=[MinValueValidator(60), MaxValueValidator(7 * 86400)],
        help_text="W: preemptions and capacity failures are counted over this window; also the cool-off "
        "before spot is tried again.",
    )
    warm_pool = models.BooleanField(
        "keep drained nodes stopped",
        default=True,
        help_text="A scaled-down on-demand node is stopped (disk kept) for WARM_POOL_TTL_S instead of "
        "terminated, so the next scale-up restarts it in seconds. Spot nodes are always terminated.",
    )
    is_active = models.BooleanField("active", default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "catalog_model"  # the table kept its name when the class was renamed from ServedModel
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        errors: dict[str, str] = {}
        if self.max_replicas < self.min_replicas:
            errors["max_replicas"] = "Must be at least min replicas."
        if self.max_replicas < 1 and self.is_active:
            errors["max_replicas"] = "An active model needs at least 1 (set min replicas 0 to scale to zero)."
        if not isinstance(self.extra_vllm_args, list) or not all(isinstance(a, str) for a in self.extra_vllm_args):
            errors["extra_vllm_args"] = "Must be a list of strings."
        elif set(self.extra_vllm_args) & PARSER_FLAGS:
            errors["extra_vllm_args"] = "Set the tool-call and reasoning parsers in their own fields, not here."
        if errors:
            raise ValidationError(errors)

    # Set by selectors.with_latest_jobs (a Prefetch to_attr); absent on a plain instance.
    latest_uploads: list[WeightUpload]
    latest_verifications: list[WeightVerification]

    @property
    def latest_upload(self) -> WeightUpload | None:
        """The last upload attempt (prefetched by selectors.with_latest_jobs on lists)."""
        if hasattr(self, "latest_uploads"):
            return self.latest_uploads[0] if self.latest_uploads else None
        return self.uploads.order_by("-id").first()

    @property
    def latest_verification(self) -> WeightVerification | None:
        """The last verification (prefetched by selectors.with_latest_jobs on lists)."""
        if hasattr(self, "latest_verifications"):
            return self.latest_verifications[0] if self.latest_verifications else None
        return self.verifications.order_by("-id").first()


BUSY_UPLOAD_STATUSES = (UploadStatus.QUEUED, UploadStatus.UPLOADING, UploadStatus.VERIFYING)


class WeightUpload(models.Model):
    """One attempt to put a model's weights in the bucket; a worker claims it (queued -> uploading)
    with a conditional UPDATE and reports progress on it. At most one attempt per model is busy."""

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="uploads")
    status = models.CharField(max_length=16, choices=UploadStatus.choices, default=UploadStatus.QUEUED)
    source = models.JSONField(
        default=dict,
        blank=True,
        help_text="What this upload was asked to do: {kind: hf|dir, repo, revision, path, prefix, keep}.",
    )
    error = models.TextField(blank=True)
    bytes_done = models.PositiveBigIntegerField(default=0)
    bytes_total = models.PositiveBigIntegerField(default=0)
    rate_bps = models.PositiveBigIntegerField(default=0)
    current_file = models.CharField(max_length=500, blank=True)
    cancel_requested = models.BooleanField(default=False)
    origin = models.CharField(max_length=16, choices=JobOrigin.choices, default=JobOrigin.ADMIN)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The worker's heartbeat: written with every progress update; a busy attempt silent for
    # UPLOAD_STALE_AFTER_S is taken as dead and may be replaced.
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model"],
                condition=models.Q(status__in=BUSY_UPLOAD_STATUSES),
                name="catalog_one_busy_upload",
                violation_error_message="An upload is already running for this model.",
            ),
        ]
        indexes = [models.Index(fields=["model", "-id"], name="catalog_upload_latest")]

    def __str__(self) -> str:
        return f"upload #{self.pk} of {self.model_id}: {self.status}"

    @property
    def progress(self) -> float:
        if not self.bytes_total:
            return 0.0
        return min(1.0, self.bytes_done / self.bytes_total)


class WeightVerification(models.Model):
    """One check of a model's objects in the bucket against its manifest."""

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="verifications")
    status = models.CharField(max_length=16, choices=VerifyStatus.choices, default=VerifyStatus.RUNNING)
    full = models.BooleanField(default=False, help_text="Re-hashed every object's bytes (not only size + checksum).")
    uri = models.CharField(max_length=500, blank=True)
    checked = models.PositiveIntegerField(default=0)
    problems = models.JSONField(default=list, blank=True, help_text="Problems found (at most 200).")
    error = models.TextField(blank=True)
    origin = models.CharField(max_length=16, choices=JobOrigin.choices, default=JobOrigin.ADMIN)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["model", "-id"], name="catalog_verify_latest")]

    def __str__(self) -> str:
        return f"verification #{self.pk} of {self.model_id}: {self.status or 'never'}"
