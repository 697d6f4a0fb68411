"""Idempotent demo data for `make run`: a superuser, the `demo` tenant, a demo model and key."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from apps.tenancy.management.commands._common import service_errors
from apps.tenancy.models import ApiKey, Scope, SecretStatus, Tenant
from apps.tenancy.services import api_key_issue, tenant_create

DEMO_TENANT = "demo"
DEMO_MODEL = "demo-llama"
DEMO_KEY_NAME = "demo"


class Command(BaseCommand):
    help = (
        "Create the demo data if missing: a superuser (DJANGO_SUPERUSER_USERNAME/PASSWORD/EMAIL, or admin/admin "
        "when DEBUG), the 'demo' tenant, the 'demo-llama' model and a demo API key. Safe to run repeatedly. "
        "Keys are shown only once: a new demo key is issued when none exists or with --new-key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--new-key", action="store_true", help="Issue a new demo API key even if one exists.")
        parser.add_argument(
            "--synthetic-usage-days",
            type=float,
            default=0,
            metavar="DAYS",
            help="Development only: also write DAYS (up to 31) of synthetic usage for the demo tenants, its rollups "
            "and a billed history node, so the dashboard's charts are not empty (apps/metering/synthetic.py). "
            "Safe to repeat: known minutes are skipped.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            self._superuser()
            tenant = self._tenant()
            self._model()
            self._key(tenant, new=options["new_key"])
        self._demo_node()
        if options["synthetic_usage_days"]:
            self._synthetic_usage(tenant, options["synthetic_usage_days"])

    def _superuser(self) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "")
        if username and not password and not User.objects.filter(username=username).exists():
            raise CommandError("DJANGO_SUPERUSER_USERNAME is set but DJANGO_SUPERUSER_PASSWORD is not.")
        if not username:
            if not settings.DEBUG:
                if User.objects.filter(is_superuser=True).exists():
                    self.stdout.write("superuser: one exists already (DJANGO_SUPERUSER_* not set)")
                    return
                raise CommandError(
                    "Set DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD (and optionally "
                    "DJANGO_SUPERUSER_EMAIL): the admin/admin default exists only when DEBUG is on."
                )
            username, password, email = "admin", "admin", email or "admin@localhost"
            if not User.objects.filter(username=username).exists():
                self.stderr.write(
                    self.style.WARNING(
                        "WARNING: creating superuser admin/admin because DEBUG is on and DJANGO_SUPERUSER_USERNAME "
                        "is not set. Never expose this instance; set DJANGO_SUPERUSER_* for anything shared."
                    )
                )
        user = User.objects.filter(username=username).first()
        if user is not None:
            # Idempotent: never reset a password someone may have changed.
            self.stdout.write(f"superuser: {username} exists (password unchanged)")
            return
        User.objects.create_superuser(username=username, email=email, password=password)
        shown = password if password == "admin" else "from DJANGO_SUPERUSER_PASSWORD"  # noqa: S105 - dev default
        self.stdout.write(self.style.SUCCESS(f"superuser: created {username} (password: {shown})"))

    def _tenant(self) -> Tenant:
        tenant = Tenant.objects.filter(slug=DEMO_TENANT).first()
        if tenant is not None:
            self.stdout.write(f"tenant: {DEMO_TENANT} exists")
            return tenant
        with service_errors():
            tenant = tenant_create(slug=DEMO_TENANT, name="Demo tenant", contact_email="demo@example.com")
        self.stdout.write(self.style.SUCCESS(f"tenant: created {DEMO_TENANT}"))
        return tenant

    def _model(self) -> None:
        from apps.catalog.models import ServedModel
        from apps.catalog.services import model_create

        if ServedModel.objects.filter(name=DEMO_MODEL).exists():
            self.stdout.write(f"model: {DEMO_MODEL} exists")
            return
        try:
            model_create(name=DEMO_MODEL, hf_repo="meta-llama/Llama-3.2-1B-Instruct", context_length=8192)
        except ValidationError as exc:
            raise CommandError(f"could not create the demo model: {'; '.join(exc.messages)}") from None
        self.stdout.write(self.style.SUCCESS(f"model: created {DEMO_MODEL}"))

    def _demo_node(self) -> None:
        """In development, serve the demo model at once from a local simulator node, so the first
        /v1 request works without a GPU. The node registers with CONTROL_PLANE_URL once the
        Celery worker has started it; the reconciler keeps it there (min_replicas=1)."""
        from apps.catalog.models import ServedModel
        from apps.fleet.models import LIVE_STATUSES, Launcher, Node
        from apps.fleet.placement import Placement
        from apps.fleet.services import node_request_launch

        if not settings.DEBUG or settings.FLEET_DEFAULT_LAUNCHER != Launcher.LOCAL:
            return
        model = ServedModel.objects.get(name=DEMO_MODEL)
        if Node.objects.filter(model=model, status__in=LIVE_STATUSES).exists():
            self.stdout.write(f"demo node: {DEMO_MODEL} already has a live node")
            return
        with transaction.atomic():
            if model.min_replicas < 1:
                ServedModel.objects.filter(pk=model.pk).update(min_replicas=1, max_replicas=max(1, model.max_replicas))
                model.refresh_from_db()
            try:
                [node] = node_request_launch(
                    model=model, placement=Placement(launcher=Launcher.LOCAL), actor="bootstrap_demo"
                )
            except ValidationError as exc:
                raise CommandError(f"could not launch the demo node: {'; '.join(exc.messages)}") from None
        self.stdout.write(
            self.style.SUCCESS(
                f"demo node: launching {node} (local simulator); ready a few seconds after the worker starts"
            )
        )

    def _synthetic_usage(self, tenant: Tenant, days: float) -> None:
        from django.utils import timezone

        from apps.catalog.models import ServedModel
        from apps.catalog.services import model_update
        from apps.metering.synthetic import synthetic_usage_create

        if not settings.DEBUG:
            raise CommandError("--synthetic-usage-days writes made-up usage and costs: development only (DEBUG on).")
        if not 0 < days <= 31:
            raise CommandError("--synthetic-usage-days takes a number of days between 0 and 31, e.g. 1 or 0.5.")
        model = ServedModel.objects.get(name=DEMO_MODEL)
        if not model.price_input_per_mtok and not model.price_output_per_mtok:
            # Unpriced usage would chart as $0: give the demo model a list price first.
            model = model_update(
                model=model, price_input_per_mtok=Decimal("0.10"), price_output_per_mtok=Decimal("0.40")
            )
            self.stdout.write(f"model: {DEMO_MODEL} priced at $0.10 / $0.40 per 1M input / output tokens")
        tenants = [tenant]
        for slug, name in (("demo-acme", "Acme (synthetic)"), ("demo-globex", "Globex (synthetic)")):
            other = Tenant.objects.filter(slug=slug).first()
            if other is None:
                with service_errors():
                    other = tenant_create(slug=slug, name=name, contact_email=f"{slug}@example.com")
            tenants.append(other)
        keys = {k.tenant_id: k for k in ApiKey.objects.with_status(SecretStatus.ACTIVE).filter(tenant__in=tenants)}
        result = synthetic_usage_create(
            tenants=[(t, keys.get(t.pk)) for t in tenants], models=[model], days=days, now=timezone.now()
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"synthetic usage: {result.records} records over {days:g} day(s) (known ones skipped), "
                f"{result.hours_rolled} hours rolled up, "
                f"{result.nodes} history node(s); see /admin/dashboard/"
            )
        )

    def _key(self, tenant: Tenant, *, new: bool) -> None:
        existing = ApiKey.objects.with_status(SecretStatus.ACTIVE).filter(tenant=tenant, name=DEMO_KEY_NAME).first()
        if existing is not None and not new:
            self.stdout.write(
                f"demo API key: {existing.prefix}… exists; keys are shown only once. "
                "For a new one: python manage.py bootstrap_demo --new-key"
            )
            return
        with service_errors():
            _, raw = api_key_issue(tenant=tenant, name=DEMO_KEY_NAME, scopes=list(Scope.values))
        self.stdout.write(self.style.SUCCESS("demo API key (shown only once, store it):"))
        self.stdout.write(raw)
