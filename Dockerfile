# CrossLogic control plane image: the web (gunicorn + uvicorn workers), the Celery worker and beat
# all run from it; docker-compose.yml picks the command. Build: docker build -t crosslogic .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user owns nothing but var/ (upload scratch space) and its home (caches).
RUN groupadd --system --gid 10001 crosslogic \
    && useradd --system --uid 10001 --gid crosslogic --create-home --home-dir /home/crosslogic crosslogic

WORKDIR /app

# Dependencies first, pinned by constraints.txt, so code changes reuse this layer.
# Every pinned package ships manylinux wheels (psycopg[binary] bundles libpq): no compiler needed.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt && pip check

COPY . .

# Hashed, compressed static files for WhiteNoise. The values below exist only for this build step
# (settings refuse to start with DEBUG off and no secret); the running containers get theirs from .env.
RUN DEBUG=false \
    SECRET_KEY=build-time-only-collectstatic-not-a-real-secret-0000 \
    API_KEY_PEPPER=build-time-only-not-a-pepper \
    ALLOWED_HOSTS=build.invalid \
    DATABASE_URL=postgres://build@build.invalid:5432/build \
    CROSSLOGIC_ENV_FILE= \
    python manage.py collectstatic --noinput \
    && mkdir -p /app/var/uploads \
    && chown -R crosslogic:crosslogic /app/var

USER crosslogic

EXPOSE 8000

# Liveness of the web process; the worker and beat services override it in docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["gunicorn", "crosslogic.asgi:application", "--worker-class", "crosslogic.server.UvicornWorker", \
     "--bind", "0.0.0.0:8000", "--graceful-timeout", "60", "--keep-alive", "75", \
     "--worker-tmp-dir", "/dev/shm", "--access-logfile", "-"]
