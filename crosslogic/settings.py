"""CrossLogic settings: every value comes from the environment, with development defaults.

Invalid values raise ImproperlyConfigured at start rather than surprising us later.
"""

from __future__ import annotations

import re
import shlex
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# Values from the real environment win over the file. CROSSLOGIC_ENV_FILE="" reads no file (tests).
_ENV_FILE = env("CROSSLOGIC_ENV_FILE", default=str(BASE_DIR / ".env"))
if _ENV_FILE:
    environ.Env.read_env(_ENV_FILE, overwrite=False)
# Local state in development: the SQLite database, the filesystem broker, local nodes' logs, uploads.
VAR_DIR = Path(env("CROSSLOGIC_VAR_DIR", default=str(BASE_DIR / "var")))

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_or_fail(name: str, cast, default):
    if cast is bool:
        # Strict: a typo such as SESSION_COOKIE_SECURE=treu must not quietly mean False.
        raw = env.str(name, default=None)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in _TRUE | _FALSE:
            return value in _TRUE
        raise ImproperlyConfigured(f"{name} is invalid: {raw!r} is not a boolean (true/false, 1/0, yes/no, on/off).")
    try:
        return env(name, cast=cast, default=default)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"{name} is invalid: {exc}") from exc


DEBUG: bool = _env_or_fail("DEBUG", bool, True)

_DEV_SECRET = "dev-insecure-secret-key-change-me-0123456789abcdef"  # noqa: S105 - refused when DEBUG is off
_DEV_PEPPER = "dev-insecure-api-key-pepper"
SECRET_KEY: str = env("SECRET_KEY", default=_DEV_SECRET if DEBUG else "")
API_KEY_PEPPER: str = env("API_KEY_PEPPER", default=_DEV_PEPPER if DEBUG else "")
if not DEBUG:
    if not SECRET_KEY or SECRET_KEY == _DEV_SECRET or len(SECRET_KEY) < 32:
        raise ImproperlyConfigured("SECRET_KEY must be set (32+ characters) when DEBUG is off.")
    if not API_KEY_PEPPER or API_KEY_PEPPER == _DEV_PEPPER or len(API_KEY_PEPPER) < 16:
        raise ImproperlyConfigured("API_KEY_PEPPER must be set (16+ characters) when DEBUG is off.")
# Signs per-node vLLM API keys; separate from SECRET_KEY so rotating one does not rotate the other.
NODE_KEY_SECRET: str = env("NODE_KEY_SECRET", default=SECRET_KEY)

ALLOWED_HOSTS: list[str] = env.list(
    "ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"] if DEBUG else []
)
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when DEBUG is off.")
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets served by us, not fetched from a CDN
    "django_celery_beat",
    "apps.core",
    "apps.tenancy",
    "apps.catalog",
    "apps.fleet",
    "apps.metering",
    "apps.gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "apps.core.input.RejectNulMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "crosslogic.urls"
WSGI_APPLICATION = "crosslogic.wsgi.application"
ASGI_APPLICATION = "crosslogic.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
try:
    DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
except Exception as exc:  # environ raises a bare Exception subclass for unknown schemes
    raise ImproperlyConfigured(f"DATABASE_URL is invalid: {exc}") from exc
# environ passes unknown schemes through as an engine name, or returns {} for non-URLs.
if DATABASES["default"].get("ENGINE") not in {"django.db.backends.postgresql", "django.db.backends.sqlite3"}:
    raise ImproperlyConfigured(
        "DATABASE_URL is invalid: use postgres://user:password@host:port/name (or sqlite:////path for development)."
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and not DATABASES["default"].get("NAME"):
    raise ImproperlyConfigured("DATABASE_URL is invalid: it names no database (postgres://user@host:port/NAME).")
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # In development the web server, the Celery worker and beat all write to one SQLite file.
    # WAL lets readers run beside the writer; IMMEDIATE transactions take the write lock up front
    # so the busy timeout applies (a deferred transaction upgrading to write fails at once).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DATABASES["default"]["CONN_MAX_AGE"] = _env_or_fail("DB_CONN_MAX_AGE", int, 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Concurrent test runs (helpers, CI) must not share one test database.
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["TEST"] = {"NAME": "test_crosslogic" + env("TEST_DB_SUFFIX", default="")}
else:  # SQLite: each test run gets a private in-memory database
    DATABASES["default"]["TEST"] = {"NAME": None}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Celery -----------------------------------------------------------------------
REDIS_URL: str = env("REDIS_URL", default="")
if REDIS_URL and urlparse(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
    raise ImproperlyConfigured("REDIS_URL must be a redis://, rediss:// or unix:// URL.")

# Django's cache: request throttles (node registration). Shared through Redis when there is one,
# so every web process counts against the same limit.
CACHES: dict = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": "crosslogic"}
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

_BROKER_DIR = VAR_DIR / "broker"
# The filesystem transport ignores the host; naming one keeps kombu from warning about it.
CELERY_BROKER_URL: str = env("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://localhost//")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    # kombu's filesystem transport: single-machine development without Redis.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_BROKER_DIR / "queue"),
        "data_folder_out": str(_BROKER_DIR / "queue"),
        "processed_folder": str(_BROKER_DIR / "processed"),
        "store_processed": False,
        # Exchange tables (kombu's default is ./control, wherever the process started).
        "control_folder": str(_BROKER_DIR / "control"),
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER: bool = _env_or_fail("CELERY_TASK_ALWAYS_EAGER", bool, False)
# django-celery-beat's DatabaseScheduler that sends only while it holds a lease in Redis: a second
# beat stands by instead of doubling every periodic pass (apps/core/beat.py).
CELERY_BEAT_SCHEDULER = "apps.core.beat:SingleBeatScheduler"
# How long the beat lease lives without a refresh: a standby beat takes over within this.
BEAT_LEASE_S: float = _env_or_fail("BEAT_LEASE_S", float, 30.0)
CELERY_TIMEZONE = "UTC"

# --- Internationalisation and static --------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# --- Security (production values come from the environment) ---------------------------------
SECURE_SSL_REDIRECT: bool = _env_or_fail("SECURE_SSL_REDIRECT", bool, not DEBUG)
SESSION_COOKIE_SECURE: bool = _env_or_fail("SESSION_COOKIE_SECURE", bool, not DEBUG)
CSRF_COOKIE_SECURE: bool = _env_or_fail("CSRF_COOKIE_SECURE", bool, not DEBUG)
SECURE_HSTS_SECONDS: int = _env_or_fail("SECURE_HSTS_SECONDS", int, 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = _env_or_fail("SECURE_HSTS_INCLUDE_SUBDOMAINS", bool, not DEBUG)
SECURE_HSTS_PRELOAD: bool = _env_or_fail("SECURE_HSTS_PRELOAD", bool, False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if _env_or_fail("USE_X_FORWARDED_PROTO", bool, not DEBUG):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Health and readiness probes come over plain HTTP from the load balancer.
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.tenancy.authentication.BearerKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
        "rest_framework.filters.SearchFilter",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "apps.core.input.SafeJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "apps.core.paginator.StrictLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apps.core.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
    # Node registration is open to the internet (a node proves itself with its one-time token):
    # attempts per client address. Behind N reverse proxies, X-Forwarded-For's Nth-from-last
    # address is the client's; with 0 the socket's peer is.
    "DEFAULT_THROTTLE_RATES": {"node-register": env("NODE_REGISTRATION_RATE", default="30/min")},
    "NUM_PROXIES": _env_or_fail("TRUSTED_PROXY_COUNT", int, 0),
}
if not re.fullmatch(
    r"\d+/(s|sec|second|m|min|minute|h|hour|d|day)", REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["node-register"]
):
    raise ImproperlyConfigured("NODE_REGISTRATION_RATE must look like 30/min (per s, min, hour or day).")
if REST_FRAMEWORK["NUM_PROXIES"] < 0:
    raise ImproperlyConfigured("TRUSTED_PROXY_COUNT must be 0 or more (the reverse proxies in front of web).")
SPECTACULAR_SETTINGS: dict[str, Any] = {
    "TITLE": "CrossLogic management API",
    "DESCRIPTION": "Tenants, API keys, the model catalog, GPU nodes and usage.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # One stable schema name per choice set (several fields share NodeStatus, several models
    # have a "status"); without these the generated names depend on field order.
    "ENUM_NAME_OVERRIDES": {
        "TenantStatusEnum": "apps.tenancy.models.TenantStatus",
        "ScopeEnum": "apps.tenancy.models.Scope",
        "UploadStatusEnum": "apps.catalog.models.UploadStatus",
        "VerifyStatusEnum": "apps.catalog.models.VerifyStatus",
        "LauncherEnum": "apps.fleet.models.Launcher",
        "NodeStatusEnum": "apps.fleet.models.NodeStatus",
        "NodeEventKindEnum": "apps.fleet.models.NodeEvent.Kind",
    },
    # The API is JSON: form parsers stay for the browsable API, but clients are told JSON only
    # (a form cannot say null, so a schema-valid null sent as a form field was refused).
    "PARSER_WHITELIST": ["apps.core.input.SafeJSONParser"],
    # Every operation documents its 4xx answers (one Error shape), not only its successes.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "apps.core.schema.document_error_responses",
    ],
}

# --- Domain settings ------------------------------------------------------------------------
API_KEY_PREFIX = "clk_"
# A key's last_used_at is written at most this often, so the hot path does not write per call.
API_KEY_LAST_USED_RESOLUTION_S: int = _env_or_fail("API_KEY_LAST_USED_RESOLUTION_S", int, 60)
FLEET_CLUSTER_PREFIX: str = env("FLEET_CLUSTER_PREFIX", default="crosslogic")
# Cluster names are "<prefix>-<node id>" and must pass SkyPilot's rule
# (sky.skylet.constants.CLUSTER_NAME_VALID_REGEX: a letter, then letters, digits, - _ .).
if not re.fullmatch(r"[a-zA-Z][-_.a-zA-Z0-9]{0,39}", FLEET_CLUSTER_PREFIX):
    raise ImproperlyConfigured(
        "FLEET_CLUSTER_PREFIX is invalid: SkyPilot cluster names start with a letter and "
        "hold only letters, digits, '-', '_' and '.' (at most 40 characters here)."
    )
FLEET_DEFAULT_LAUNCHER: str = env("FLEET_DEFAULT_LAUNCHER", default="local" if DEBUG else "skypilot")
if FLEET_DEFAULT_LAUNCHER not in {"skypilot", "local", "static"}:
    raise ImproperlyConfigured("FLEET_DEFAULT_LAUNCHER must be one of skypilot, local, static.")

LOG_LEVEL: str = env("LOG_LEVEL", default="INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- Fleet ----------------------------------------------------------------------------------
# Where nodes call home (registration); must be reachable from the GPU machines.
CONTROL_PLANE_URL: str = env("CONTROL_PLANE_URL", default="http://127.0.0.1:8000")
# The SkyPilot API server the SDK talks to; empty = refuse SkyPilot launches (never auto-start one).
SKYPILOT_API_SERVER_ENDPOINT: str = env("SKYPILOT_API_SERVER_ENDPOINT", default="")
# One SkyPilot identity for every worker (docs/fleet.md): clusters belong to the user that launched
# them. A service-account token (API server with auth) or at least a fixed user id; without either,
# each host gets its own hash and a redeployed worker could not operate the clusters it inherits.
SKYPILOT_SERVICE_ACCOUNT_TOKEN: str = env("SKYPILOT_SERVICE_ACCOUNT_TOKEN", default="")
SKYPILOT_USER_ID: str = env("SKYPILOT_USER_ID", default="")
if SKYPILOT_SERVICE_ACCOUNT_TOKEN and not SKYPILOT_SERVICE_ACCOUNT_TOKEN.startswith("sky_"):
    raise ImproperlyConfigured("SKYPILOT_SERVICE_ACCOUNT_TOKEN is invalid: SkyPilot tokens start with sky_.")
if SKYPILOT_USER_ID and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9-]*", SKYPILOT_USER_ID):
    raise ImproperlyConfigured("SKYPILOT_USER_ID is invalid: letters, digits and '-', starting with a letter or digit.")
if SKYPILOT_API_SERVER_ENDPOINT and not DEBUG and not (SKYPILOT_SERVICE_ACCOUNT_TOKEN or SKYPILOT_USER_ID):
    raise ImproperlyConfigured(
        "SKYPILOT_SERVICE_ACCOUNT_TOKEN (or SKYPILOT_USER_ID) must be set when "
        "SKYPILOT_API_SERVER_ENDPOINT is set and DEBUG is off: every worker must act "
        "as the same SkyPilot user."
    )
if SKYPILOT_API_SERVER_ENDPOINT and urlparse(SKYPILOT_API_SERVER_ENDPOINT).scheme not in {"http", "https"}:
    raise ImproperlyConfigured("SKYPILOT_API_SERVER_ENDPOINT must be an http(s):// URL.")
VLLM_VERSION: str = env("VLLM_VERSION", default="0.11.0")
FLEET_HEALTH_INTERVAL_S: int = _env_or_fail("FLEET_HEALTH_INTERVAL_S", int, 15)
FLEET_HEALTH_TIMEOUT_S: float = _env_or_fail("FLEET_HEALTH_TIMEOUT_S", float, 2.0)
FLEET_HEALTH_CONCURRENCY: int = _env_or_fail("FLEET_HEALTH_CONCURRENCY", int, 200)
FLEET_UNHEALTHY_AFTER: int = _env_or_fail("FLEET_UNHEALTHY_AFTER", int, 3)
FLEET_RECONCILE_INTERVAL_S: int = _env_or_fail("FLEET_RECONCILE_INTERVAL_S", int, 60)
FLEET_REPLACE_UNHEALTHY_AFTER_S: int = _env_or_fail("FLEET_REPLACE_UNHEALTHY_AFTER_S", int, 300)
FLEET_ORPHAN_GRACE_S: int = _env_or_fail("FLEET_ORPHAN_GRACE_S", int, 600)
FLEET_DRAIN_TIMEOUT_S: int = _env_or_fail("FLEET_DRAIN_TIMEOUT_S", int, 300)
FLEET_LAUNCH_POLL_S: int = _env_or_fail("FLEET_LAUNCH_POLL_S", int, 15)
# Longest wait for a SkyPilot cluster status (the reconciler refreshes it from the clouds); then cancelled.
FLEET_SKY_STATUS_TIMEOUT_S: float = _env_or_fail("FLEET_SKY_STATUS_TIMEOUT_S", float, 120.0)
# A launch that has not registered after this long is failed (and replaced by the reconciler).
FLEET_LAUNCH_TIMEOUT_S: int = _env_or_fail("FLEET_LAUNCH_TIMEOUT_S", int, 3600)
# Relaunch brake (reconciler): after a model's n-th failed node within the window, wait
# FLEET_RELAUNCH_BACKOFF_S * 2^(n-1) before replacing it; at FLEET_RELAUNCH_MAX_FAILURES stop until staff act.
FLEET_RELAUNCH_MAX_FAILURES: int = _env_or_fail("FLEET_RELAUNCH_MAX_FAILURES", int, 3)
FLEET_RELAUNCH_FAILURE_WINDOW_S: int = _env_or_fail("FLEET_RELAUNCH_FAILURE_WINDOW_S", int, 6 * 3600)
FLEET_RELAUNCH_BACKOFF_S: int = _env_or_fail("FLEET_RELAUNCH_BACKOFF_S", int, 120)
if min(FLEET_RELAUNCH_MAX_FAILURES, FLEET_RELAUNCH_FAILURE_WINDOW_S) < 1 or FLEET_RELAUNCH_BACKOFF_S < 0:
    raise ImproperlyConfigured(
        "FLEET_RELAUNCH_MAX_FAILURES and FLEET_RELAUNCH_FAILURE_WINDOW_S must be positive, "
        "FLEET_RELAUNCH_BACKOFF_S 0 or more."
    )
# Local launcher: simulated weight-loading time of the vLLM simulator it starts.
FLEET_LOCAL_STARTUP_DELAY_S: float = _env_or_fail("FLEET_LOCAL_STARTUP_DELAY_S", float, 1.0)
# Local launcher: more `python -m vllm_sim` flags for its nodes, e.g. "--max-num-seqs 4 --itl-ms 40"
# (docs/simulator.md lists them; bench/autoscale_bench.py bounds each node's capacity with them).
FLEET_LOCAL_SIM_ARGS: str = env("FLEET_LOCAL_SIM_ARGS", default="")
try:
    shlex.split(FLEET_LOCAL_SIM_ARGS)
except ValueError as exc:
    raise ImproperlyConfigured(f"FLEET_LOCAL_SIM_ARGS: {exc} (write it as a shell command line).") from None
# Autoscaler (apps.fleet.autoscale): how often beat runs it, how long a drained node may stay
# stopped (warm pool) before it is torn down, and what a stopped node's disk costs.
FLEET_AUTOSCALE_INTERVAL_S: int = _env_or_fail("FLEET_AUTOSCALE_INTERVAL_S", int, 5)
WARM_POOL_TTL_S: int = _env_or_fail("WARM_POOL_TTL_S", int, 3600)
WARM_POOL_DISK_USD_PER_GB_MONTH: float = _env_or_fail("WARM_POOL_DISK_USD_PER_GB_MONTH", float, 0.10)
# Cold start assumed for an accelerator with no measured launch yet (seconds).
FLEET_DEFAULT_COLD_START_S: float = _env_or_fail("FLEET_DEFAULT_COLD_START_S", float, 60.0)
# Warm start (a stopped node restarted) assumed until one was measured; and the scale-down hold for
# nodes a scale-down would stop into the warm pool, in warm starts (docs/fleet.md "The decision":
# being wrong costs one warm start, so the hold need not last the whole scale_down_window_s).
FLEET_DEFAULT_WARM_START_S: float = _env_or_fail("FLEET_DEFAULT_WARM_START_S", float, 10.0)
FLEET_WARM_DOWN_HOLD_STARTS: float = _env_or_fail("FLEET_WARM_DOWN_HOLD_STARTS", float, 10.0)
if FLEET_AUTOSCALE_INTERVAL_S < 1 or WARM_POOL_TTL_S < 0 or WARM_POOL_DISK_USD_PER_GB_MONTH < 0:
    raise ImproperlyConfigured(
        "FLEET_AUTOSCALE_INTERVAL_S must be positive; WARM_POOL_TTL_S and WARM_POOL_DISK_USD_PER_GB_MONTH 0 or more."
    )
if FLEET_DEFAULT_COLD_START_S <= 0 or FLEET_DEFAULT_WARM_START_S <= 0:
    raise ImproperlyConfigured("FLEET_DEFAULT_COLD_START_S and FLEET_DEFAULT_WARM_START_S must be positive seconds.")
if FLEET_WARM_DOWN_HOLD_STARTS < 0:
    raise ImproperlyConfigured("FLEET_WARM_DOWN_HOLD_STARTS must be 0 or more (0: the full scale-down window).")
if FLEET_SKY_STATUS_TIMEOUT_S <= 0:
    raise ImproperlyConfigured("FLEET_SKY_STATUS_TIMEOUT_S must be a positive number of seconds.")
if min(FLEET_HEALTH_INTERVAL_S, FLEET_UNHEALTHY_AFTER, FLEET_LAUNCH_POLL_S) < 1 or FLEET_HEALTH_TIMEOUT_S <= 0:
    raise ImproperlyConfigured("FLEET_* intervals, timeouts and thresholds must be positive.")

# --- R2 storage -----------------------------------------------------------------------------
# Cloudflare R2 (or any S3-compatible store): model weights that nodes stream with vLLM's Run:ai
# streamer. Only apps/catalog/storage.py reads these to build its boto3 client.
R2_ENDPOINT_URL: str = env("R2_ENDPOINT_URL", default="")
R2_ACCESS_KEY_ID: str = env("R2_ACCESS_KEY_ID", default="")
R2_SECRET_ACCESS_KEY: str = env("R2_SECRET_ACCESS_KEY", default="")
# GPU nodes read weights with their own read-only token (docs/r2.md); never the uploader's.
R2_NODE_ACCESS_KEY_ID: str = env("R2_NODE_ACCESS_KEY_ID", default="")
R2_NODE_SECRET_ACCESS_KEY: str = env("R2_NODE_SECRET_ACCESS_KEY", default="")
R2_BUCKET: str = env("R2_BUCKET", default="")
R2_REGION: str = env("R2_REGION", default="auto")
R2_CONNECT_TIMEOUT_S: float = _env_or_fail("R2_CONNECT_TIMEOUT_S", float, 10.0)
R2_READ_TIMEOUT_S: float = _env_or_fail("R2_READ_TIMEOUT_S", float, 120.0)
R2_MAX_ATTEMPTS: int = _env_or_fail("R2_MAX_ATTEMPTS", int, 5)
R2_MULTIPART_THRESHOLD_MB: int = _env_or_fail("R2_MULTIPART_THRESHOLD_MB", int, 16)
R2_MULTIPART_CHUNK_MB: int = _env_or_fail("R2_MULTIPART_CHUNK_MB", int, 8)
R2_MAX_CONCURRENCY: int = _env_or_fail("R2_MAX_CONCURRENCY", int, 8)
# botocore's own default ("when_supported") sends every PutObject/UploadPart body aws-chunked with a
# CRC32 trailer over https, which R2 refuses (401 Unauthorized): keep "when_required" for R2. We send our
# own SHA-256 where R2 checks it (ChecksumSHA256 on single PUTs). "when_supported" only for stores that take it.
R2_CHECKSUMS: str = env("R2_CHECKSUMS", default="when_required")
# A CA bundle (PEM) to verify the endpoint's certificate with; empty = the system/certifi store (real R2).
R2_CA_BUNDLE: str = env("R2_CA_BUNDLE", default="")
# Economics (docs/economics.md): R2's list price for standard storage, USD per GB-month (GB = 10^9 bytes).
_r2_price = env.str("R2_STORAGE_PRICE_PER_GB_MONTH", default="0.015")
try:
    R2_STORAGE_PRICE_PER_GB_MONTH: Decimal = Decimal(_r2_price.strip())
except ArithmeticError:  # decimal.InvalidOperation
    R2_STORAGE_PRICE_PER_GB_MONTH = Decimal(-1)
if not R2_STORAGE_PRICE_PER_GB_MONTH.is_finite() or R2_STORAGE_PRICE_PER_GB_MONTH < 0:
    raise ImproperlyConfigured(f"R2_STORAGE_PRICE_PER_GB_MONTH is invalid: {_r2_price!r} is not a price >= 0 (USD).")
# The staff dashboard (/admin/dashboard/) refetches its numbers this often.
DASHBOARD_REFRESH_S: int = _env_or_fail("DASHBOARD_REFRESH_S", int, 30)
if DASHBOARD_REFRESH_S < 5:
    raise ImproperlyConfigured("DASHBOARD_REFRESH_S must be at least 5 (seconds).")
if R2_ENDPOINT_URL and urlparse(R2_ENDPOINT_URL).scheme not in {"http", "https"}:
    raise ImproperlyConfigured("R2_ENDPOINT_URL must be an http(s):// URL: https://<account>.r2.cloudflarestorage.com")
if R2_MULTIPART_CHUNK_MB < 5 or R2_MULTIPART_THRESHOLD_MB < 5 or not 1 <= R2_MAX_CONCURRENCY <= 64:
    raise ImproperlyConfigured("R2 multipart sizes must be >= 5 MB and R2_MAX_CONCURRENCY within 1..64.")
if R2_CHECKSUMS not in {"when_supported", "when_required"}:
    raise ImproperlyConfigured("R2_CHECKSUMS must be when_required (R2) or when_supported.")
if R2_CA_BUNDLE and not Path(R2_CA_BUNDLE).is_file():
    raise ImproperlyConfigured(f"R2_CA_BUNDLE: {R2_CA_BUNDLE} is not a file (a PEM bundle of CA certificates).")
HF_TOKEN: str = env("HF_TOKEN", default="")
HF_ENDPOINT: str = env("HF_ENDPOINT", default="")  # a Hugging Face mirror; empty = huggingface.co
UPLOAD_WORK_DIR: Path = Path(env("UPLOAD_WORK_DIR", default=str(VAR_DIR / "uploads")))
UPLOAD_PROGRESS_INTERVAL_S: float = _env_or_fail("UPLOAD_PROGRESS_INTERVAL_S", float, 0.5)
# An upload whose row has not moved for this long is considered dead (worker killed) and may be re-queued.
UPLOAD_STALE_AFTER_S: int = _env_or_fail("UPLOAD_STALE_AFTER_S", int, 600)
UPLOAD_FILE_RETRIES: int = _env_or_fail("UPLOAD_FILE_RETRIES", int, 3)
# First wait before a file is retried; doubles on each further attempt (capped at 60 s).
UPLOAD_RETRY_BACKOFF_S: float = _env_or_fail("UPLOAD_RETRY_BACKOFF_S", float, 2.0)
# Files sent at once (their parts share the R2_MAX_CONCURRENCY threads): keeps the pipe full across small files.
UPLOAD_FILES_IN_FLIGHT: int = _env_or_fail("UPLOAD_FILES_IN_FLIGHT", int, 2)

# --- Tenancy and management API -------------------------------------------------------------
# Several serializers have a `status` field with different choice sets; name their enums.
SPECTACULAR_SETTINGS.setdefault("ENUM_NAME_OVERRIDES", {}).update(
    {
        "TenantStatusEnum": "apps.tenancy.models.TenantStatus",
        "KeyStatusEnum": "apps.tenancy.serializers.KEY_STATUS_CHOICES",
    }
)

# --- Metering: rollups, retention, Stripe (docs/metering.md) ---------------------------------
# Raw usage records are kept this many days, then deleted in batches once their hour is rolled up.
USAGE_RETENTION_DAYS: int = _env_or_fail("USAGE_RETENTION_DAYS", int, 90)
USAGE_PRUNE_BATCH: int = _env_or_fail("USAGE_PRUNE_BATCH", int, 2000)  # ids per DELETE statement
USAGE_PRUNE_MAX_ROWS: int = _env_or_fail("USAGE_PRUNE_MAX_ROWS", int, 500_000)  # per beat run
# The hourly rollup pass rebuilds this many complete hours back (besides hours with late records).
USAGE_ROLLUP_LOOKBACK_HOURS: int = _env_or_fail("USAGE_ROLLUP_LOOKBACK_HOURS", int, 3)
# Hours after the newest rollup are read from raw records, at most this many (a stopped beat).
USAGE_LIVE_MAX_HOURS: int = _env_or_fail("USAGE_LIVE_MAX_HOURS", int, 3)
if USAGE_RETENTION_DAYS < 1 or USAGE_PRUNE_BATCH < 1 or USAGE_PRUNE_MAX_ROWS < 1:
    raise ImproperlyConfigured("USAGE_RETENTION_DAYS, USAGE_PRUNE_BATCH and USAGE_PRUNE_MAX_ROWS must be >= 1.")
if not 1 <= USAGE_ROLLUP_LOOKBACK_HOURS <= 168 or not 1 <= USAGE_LIVE_MAX_HOURS <= 48:
    raise ImproperlyConfigured("USAGE_ROLLUP_LOOKBACK_HOURS must be within 1..168, USAGE_LIVE_MAX_HOURS within 1..48.")
# Stripe Billing Meters: on only when STRIPE_API_KEY is set (a secret key, sk_... or rk_...).
STRIPE_API_KEY: str = env("STRIPE_API_KEY", default="")
STRIPE_API_BASE: str = env("STRIPE_API_BASE", default="")  # empty = https://api.stripe.com (tests: a local stub)
STRIPE_TIMEOUT_S: float = _env_or_fail("STRIPE_TIMEOUT_S", float, 20.0)
# Meter event names (the meter's event_name in Stripe); an empty name does not send that meter.
STRIPE_METER_PROMPT_TOKENS: str = env("STRIPE_METER_PROMPT_TOKENS", default="crosslogic_prompt_tokens")
STRIPE_METER_COMPLETION_TOKENS: str = env("STRIPE_METER_COMPLETION_TOKENS", default="crosslogic_completion_tokens")
STRIPE_METER_COST_MICROS: str = env("STRIPE_METER_COST_MICROS", default="")
if STRIPE_API_BASE and urlparse(STRIPE_API_BASE).scheme not in {"http", "https"}:
    raise ImproperlyConfigured("STRIPE_API_BASE must be an http(s):// URL.")

# --- Gateway --------------------------------------------------------------------------------
# The OpenAI-compatible /v1 proxy (apps/gateway). No total timeout on upstream calls: streams
# may run for many minutes; only connecting and silence between bytes are bounded.
GATEWAY_CONNECT_TIMEOUT_S: float = _env_or_fail("GATEWAY_CONNECT_TIMEOUT_S", float, 3.0)
GATEWAY_READ_IDLE_TIMEOUT_S: float = _env_or_fail("GATEWAY_READ_IDLE_TIMEOUT_S", float, 300.0)
GATEWAY_MAX_BODY_BYTES: int = _env_or_fail("GATEWAY_MAX_BODY_BYTES", int, 4 * 1024 * 1024)
GATEWAY_DEFAULT_MAX_TOKENS: int = _env_or_fail("GATEWAY_DEFAULT_MAX_TOKENS", int, 1024)
GATEWAY_RATE_LIMIT_FAIL_OPEN: bool = _env_or_fail("GATEWAY_RATE_LIMIT_FAIL_OPEN", bool, True)
GATEWAY_MAX_RETRIES: int = _env_or_fail("GATEWAY_MAX_RETRIES", int, 2)
GATEWAY_NODE_COOLDOWN_S: float = _env_or_fail("GATEWAY_NODE_COOLDOWN_S", float, 10.0)
GATEWAY_UPSTREAM_POOL_SIZE: int = _env_or_fail("GATEWAY_UPSTREAM_POOL_SIZE", int, 1024)
GATEWAY_KEY_CACHE_TTL_S: float = _env_or_fail("GATEWAY_KEY_CACHE_TTL_S", float, 60.0)
GATEWAY_USAGE_FLUSH_INTERVAL_S: float = _env_or_fail("GATEWAY_USAGE_FLUSH_INTERVAL_S", float, 0.5)
GATEWAY_USAGE_BATCH_SIZE: int = _env_or_fail("GATEWAY_USAGE_BATCH_SIZE", int, 500)
GATEWAY_USAGE_BUFFER_MAX: int = _env_or_fail("GATEWAY_USAGE_BUFFER_MAX", int, 200_000)
ROUTING_REFRESH_S: float = _env_or_fail("ROUTING_REFRESH_S", float, 1.0)
# redis-py pool size per gateway worker, for the load board and readiness (rate limits and budgets
# use one shared pipelined connection, apps.core.redis.Multiplexed). redis-py's asyncio pool
# refuses beyond its size (default 100), which under load turned into fail-open admissions.
GATEWAY_REDIS_MAX_CONNECTIONS: int = _env_or_fail("GATEWAY_REDIS_MAX_CONNECTIONS", int, 2048)
# The HTTP edge (crosslogic/server.py): what a client may send before the application sees a
# request. A reverse proxy in front (docker-compose's nginx) applies its own, similar limits.
HTTP_MAX_HEADER_BYTES: int = _env_or_fail("HTTP_MAX_HEADER_BYTES", int, 64 * 1024)
HTTP_MAX_HEADERS: int = _env_or_fail("HTTP_MAX_HEADERS", int, 100)
HTTP_HEADER_TIMEOUT_S: float = _env_or_fail("HTTP_HEADER_TIMEOUT_S", float, 10.0)
# Idle keep-alive between requests; above a load balancer's idle timeout (AWS ALB: 60 s).
HTTP_KEEPALIVE_S: int = _env_or_fail("HTTP_KEEPALIVE_S", int, 75)
if HTTP_MAX_HEADER_BYTES < 4096 or HTTP_MAX_HEADERS < 16:
    raise ImproperlyConfigured("HTTP_MAX_HEADER_BYTES must be >= 4096 and HTTP_MAX_HEADERS >= 16.")
if HTTP_HEADER_TIMEOUT_S <= 0 or HTTP_KEEPALIVE_S < 1:
    raise ImproperlyConfigured("HTTP_HEADER_TIMEOUT_S must be positive and HTTP_KEEPALIVE_S at least 1.")
if min(GATEWAY_CONNECT_TIMEOUT_S, GATEWAY_READ_IDLE_TIMEOUT_S, ROUTING_REFRESH_S) <= 0 or GATEWAY_MAX_RETRIES < 0:
    raise ImproperlyConfigured("GATEWAY_* timeouts and ROUTING_REFRESH_S must be positive, retries >= 0.")
if GATEWAY_MAX_BODY_BYTES < 1024 or GATEWAY_DEFAULT_MAX_TOKENS < 1:
    raise ImproperlyConfigured("GATEWAY_MAX_BODY_BYTES must be >= 1024 and GATEWAY_DEFAULT_MAX_TOKENS >= 1.")
# Longest a client may take to send its whole request body (408 after): an unfinished body must
# not hold a connection and a worker's memory forever.
GATEWAY_BODY_TIMEOUT_S: float = _env_or_fail("GATEWAY_BODY_TIMEOUT_S", float, 30.0)
# A node that answered 5xx to this many different requests that then worked on another node,
# within the window, is cooled down; a request failing on two nodes is the request's fault.
GATEWAY_NODE_FAILURES_TO_COOL_DOWN: int = _env_or_fail("GATEWAY_NODE_FAILURES_TO_COOL_DOWN", int, 3)
GATEWAY_NODE_FAILURE_WINDOW_S: float = _env_or_fail("GATEWAY_NODE_FAILURE_WINDOW_S", float, 30.0)
# Fairness: one tenant's requests in flight on one model, per ready node of it (0 = no cap), so
# one tenant's flood leaves room for the others (vLLM batches 256 sequences per node by default).
GATEWAY_TENANT_INFLIGHT_PER_NODE: int = _env_or_fail("GATEWAY_TENANT_INFLIGHT_PER_NODE", int, 128)
# Admission leases (docs/gateway.md): how long a worker may admit a busy key's requests from a
# slice of its limits leased from Redis before the unused part goes back (0 = no leases: one Redis
# call per request). Also the longest that an unused slice is withheld from the other workers.
GATEWAY_RATE_LIMIT_LEASE_S: float = _env_or_fail("GATEWAY_RATE_LIMIT_LEASE_S", float, 1.0)
# Prometheus (docs/monitoring.md): /metrics for a staff token. Each worker publishes its counters
# to Redis this often; a tenant label on requests and tokens only if turned on (cardinality).
METRICS_ENABLED: bool = _env_or_fail("METRICS_ENABLED", bool, True)
METRICS_PUBLISH_INTERVAL_S: float = _env_or_fail("METRICS_PUBLISH_INTERVAL_S", float, 5.0)
METRICS_TENANT_LABEL: bool = _env_or_fail("METRICS_TENANT_LABEL", bool, False)
if METRICS_PUBLISH_INTERVAL_S <= 0:
    raise ImproperlyConfigured("METRICS_PUBLISH_INTERVAL_S must be a positive number of seconds.")
# Budgets in dollars (docs/metering.md): how often beat looks for crossed thresholds, and how long a
# tenant's webhook may take. Alert emails go through Django's email settings below.
BUDGET_ALERT_INTERVAL_S: int = _env_or_fail("BUDGET_ALERT_INTERVAL_S", int, 60)
BUDGET_WEBHOOK_TIMEOUT_S: float = _env_or_fail("BUDGET_WEBHOOK_TIMEOUT_S", float, 5.0)
# Seals each tenant's webhook signing secret in the database (apps.core.sealing); separate from
# SECRET_KEY so rotating one does not rotate the other. Changing it voids every stored secret:
# tenants then get a new one (rotate it in the admin or the API to see it).
WEBHOOK_SECRET_KEY: str = env("WEBHOOK_SECRET_KEY", default=SECRET_KEY)
# Tenants choose their webhook URL, so by default it may only reach public addresses: a URL naming
# (or resolving to) loopback, a private network or the cloud's metadata service (169.254.169.254)
# is refused, which keeps the webhook from being a way into the control plane's own network.
WEBHOOK_ALLOW_PRIVATE_ADDRESSES: bool = _env_or_fail("WEBHOOK_ALLOW_PRIVATE_ADDRESSES", bool, False)
if BUDGET_ALERT_INTERVAL_S < 1 or BUDGET_WEBHOOK_TIMEOUT_S <= 0:
    raise ImproperlyConfigured("BUDGET_ALERT_INTERVAL_S must be >= 1 and BUDGET_WEBHOOK_TIMEOUT_S positive.")
_MAIL = "django.core.mail.backends."
EMAIL_BACKEND: str = env("EMAIL_BACKEND", default=_MAIL + ("console.EmailBackend" if DEBUG else "smtp.EmailBackend"))
EMAIL_HOST: str = env("EMAIL_HOST", default="localhost")
EMAIL_PORT: int = _env_or_fail("EMAIL_PORT", int, 25)
EMAIL_HOST_USER: str = env("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD: str = env("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS: bool = _env_or_fail("EMAIL_USE_TLS", bool, False)
EMAIL_TIMEOUT: int = _env_or_fail("EMAIL_TIMEOUT", int, 10)
DEFAULT_FROM_EMAIL: str = env("DEFAULT_FROM_EMAIL", default="CrossLogic <noreply@localhost>")
# Scale from zero (apps/gateway/coldstart.py): requests for a model whose first node is starting
# are held, at most this many per model per gateway worker, for at most this long; then 503.
GATEWAY_COLD_QUEUE_MAX: int = _env_or_fail("GATEWAY_COLD_QUEUE_MAX", int, 256)
GATEWAY_COLD_WAIT_S: float = _env_or_fail("GATEWAY_COLD_WAIT_S", float, 120.0)
if GATEWAY_COLD_QUEUE_MAX < 0 or GATEWAY_COLD_WAIT_S <= 0:
    raise ImproperlyConfigured(
        "GATEWAY_COLD_QUEUE_MAX must be >= 0 (0: hold nothing) and GATEWAY_COLD_WAIT_S positive."
    )
if GATEWAY_BODY_TIMEOUT_S <= 0 or GATEWAY_NODE_FAILURE_WINDOW_S <= 0:
    raise ImproperlyConfigured("GATEWAY_BODY_TIMEOUT_S and GATEWAY_NODE_FAILURE_WINDOW_S must be positive.")
if GATEWAY_RATE_LIMIT_LEASE_S < 0 or GATEWAY_RATE_LIMIT_LEASE_S > 60:
    raise ImproperlyConfigured("GATEWAY_RATE_LIMIT_LEASE_S must be between 0 (no leases) and 60 seconds.")
if GATEWAY_NODE_FAILURES_TO_COOL_DOWN < 1 or GATEWAY_TENANT_INFLIGHT_PER_NODE < 0:
    raise ImproperlyConfigured(
        "GATEWAY_NODE_FAILURES_TO_COOL_DOWN must be >= 1, GATEWAY_TENANT_INFLIGHT_PER_NODE >= 0 (0: no cap)."
    )
