"""HTTPS clients of the hub (the CLI, the testbed, spokes fetching registry tokens): one way
to trust the federation's CA, and one-line explanations of why a connection failed.

With a CA file a client trusts that CA only (the federation's private CA); without one it
trusts the system's store (a hub behind a proxy with a publicly trusted certificate)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

#: OpenSSL's verification results that mean "signed by nobody this client trusts".
_UNTRUSTED = {18, 19, 20, 21}  # self-signed, self-signed in chain, issuer unknown, leaf only
_EXPIRED, _NOT_YET_VALID, _WRONG_HOST = 10, 9, 62


def trust(ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the server against ``ca_file`` (PEM), else against
    the system's trust store. Raises ValueError for a file that holds no CA certificate."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except OSError as exc:  # a missing file, or ssl.SSLError for one without a certificate
        raise ValueError(f"{ca_file} is not a readable PEM CA certificate "
                         f"({exc.strerror or exc})") from None


def client(base_url: str, ca_file: Path | None = None, **kwargs: Any) -> httpx.Client:
    """An httpx client for ``base_url`` that verifies the server's certificate as
    :func:`trust` does (plain ``http://`` URLs are not encrypted and need no CA)."""
    return httpx.Client(base_url=base_url.rstrip("/"), verify=trust(ca_file), **kwargs)


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def explain(exc: httpx.TransportError, url: str, what: str = "the server",
            ca_hint: str = "") -> str:
    """One line saying why a request to ``what`` at ``url`` failed and what to do;
    ``ca_hint`` says how this client is given a CA (e.g. ``pass --hub-ca FILE``)."""
    where = url.rstrip("/")
    hint = f"; {ca_hint}" if ca_hint else ""
    verify = _cause(exc, ssl.SSLCertVerificationError)
    if isinstance(verify, ssl.SSLCertVerificationError):
        code = verify.verify_code
        if code in _UNTRUSTED:
            return (f"{what}'s certificate at {where} is not signed by a CA this client "
                    f"trusts{hint}")
        if code == _WRONG_HOST:
            return (f"{what}'s certificate at {where} was not issued for that name "
                    f"({verify.verify_message.rstrip('.')}): use a name or address it lists")
        if code in (_EXPIRED, _NOT_YET_VALID):
            return (f"{what}'s certificate at {where} is not valid now "
                    f"({verify.verify_message}): it needs a new one")
        return f"{what}'s certificate at {where} was refused: {verify.verify_message}"
    tls = _cause(exc, ssl.SSLError)
    if tls is not None:
        if "WRONG_VERSION_NUMBER" in str(tls) or "record layer" in str(tls).lower():
            return (f"{what} at {where} does not answer TLS: it may serve plain HTTP (then "
                    "use an http:// URL), or this is another service's port")
        return f"TLS with {what} at {where} failed: {tls}"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return f"{where} is not a URL for {what}: begin it with https:// (or http://)"
    if isinstance(exc, httpx.TimeoutException):
        return f"{what} at {where} did not answer in time"
    if isinstance(exc, httpx.RemoteProtocolError) and where.startswith("http://"):
        return (f"{what} at {where} closed the connection without an HTTP answer: if it "
                "serves HTTPS, use an https:// URL")
    if isinstance(exc, httpx.ConnectError):
        reason = _cause(exc, OSError)
        detail = (reason.strerror or str(reason)) if reason is not None else str(exc)
        return f"cannot reach {what} at {where}: {detail or type(exc).__name__}"
    return f"the connection to {what} at {where} failed: {exc or type(exc).__name__}"
