"""The one way CLI commands talk to the hub: its URL, a bearer token and the CA its
certificate is checked against (``--hub``, ``--token``, ``--hub-ca`` or ``TRIBUTARY_HUB_URL``,
``TRIBUTARY_TOKEN``, ``TRIBUTARY_HUB_CA_FILE``), and every failure to reach it or every
refusal as one line on standard error and exit status 1, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:  # httpx is imported when a command talks to the hub, not for --help
    import httpx

CA_ENV = "TRIBUTARY_HUB_CA_FILE"
CA_HINT = f"pass --hub-ca FILE or set {CA_ENV}"

HubOption = Annotated[str, typer.Option("--hub", envvar="TRIBUTARY_HUB_URL",
                                        help="The hub's base URL.")]
TokenOption = Annotated[str, typer.Option(
    "--token", envvar="TRIBUTARY_TOKEN", show_default=False,
    help="Bearer token (from POST /api/auth/token).")]
HubCaOption = Annotated[Path | None, typer.Option(
    "--hub-ca", envvar=CA_ENV, dir_okay=False, show_default=False,
    help="The CA (PEM) that signed the hub's HTTPS certificate (default: the system's "
         "trusted CAs).")]

errors = Console(stderr=True, emoji=False)  # the hub's details are data, not markup


def fail(message: str) -> NoReturn:
    from rich.markup import escape

    errors.print(f"[red]{escape(message)}[/]", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


@contextmanager
def hub_client(hub: str, token: str | None, ca_file: Path | None = None,
               timeout: float | None = 60) -> Iterator[httpx.Client]:
    """An httpx client for the hub that verifies its certificate; a request in the block
    that cannot reach the hub ends the command with the reason."""
    import httpx

    from tributary.protocol import https

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        client = https.client(hub, ca_file, timeout=timeout, headers=headers)
    except ValueError as exc:  # a file that holds no CA certificate
        fail(f"--hub-ca: {exc}")
    except httpx.InvalidURL as exc:
        fail(f"not a hub URL: {hub} ({exc})")
    try:
        with client:
            yield client
    except httpx.TransportError as exc:
        fail(https.explain(exc, hub, "the hub", CA_HINT))
    except httpx.InvalidURL as exc:
        fail(f"not a hub URL: {hub} ({exc})")


def check(response: httpx.Response, doing: str) -> Any:
    """The JSON body, or exit 1 with the hub's own explanation."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(map(str, e.get('loc', [])[1:]))}: {e.get('msg')}"
                           for e in detail)
    elif isinstance(detail, dict) and isinstance(detail.get("refusals"), list):
        # A launch refused before anything was sent: each spoke's reason on its own line.
        detail = "\n".join([str(detail.get("message", "")), *(
            f"  {r.get('spoke_id')}: {r.get('reason')}" for r in detail["refusals"]
            if isinstance(r, dict))])
    fail(f"{doing} refused ({response.status_code}): {detail}")
