"""Reading what the spoke hands an algorithm (ALGO_ARG + participant JSON) and writing back.

Everything is validated up front so that a malformed hand-over fails with a message naming
the field, instead of a ``KeyError`` deep inside an algorithm.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .contract import (
    ALGO_ARG_ENV,
    CONTRACT_VERSION,
    DEFAULT_OUTPUT_LIMIT_BYTES,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    PROGRESS_STEPS,
    PSEUDONYM_PATTERN,
    ExitCode,
    exit_label,
)
from .errors import ContextError, InvalidArguments, OutputError, UnsuitableInput

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import FileDataset

#: Outside a container, ALGO_ARG may instead be read from the JSON file this names.
ALGO_ARG_FILE_ENV = "TRIBUTARY_ALGO_ARG_FILE"

_ALGO_ARG_KEYS = ("contract_version", "arguments", "participant", "output")


@dataclass(frozen=True)
class Series:
    """One de-identified series, mounted read-only at ``path``."""

    series_id: str
    modality: str
    path: str
    instance_count: int
    rows: int | None = None
    columns: int | None = None
    body_part: str | None = None

    def files(self) -> list[str]:
        """All regular files of the series (any names, sub-folders included), sorted.

        Hidden files (``.DS_Store`` and the like) are skipped: they are never DICOM.
        """
        found: list[str] = []
        for root, dirs, names in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                full = os.path.join(root, name)
                if not name.startswith(".") and os.path.isfile(full):
                    found.append(full)
        return sorted(found)

    def datasets(
        self, *, stop_before_pixels: bool = False, skip_invalid: bool = True
    ) -> list[FileDataset]:
        """Read every file with pydicom (``pip install tributary-algorithm[dicom]``).

        Files that are not DICOM are skipped when ``skip_invalid`` (a series folder may
        carry stray files); otherwise the first one raises :class:`UnsuitableInput`.
        """
        return list(
            self.iter_datasets(stop_before_pixels=stop_before_pixels, skip_invalid=skip_invalid)
        )

    def iter_datasets(
        self, *, stop_before_pixels: bool = False, skip_invalid: bool = True
    ) -> Iterator[FileDataset]:
        """Like :meth:`datasets` but one at a time, for series too large to hold twice."""
        try:
            import pydicom
            from pydicom.errors import InvalidDicomError
        except ImportError as exc:  # pragma: no cover - depends on the image
            raise ContextError(
                "reading DICOM needs pydicom: install 'tributary-algorithm[dicom]'"
            ) from exc
        for path in self.files():
            try:
                yield pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            except (InvalidDicomError, EOFError) as exc:
                if not skip_invalid:
                    raise UnsuitableInput(f"{path} is not a readable DICOM file: {exc}") from exc


@dataclass
class Context:
    """Everything an algorithm gets from the spoke, plus the one way to answer it."""

    arguments: dict[str, Any]
    case_id: str
    experiment_id: str
    series: tuple[Series, ...]
    contract_version: str = CONTRACT_VERSION
    participant_path: str = PARTICIPANT_PATH
    output_path: str = OUTPUT_PATH
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES
    participant: dict[str, Any] = field(default_factory=dict, repr=False)
    output_written: bool = False

    def series_with_modality(self, modality: str) -> list[Series]:
        """The series of one modality (case-insensitive), in participant order."""
        wanted = modality.upper()
        return [s for s in self.series if s.modality.upper() == wanted]

    def validated_arguments(self, schema: Mapping[str, Any] | str | os.PathLike) -> dict:
        """Check ``arguments`` against a JSON Schema (subset) and fill in its defaults.

        ``schema`` is a mapping or the path of a ``.json`` file; failures raise
        :class:`InvalidArguments`, which ``run`` turns into exit code 2.
        """
        from .schema import validate_arguments

        if not isinstance(schema, Mapping):
            with open(schema, encoding="utf-8") as handle:
                schema = json.load(handle)
        return validate_arguments(self.arguments, schema)

    def write_output(self, data: Mapping[str, Any]) -> str:
        """Write ``output.json`` atomically and return its path.

        A temporary file in the output directory is written, fsync'ed and renamed over the
        target, so a crash or a kill never leaves a half-written answer that the spoke
        could mistake for a result. Numpy scalars/arrays are converted via ``tolist()``.
        """
        payload = encode_output(data, self.output_limit_bytes)
        atomic_write(self.output_path, payload)
        self.output_written = True
        return self.output_path

    def report_progress(self, fraction: float, step: str | None = None) -> None:
        """Tell the spoke (and, through it, the hub) how far this case is; see
        :func:`report_progress`. The file sits next to ``output.json``."""
        report_progress(fraction, step,
                        os.path.join(os.path.dirname(self.output_path), "progress.json"))

    def fail(self, message: str, code: int = ExitCode.ERROR) -> NoReturn:
        """Explain on stderr and exit with ``code`` (e.g. ``ExitCode.UNSUITABLE_INPUT``)."""
        code = int(code)
        print(f"{exit_label(code)}: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        raise SystemExit(code)


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy scalars and arrays
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def report_progress(fraction: float, step: str | None = None,
                    path: str | None = None) -> None:
    """Write the optional progress file: ``{"fraction": 0..1, "message": step}``.

    The spoke polls it while the container runs and forwards changes to the hub, rounded
    to 0.05, at a limited rate and a limited number of times per case (none when the
    site's steward reviews results), so calling this often is cheap and harmless. ``step``
    is one of :data:`PROGRESS_STEPS` (or None): progress leaves the spoke unreviewed, so
    free text is refused here rather than silently dropped by the spoke. The file is
    replaced atomically, so the spoke never reads half of it. Outside a spoke (no output
    directory) it does nothing, so algorithms can call it unconditionally.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"progress fraction must be a number, not {fraction!r}") from exc
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress fraction must be between 0 and 1, not {fraction}")
    if step is not None and str(step) not in PROGRESS_STEPS:
        raise ValueError(f"progress step must be one of {', '.join(PROGRESS_STEPS)} or None, "
                         f"not {step!r}: progress leaves the spoke unreviewed")
    message = None if step is None else str(step)
    if path is None:
        from .contract import PROGRESS_PATH

        path = PROGRESS_PATH
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return
    payload = json.dumps({"fraction": fraction, "message": message}).encode()
    fd, tmp = tempfile.mkstemp(prefix=".progress-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o644)  # the spoke reads it as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def encode_output(data: Any, limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES) -> bytes:
    """Serialise an output object exactly as it will be stored, enforcing the contract.

    Refuses what the spoke would refuse (not an object, over the size limit) and what is
    not strict JSON (NaN/Infinity, unknown types), so the failure happens in the algorithm
    with a clear message rather than as a rejected result at the spoke.
    """
    if not isinstance(data, Mapping):
        raise OutputError(f"output must be a JSON object (a dict), not {type(data).__name__}")
    try:
        text = json.dumps(dict(data), ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise OutputError(f"output is not JSON-serialisable: {exc}") from exc
    payload = text.encode("utf-8")
    if len(payload) > limit_bytes:
        raise OutputError(
            f"output is {len(payload)} bytes; the spoke accepts at most {limit_bytes} bytes"
        )
    return payload


def atomic_write(path: str, payload: bytes) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise OutputError(f"output directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".output-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the spoke reads it as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every filesystem allows fsync on a dir
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read_algo_arg_text(environ: Mapping[str, str]) -> str:
    text = environ.get(ALGO_ARG_ENV)
    if text is not None:
        return text
    file_name = environ.get(ALGO_ARG_FILE_ENV)
    if file_name:
        try:
            with open(file_name, encoding="utf-8") as handle:
                return handle.read()
        except OSError as exc:
            raise ContextError(f"{ALGO_ARG_FILE_ENV}={file_name} cannot be read: {exc}") from exc
    raise ContextError(
        f"{ALGO_ARG_ENV} is not set. A spoke always sets it; to debug outside a container set "
        f"{ALGO_ARG_ENV} (or {ALGO_ARG_FILE_ENV}) to a JSON object whose 'participant' and "
        "'output' point at local files"
    )


def _check_version(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ContextError(f"{where}.contract_version must be a string like '1.0'")
    major = value.split(".", 1)[0]
    if major != CONTRACT_VERSION.split(".", 1)[0]:
        raise ContextError(
            f"{where}.contract_version is {value!r}; this SDK speaks contract "
            f"{CONTRACT_VERSION} (same major version required)"
        )
    return value


def parse_algo_arg(raw: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Validate an ALGO_ARG value (JSON text or mapping) and fill the contract defaults."""
    if isinstance(raw, (str, bytes)):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ContextError(f"{ALGO_ARG_ENV} is not valid JSON: {exc}") from exc
    else:
        value = raw
    if not isinstance(value, Mapping):
        raise ContextError(f"{ALGO_ARG_ENV} must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - set(_ALGO_ARG_KEYS))
    if unknown:  # newer minor versions may add fields: tolerate, but say so
        print(f"warning: {ALGO_ARG_ENV} has unknown fields {unknown}", file=sys.stderr)
    result = {
        "contract_version": _check_version(
            value.get("contract_version", CONTRACT_VERSION), ALGO_ARG_ENV
        ),
        "arguments": value.get("arguments", {}),
        "participant": value.get("participant", PARTICIPANT_PATH),
        "output": value.get("output", OUTPUT_PATH),
    }
    if result["arguments"] is None:
        result["arguments"] = {}
    if not isinstance(result["arguments"], Mapping):
        raise InvalidArguments(
            f"{ALGO_ARG_ENV}.arguments must be a JSON object, "
            f"not {type(result['arguments']).__name__}"
        )
    result["arguments"] = dict(result["arguments"])
    for key in ("participant", "output"):
        if not isinstance(result[key], str) or not result[key]:
            raise ContextError(f"{ALGO_ARG_ENV}.{key} must be a non-empty path string")
    return result


def _optional_count(item: Mapping[str, Any], key: str, where: str) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContextError(f"{where}.{key} must be a non-negative integer or null")
    return value


def parse_participant(value: Any, base_dir: str = "/") -> tuple[str, str, tuple[Series, ...]]:
    """Validate a participant object; return ``(case_id, experiment_id, series)``.

    Relative series paths are resolved against ``base_dir`` (the participant file's folder),
    which makes hand-written participant files for local debugging convenient.
    """
    where = "participant"
    if not isinstance(value, Mapping):
        raise ContextError(f"{where} must be a JSON object, not {type(value).__name__}")
    _check_version(value.get("contract_version", CONTRACT_VERSION), where)
    case_id = value.get("case_id")
    if not isinstance(case_id, str) or not PSEUDONYM_PATTERN.match(case_id):
        raise ContextError(f"{where}.case_id must be a pseudonym like 'c-0123456789abcdef'")
    experiment_id = value.get("experiment_id")
    if not isinstance(experiment_id, str) or not experiment_id:
        raise ContextError(f"{where}.experiment_id must be a non-empty string")
    raw_series = value.get("series")
    if not isinstance(raw_series, list):
        raise ContextError(f"{where}.series must be a list")
    series: list[Series] = []
    for index, item in enumerate(raw_series):
        at = f"{where}.series[{index}]"
        if not isinstance(item, Mapping):
            raise ContextError(f"{at} must be an object")
        series_id = item.get("series_id")
        if not isinstance(series_id, str) or not PSEUDONYM_PATTERN.match(series_id):
            raise ContextError(f"{at}.series_id must be a pseudonym like 's-0123456789abcdef'")
        modality = item.get("modality")
        if not isinstance(modality, str) or not modality:
            raise ContextError(f"{at}.modality must be a non-empty string")
        path = item.get("path")
        if not isinstance(path, str) or not path:
            raise ContextError(f"{at}.path must be a non-empty string")
        count = item.get("instance_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ContextError(f"{at}.instance_count must be a non-negative integer")
        body_part = item.get("body_part")
        if body_part is not None and not isinstance(body_part, str):
            raise ContextError(f"{at}.body_part must be a string or null")
        series.append(
            Series(
                series_id=series_id,
                modality=modality,
                path=os.path.join(base_dir, path),
                instance_count=count,
                rows=_optional_count(item, "rows", at),
                columns=_optional_count(item, "columns", at),
                body_part=body_part,
            )
        )
    return case_id, experiment_id, tuple(series)


def load_context(
    algo_arg: str | bytes | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
) -> Context:
    """Read and validate ALGO_ARG and the participant JSON it points to.

    ``algo_arg`` defaults to the ``ALGO_ARG`` environment variable, or to the file named by
    ``TRIBUTARY_ALGO_ARG_FILE`` when ``ALGO_ARG`` is unset (handy outside a container).
    The participant and output paths are taken from ALGO_ARG, never assumed, so pointing
    them at local files is all local debugging needs.
    """
    if algo_arg is None:
        algo_arg = _read_algo_arg_text(os.environ if environ is None else environ)
    parsed = parse_algo_arg(algo_arg)
    participant_path = parsed["participant"]
    try:
        with open(participant_path, encoding="utf-8") as handle:
            participant = json.load(handle)
    except OSError as exc:
        raise ContextError(f"participant file {participant_path} cannot be read: {exc}") from exc
    except ValueError as exc:
        raise ContextError(f"participant file {participant_path} is not JSON: {exc}") from exc
    base_dir = os.path.dirname(os.path.abspath(participant_path))
    case_id, experiment_id, series = parse_participant(participant, base_dir)
    return Context(
        arguments=parsed["arguments"],
        case_id=case_id,
        experiment_id=experiment_id,
        series=series,
        contract_version=parsed["contract_version"],
        participant_path=participant_path,
        output_path=parsed["output"],
        output_limit_bytes=output_limit_bytes,
        participant=dict(participant),
    )
