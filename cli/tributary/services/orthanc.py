"""An Orthanc PACS with its DICOMweb plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``)
on loopback: a real QIDO-RS/WADO-RS server for the spoke's PACS source, in tests and
demos. Each instance lives in its own folder (config, storage, index, pid, log), so
several can run side by side; starting one that already runs there is a no-op."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from tributary.services.system import (
    ServiceError,
    apt_get,
    ensure_commands,
    port_open,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def ensure_installed() -> None:
    """apt-get install Orthanc and its DICOMweb plugin when either is missing."""
    ensure_commands({"Orthanc": "orthanc"})
    if not DICOMWEB_PLUGIN.exists():
        if os.geteuid() != 0:
            raise ServiceError("missing Debian package orthanc-dicomweb; run as root to "
                               "install it")
        if shutil.which("apt-get") is None:
            raise ServiceError("orthanc-dicomweb is missing and apt-get is unavailable")
        apt_get("install", "-y", "-qq", "orthanc-dicomweb")


@dataclass(frozen=True)
class Orthanc:
    directory: Path
    host: str
    http_port: int
    users: dict[str, str] | None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _client(self) -> httpx.Client:
        auth = next(iter(self.users.items())) if self.users else None
        return httpx.Client(base_url=self.url, auth=auth, timeout=60)

    def upload(self, files: list[Path]) -> int:
        """Store DICOM files (POST /instances); returns how many Orthanc accepted."""
        stored = 0
        with self._client() as client:
            for path in files:
                response = client.post("/instances", content=path.read_bytes(),
                                       headers={"Content-Type": "application/dicom"})
                response.raise_for_status()
                stored += 1
        return stored

    def stop(self) -> bool:
        return stop_daemon(self.directory / "orthanc.pid")


def start(directory: Path, http_port: int, host: str = "127.0.0.1",
          users: dict[str, str] | None = None) -> Orthanc:
    """Start (or find running) an Orthanc whose files live in ``directory``."""
    server = Orthanc(directory, host, http_port, users)
    pidfile = directory / "orthanc.pid"
    if read_pid(pidfile) is not None and port_open(host, http_port):
        return server
    if port_open(host, http_port):
        raise ServiceError(f"port {http_port} is taken by another process")
    ensure_installed()
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "tributary-test-pacs",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": http_port,
        "DicomServerEnabled": False,  # DICOMweb only: no DIMSE listener
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StorageCompression": False,
    }
    config_file = directory / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    config_file.chmod(0o600)  # it may hold users' passwords
    log = directory / "orthanc.log"
    start_daemon(["Orthanc", str(config_file)], pidfile, log, cwd=directory)
    wait_for(lambda: port_open(host, http_port), 30, "Orthanc", log)
    return server
