"""Django's last-resort error views (handler400/403/404/500), JSON for the management API.

DRF's exception handler (apps/core/api.py) shapes every error a view raises. What happens before
or outside a DRF view does not reach it: an unknown URL under /api/v1/, a body beyond
DATA_UPLOAD_MAX_MEMORY_SIZE (RequestDataTooBig, a SuspiciousOperation: 400), a disallowed Host,
an uncaught exception. Django answers those with an HTML page; an API client gets the same JSON
error body as everywhere else instead. Other paths (/admin/, the dashboard) keep Django's pages.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

_API_PREFIX = "/api/"

_MESSAGES = {
    400: ("The request could not be processed.", "invalid_request"),
    403: ("You do not have permission to perform this action.", "permission_denied"),
    404: ("Not found.", "not_found"),
    500: ("The server failed to process the request. It has been logged; retry later.", "server_error"),
}


def _is_api(request: HttpRequest) -> bool:
    # path_info, not path: a SCRIPT_NAME prefix does not decide which clients these are.
    return request.path_info.startswith(_API_PREFIX)


def _json(status: int, message: str | None = None) -> JsonResponse:
    default_message, error_type = _MESSAGES[status]
    return JsonResponse({"error": {"message": message or default_message, "type": error_type}}, status=status)


def _too_big_message(exception: Exception | None) -> str | None:
    from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent

    if isinstance(exception, RequestDataTooBig):
        from django.conf import settings

        return f"The request body exceeds {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
    if isinstance(exception, TooManyFieldsSent | TooManyFilesSent):
        return "The request has too many fields."
    return None


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        # Other SuspiciousOperations (a forged Host, …) are not described back to the client.
        return _json(400, _too_big_message(exception))
    return defaults.bad_request(request, exception)  # type: ignore[arg-type]  # Django accepts any exception


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return _json(403)
    return defaults.permission_denied(request, exception)  # type: ignore[arg-type]


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return _json(404, f"No such endpoint: {request.method} {request.path_info[:200]}")
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return _json(500)
    return defaults.server_error(request)
