"""An ActiveMQ broker of a test's own, on a free port, with its state in a folder: one that
may be killed with SIGKILL and started again without disturbing anybody else using the
machine's shared broker (as :mod:`tributary.testbed.faults` does for its rig)."""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tributary.services import broker as broker_service
from tributary.services.system import free_port


@dataclass
class PrivateBroker:
    base: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=lambda: free_port("127.0.0.1"))

    @property
    def _config(self) -> Path:
        return self.base / "conf" / "activemq.xml"

    def start(self) -> PrivateBroker:
        """Start it (the first time, write its configuration); returns once it listens."""
        if not self._config.exists():
            self._config.parent.mkdir(parents=True, exist_ok=True)
            template = resources.files("tributary.services").joinpath("activemq.xml")
            self._config.write_text(template.read_text().replace("@HOST@", self.host)
                                    .replace("@PORT@", str(self.port)))
        broker_service.start_instance(self.base, self._config, self.host, self.port)
        return self

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL, as a crash: nothing of it is kept but what it had written to disk."""
        os.kill(int((self.base / "broker.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self._listening():
            if time.monotonic() > deadline:
                raise TimeoutError("the killed broker still listens")
            time.sleep(0.2)

    def stop(self) -> None:
        broker_service.stop_instance(self.base)

    def _listening(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.host, self.port)) == 0
