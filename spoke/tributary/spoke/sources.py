"""Where DICOM comes from: a local folder in any layout, or a PACS over DICOMweb.

A source lists its inputs cheaply (a directory walk, or QIDO-RS queries) as items with a
stable reference and a fingerprint; the ingest reads (WADO-RS retrieves) only items whose
fingerprint it has not stored yet, so re-running is a no-op and new inputs are picked up
incrementally. Credentials come from the spoke's own configuration, never from the hub.

DICOMweb uses the maintained ``dicomweb-client`` library (QIDO-RS/WADO-RS request and
multipart handling, paging, auth via a requests session) rather than hand-written HTTP."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from tributary.spoke.config import DicomWebSource, FolderSource
from tributary.spoke.store import Excluded

_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"


class SourceUnavailable(RuntimeError):
    """The source could not be listed or read at all (network, permissions); nothing was
    recorded for the inputs it could not reach, so the next ingest tries them again."""


@dataclass(frozen=True)
class SourceItem:
    ref: str  # stable reference inside the source (relative path; study/series/sop UIDs)
    fingerprint: str  # changes when the input may have changed
    path: Path | None = None  # a local file (screened and read by the store's Preparer)
    load: Callable[[], Dataset] | None = None  # a remote instance (WADO-RS retrieve)
    root: Path | None = None  # the folder ``path`` is in: symbolic links stay inside it


class Source(Protocol):
    name: str

    def items(self) -> list[SourceItem]: ...


class Folder:
    """Every regular file under ``path`` (hidden files and folders skipped)."""

    def __init__(self, config: FolderSource, ignore: frozenset[Path] = frozenset()) -> None:
        self.name = config.name
        self.root = config.path
        self.ignore = ignore  # e.g. the attributes file kept beside the images

    def _walk(self) -> Iterator[Path]:
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if not name.startswith(".") and path not in self.ignore:
                    yield path

    def items(self) -> list[SourceItem]:
        if not self.root.is_dir():
            raise SourceUnavailable(f"source {self.name}: folder {self.root} does not exist")
        items = []
        for path in self._walk():
            try:  # a link's target's (a changed target is read again)...
                stat = path.stat()
            except OSError:
                try:  # ...or, dangling, its own: recorded as an exclusion, not skipped
                    stat = path.lstat()
                except OSError:
                    continue  # vanished while walking; seen next time if it comes back
            items.append(SourceItem(
                ref=str(path.relative_to(self.root)),
                fingerprint=f"{stat.st_size}:{stat.st_mtime_ns}",
                path=path, root=self.root))
        return items


def _value(entry: dict, tag: str) -> str | None:
    values = entry.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


class DicomWeb:
    """A DICOMweb service: studies -> series -> instances by QIDO-RS, one WADO-RS retrieve
    per new instance in its stored transfer syntax."""

    def __init__(self, config: DicomWebSource) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.name = config.name
        session = requests.Session()
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else ""
            session.auth = (config.username, password)
        if config.ca_file is not None:
            session.verify = str(config.ca_file)
        self.client = DICOMwebClient(url=config.url.rstrip("/"), session=session,
                                     timeout=config.timeout_seconds)
        self.url = config.url

    def _query(self, what: str, call: Callable[[], list[dict]]) -> list[dict]:
        try:
            return call()
        except Exception as exc:  # requests' errors carry the URL, never the password
            raise SourceUnavailable(f"source {self.name}: QIDO-RS {what} failed: "
                                    f"{type(exc).__name__}: {exc}"[:500]) from exc

    def _retrieve(self, study: str, series: str, sop: str) -> Dataset:
        try:
            return self.client.retrieve_instance(study, series, sop,
                                                 media_types=(("application/dicom", "*"),))
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is None or status >= 500 or status in (401, 403):
                raise SourceUnavailable(f"source {self.name}: WADO-RS retrieve failed: "
                                        f"{type(exc).__name__}: {exc}"[:500]) from exc
            raise Excluded(f"WADO-RS retrieve answered {status}") from exc

    def items(self) -> list[SourceItem]:
        items = []
        client = self.client
        for study in self._query("studies", lambda: client.search_for_studies(
                fields=[_STUDY], get_remaining=True)):
            study_uid = _value(study, _STUDY)
            if not study_uid:
                continue
            for series in self._query("series", lambda s=study_uid: client.search_for_series(
                    study_instance_uid=s, get_remaining=True)):
                series_uid = _value(series, _SERIES)
                if not series_uid:
                    continue
                for instance in self._query(
                        "instances", lambda s=study_uid, r=series_uid:
                        client.search_for_instances(study_instance_uid=s,
                                                    series_instance_uid=r,
                                                    get_remaining=True)):
                    sop_uid = _value(instance, _SOP)
                    if not sop_uid:
                        continue
                    items.append(SourceItem(
                        ref=f"{study_uid}/{series_uid}/{sop_uid}",
                        fingerprint="",  # a stored instance does not change in a PACS
                        load=lambda a=study_uid, b=series_uid, c=sop_uid:
                        self._retrieve(a, b, c)))
        return items


def open_source(config: FolderSource | DicomWebSource,
                ignore: frozenset[Path] = frozenset()) -> Source:
    return Folder(config, ignore) if isinstance(config, FolderSource) else DicomWeb(config)
