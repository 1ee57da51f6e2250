"""Small network probes that :class:`tributary.testbed.hosts.Hosts` runs *inside* a
network namespace (``ip netns exec NS python -m tributary.testbed.netprobe ...``): a
process sees only its namespace's interfaces, so the probe has to be a process of its own.
Standard library only, so it starts fast; each command prints one JSON object.

Commands::

    connect HOST PORT                 can a TCP connection be opened?
    tls HOST PORT CA [CERT KEY]       does a TLS handshake verifying against CA succeed?
    plain HOST PORT http|stomp        what does a plaintext request get back?
    listen HOST PORT                  accept connections (prints {"ready": true} first)
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from typing import Any

TIMEOUT = 2.0
#: What a plaintext server answers first: an HTTP status line or a STOMP frame.
PLAINTEXT_ANSWERS = (b"HTTP/", b"CONNECTED", b"ERROR")
#: What Go's TLS servers (SeaweedFS's S3 gateway) send back to a plaintext HTTP request before
#: closing: a refusal, not a service answering in plaintext.
TLS_REFUSAL = b"Client sent an HTTP request to an HTTPS server"
REQUESTS = {
    "http": b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n",
    "stomp": b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00",
}


def connect(host: str, port: int) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return {"connected": True}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


def tls(host: str, port: int, ca: str, cert: str | None = None,
        key: str | None = None) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname=host) as conn:
            return {"handshake": True, "version": conn.version(),
                    "subject": dict(x[0] for x in conn.getpeercert()["subject"])}
    except (OSError, ssl.SSLError) as exc:
        return {"handshake": False, "error": f"{type(exc).__name__}: {exc}"}


def plain(host: str, port: int, protocol: str) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
            conn.sendall(REQUESTS[protocol])
            answer = b""
            try:
                while len(answer) < 256:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    answer += chunk
            except (TimeoutError, ConnectionResetError):
                pass
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"connected": True, "answer": answer.hex(),
            "plaintext": answer.startswith(PLAINTEXT_ANSWERS) and TLS_REFUSAL not in answer}


def listen(host: str, port: int) -> None:
    with socket.create_server((host, port)) as server:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello\n")


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "listen":
        listen(args[0], int(args[1]))
        return 0
    if command == "connect":
        result = connect(args[0], int(args[1]))
    elif command == "tls":
        result = tls(args[0], int(args[1]), *args[2:5])
    elif command == "plain":
        result = plain(args[0], int(args[1]), args[2])
    else:
        print(json.dumps({"error": f"unknown probe {command!r}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
