"""``tributary login``: a bearer token for the other commands, so nobody needs to know that
``POST /api/auth/token`` exists. It prints only the token, for
``export TRIBUTARY_TOKEN=$(tributary login NAME)``."""

from __future__ import annotations

import getpass
import os
from typing import Annotated

import typer

from tributary.cli.hub_client import HubCaOption, HubOption, check, hub_client

PASSWORD_ENV = "TRIBUTARY_PASSWORD"


def login(
    username: Annotated[str, typer.Argument(help="Your hub account.")],
    hub: HubOption = "http://127.0.0.1:8000",
    hub_ca: HubCaOption = None,
) -> None:
    """Sign in and print a bearer token (valid 12 hours). The password is read from
    TRIBUTARY_PASSWORD or asked for on the terminal."""
    password = os.environ.get(PASSWORD_ENV) or getpass.getpass(f"password for {username}: ")
    with hub_client(hub, None, hub_ca) as client:
        issued = check(client.post("/api/auth/token",
                                   json={"username": username, "password": password}),
                       "sign-in")
    typer.echo(issued["access_token"])
