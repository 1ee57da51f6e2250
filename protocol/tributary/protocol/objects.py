"""The federation's object store as both sides see it: credentials, client, key names.

Models and updates are too large for broker messages, so federated training moves them
through an S3 object store the hub runs (SeaweedFS; ``tributary.services.objectstore``).
Everything lives in one bucket, named after the federation::

    global/<round>/<name>            written by the hub, read by every spoke
    spokes/<spoke>/<round>/<name>    written by that spoke only, read by the hub

The store enforces this per identity (a spoke can neither read another spoke's objects nor
write global ones); the names below are the one place both sides agree on the layout.
Each party holds a credentials file (:class:`ObjectStoreCredentials`) beside the
federation's CA certificate; the client verifies the store's certificate against that CA
only, never the system's trust store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)

from tributary.protocol.messages import SPOKE_ID_RE

#: boto3's S3 client (its type exists only in boto3's stubs).
S3Client = Any

GLOBAL_PREFIX = "global/"
SPOKES_PREFIX = "spokes/"
HUB_PARTY = "hub"
#: An object's last path segment: no separators, no dot-only names.
_NAME_RE = re.compile(r"^(?!\.+$)[A-Za-z0-9._-]{1,128}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


class ObjectStoreError(RuntimeError):
    """The object store could not be reached, refused us, or a credentials file is bad."""


class ObjectStoreTLSError(ObjectStoreError):
    """The store's certificate is not one the federation CA signed for that address."""


class ObjectStoreRefused(ObjectStoreError):
    """The store refused these credentials for this object (or no longer knows them)."""


class ObjectNotFound(ObjectStoreError):
    """No such object (or bucket)."""


class ObjectStoreCredentials(BaseModel):
    """One party's credentials file (``credentials.json``, mode 0600), handed to that party
    only. ``ca_file`` is relative to the file's folder unless absolute."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(description="https://host:port of the S3 gateway")
    region: str = "us-east-1"
    bucket: str
    party: str = Field(description="'hub' or the spoke's id")
    access_key: str = Field(min_length=8)
    secret_key: SecretStr
    ca_file: str = "ca.crt"

    @field_serializer("secret_key", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        return value.get_secret_value()  # the file exists to carry it; repr() still hides it

    @field_validator("endpoint")
    @classmethod
    def _https_only(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("the object store endpoint must be https://")
        return value.rstrip("/")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_RE.fullmatch(value):
            raise ValueError(f"invalid bucket name {value!r}")
        return value

    @field_validator("party")
    @classmethod
    def _party(cls, value: str) -> str:
        if value != HUB_PARTY and not SPOKE_ID_RE.fullmatch(value):
            raise ValueError(f"party {value!r} is neither 'hub' nor a spoke id")
        return value


def load_credentials(path: Path) -> tuple[ObjectStoreCredentials, Path]:
    """The credentials in ``path`` and the absolute path of their CA file."""
    try:
        creds = ObjectStoreCredentials.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ObjectStoreError(f"no object store credentials at {path}") from None
    except ValidationError as exc:
        raise ObjectStoreError(f"{path} is not an object store credentials file: {exc}") from None
    ca = Path(creds.ca_file)
    ca = ca if ca.is_absolute() else path.parent / ca
    if not ca.is_file():
        raise ObjectStoreError(f"the federation CA file {ca} named by {path} is missing")
    return creds, ca


def _round(round_no: int) -> str:
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not 0 <= round_no < 10**9:
        raise ValueError(f"round must be an integer from 0 to 999999999, not {round_no!r}")
    return f"{round_no:09d}"  # zero-padded: listings sort by round


def _name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"object name {name!r}: 1-128 letters, digits, '.', '_' or '-'")
    return name


def global_model_key(round_no: int, name: str = "model.bin") -> str:
    """Where the hub puts the global model (or any global object) of a round."""
    return f"{GLOBAL_PREFIX}{_round(round_no)}/{_name(name)}"


def spoke_prefix(spoke_id: str) -> str:
    if not SPOKE_ID_RE.fullmatch(spoke_id):
        raise ValueError(f"invalid spoke id {spoke_id!r}")
    return f"{SPOKES_PREFIX}{spoke_id}/"


def round_update_key(spoke_id: str, round_no: int, name: str = "update.bin") -> str:
    """Where a spoke puts its update (or any object) for a round."""
    return f"{spoke_prefix(spoke_id)}{_round(round_no)}/{_name(name)}"


def s3_client(creds: ObjectStoreCredentials, ca_file: Path) -> S3Client:
    """A boto3 S3 client for these credentials that trusts only the federation CA.

    Path-style addressing (the bucket is not a DNS name of the store) and SigV4; few
    retries, so a refusal surfaces quickly instead of being retried for a minute.
    """
    try:  # heavy, and an extra: only code that really talks to the store pays for it
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError("the S3 client is missing: install tributary-protocol[objects]"
                               ) from None

    return boto3.client(
        "s3", endpoint_url=creds.endpoint, region_name=creds.region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key.get_secret_value(),
        verify=str(ca_file),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"max_attempts": 2, "mode": "standard"},
                      connect_timeout=10, read_timeout=60),
    )


class ObjectStore:
    """The store as one party uses it: put and get objects by the federation's key names,
    with errors that say what went wrong (certificate, refusal, missing object)."""

    def __init__(self, creds: ObjectStoreCredentials, ca_file: Path) -> None:
        self.creds = creds
        self.bucket = creds.bucket
        self.client = s3_client(creds, ca_file)
        self._ca_file = ca_file

    @classmethod
    def from_file(cls, path: Path) -> ObjectStore:
        return cls(*load_credentials(path))

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data))

    def get(self, key: str) -> bytes:
        response = self._call("read", key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=key))
        return bytes(response["Body"].read())

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (the whole listing, page after page)."""
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list", prefix, lambda t=token: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, **t))
            keys += [item["Key"] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _call(self, action: str, key: str, fn: Any) -> Any:
        from botocore.exceptions import ClientError, EndpointConnectionError, SSLError

        where = f"{self.creds.endpoint}/{self.bucket}/{key}"
        try:
            return fn()
        except SSLError as exc:
            raise ObjectStoreTLSError(
                f"TLS to the object store {self.creds.endpoint} failed: its certificate is "
                f"not signed by the federation CA in {self._ca_file} ({exc})") from None
        except EndpointConnectionError as exc:
            raise ObjectStoreError(f"cannot reach the object store: {exc}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                raise ObjectStoreRefused(
                    f"the object store refused {self.creds.party!r} to {action} {where} "
                    f"({code})") from None
            if code in {"NoSuchKey", "404", "NoSuchBucket"}:
                raise ObjectNotFound(f"{where} does not exist ({code})") from None
            raise ObjectStoreError(f"{action} {where} failed: {exc}") from None
