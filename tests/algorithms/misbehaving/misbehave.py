"""An algorithm that misbehaves on purpose, so tests can prove the platform contains it.

``arguments.behaviour`` picks the misbehaviour:

ok           write ``{"ok": true, "case_id": ...}`` and exit 0
crash        raise an exception: exit 1 with a traceback on stderr
exit-code    exit with ``arguments.code`` (0..255)
hang         sleep forever (the spoke must time it out)
garbage      write non-JSON to output.json and exit 0
not-object   write a JSON list to output.json and exit 0
oversize     write a 2 MiB JSON object to output.json and exit 0
no-output    exit 0 without writing output.json
network      try TCP connections to loopback service ports; must fail under --network none
write-input  try to write into the read-only input series folder
memory       allocate memory until the memory limit kills the container
echo-patient write the PatientID of its input's DICOM headers into its output (the
             store's case pseudonym, which must not leave the spoke)
slow         work for ``arguments.seconds`` (default 30), reporting progress twice a
             second through the progress file, then succeed like ``ok``
plant        put ``arguments.kind`` (fifo, socket, symlink, huge) at ``arguments.at``
             (output or progress) in the output folder, then ``arguments.then``: exit 0
             (default) or hang; a reader that opens it blindly blocks or leaks
spin         keep one CPU busy for ``arguments.seconds`` (default 3), then succeed like
             ``ok`` (a CPU-bound case for bench_case_overhead)
fill         write ``arguments.mb`` MiB (default 1024) into the output folder; exit 1
             with the error when the folder refuses more

The raw misbehaviours write ``ctx.output_path`` directly, bypassing the SDK's checks on
purpose: the point is to feed the spoke what a careless algorithm could produce.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from tributary_algorithm import Context, InvalidArguments, run

#: Only loopback is ever targeted: a broker (STOMP) port and a registry port. Under
#: ``--network none`` the container's own loopback has nothing listening, so both fail.
NETWORK_TARGETS = (("127.0.0.1", 61613), ("127.0.0.1", 5000))
OVERSIZE_BYTES = 2 * 1024 * 1024
MEMORY_CHUNK_BYTES = 16 * 1024 * 1024

BEHAVIOURS = (
    "ok",
    "crash",
    "exit-code",
    "hang",
    "garbage",
    "not-object",
    "oversize",
    "no-output",
    "network",
    "write-input",
    "memory",
    "slow",
    "echo-patient",
    "plant",
    "fill",
    "spin",
)
PLANT_KINDS = ("fifo", "socket", "symlink", "huge")


def _patient_id(ctx: Context) -> str:
    """PatientID (0010,0020, explicit VR LO) of the first input file that has one, read
    without a DICOM library, as a careless algorithm might copy it."""
    for series in ctx.series:
        for folder, _dirs, names in sorted(os.walk(series.path)):
            for name in sorted(names):
                with open(os.path.join(folder, name), "rb") as handle:
                    data = handle.read()
                at = data.find(b"\x10\x00\x20\x00LO")
                if at >= 0:
                    length = int.from_bytes(data[at + 6:at + 8], "little")
                    return data[at + 8:at + 8 + length].decode(errors="replace").strip("\0 ")
    return ""


def _write_raw(ctx: Context, data: bytes) -> None:
    with open(ctx.output_path, "wb") as handle:
        handle.write(data)


def _network(ctx: Context) -> dict[str, Any]:
    failures, reached = [], []
    for host, port in NETWORK_TARGETS:
        try:
            with socket.create_connection((host, port), timeout=3):
                reached.append(f"{host}:{port}")
                print(f"connected to {host}:{port}", flush=True)
        except OSError as exc:
            failures.append(f"{host}:{port}: {exc}")
            print(f"connection to {host}:{port} failed: {exc}", flush=True)
    if reached:  # the sandbox let us out: report it as a (suspicious) success
        return {"network": "reachable", "reached": reached, "case_id": ctx.case_id}
    print(f"network access failed: {'; '.join(failures)}", file=sys.stderr, flush=True)
    sys.exit(1)


def _write_input(ctx: Context) -> dict[str, Any]:
    if not ctx.series:
        raise InvalidArguments("write-input needs at least one input series")
    target = os.path.join(ctx.series[0].path, "tributary-write-test.txt")
    try:
        with open(target, "w") as handle:
            handle.write("an algorithm must not be able to write here\n")
    except OSError as exc:
        print(f"writing to the input failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    os.unlink(target)  # leave the input as found, then report the breach
    print(f"wrote to {target}: the input is writable", flush=True)
    return {"input_writable": True, "case_id": ctx.case_id}


def _slow(ctx: Context) -> dict[str, Any]:
    seconds = ctx.arguments.get("seconds", 30)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise InvalidArguments("slow needs arguments.seconds, a number >= 0")
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < seconds:
        ctx.report_progress(min(elapsed / seconds, 1.0), "measuring")
        time.sleep(0.5)
    ctx.report_progress(1.0, "done")
    return {"ok": True, "case_id": ctx.case_id, "seconds": seconds}


def _plant(ctx: Context) -> None:
    kind, at = ctx.arguments.get("kind"), ctx.arguments.get("at", "output")
    if kind not in PLANT_KINDS or at not in ("output", "progress"):
        raise InvalidArguments(f"plant needs kind in {PLANT_KINDS} and at output|progress")
    folder = os.path.dirname(ctx.output_path)
    target = ctx.output_path if at == "output" else os.path.join(folder, "progress.json")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(target)
        server.listen(1)
    elif kind == "symlink":
        os.symlink("/etc/passwd", target)
    else:  # a sparse file far past any limit
        with open(target, "wb") as handle:
            handle.truncate(64 * 1024 * 1024 * 1024)
    print(f"planted a {kind} at {target}", flush=True)
    if ctx.arguments.get("then") == "hang":
        while True:
            time.sleep(3600)
    sys.exit(0)


def _fill(ctx: Context) -> None:
    megabytes = ctx.arguments.get("mb", 1024)
    chunk = b"\x01" * (1024 * 1024)
    written = 0
    try:
        with open(os.path.join(os.path.dirname(ctx.output_path), "fill.bin"), "wb") as handle:
            for _ in range(int(megabytes)):
                handle.write(chunk)
                handle.flush()
                written += 1
    except OSError as exc:
        print(f"output folder full after {written} MiB: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"wrote {written} MiB", flush=True)
    sys.exit(0)


def _memory() -> None:
    hoard = []
    while True:
        hoard.append(b"\x01" * MEMORY_CHUNK_BYTES)  # non-zero bytes: pages really touched
        print(f"holding {len(hoard) * MEMORY_CHUNK_BYTES >> 20} MiB", flush=True)


def main(ctx: Context) -> dict[str, Any] | None:
    """Do what ``arguments.behaviour`` asks."""
    behaviour = ctx.arguments.get("behaviour", "ok")
    if behaviour not in BEHAVIOURS:
        raise InvalidArguments(f"behaviour must be one of {', '.join(BEHAVIOURS)}")
    if behaviour == "ok":
        return {"ok": True, "case_id": ctx.case_id}
    if behaviour == "spin":
        until, turns = time.monotonic() + float(ctx.arguments.get("seconds", 3)), 0
        while time.monotonic() < until:
            turns += sum(range(10_000)) & 1
        return {"ok": True, "case_id": ctx.case_id}
    if behaviour == "crash":
        raise RuntimeError("deliberate crash requested by arguments.behaviour")
    if behaviour == "exit-code":
        code = ctx.arguments.get("code")
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise InvalidArguments("exit-code needs arguments.code, an integer 0..255")
        print(f"exiting with status {code} as asked", file=sys.stderr, flush=True)
        sys.exit(code)
    if behaviour == "hang":
        print("hanging", flush=True)
        while True:
            time.sleep(3600)
    if behaviour == "garbage":
        _write_raw(ctx, b"this is { not JSON \x00\xff")
        sys.exit(0)
    if behaviour == "not-object":
        _write_raw(ctx, b'["a", "list", "is", "not", "an", "object"]')
        sys.exit(0)
    if behaviour == "oversize":
        head, tail = '{"padding": "', '"}'
        filler = "x" * (OVERSIZE_BYTES - len(head) - len(tail))
        _write_raw(ctx, (head + filler + tail).encode())
        sys.exit(0)
    if behaviour == "no-output":
        sys.exit(0)
    if behaviour == "network":
        return _network(ctx)
    if behaviour == "echo-patient":
        return {"ok": True, "patient": _patient_id(ctx)}
    if behaviour == "write-input":
        return _write_input(ctx)
    if behaviour == "slow":
        return _slow(ctx)
    if behaviour == "plant":
        _plant(ctx)
    if behaviour == "fill":
        _fill(ctx)
    _memory()
    return None


if __name__ == "__main__":
    run(main)
