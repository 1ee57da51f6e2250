"""``tributary hub serve | consume | train | worker | registry-gateway | migrate |
create-user``: the hub's processes and its database. The web app (``serve``), the results
consumer (``consume``), the training round loop (``train``), the aggregation worker
(``worker``) and the registry's TLS gateway (``registry-gateway``) are peers: each can run
as its own process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tributary.protocol import logs

if TYPE_CHECKING:
    from tributary.hub.settings import HubSettings

app = typer.Typer(help="Run the hub (API, pages, results consumer).", no_args_is_help=True)
console = Console(emoji=False)  # what messages and spokes carry is data, not markup


def _serve_settings(database_url: str | None, overrides: dict[str, object]) -> HubSettings:
    """The environment's settings with the command line's on top, or a one-line error."""
    from pydantic import ValidationError

    from tributary.hub.settings import HubSettings

    given = {k: v for k, v in overrides.items() if v is not None}
    if database_url:
        given["database_url"] = database_url
    try:
        return HubSettings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(
            str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None


def _tls_options(settings: HubSettings) -> dict[str, str]:
    """uvicorn's ssl options, after checking that the certificate and key load and match
    (uvicorn would fail later, with a traceback)."""
    import ssl

    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    cert, key = str(settings.tls_cert_file), str(settings.tls_key_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except OSError as exc:  # FileNotFoundError, PermissionError, ssl.SSLError
        raise typer.BadParameter(
            f"cannot use the TLS certificate {cert} with the key {key}: "
            f"{exc.strerror or exc}") from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}


@app.command("serve")
def hub_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL (default: TRIBUTARY_HUB_DATABASE_URL or a local SQLite file).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="Serve HTTPS with this certificate (PEM, chain after it; default: "
             "TRIBUTARY_HUB_TLS_CERT_FILE).", dir_okay=False, show_default=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="The certificate's private key (PEM; default: TRIBUTARY_HUB_TLS_KEY_FILE).",
        dir_okay=False, show_default=False)] = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Addresses of the TLS proxy whose X-Forwarded-* headers to believe "
             "(default: TRIBUTARY_HUB_FORWARDED_ALLOW_IPS, else 127.0.0.1).",
        show_default=False)] = None,
    verbose: bool = False,
) -> None:
    """Serve the hub's REST API and pages, and consume spoke results (unless
    TRIBUTARY_HUB_CONSUME_RESULTS=false, when `tributary hub consume` runs apart)."""
    import uvicorn

    from tributary.hub.main import create_app

    logs.configure(verbose)
    settings = _serve_settings(database_url, {"tls_cert_file": tls_cert,
                                              "tls_key_file": tls_key,
                                              "forwarded_allow_ips": forwarded_allow_ips})
    tls = _tls_options(settings)
    # Open event streams (dashboard pages, `study watch`) never finish by themselves: give
    # them a few seconds on shutdown, then close them.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5, proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips, **tls)


@app.command("consume")
def hub_consume(
    database_url: Annotated[str | None, typer.Option(help="The hub's database URL.")] = None,
    verbose: bool = False,
) -> None:
    """Consume the results queue as a process of its own, until SIGTERM or Ctrl-C. Run the
    web app with TRIBUTARY_HUB_CONSUME_RESULTS=false beside it, so that only this process
    takes results off the queue."""
    from tributary.hub import consumer
    from tributary.hub.settings import HubSettings

    logs.configure(verbose)
    consumer.run(HubSettings.with_database(database_url))


@app.command("train")
def hub_train(
    database_url: Annotated[str | None, typer.Option(help="The hub's database URL.")] = None,
    verbose: bool = False,
) -> None:
    """Run the federated-training round loop as a process of its own, until SIGTERM or
    Ctrl-C: it resumes every open training study from the database and the object store
    (TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS). Run the web app with
    TRIBUTARY_HUB_RUN_TRAINING=false beside it."""
    from tributary.hub import training_coordinator
    from tributary.hub.settings import HubSettings

    logs.configure(verbose)
    settings = HubSettings.with_database(database_url)
    if settings.objectstore_credentials is None:
        raise typer.BadParameter("set TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS to the hub's "
                                 "object-store credentials file: training needs the store")
    training_coordinator.run(settings)


@app.command("worker")
def hub_worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    verbose: bool = False,
) -> None:
    """Run a Celery worker for aggregation tasks (needs TRIBUTARY_HUB_CELERY_BROKER_URL and
    the hub's TRIBUTARY_HUB_DATABASE_URL)."""
    from tributary.hub.settings import HubSettings
    from tributary.hub.worker import app as celery_app

    if not HubSettings().celery_broker_url:
        raise typer.BadParameter("set TRIBUTARY_HUB_CELERY_BROKER_URL: without a broker the "
                                 "hub aggregates in its own process and needs no worker")
    celery_app.worker_main(["worker", f"--concurrency={concurrency}",
                            f"--loglevel={'DEBUG' if verbose else 'INFO'}"])


@app.command("migrate")
def hub_migrate(
    database_url: Annotated[str | None, typer.Option(help="The hub's database URL.")] = None,
) -> None:
    """Bring the hub's database schema up to date, keeping its data. The hub does it too
    when it starts; this is for operators who upgrade in a maintenance window."""
    import getpass

    from tributary.hub.db import make_engine, upgrade_schema
    from tributary.hub.services.audit import attach_forensic_log
    from tributary.hub.settings import HubSettings

    settings = HubSettings.with_database(database_url)
    engine = make_engine(settings.database_url, migrate=False)
    attach_forensic_log(engine, settings.audit_log_path())
    before, after = upgrade_schema(engine, actor=f"cli:{getpass.getuser()}")
    if before == after:
        console.print(f"database schema already at the newest revision, {after}", markup=False)
    else:
        console.print(f"database schema upgraded from {before or 'none'} to {after}",
                      markup=False)


@app.command("create-user")
def hub_create_user(
    username: Annotated[str, typer.Argument(help="The new user's name.")],
    role: Annotated[list[str], typer.Option(
        help="admin, coordinator, developer or reviewer (repeatable).")],
    organisation: Annotated[str, typer.Option(
        help="The user's organisation: the existing one of that name (compared ignoring case "
             "and spacing), else a new one.")] = "",
    database_url: Annotated[str | None, typer.Option(help="The hub's database URL.")] = None,
) -> None:
    """Create a hub user; the password is asked for (or read from standard input)."""
    from sqlmodel import Session

    from tributary.hub.db import open_database
    from tributary.hub.services.users import create_user
    from tributary.hub.settings import HubSettings

    password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = HubSettings.with_database(database_url)
    with Session(open_database(settings)) as session:
        try:
            create_user(session, username, password, role, organisation, actor="cli")
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    console.print(f"created {username} with roles {', '.join(role)}", markup=False)


@app.command("registry-gateway")
def hub_registry_gateway(
    cert: Annotated[Path, typer.Option(help="The registry's TLS certificate (PEM).")],
    key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
    upstream: Annotated[str, typer.Option(
        help="The registry on loopback, e.g. http://127.0.0.1:5001.")],
    roots: Annotated[Path, typer.Option(
        help="Certificates that may sign registry tokens (the registry's rootcertbundle).")],
    realm: Annotated[str, typer.Option(
        help="The token realm clients are sent to (the registry's auth.token.realm), "
             "e.g. https://registry.example:5000/token.")],
    hub_url: Annotated[str | None, typer.Option(
        help="The hub whose token service /token forwards to.")] = None,
    hub_ca_file: Annotated[Path | None, typer.Option(
        help="CA of the hub's certificate, for an HTTPS hub.")] = None,
    issuer: Annotated[str | None, typer.Option(
        help="Token issuer (default: TRIBUTARY_HUB_REGISTRY_TOKEN_ISSUER).")] = None,
    service: Annotated[str | None, typer.Option(
        help="Token service (default: TRIBUTARY_HUB_REGISTRY_TOKEN_SERVICE).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The registry's published port.")] = 5000,
    verbose: bool = False,
) -> None:
    """Serve the registry's published port with TLS, enforcing the digest restrictions of
    the hub's registry tokens, in front of the registry on loopback."""
    from tributary.hub.registry_gateway import GatewayConfig, serve
    from tributary.hub.settings import HubSettings

    logs.configure(verbose)
    settings = HubSettings()
    config = GatewayConfig(upstream=upstream, roots=roots, realm=realm, hub_url=hub_url,
                           hub_ca_file=hub_ca_file,
                           issuer=issuer or settings.registry_token_issuer,
                           service=service or settings.registry_token_service)
    serve(config, host, port, cert, key)
