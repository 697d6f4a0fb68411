"""Staff cockpit for tenants, API keys and staff tokens.

Every write goes through apps.tenancy.services. Raw keys and tokens are shown exactly once,
in the success message after they are issued; digests are never rendered anywhere.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from apps.core.admin_confirm import ObjectAction, ObjectActionMixin, confirmation_page, reason_form, with_actor
from apps.core.paginator import EstimatedCountPaginator
from apps.metering.display import budget_bar
from apps.metering.selectors import month_key, month_spend_subquery
from apps.tenancy import services
from apps.tenancy.admin_forms import (
    LIMIT_FIELDS,
    SPEND_FIELD,
    ApiKeyForm,
    KeyStatusFilter,
    ScopeFilter,
    StaffTokenForm,
    TenantForm,
    copy_saved,
    show_once,
)
from apps.tenancy.models import ApiKey, StaffToken, Tenant, TenantStatus

# --- Tenants --------------------------------------------------------------------------------


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("prefix", "name", "scopes", "status", "expires_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("-created_at",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # keys are issued from the API key page, which shows the raw key once

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="status")
    def status(self, key: ApiKey) -> str:
        return key.status


@admin.register(Tenant)
class TenantAdmin(ObjectActionMixin):
    form = TenantForm
    object_action = ObjectAction(
        name="suspend",
        label="Suspend…",
        applies=lambda t: t.status == TenantStatus.ACTIVE,
        title="Suspend tenant",
        question="Suspend {obj}? Every API key of this tenant stops working within a second.",
        submit_label="Yes, suspend",
        run=lambda t, reason: services.tenant_suspend(tenant=t, reason=reason),
        done="Suspended {obj}.",
    )

    list_display = (
        "slug",
        "name",
        "status",
        "contact_email",
        "requests_per_minute",
        "tokens_per_minute",
        "max_concurrent_requests",
        "monthly_token_budget",
        "budget_used",
        "key_count",
        "created_at",
    )
    list_filter = ("status", "created_at")
    search_fields = ("slug", "name", "contact_email")
    ordering = ("slug",)
    readonly_fields = (
        "status",
        "status_reason",
        "issue_key",
        "budget_used",
        "budget_alerts",
        "webhook_secret",
        "created_at",
        "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("slug", "name", "contact_email", "status", "status_reason", "issue_key")}),
        ("Limits", {"fields": (*LIMIT_FIELDS, "monthly_token_budget")}),
        (
            "Spend (US$ per calendar month)",
            {
                "fields": (
                    SPEND_FIELD,
                    "budget_alert_percent",
                    "budget_webhook_url",
                    "webhook_secret",
                    "budget_used",
                    "budget_alerts",
                )
            },
        ),
        ("Dates", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )
    inlines = (ApiKeyInline,)
    actions = ("suspend", "reactivate", "rotate_webhook_secret")
    change_form_template = "admin/crosslogic/change_form_actions.html"
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        # A correlated subquery runs only for the rows on the page, where a JOIN + GROUP BY would
        # aggregate every key of every tenant before paginating.
        keys = ApiKey.objects.filter(tenant=OuterRef("pk")).order_by().values("tenant").annotate(n=Count("id"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                _key_count=Coalesce(Subquery(keys.values("n")), 0),
                _spend_month=Coalesce(month_spend_subquery(owner_field="tenant"), 0),
            )
        )

    @admin.display(description="spend this month")
    def budget_used(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "-"
        spent = getattr(tenant, "_spend_month", 0)  # annotated by get_queryset
        return budget_bar(
            spent_micros=spent,
            limit_micros=tenant.monthly_spend_limit_micros,
            alert_percent=tenant.budget_alert_percent,
        )

    @admin.display(description="alerts this month")
    def budget_alerts(self, tenant: Tenant) -> str:
        from apps.metering.models import BudgetAlert
        from apps.metering.selectors import month_bounds

        if tenant.pk is None:
            return "-"
        first_day = month_bounds(month_key())[0].date()
        alerts = list(BudgetAlert.objects.filter(tenant=tenant, month=first_day).select_related("api_key")[:20])
        if not alerts:
            return "none"
        return format_html_join(
            mark_safe("<br>"),
            "{}: {} ({}; webhook {}, email {})",
            (
                (
                    f"key {a.api_key.prefix}…" if a.api_key else "tenant",
                    a.get_level_display(),
                    a.created_at.strftime("%Y-%m-%d %H:%M UTC"),
                    a.webhook_result or "-",
                    a.email_result or "-",
                )
                for a in alerts
            ),
        )

    @admin.display(description="webhook signing secret")
    def webhook_secret(self, tenant: Tenant) -> str:
        # Never the secret itself: it is shown once, when rotated.
        if tenant.budget_webhook_secret_rotated_at is None:
            return "none yet (one is made at the first delivery; rotate it to see it)"
        return f"set {tenant.budget_webhook_secret_rotated_at:%Y-%m-%d %H:%M} UTC (rotate it to see a new one)"

    @admin.action(description="Rotate the budget webhook signing secret (one tenant)…", permissions=["change"])
    def rotate_webhook_secret(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        # One at a time: the new secret is shown once, in the message, and must be told apart.
        tenants = list(queryset[:2])
        if len(tenants) != 1:
            self.message_user(request, "Select exactly one tenant to rotate its webhook secret.", messages.ERROR)
            return
        raw = services.tenant_webhook_secret_rotate(tenant=tenants[0])
        show_once(request, f"Budget webhook signing secret of {tenants[0].slug} (the previous one stops now)", raw)

    @admin.display(description="API keys")
    def issue_key(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "Save the tenant first, then issue its keys."
        url = reverse("admin:tenancy_apikey_add") + f"?tenant={tenant.pk}"
        listing = reverse("admin:tenancy_apikey_changelist") + f"?tenant__id__exact={tenant.pk}"
        return format_html('<a href="{}">Issue a new key</a> · <a href="{}">all keys</a>', url, listing)

    @admin.display(description="keys", ordering="_key_count")
    def key_count(self, tenant: Tenant) -> int:
        return tenant._key_count  # type: ignore[attr-defined]  # annotated by get_queryset

    def save_model(self, request: HttpRequest, obj: Tenant, form: forms.ModelForm, change: bool) -> None:
        data = {name: form.cleaned_data[name] for name in form.changed_data} if change else form.cleaned_data
        if change:
            services.tenant_update(tenant=obj, **data)
        else:
            copy_saved(obj, services.tenant_create(**data))

    def delete_model(self, request: HttpRequest, obj: Tenant) -> None:
        services.tenant_delete(tenant=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset:
            services.tenant_delete(tenant=tenant)

    @admin.action(description="Suspend selected tenants (their keys stop working)…", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> HttpResponse | None:
        active = queryset.filter(status=TenantStatus.ACTIVE)
        form = reason_form(request)
        if not form.is_valid():
            total = active.count()
            return confirmation_page(
                request,
                model_admin=self,
                title="Suspend tenants",
                question=f"Suspend {total} active tenant(s)? Every API key of theirs stops working within a second.",
                objects=list(active[:25]),
                total=total,
                form=form,
                submit_label="Yes, suspend",
                action="suspend",
            )
        tenants = list(active)
        for tenant in tenants:
            services.tenant_suspend(tenant=tenant, reason=with_actor(request, form.cleaned_data["reason"]))
        self.message_user(request, f"Suspended {len(tenants)} tenant(s).", messages.SUCCESS)
        return None

    @admin.action(description="Reactivate selected tenants", permissions=["change"])
    def reactivate(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        tenants = list(queryset.filter(status=TenantStatus.SUSPENDED))
        for tenant in tenants:
            services.tenant_reactivate(tenant=tenant)
        self.message_user(request, f"Reactivated {len(tenants)} tenant(s).", messages.SUCCESS)


# --- API keys -------------------------------------------------------------------------------


@admin.register(ApiKey)
class ApiKeyAdmin(ObjectActionMixin):
    form = ApiKeyForm
    object_action = ObjectAction(
        name="revoke",
        label="Revoke…",
        applies=lambda k: k.revoked_at is None,
        title="Revoke API key",
        question="Revoke {obj}? Requests with it are refused within a second; this cannot be undone.",
        submit_label="Yes, revoke",
        run=lambda k, reason: services.api_key_revoke(key=k, reason=reason),
        done="Revoked {obj}.",
    )

    list_display = (
        "prefix",
        "name",
        "tenant",
        "scope_list",
        "status",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "created_at",
    )
    list_select_related = ("tenant",)
    list_filter = (KeyStatusFilter, ScopeFilter, "tenant__status", "created_at")
    search_fields = ("^prefix", "name", "tenant__slug")
    ordering = ("-created_at",)
    autocomplete_fields = ("tenant",)
    actions = ("revoke",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    change_form_template = "admin/crosslogic/change_form_actions.html"

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        limits = ("Limit overrides (empty = the tenant's)", {"fields": LIMIT_FIELDS})
        spend_fields: tuple[str, ...] = (SPEND_FIELD,) if obj is None else (SPEND_FIELD, "budget_used")
        spend = ("Spend (US$ per calendar month, besides the tenant's)", {"fields": spend_fields})
        if obj is None:
            return ((None, {"fields": ("tenant", "name", "scopes", "allowed_models", "expires_at")}), limits, spend)
        return (
            (None, {"fields": ("tenant", "prefix", "name", "status", "scopes", "allowed_models", "expires_at")}),
            limits,
            spend,
            ("Use", {"fields": ("revoked_at", "revoked_reason", "last_used_at", "created_at")}),
        )

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        # A key never moves between tenants; its prefix and digest are fixed for its life.
        return (
            "tenant",
            "prefix",
            "status",
            "budget_used",
            "revoked_at",
            "revoked_reason",
            "last_used_at",
            "created_at",
        )

    @admin.display(description="spend this month")
    def budget_used(self, key: ApiKey) -> str:
        from apps.metering.selectors import month_spend

        spent = month_spend(key_ids=[key.pk], month=month_key()).get(f"key:{key.pk}", 0)
        return budget_bar(
            spent_micros=spent,
            limit_micros=key.monthly_spend_limit_micros,
            alert_percent=key.tenant.budget_alert_percent,
        )

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: usage records keep pointing at the key

    @admin.display(description="scopes")
    def scope_list(self, key: ApiKey) -> str:
        return ", ".join(key.scopes)

    @admin.display(description="status")
    def status(self, key: ApiKey) -> str:
        return key.status

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            services.api_key_update(key=obj, **{name: data[name] for name in form.changed_data})
            return
        key, raw = services.api_key_issue(
            tenant=data["tenant"],
            name=data["name"],
            scopes=data["scopes"],
            allowed_models=data["allowed_models"],
            expires_at=data["expires_at"],
            **{name: data[name] for name in LIMIT_FIELDS},
            monthly_spend_limit_micros=data.get(SPEND_FIELD),
        )
        copy_saved(obj, key)
        show_once(request, f"API key {key.prefix}… for {key.tenant.slug}", raw)

    @admin.action(description="Revoke selected keys…", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        live = queryset.filter(revoked_at__isnull=True)
        form = reason_form(request)
        if not form.is_valid():
            total = live.count()
            return confirmation_page(
                request,
                model_admin=self,
                title="Revoke API keys",
                question=(
                    f"Revoke {total} key(s)? Requests with them are refused within a second; this cannot be undone."
                ),
                objects=list(live.select_related("tenant")[:25]),
                total=total,
                form=form,
                submit_label="Yes, revoke",
                action="revoke",
            )
        keys = list(live)
        for key in keys:
            services.api_key_revoke(key=key, reason=with_actor(request, form.cleaned_data["reason"]))
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)
        return None


# --- Staff tokens ---------------------------------------------------------------------------


@admin.register(StaffToken)
class StaffTokenAdmin(admin.ModelAdmin):
    form = StaffTokenForm
    list_display = ("prefix", "name", "user", "status", "expires_at", "revoked_at", "last_used_at", "created_at")
    list_select_related = ("user",)
    list_filter = (KeyStatusFilter,)
    search_fields = ("^prefix", "name", "user__username")
    ordering = ("-created_at",)
    actions = ("revoke",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[StaffToken]:
        queryset = super().get_queryset(request)
        # A token acts with its user's powers: only superusers see and manage other people's.
        return queryset if request.user.is_superuser else queryset.filter(user=request.user)

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "user":
            users = User.objects.filter(is_staff=True, is_active=True)
            # Admin requests come from signed-in staff, so request.user.pk is set (hence the ignore).
            kwargs["queryset"] = users if request.user.is_superuser else users.filter(pk=request.user.pk)  # type: ignore[misc]
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_fields(self, request: HttpRequest, obj: StaffToken | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("user", "name", "expires_at")
        return (
            "user",
            "prefix",
            "name",
            "status",
            "expires_at",
            "revoked_at",
            "revoked_reason",
            "last_used_at",
            "created_at",
        )

    def get_readonly_fields(self, request: HttpRequest, obj: StaffToken | None = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        # Nothing about an issued token is editable: revoke it and issue another.
        return self.get_fields(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: StaffToken | None = None) -> bool:
        return False  # revoke instead, so the audit trail stays

    @admin.display(description="status")
    def status(self, token: StaffToken) -> str:
        return token.status

    def save_model(self, request: HttpRequest, obj: StaffToken, form: forms.ModelForm, change: bool) -> None:
        if change:
            return  # every field is read-only once issued
        data = form.cleaned_data
        token, raw = services.staff_token_issue(user=data["user"], name=data["name"], expires_at=data["expires_at"])
        copy_saved(obj, token)
        show_once(request, f"Staff token {token.prefix}… for {token.user}", raw)

    @admin.action(description="Revoke selected tokens…", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[StaffToken]) -> HttpResponse | None:
        live = queryset.filter(revoked_at__isnull=True)
        form = reason_form(request)
        if not form.is_valid():
            total = live.count()
            return confirmation_page(
                request,
                model_admin=self,
                title="Revoke staff tokens",
                question=f"Revoke {total} staff token(s)? This cannot be undone.",
                objects=list(live.select_related("user")[:25]),
                total=total,
                form=form,
                submit_label="Yes, revoke",
                action="revoke",
            )
        tokens = list(live)
        for token in tokens:
            services.staff_token_revoke(token=token, reason=with_actor(request, form.cleaned_data["reason"]))
        self.message_user(request, f"Revoked {len(tokens)} token(s).", messages.SUCCESS)
        return None
