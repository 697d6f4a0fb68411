"""An intermediate confirmation page for admin actions that destroy or cut off something
(revoking a key, suspending a tenant, terminating a node), with a reason when one is recorded.

It serves both a bulk action on a change list (the page re-posts the action, the selected ids
and ``select_across``, like Django's own delete confirmation) and a button on a change page
(``hidden`` empty, posting back to the page's own URL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Model
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

CONFIRM_FIELD = "confirm"
OBJECTS_LISTED = 25


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Recorded with the change (500 characters at most).",
    )

    def __init__(self, *args: Any, required: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reason"].required = required


def reason_form(request: HttpRequest, *, required: bool = True) -> ReasonForm:
    """Bound to the POST once the staff member pressed the confirm button; unbound (so invalid,
    without errors shown) when the page is first opened."""
    if request.method == "POST" and CONFIRM_FIELD in request.POST:
        return ReasonForm(request.POST, required=required)
    return ReasonForm(required=required)


def confirmation_page(
    request: HttpRequest,
    *,
    model_admin: admin.ModelAdmin,
    title: str,
    question: str,
    objects: Sequence[Model],
    total: int,
    form: ReasonForm,
    submit_label: str,
    action: str = "",
    cancel_url: str = "",
    destructive: bool = True,
) -> TemplateResponse:
    """The page; ``action`` set: re-post a change list action (with the selection) on confirm."""
    hidden: list[tuple[str, str]] = []
    if action:
        hidden.append(("action", action))
        hidden.extend((helpers.ACTION_CHECKBOX_NAME, v) for v in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))
        hidden.append(("select_across", request.POST.get("select_across", "0")))
    opts = model_admin.model._meta
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "question": question,
        "objects": list(objects[:OBJECTS_LISTED]),
        "more": max(0, total - OBJECTS_LISTED),
        "total": total,
        "form": form,
        "hidden": hidden,
        "submit_label": submit_label,
        "confirm_field": CONFIRM_FIELD,
        "cancel_url": cancel_url or request.get_full_path(),
        "destructive": destructive,
        "opts": opts,
    }
    return TemplateResponse(request, "admin/crosslogic/confirm_action.html", context)


def actor(request: HttpRequest) -> str:
    return f"staff:{request.user.get_username()}"


def with_actor(request: HttpRequest, reason: str) -> str:
    """The reason as recorded: who gave it, so the row says who cut the tenant or key off."""
    return f"{reason} ({actor(request)})"[:500]


def object_action_view(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    object_id: str,
    *,
    applies: Callable[[Any], bool],
    title: str,
    question: str,
    submit_label: str,
    run: Callable[[Any, str], object],
    done: str,
    reason_required: bool = True,
    refused: tuple[type[Exception], ...] = (ValidationError,),
    reason_names_actor: bool = True,
) -> HttpResponse:
    """One object's confirmation page (GET) and the action once confirmed (POST), for a button
    on its change page. ``run(obj, reason)`` calls the service; what it refuses (``refused``)
    becomes an error message on the change page, never a 500. ``reason_names_actor`` False: the
    service records the actor itself (node events have an actor column)."""
    obj = model_admin.get_object(request, object_id)
    if obj is None:
        raise Http404("No such object.")
    if not model_admin.has_change_permission(request, obj):
        raise PermissionDenied
    change_url = reverse(
        f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change",
        args=[obj.pk],
        current_app=model_admin.admin_site.name,
    )
    if not applies(obj):
        model_admin.message_user(request, f"Nothing to do: {obj} is not in a state this applies to.", messages.WARNING)
        return HttpResponseRedirect(change_url)
    form = reason_form(request, required=reason_required)
    if form.is_valid():
        try:
            reason = form.cleaned_data["reason"] or title.lower()
            run(obj, with_actor(request, reason) if reason_names_actor else reason)
        except refused as exc:
            text = "; ".join(getattr(exc, "messages", None) or [str(exc)])
            model_admin.message_user(request, f"Refused: {text}", messages.ERROR)
        else:
            model_admin.message_user(request, done.format(obj=obj), messages.SUCCESS)
        return HttpResponseRedirect(change_url)
    return confirmation_page(
        request,
        model_admin=model_admin,
        title=title,
        question=question.format(obj=obj),
        objects=[obj],
        total=1,
        form=form,
        submit_label=submit_label,
        cancel_url=change_url,
    )


@dataclass(frozen=True)
class ObjectAction:
    """One confirm-with-reason button on a change page (see ObjectActionMixin)."""

    name: str  # URL segment, button name and the URL name's suffix
    label: str
    applies: Callable[[Any], bool]
    title: str
    question: str
    submit_label: str
    run: Callable[[Any, str], object]
    done: str


class ObjectActionMixin(admin.ModelAdmin):
    """Declares ``object_action`` and gets its URL (``admin:<app>_<model>_<name>``), its button on
    the change page (when it applies and the user may change the object) and its view."""

    object_action: ObjectAction

    def _object_action_url_name(self) -> str:
        meta = self.model._meta
        return f"{meta.app_label}_{meta.model_name}_{self.object_action.name}"

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.object_action_view)
        url = path(f"<path:object_id>/{self.object_action.name}/", view, name=self._object_action_url_name())
        return [url, *super().get_urls()]

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        action = self.object_action
        obj = self.get_object(request, object_id)
        buttons = []
        if obj is not None and action.applies(obj) and self.has_change_permission(request, obj):
            url = reverse(f"admin:{self._object_action_url_name()}", args=[obj.pk])
            buttons.append({"name": action.name, "label": action.label, "url": url})
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), "object_actions": buttons})

    def object_action_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        a = self.object_action
        return object_action_view(
            self,
            request,
            object_id,
            applies=a.applies,
            title=a.title,
            question=a.question,
            submit_label=a.submit_label,
            run=a.run,
            done=a.done,
        )
