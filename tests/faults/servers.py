"""Throwaway PostgreSQL and Redis servers for the fault suite and the soak (bench/soak.py): each
in a temporary folder on a free port, stoppable and restartable on the same port, deleted on
close. The machine's own servers on the standard ports are never touched.

Binaries are found as scripts/services.sh finds them: CROSSLOGIC_PG_BINDIR (a folder with
initdb and pg_ctl) or initdb on PATH or /usr/lib/postgresql/*/bin; CROSSLOGIC_REDIS_SERVER or
redis-server on PATH. As root, PostgreSQL runs as the user ``postgres`` (initdb refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class ServerUnavailableError(RuntimeError):
    """The binaries to start a throwaway server are not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pg_bindir() -> str | None:
    chosen = os.environ.get("CROSSLOGIC_PG_BINDIR")
    if chosen is not None:
        return chosen if Path(chosen, "initdb").exists() and Path(chosen, "pg_ctl").exists() else None
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return str(Path(initdb).parent)
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(bindir, "initdb").exists() and Path(bindir, "pg_ctl").exists():
            return bindir
    return None


def redis_binary() -> str | None:
    return os.environ.get("CROSSLOGIC_REDIS_SERVER") or shutil.which("redis-server")


class ThrowawayPostgres:
    """initdb once, then start/stop (fast: fsync off) on the same port for the object's life."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise ServerUnavailableError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bindir = Path(bindir)
        self.dir = Path(tempfile.mkdtemp(prefix="crosslogic-faults-pg."))
        self.port = free_port()
        self.runas: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.dir, *_uid_gid("postgres"))
            self.runas = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.runas, str(self.bindir / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "-t", "30",
                  "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected, as when an operator stops the server; ``immediate``: a crash."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "-t", "30", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThrowawayRedis:
    """redis-server without persistence; ``kill()`` is a SIGKILL (everything in it is lost),
    ``start()`` brings an empty one back on the same port."""

    def __init__(self) -> None:
        binary = redis_binary()
        if binary is None:
            raise ServerUnavailableError("redis-server is not installed")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="crosslogic-faults-redis."))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        _wait(lambda: port_open(self.port), 15, f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
