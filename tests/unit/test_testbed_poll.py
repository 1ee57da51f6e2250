"""The testbed's polling GET survives a keep-alive connection the server closed between
two polls (an e2e test once failed on a loaded machine with "connection reset by peer")."""

from __future__ import annotations

import socket
import struct
import threading

import httpx

from tributary.testbed.federation import poll

BODY = b'{"state": "completed"}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
          b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


def serve(server: socket.socket, connections: list[int]) -> None:
    """Answer one request per connection, then reset it: the next request sent on it fails."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        connections.append(1)
        conn.recv(65536)
        conn.sendall(ANSWER)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # with linger 0: a reset, as when the server's keep-alive ran out


def test_a_poll_on_a_connection_the_server_closed_is_asked_again() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    connections: list[int] = []
    threading.Thread(target=serve, args=(server, connections), daemon=True).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.getsockname()[1]}") as api:
            assert poll(api, "/api/experiments/x") == {"state": "completed"}
            # The pooled connection was reset after the first answer: without the retry
            # this GET raises (ReadError or RemoteProtocolError).
            assert poll(api, "/api/experiments/x") == {"state": "completed"}
    finally:
        server.close()
    assert len(connections) == 2
