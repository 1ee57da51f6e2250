"""ActiveMQ Classic from Debian's ``activemq`` package, run as our own instance with a
generated configuration: STOMP on loopback, KahaDB persistence, per-queue dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    port_open,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)

ACTIVEMQ_HOME = Path("/usr/share/activemq")


def _write_config(settings: ServiceSettings) -> Path:
    base = settings.state_dir / "activemq"
    conf = base / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    template = resources.files("tributary.services").joinpath("activemq.xml").read_text()
    xml = template.replace("@HOST@", settings.host).replace("@PORT@", str(settings.broker_port))
    (conf / "activemq.xml").write_text(xml)
    return base


def ensure_running(settings: ServiceSettings) -> str:
    pidfile = settings.path("activemq", "broker.pid")
    if read_pid(pidfile) is not None and port_open(settings.host, settings.broker_port):
        return "running"
    if port_open(settings.host, settings.broker_port):
        raise ServiceError(
            f"port {settings.broker_port} is taken by another process; "
            "set TRIBUTARY_BROKER_PORT to use another"
        )
    base = _write_config(settings)
    start_instance(base, base / "conf" / "activemq.xml", settings.host, settings.broker_port)
    return "started"


def start_instance(base: Path, config: Path, host: str, port: int,
                   jaas_config: Path | None = None,
                   command_prefix: Sequence[str] = ()) -> None:
    """Start a broker from ``config`` with its state in ``base`` (``data/``, ``conf/``,
    ``broker.pid``) and wait until ``host:port``, the port the config listens on, is open.
    Separate from :func:`ensure_running` so other configurations (the mutual-TLS one) run
    the same way. ``command_prefix`` runs it through a wrapper that replaces itself with
    the command (``ip netns exec NS``, to put it on another simulated host)."""
    ensure_commands({"java": "default-jre-headless"})
    if not (ACTIVEMQ_HOME / "bin" / "activemq.jar").exists():
        ensure_commands({"activemq-not-installed": "activemq"})
    conf = base / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (base / "data").mkdir(exist_ok=True)
    log4j = resources.files("tributary.services").joinpath("log4j2.properties").read_text()
    (conf / "log4j2.properties").write_text(log4j)
    log = base / "data" / "console.log"
    start_daemon(
        [
            *command_prefix, "java", "-Xms64M", "-Xmx256M", "-Djava.awt.headless=true",
            f"-Dactivemq.home={ACTIVEMQ_HOME}", f"-Dactivemq.base={base}",
            f"-Dactivemq.conf={conf}", f"-Dactivemq.data={base / 'data'}",
            f"-Dlog4j2.configurationFile={conf / 'log4j2.properties'}",
            *([f"-Djava.security.auth.login.config={jaas_config}"] if jaas_config else []),
            "-jar", str(ACTIVEMQ_HOME / "bin" / "activemq.jar"),
            "start", f"xbean:file:{config}",
        ],
        base / "broker.pid",
        log,
        cwd=base,
    )
    wait_for(lambda: port_open(host, port), 90, "ActiveMQ", log)


def stop_instance(base: Path) -> bool:
    """Stop the broker started with state in ``base``; True if one was running."""
    return stop_daemon(base / "broker.pid", timeout=30)


def stop(settings: ServiceSettings) -> bool:
    return stop_instance(settings.state_dir / "activemq")


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    listening = port_open(settings.host, settings.broker_port)
    where = f"stomp://{settings.host}:{settings.broker_port}"
    if listening:
        return True, where
    if read_pid(settings.path("activemq", "broker.pid")) is not None:
        return False, "starting or stuck (process up, port closed)"
    return False, "not running"
