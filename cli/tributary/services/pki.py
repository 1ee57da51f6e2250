"""A small private CA for the broker's mutual TLS.

The federation's broker trusts exactly one CA, ours, so a certificate is an identity: the hub
and every spoke get a client certificate whose common name is their identity, and the broker
gets a server certificate for the addresses clients dial. Everything is reused when it exists
and is still valid (so re-running the generator does not invalidate what spokes already hold)
and re-issued only when asked to rotate, when the CA changed, or when it is about to expire.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tributary.services.system import ServiceError, ensure_commands

CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=730)
#: A certificate closer than this to its expiry is re-issued rather than reused.
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path
    #: True when this call created the CA (everything it signed before is void).
    created: bool = False


@dataclass(frozen=True)
class IssuedCertificate:
    cert_path: Path
    key_path: Path
    #: True when this call issued a new certificate instead of reusing one.
    created: bool = False


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with a looser mode
        os.write(fd, data)
    finally:
        os.close(fd)


def new_password() -> str:
    """A random secret that needs no quoting in XML, Spring placeholders or STOMP headers."""
    return secrets.token_urlsafe(24)


def read_or_create_secret(path: Path, rotate: bool = False) -> str:
    if not rotate and path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = new_password()
    write_private(path, value.encode())
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_pair(cert_path: Path,
               key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    if not (cert_path.exists() and key_path.exists()):
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return cert, key


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() > RENEW_BEFORE


def ensure_ca(pki_dir: Path, rotate: bool = False,
              common_name: str = "Tributary broker CA") -> CertificateAuthority:
    """Load the CA from ``pki_dir`` or create it (``ca.crt``, ``ca.key`` with mode 0600)."""
    cert_path, key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    existing = None if rotate else _load_pair(cert_path, key_path)
    if existing is not None and _fresh(existing[0]):
        return CertificateAuthority(existing[0], existing[1], cert_path, key_path)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tributary")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))
    return CertificateAuthority(cert, key, cert_path, key_path, created=True)


def _issued_by(cert: x509.Certificate, ca: CertificateAuthority) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):  # any mismatch means "not ours"
        return False
    return True


def _san_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName))


def _issue(ca: CertificateAuthority, cert_path: Path, key_path: Path, common_name: str,
           usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier], sans: list[str],
           rotate: bool) -> IssuedCertificate:
    existing = None if rotate or ca.created else _load_pair(cert_path, key_path)
    if existing is not None:
        cert = existing[0]
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if (_issued_by(cert, ca) and _fresh(cert) and cn and cn[0].value == common_name
                and _sans(cert) == set(sans)):
            return IssuedCertificate(cert_path, key_path)
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + LEAF_LIFETIME, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_names(sans)),
                                        critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))
    return IssuedCertificate(cert_path, key_path, created=True)


def issue_server_cert(ca: CertificateAuthority, directory: Path, hosts: list[str],
                      rotate: bool = False) -> IssuedCertificate:
    """``server.crt``/``server.key`` for the broker, valid for every name clients dial
    (Python's TLS client checks the IP address or host name against the SAN)."""
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    return _issue(ca, directory / "server.crt", directory / "server.key", hosts[0],
                  ExtendedKeyUsageOID.SERVER_AUTH, hosts, rotate)


def issue_client_cert(ca: CertificateAuthority, directory: Path, identity: str,
                      rotate: bool = False) -> IssuedCertificate:
    """``client.crt``/``client.key`` with CN = ``identity``, for TLS client authentication."""
    return _issue(ca, directory / "client.crt", directory / "client.key", identity,
                  ExtendedKeyUsageOID.CLIENT_AUTH, [], rotate)


def issue_bridge_cert(ca: CertificateAuthority, directory: Path, identity: str,
                      hosts: list[str], rotate: bool = False) -> IssuedCertificate:
    """``server.crt``/``server.key`` for an edge broker: CN = ``identity`` (its bridge
    identity at the hub broker) and both TLS usages, because ActiveMQ presents the one key
    in its key store both to its own clients and to the hub broker it bridges to."""
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    return _issue(ca, directory / "server.crt", directory / "server.key", identity,
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], hosts,
                  rotate)


def write_keystore(path: Path, issued: IssuedCertificate, ca: CertificateAuthority,
                   password: str, alias: str = "broker") -> None:
    """A PKCS12 key store with the broker's key and chain; the JVM reads it as ``PKCS12``."""
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    data = pkcs12.serialize_key_and_certificates(alias.encode(), key, cert, [ca.cert],
                                                 encryption)
    write_private(path, data)


def write_truststore(path: Path, ca: CertificateAuthority, password: str,
                     alias: str = "tributary-ca") -> None:
    """A PKCS12 trust store holding only our CA.

    Built with the JDK's ``keytool`` because the JVM only treats PKCS12 entries as trusted
    certificates when they carry Java's own trust attribute, which other tools do not write.
    The password goes through the environment, never the command line.
    """
    ensure_commands({"keytool": "default-jre-headless"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "TRIBUTARY_STOREPASS": password}
    proc = subprocess.run(
        ["keytool", "-importcert", "-noprompt", "-alias", alias, "-file", str(ca.cert_path),
         "-keystore", str(tmp), "-storetype", "PKCS12", "-storepass:env", "TRIBUTARY_STOREPASS"],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"keytool could not build the trust store: {proc.stderr.strip()}")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
