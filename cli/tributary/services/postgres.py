"""PostgreSQL from Debian's ``postgresql`` package, for a hub that keeps its database on a
server rather than in SQLite (and for the tests that show the hub works on one).

Our own cluster, not the package's: loopback only, SCRAM password authentication for the
one role ``tributary`` with a generated password kept in the state folder (mode 600).
PostgreSQL refuses to run as root, so when started by root the server runs as the
package's ``postgres`` user, its data in a folder that user owns. Idempotent: a running
cluster of ours is reused."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tributary.services.pki import read_or_create_secret
from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    one_starter,
    preferred_port,
    read_pid,
    recorded_port,
    start_daemon,
    stop_daemon,
    wait_for,
)

ROLE = "tributary"
#: Where a root-started cluster keeps its data: root's own state folder is not reachable
#: by the unprivileged ``postgres`` user.
ROOT_DATA_BASE = Path("/var/lib/tributary-postgres")


def _password(settings: ServiceSettings) -> str:
    return read_or_create_secret(settings.path("postgres", "password"))


def _bin_dir() -> Path:
    ensure_commands({"pg_ctlcluster": "postgresql"})
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise ServiceError("Debian's postgresql is installed but no server binary was found")
    return versions[-1].parent


def _as_server_user(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as ``postgres`` when we are root (setpriv execs: the pid stays the
    server's, so stopping it signals the server itself)."""
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd]


def _data_base(settings: ServiceSettings) -> Path:
    if os.geteuid() != 0:
        return settings.path("postgres", "cluster", "x").parent
    user = pwd.getpwnam("postgres")
    ROOT_DATA_BASE.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(ROOT_DATA_BASE, user.pw_uid, user.pw_gid)
    return ROOT_DATA_BASE


def _chown_to_server(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)


def _initdb(bin_dir: Path, data: Path, password: str) -> None:
    data.parent.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / "initdb-password"
    pwfile.touch(mode=0o600)
    pwfile.write_text(password + "\n")
    _chown_to_server(pwfile)
    try:
        done = subprocess.run(_as_server_user([
            str(bin_dir / "initdb"), "-D", str(data), "-U", ROLE, f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
            "--locale=C", "--no-instructions"]), capture_output=True, text=True)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ServiceError(f"initdb failed: {done.stderr.strip()[-2000:]}")


def _accepting(bin_dir: Path, host: str, port: int) -> bool:
    """Whether the server accepts sessions (``pg_isready`` exits 0 only then)."""
    done = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", host, "-p", str(port),
                           "-t", "2"], capture_output=True)
    return done.returncode == 0


def url(settings: ServiceSettings, port: int, database: str = "postgres") -> str:
    """A SQLAlchemy URL (psycopg 3 driver) for ``database`` on our cluster."""
    return (f"postgresql+psycopg://{ROLE}:{_password(settings)}@{settings.host}:{port}/"
            f"{database}")


@one_starter("postgres")
def ensure_running(settings: ServiceSettings | None = None) -> str:
    """Start our cluster if it is not running; return the URL of its ``postgres``
    database. Listens on ``TRIBUTARY_POSTGRES_PORT`` if free, else on a free port."""
    settings = settings or ServiceSettings()
    pidfile = settings.path("postgres", "postgres.pid")
    portfile = settings.path("postgres", "port")
    bin_dir = _bin_dir()
    running = recorded_port(pidfile, portfile, settings.host)
    if running is not None:
        # Its port may be open while it still replays its log after a restart.
        wait_for(lambda: _accepting(bin_dir, settings.host, running), 60, "postgres",
                 settings.path("postgres", "postgres.log"))
        return url(settings, running)
    stop(settings)
    base = _data_base(settings)
    data = base / "data"
    if not settings.path("postgres", "password").exists():
        # A cluster whose password went with an earlier state folder cannot be logged in
        # to: it only ever held this project's local databases, so it is made anew.
        shutil.rmtree(data, ignore_errors=True)
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        _initdb(bin_dir, data, _password(settings))
    sockets = base / "run"
    sockets.mkdir(exist_ok=True)
    _chown_to_server(sockets)
    port = preferred_port(settings.host, settings.postgres_port)
    log = settings.path("postgres", "postgres.log")
    start_daemon(_as_server_user([
        str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={settings.host}", "-c", f"unix_socket_directories={sockets}",
        "-c", "max_connections=200"]), pidfile, log)
    try:
        # An open port is not readiness: during start-up the server answers "the database
        # system is starting up" and refuses sessions.
        wait_for(lambda: _accepting(bin_dir, settings.host, port), 60, "postgres", log)
    except ServiceError:
        stop(settings)
        raise
    portfile.write_text(str(port))
    return url(settings, port)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` (if missing) on the server of ``server_url``; its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                        {"n": name}).first()
            if exists is None:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def stop(settings: ServiceSettings | None = None) -> bool:
    """Fast shutdown (SIGINT: sessions are ended, the cluster stays consistent)."""
    pidfile = (settings or ServiceSettings()).path("postgres", "postgres.pid")
    pid = read_pid(pidfile)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and read_pid(pidfile) is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
    return stop_daemon(pidfile)
