"""`python -m crosslogic.serve`: uvicorn with the project's edge limits (crosslogic/server.py).

`make run` and the benchmarks use it; production runs gunicorn with `crosslogic.server.UvicornWorker`,
which applies the same protocol. uvicorn's own CLI cannot select a protocol class, hence this command.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from crosslogic.server import uvicorn_config_kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosslogic.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one, no master)")
    parser.add_argument("--backlog", type=int, default=2048)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536 and args.port != 0:
        parser.error(f"--port {args.port} is not a TCP port")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
    from django.conf import settings

    uvicorn.run(
        "crosslogic.asgi:application",
        host=args.host,
        port=args.port,
        workers=args.workers,
        backlog=args.backlog,
        lifespan="on",
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_keep_alive=int(settings.HTTP_KEEPALIVE_S),
        **uvicorn_config_kwargs(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
