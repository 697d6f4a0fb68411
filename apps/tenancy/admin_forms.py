"""Forms, list filters and small helpers of the tenancy admin (apps/tenancy/admin.py).

Staff type money in US$ here; it is stored in micro-dollars. Raw keys and tokens are shown
exactly once, in the success message after they are issued.
"""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from apps.metering.display import dollars_to_micros, micros_to_dollars
from apps.tenancy import services
from apps.tenancy.models import ApiKey, Scope, SecretQuerySet, SecretStatus, StaffToken, Tenant
from apps.tenancy.selectors import with_scope

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
SPEND_FIELD = "monthly_spend_limit_micros"


class SpendLimitInDollars(forms.ModelForm):
    """Staff type the monthly spend limit in US$; it is stored in micro-dollars."""

    monthly_spend_limit_micros = forms.DecimalField(
        label="Monthly spend limit (US$)",
        required=False,
        min_value=0,
        max_digits=16,
        decimal_places=6,
        help_text="Per calendar month (UTC); requests get 429 insufficient_quota once it is spent. Empty: no limit.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.initial[SPEND_FIELD] = micros_to_dollars(getattr(self.instance, SPEND_FIELD))

    def clean_monthly_spend_limit_micros(self) -> int | None:
        return dollars_to_micros(self.cleaned_data.get(SPEND_FIELD))


def copy_saved(target: Any, saved: Any) -> None:
    """Make the admin's unsaved ``target`` the row a service just saved, so logging and redirects work."""
    for field in type(saved)._meta.concrete_fields:
        setattr(target, field.attname, getattr(saved, field.attname))
    target._state.adding = False
    target._state.db = saved._state.db


def show_once(request: HttpRequest, what: str, raw: str) -> None:
    messages.success(
        request,
        format_html(
            "{} created. Copy it now, it will not be shown again: <code style='user-select: all'>{}</code>",
            what,
            raw,
        ),
    )


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "key_status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(s.value, str(s.label)) for s in (SecretStatus.ACTIVE, SecretStatus.EXPIRED, SecretStatus.REVOKED)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        status = self.value()
        if status in SecretStatus.values:
            assert isinstance(queryset, SecretQuerySet)  # ApiKey's and StaffToken's manager
            return queryset.with_status(status)
        return queryset


class ScopeFilter(admin.SimpleListFilter):
    title = "scope"
    parameter_name = "scope"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Scope.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        scope = self.value()
        return with_scope(queryset, scope) if scope else queryset


class TenantForm(SpendLimitInDollars):
    budget_webhook_url = forms.URLField(
        label="Budget webhook URL",
        max_length=500,
        required=False,
        assume_scheme="https",
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="Optional: budget alerts are POSTed here as JSON, signed (besides an email to the contact "
        "address). The signing secret: action 'Rotate the budget webhook signing secret' on the tenant list.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Left empty: the model's default threshold (a tenant form from before budgets still saves).
        if "budget_alert_percent" in self.fields:
            self.fields["budget_alert_percent"].required = False

    def clean_budget_alert_percent(self) -> int:
        value = self.cleaned_data.get("budget_alert_percent")
        return Tenant._meta.get_field("budget_alert_percent").get_default() if value is None else value

    class Meta:
        model = Tenant
        fields = (
            "slug",
            "name",
            "contact_email",
            *LIMIT_FIELDS,
            "monthly_token_budget",
            SPEND_FIELD,
            "budget_alert_percent",
            "budget_webhook_url",
        )


def model_choices() -> list[tuple[str, str]]:
    from apps.catalog.models import ServedModel

    return [(name, name) for name in ServedModel.objects.order_by("name").values_list("name", flat=True)]


class ApiKeyForm(SpendLimitInDollars):
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices, widget=forms.CheckboxSelectMultiple, initial=[Scope.INFERENCE]
    )
    allowed_models = forms.MultipleChoiceField(
        choices=model_choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="Served models this key may call; none ticked means all.",
    )

    class Meta:
        model = ApiKey
        fields = ("tenant", "name", "scopes", "allowed_models", *LIMIT_FIELDS, SPEND_FIELD, "expires_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields.get("allowed_models")
        if isinstance(field, forms.MultipleChoiceField) and self.instance.pk:
            # Keep names the key already holds selectable even if the model is gone from the catalog.
            choices = cast("list[tuple[str, str]]", field.choices)  # the form sets it as a list of pairs
            known = {value for value, _ in choices}
            field.choices = [*choices, *((n, n) for n in self.instance.allowed_models if n not in known)]

    def clean_scopes(self) -> list[str]:
        return services.validate_scopes(self.cleaned_data["scopes"])

    def clean_allowed_models(self) -> list[str]:
        return services.validate_models(self.cleaned_data["allowed_models"])

    def clean_expires_at(self) -> Any:
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now() and "expires_at" in self.changed_data:
            raise ValidationError("Expiry must be in the future.")
        return value


class StaffTokenForm(forms.ModelForm):
    class Meta:
        model = StaffToken
        fields = ("user", "name", "expires_at")

    def clean_expires_at(self) -> Any:
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now():
            raise ValidationError("Expiry must be in the future.")
        return value
