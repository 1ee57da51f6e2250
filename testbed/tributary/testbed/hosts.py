"""Parties on separate hosts, simulated on one machine with Linux network namespaces
(needs root and ``ip``/``iptables``).

Topology of one :class:`Hosts`::

    hub side (namespace PREFIX-hub)     the hub address, a /32 on its loopback: the one
      │                                 address every party dials and certificates name
      ├── veth, /30 ── spoke 0 (PREFIX-s0)   a route to the hub address, nothing else
      ├── veth, /30 ── spoke 1 (PREFIX-s1)
      └── veth, /30 ── root namespace        this machine: the Docker engine, the driver

Each link has a private /30 out of one /24 (``10.x.y.0/24``, picked so that it overlaps
none of the machine's own addresses and routes). The hub side does not forward, so spokes
cannot reach each other through it.

**The root namespace link is the spoke hosts' container engine path.** The Docker engine is
shared by the machine and runs in the root namespace; a spoke reaches its unix socket
through the filesystem (which the issue allows) and the engine pulls images from the
registry on the hub side over the root link (trusting the federation CA for it).
Algorithm containers keep ``--network none``. The driver of a test or of the demo (the
coordinator's API calls) uses the same link.

**Firewall** (iptables inside each namespace; the root namespace gets no rule):

* a spoke: outbound only to the hub address on the published ports, replies
  (established/related) back in, nothing inbound, nothing forwarded, no IPv6;
* the hub side: inbound only to the published ports (and replies), nothing forwarded.

Processes are placed on a host by entering its network namespace only: every host shares
this machine's filesystem, as the engine must see a spoke's folders to mount them.

Every namespace, link and rule goes on :meth:`Hosts.close` (the ``with`` block's end,
failures included). A marker with the owner's pid is kept per set, so the next
:class:`Hosts` removes the sets of killed runs (and a leftover of its own prefix).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

FAMILY = "trib"
#: Where each live set records its owner's pid (for the cleanup of killed runs).
MARKERS = Path("/run/tributary-hosts")
#: Where ``ip netns add`` keeps the namespaces it names.
NETNS_DIR = Path("/run/netns")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
_MAX_SPOKES = 62  # /30 slots in the /24: slot 0 holds the hub address, slot 1 the root link
ROOT = "root"
HUB = "hub"


class HostsError(RuntimeError):
    """Namespaces could not be set up; the message holds the failing command's error."""


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise HostsError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _fails(*argv: str) -> str | None:
    try:
        _run(*argv)
    except (OSError, HostsError) as exc:
        return f"`{' '.join(argv)}` does not work here: {exc}"
    return None


def available() -> str | None:
    """Why namespaces cannot be used here, or None if they can (tried for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("iptables", "ip6tables", "nsenter"):
        if (why := _fails(tool, "--version")) is not None:
            return why
    probe = f"{FAMILY}probe{os.getpid()}"
    try:
        return (_fails("ip", "netns", "add", probe)
                or _fails("ip", "netns", "exec", probe, "iptables", "-S"))
    finally:
        with contextlib.suppress(OSError):
            _run("ip", "netns", "del", probe, check=False)


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address or a route in."""
    taken = []
    for line in _run("ip", "-4", "-o", "addr", "show").splitlines():
        taken.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("broadcast", "local", "unreachable", "blackhole", "prohibit", "throw"):
            word = line.split()[1]
        if word == "default":
            continue
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(word, strict=False))
    return taken


def pick_network() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps nothing this machine has an address or route in."""
    taken = _taken_networks()
    for _ in range(200):
        candidate = ipaddress.ip_network(
            f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise HostsError("no free 10.x.y.0/24 for the hosts' links")


@dataclass(frozen=True)
class Host:
    """One party's host: its namespace (None: the root namespace) and its address."""

    party: str
    netns: str | None
    address: str


class Hosts:
    """A hub side and one host per spoke, each in its own network namespace (see the module
    docstring). Use as a context manager."""

    def __init__(self, spoke_ids: Sequence[str], ports: Iterable[int] = (),
                 prefix: str | None = None, network: str | None = None) -> None:
        if len(spoke_ids) > _MAX_SPOKES or len(set(spoke_ids)) != len(spoke_ids):
            raise ValueError(f"at most {_MAX_SPOKES} spoke ids, each once")
        if ROOT in spoke_ids or HUB in spoke_ids:
            raise ValueError(f"{ROOT!r} and {HUB!r} name hosts, not spokes")
        self.prefix = prefix or f"{FAMILY}{secrets.token_hex(3)}"
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError("prefix: 1-10 lower-case letters or digits, a letter first "
                             "(interface names are at most 15 characters)")
        self.spoke_ids = list(spoke_ids)
        self.ports: list[int] = []
        self._initial_ports = sorted(set(ports))
        self._network = ipaddress.ip_network(network) if network else None
        if self._network is not None and (self._network.version != 4
                                          or self._network.prefixlen > 24):
            raise ValueError("network: an IPv4 network of at least a /24")
        self._processes: list[subprocess.Popen[Any]] = []
        self._hosts: dict[str, Host] = {}

    # -- addresses and names ------------------------------------------------------------

    @property
    def network(self) -> ipaddress.IPv4Network:
        if self._network is None:
            raise HostsError("the hosts are not set up yet")
        return self._network  # type: ignore[return-value]

    def _slot(self, index: int) -> tuple[str, str]:
        """(hub end, other end) of the /30 in slot ``index``."""
        base = self.network[4 * index]
        return str(base + 1), str(base + 2)

    @property
    def hub_address(self) -> str:
        """The address every party dials to reach the hub side."""
        return str(self.network[1])

    def host(self, party: str) -> Host:
        """``"hub"``, ``"root"`` or a spoke id."""
        try:
            return self._hosts[party]
        except KeyError:
            raise KeyError(f"no host {party!r}; parties: {sorted(self._hosts)}") from None

    def netns(self, party: str) -> str | None:
        return self.host(party).netns

    def describe(self) -> list[tuple[str, str, str]]:
        """(party, namespace, address) of every host, for people."""
        return [(h.party, h.netns or "(root namespace)", h.address)
                for h in self._hosts.values()]

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        self.setup()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def setup(self) -> None:
        remove_stale()
        remove(self.prefix)
        MARKERS.mkdir(parents=True, exist_ok=True)
        (MARKERS / f"{self.prefix}.pid").write_text(str(os.getpid()))
        try:
            if self._network is None:
                self._network = pick_network()
            elif any(self._network.overlaps(net) for net in _taken_networks()):
                raise HostsError(f"{self._network} overlaps a network of this machine")
            self._build()
            self.publish(*self._initial_ports)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        p = self.prefix
        hub_ns = f"{p}-hub"
        self._add_namespace(hub_ns)
        _run("ip", "-n", hub_ns, "addr", "add", f"{self.hub_address}/32", "dev", "lo")
        self._hosts[HUB] = Host(HUB, hub_ns, self.hub_address)
        self._firewall(hub_ns, self._hub_rules([]))
        # The root link: the engine's (and the driver's) path to the hub side.
        hub_end, root_end = self._slot(1)
        _run("ip", "link", "add", f"{p}r", "type", "veth", "peer", "name", f"{p}hr",
             "netns", hub_ns)
        self._address(None, f"{p}r", root_end)
        self._address(hub_ns, f"{p}hr", hub_end)
        _run("ip", "route", "add", f"{self.hub_address}/32", "via", hub_end, "dev", f"{p}r")
        self._hosts[ROOT] = Host(ROOT, None, root_end)
        for index, spoke_id in enumerate(self.spoke_ids):
            spoke_ns = f"{p}-s{index}"
            self._add_namespace(spoke_ns)
            self._firewall(spoke_ns, self._spoke_rules([]))
            hub_end, spoke_end = self._slot(index + 2)
            _run("ip", "link", "add", f"{p}h{index}", "netns", hub_ns, "type", "veth",
                 "peer", "name", f"{p}s{index}", "netns", spoke_ns)
            self._address(hub_ns, f"{p}h{index}", hub_end)
            self._address(spoke_ns, f"{p}s{index}", spoke_end)
            _run("ip", "-n", spoke_ns, "route", "add", f"{self.hub_address}/32", "via", hub_end)
            self._hosts[spoke_id] = Host(spoke_id, spoke_ns, spoke_end)

    @staticmethod
    def _add_namespace(name: str) -> None:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        # Nothing is forwarded from one link to another, whatever the firewall says.
        _run("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")

    @staticmethod
    def _address(netns: str | None, device: str, address: str) -> None:
        ns = ["-n", netns] if netns else []
        _run("ip", *ns, "addr", "add", f"{address}/30", "dev", device)
        _run("ip", *ns, "link", "set", device, "up")

    def close(self) -> None:
        """Stop the processes started here, then remove every namespace and link."""
        for process in reversed(self._processes):
            _stop(process)
        self._processes.clear()
        remove(self.prefix)
        (MARKERS / f"{self.prefix}.pid").unlink(missing_ok=True)
        self._hosts.clear()

    # -- firewall -----------------------------------------------------------------------

    def rules(self, party: str) -> str:
        """The IPv4 firewall of ``party``'s host, as ``iptables-restore`` reads it."""
        if party == ROOT:
            raise ValueError("the root namespace (this machine) gets no firewall")
        return (self._hub_rules(self.ports) if party == HUB
                else self._spoke_rules(self.ports))

    def _spoke_rules(self, ports: list[int]) -> str:
        allow = "".join(f"-A OUTPUT -d {self.hub_address}/32 -p tcp --dport {port} "
                        "-m conntrack --ctstate NEW -j ACCEPT\n" for port in ports)
        return ("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n"
                "-A INPUT -i lo -j ACCEPT\n"
                "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                "-A OUTPUT -o lo -j ACCEPT\n"
                "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                f"{allow}COMMIT\n")

    def _hub_rules(self, ports: list[int]) -> str:
        allow = "".join(f"-A INPUT -d {self.hub_address}/32 -p tcp --dport {port} "
                        "-m conntrack --ctstate NEW -j ACCEPT\n" for port in ports)
        return ("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                "-A INPUT -i lo -j ACCEPT\n"
                "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                f"{allow}COMMIT\n")

    @staticmethod
    def _firewall(netns: str, rules: str) -> None:
        _run("ip", "netns", "exec", netns, "iptables-restore", stdin=rules)
        _run("ip", "netns", "exec", netns, "ip6tables-restore", stdin=(
            "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n"
            "-A INPUT -i lo -j ACCEPT\n-A OUTPUT -o lo -j ACCEPT\nCOMMIT\n"))

    def publish(self, *ports: int) -> None:
        """Open ``ports`` of the hub address: to the spokes (outbound) and on the hub side
        (inbound). The firewalls are rewritten whole, so they never hold half a change."""
        self.ports = sorted({*self.ports, *ports})
        for party in (HUB, *self.spoke_ids):
            self._firewall(self.host(party).netns or "", self.rules(party))

    # -- processes ----------------------------------------------------------------------

    def command(self, party: str, argv: Sequence[str] = ()) -> list[str]:
        """``argv`` as run on ``party``'s host. ``nsenter`` enters the network namespace
        only (``ip netns exec`` would also give the command a mount namespace of its own,
        and a spoke's output tmpfs would then be invisible to the engine), and replaces
        itself with the command, so the pid of what it starts is the command's."""
        netns = self.netns(party)
        return [*(("nsenter", f"--net={NETNS_DIR / netns}", "--") if netns else ()), *argv]

    def run(self, party: str, argv: Sequence[str], **kwargs: Any
            ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(party, argv), **kwargs)

    def spawn(self, party: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on ``party``'s host; stopped by :meth:`close` if still running."""
        process = subprocess.Popen(self.command(party, argv), **kwargs)
        self._processes.append(process)
        return process

    def _probe(self, party: str, *args: str) -> dict[str, Any]:
        done = self.run(party, [sys.executable, "-m", "tributary.testbed.netprobe", *args],
                        capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise HostsError(f"probe {args} on {party} failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def _serve(self, party: str, *args: str) -> subprocess.Popen[Any]:
        process = self.spawn(party, [sys.executable, "-m", "tributary.testbed.netprobe",
                                     *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        assert process.stdout is not None
        if not process.stdout.readline().strip():
            raise HostsError(f"{args[0]} on {party} did not start: "
                             f"{process.stderr.read() if process.stderr else ''}")
        return process

    def listen(self, party: str, port: int, host: str = "0.0.0.0") -> subprocess.Popen[Any]:
        """A throwaway TCP server on ``party``'s host, to show who can reach it."""
        return self._serve(party, "listen", host, str(port))

    # -- checks -------------------------------------------------------------------------

    def can_connect(self, party: str, host: str, port: int) -> bool:
        """Whether ``party``'s host can open a TCP connection to ``host:port``."""
        return bool(self._probe(party, "connect", host, str(port))["connected"])

    def plain_connection_refused(self, party: str, host: str, port: int,
                                 protocol: str = "http") -> bool:
        """True if ``host:port`` accepts the connection but gives no plaintext answer
        (HTTP status line, STOMP frame) to a plaintext ``protocol`` request. False if it
        answered in plaintext; :class:`HostsError` if nothing could connect at all, since
        that proves nothing about TLS."""
        result = self._probe(party, "plain", host, str(port), protocol)
        if not result["connected"]:
            raise HostsError(f"{party} cannot connect to {host}:{port}: {result['error']}")
        return not result["plaintext"]

    def speaks_tls(self, party: str, host: str, port: int, ca: Path,
                   cert: Path | None = None, key: Path | None = None) -> bool:
        """True if a TLS handshake with ``host:port`` from ``party``'s host succeeds and
        the server's certificate verifies against ``ca`` for ``host`` (with a client
        certificate for mutual TLS)."""
        extra = [str(cert), str(key)] if cert and key else []
        return bool(self._probe(party, "tls", host, str(port), str(ca), *extra)["handshake"])


def _stop(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _kill_all(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _alive(pid)]
            time.sleep(0.1)
        pids = alive


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def remove(prefix: str) -> None:
    """Remove the namespaces (ending what still runs in them) and root-namespace links of
    the set ``prefix``."""
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{prefix}-"):
            pids = [int(p) for p in _run("ip", "netns", "pids", name, check=False).split()]
            _kill_all(pids)
            _run("ip", "netns", "del", name, check=False)
    for line in _run("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if re.fullmatch(rf"{re.escape(prefix)}(r|hr|h\d+|s\d+)", name):
            _run("ip", "link", "del", name, check=False)


def remove_stale() -> None:
    """Remove the sets whose owning process is gone (a killed test run, say)."""
    if not MARKERS.is_dir():
        return
    for marker in MARKERS.glob("*.pid"):
        try:
            owner = int(marker.read_text())
        except (OSError, ValueError):
            owner = 0
        if owner <= 0 or not _alive(owner):
            remove(marker.stem)
            marker.unlink(missing_ok=True)
